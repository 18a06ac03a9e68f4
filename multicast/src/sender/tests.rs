use super::*;
use crate::wire::Frame;

/// A sender of ten 1 MiB blocks (hashes known), session 7, feedback port 9.
fn ten_block_sender(now: Instant, cfg: SenderConfig) -> Sender {
    let layout = Layout::for_file(10 << 20, 1 << 20, 1000).unwrap();
    let object = SenderObject {
        layout,
        hashes: vec![Some([0; 32]); layout.block_count() as usize],
        file_sha256: Some([0; 32]),
        name: "x".into(),
    };
    Sender::new(now, cfg, 7, object, 9)
}

fn sender_with_losses(losses_ppm: &[u32]) -> Sender {
    let now = Instant::now();
    let mut s = ten_block_sender(now, SenderConfig::default());
    for (i, &loss_ppm) in losses_ppm.iter().enumerate() {
        let from: SocketAddr = format!("10.0.0.{}:5000", i + 1).parse().unwrap();
        let report = |feedback| Frame::Feedback {
            receiver: i as u64 + 1,
            feedback,
        };
        s.handle_datagram(now, from, &report(Feedback::Join).encode(7));
        let needs = Feedback::Needs {
            loss_ppm,
            path: Default::default(),
            needs: Vec::new(),
        };
        s.handle_datagram(now, from, &report(needs).encode(7));
    }
    s
}

/// The block of every data symbol of an unpaced first pass, in the
/// order sent, with 4 of `blocks` 1 MiB blocks interleaved at once.
fn first_pass_order(blocks: u64) -> (Layout, Vec<u32>) {
    let now = Instant::now();
    let block_size = Layout::for_file(1, 1 << 20, 1000).unwrap().block_size();
    let layout = Layout::for_file(blocks * u64::from(block_size), 1 << 20, 1000).unwrap();
    assert_eq!(layout.block_count() as u64, blocks);
    let object = SenderObject {
        layout,
        hashes: vec![Some([0; 32]); layout.block_count() as usize],
        file_sha256: Some([0; 32]),
        name: "x".into(),
    };
    let cfg = SenderConfig {
        rate_bps: 0,
        interleave_bytes: 4 * u64::from(block_size),
        startup: Duration::ZERO,
        ..SenderConfig::default()
    };
    let mut s = Sender::new(now, cfg, 7, object, 9);
    let t = usize::from(layout.symbol_size());
    let mut order = Vec::new();
    while s.pass_done_at.is_none() {
        s.handle_timeout(now);
        loop {
            // The encoder answers at once.
            while let Some(job) = s.poll_job() {
                s.handle_batch(EncodedBatch {
                    block: job.block,
                    source: job.with_source.then(|| vec![0; layout.k() as usize * t]),
                    repair_first_esi: job.repair_first_esi,
                    repair: vec![0; job.repair_count as usize * t],
                    more: false,
                    hashes: Vec::new(),
                    file_sha256: None,
                });
            }
            let Some(bytes) = s.poll_transmit(now) else {
                break;
            };
            if let Ok(wire::Datagram {
                frame: Frame::Data(d),
                ..
            }) = wire::decode(bytes)
            {
                order.push(d.block);
            }
        }
    }
    (layout, order)
}

#[test]
fn a_closed_session_sends_only_its_closing_frames_then_finishes() {
    let now = Instant::now();
    let cfg = SenderConfig {
        rate_bps: 0,
        startup: Duration::ZERO,
        ..SenderConfig::default()
    };
    let mut s = ten_block_sender(now, cfg);
    let t = usize::from(s.layout.symbol_size());
    let k = s.layout.k() as usize;
    let mut data = 0;
    let mut after_close = Vec::new();
    // Steps of the pass until 100 data symbols went out (round 0), then
    // one step after close (round 1).
    for round in std::iter::repeat_n(0, 50).chain([1]) {
        if round == 0 && data == 100 {
            continue;
        }
        if round == 1 {
            s.close();
        }
        s.handle_timeout(now);
        while let Some(job) = s.poll_job() {
            s.handle_batch(EncodedBatch {
                block: job.block,
                source: job.with_source.then(|| vec![0; k * t]),
                repair_first_esi: job.repair_first_esi,
                repair: vec![0; job.repair_count as usize * t],
                more: false,
                hashes: Vec::new(),
                file_sha256: None,
            });
        }
        while let Some(bytes) = s.poll_transmit(now) {
            // D: data, C: closing END-OF-PASS, o: any other frame.
            let kind = match wire::decode(bytes).unwrap().frame {
                Frame::Data(_) => 'D',
                Frame::EndOfPass { closing: true, .. } => 'C',
                _ => 'o',
            };
            if round == 0 {
                data += usize::from(kind == 'D');
                if data == 100 {
                    break;
                }
            } else {
                after_close.push(kind);
            }
        }
    }
    assert_eq!(data, 100, "the pass had started");
    // Control frames already queued may go first; no data does.
    assert!(!after_close.contains(&'D'), "{after_close:?}");
    assert_eq!(after_close.iter().filter(|&&k| k == 'C').count(), 3);
    assert!(s.is_finished());
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e == SenderEvent::Finished));
}

#[test]
fn blocks_join_the_window_in_turn_and_finish_one_after_another() {
    let (layout, order) = first_pass_order(8);
    let count = |b: u32| order.iter().filter(|&&x| x == b).count();
    let per_block = count(0);
    // Every block sends as many, but for the last two: with no loss
    // reported, their headroom is the decode margin.
    for b in 1..8u32 {
        let extra = if b >= 8 - TAIL_BLOCKS {
            layout.decode_margin() as usize
        } else {
            0
        };
        assert_eq!(count(b), per_block + extra, "block {b}");
    }
    assert!(per_block as u32 > layout.k());
    let first = |b: u32| order.iter().position(|&x| x == b).unwrap();
    let last = |b: u32| order.iter().rposition(|&x| x == b).unwrap();
    for b in 1..8u32 {
        // A block joins once the one before has sent a quarter of its
        // first pass, not before. The last one joins then too, but once
        // it has, only the two oldest blocks take turns: it sends after
        // the block two before it has finished.
        let before = order[..first(b)].iter().filter(|&&x| x == b - 1).count();
        if b == 7 {
            assert!(
                first(b) > last(b - 2),
                "block 7 sent before block 5 was done"
            );
        } else {
            assert!(
                (per_block.div_ceil(4)..=per_block.div_ceil(4) + 1).contains(&before),
                "block {b} joined after {before} of {per_block} symbols of block {}",
                b - 1
            );
        }
        // Blocks finish in order, a quarter of a block's symbols per
        // block in the window apart, not all at once; the last two half
        // a block apart, as only two take turns at the end.
        assert!(last(b) > last(b - 1));
        if b == 7 {
            assert!(
                last(b) - last(b - 1) >= per_block / 2,
                "the last two blocks finished {} symbols apart",
                last(b) - last(b - 1)
            );
        }
        assert!(
            last(b) - last(b - 1) >= per_block / 4,
            "blocks {} and {b} finished {} symbols apart",
            b - 1,
            last(b) - last(b - 1)
        );
    }
    // Never more than four blocks in flight.
    for (i, _) in order.iter().enumerate() {
        let open = (0..8u32).filter(|&b| first(b) <= i && last(b) >= i).count();
        assert!(open <= 4, "{open} blocks in flight at symbol {i}");
    }
}

#[test]
fn source_symbols_go_out_while_the_repair_symbols_are_encoded() {
    let now = Instant::now();
    let layout = Layout::for_file(100_000, 1 << 20, 1000).unwrap();
    let object = SenderObject {
        layout,
        hashes: vec![Some([0; 32])],
        file_sha256: Some([0; 32]),
        name: "x".into(),
    };
    let cfg = SenderConfig {
        rate_bps: 0,
        startup: Duration::ZERO,
        ..SenderConfig::default()
    };
    let mut s = Sender::new(now, cfg, 7, object, 9);
    s.handle_timeout(now);
    let job = s.poll_job().expect("the block is opened at once");
    assert!(job.with_source && job.repair_count > 0);
    let t = usize::from(layout.symbol_size());
    let sent_esis = |s: &mut Sender| {
        let mut esis = Vec::new();
        s.handle_timeout(now);
        while let Some(bytes) = s.poll_transmit(now) {
            if let Ok(wire::Datagram {
                frame: Frame::Data(d),
                ..
            }) = wire::decode(bytes)
            {
                esis.push(d.esi);
            }
        }
        esis
    };
    s.handle_batch(EncodedBatch {
        block: 0,
        source: Some(vec![1; layout.k() as usize * t]),
        repair_first_esi: job.repair_first_esi,
        repair: Vec::new(),
        more: true,
        hashes: Vec::new(),
        file_sha256: None,
    });
    // The file's 100 symbols; the padding up to K is never sent.
    let data = layout.data_symbols(0);
    assert_eq!(data, 100);
    assert_eq!(sent_esis(&mut s), (0..data).collect::<Vec<_>>());
    // Out of symbols, but the repair is owed: the pass is not over.
    assert!(s.pass_done_at.is_none());
    assert!(!std::iter::from_fn(|| s.poll_event()).any(|e| e == SenderEvent::PassDone { pass: 1 }));
    s.handle_batch(EncodedBatch {
        block: 0,
        source: None,
        repair_first_esi: job.repair_first_esi,
        repair: vec![2; job.repair_count as usize * t],
        more: false,
        hashes: Vec::new(),
        file_sha256: None,
    });
    let repair: Vec<u32> =
        (job.repair_first_esi..job.repair_first_esi + job.repair_count).collect();
    assert_eq!(sent_esis(&mut s), repair);
    s.handle_timeout(now);
    assert!(s.pass_done_at.is_some());
    assert!(std::iter::from_fn(|| s.poll_event()).any(|e| e == SenderEvent::PassDone { pass: 1 }));
}

#[test]
fn the_last_blocks_of_the_pass_carry_two_deviations_and_the_fast_margin_more() {
    // 5% loss on 1049-symbol blocks: sd = 7.06 symbols, so 15 + 2.
    let s = sender_with_losses(&[50_000; 8]);
    let data = s.layout.data_symbols(0);
    assert_eq!(data, 1049);
    assert_eq!(s.tail_headroom(data), 15 + s.layout.decode_margin());
    // Without reports, the margin alone.
    let quiet = sender_with_losses(&[]);
    assert_eq!(quiet.tail_headroom(data), quiet.layout.decode_margin());
}

#[test]
fn the_first_pass_is_sized_for_the_upper_quartile_of_reported_loss() {
    // Seven receivers at 6% and one at 30%: sized for 6%, so the one
    // that loses more is topped up from its NEEDS instead of every block
    // carrying 43% repair for all.
    let mut losses = vec![60_000; 7];
    losses.push(300_000);
    let repair = sender_with_losses(&losses).first_pass_repair(1000);
    assert_eq!(repair, (0.06 / 0.94 * 1020.0 + 3.0f64).ceil() as u32);
    // Three or fewer: the largest.
    let repair = sender_with_losses(&[60_000, 300_000]).first_pass_repair(1000);
    assert_eq!(repair, (0.3 / 0.7 * 1020.0 + 3.0f64).ceil() as u32);
    // Nothing reported yet: the configured floor (5%).
    assert_eq!(sender_with_losses(&[]).first_pass_repair(1000), 50);
}

#[test]
fn session_beacons_come_quickly_at_first_then_every_20_ms() {
    let start = Instant::now();
    let cfg = SenderConfig {
        min_receivers: 1,
        ..SenderConfig::default()
    };
    let mut s = ten_block_sender(start, cfg);
    let mut sessions = Vec::new();
    // Up to just before the first regular announcement (100 ms).
    for ms in 0..95u64 {
        let now = start + Duration::from_millis(ms);
        s.handle_timeout(now);
        while let Some(bytes) = s.poll_transmit(now) {
            if let Ok(wire::Datagram {
                frame: Frame::Session(_),
                ..
            }) = wire::decode(bytes)
            {
                sessions.push(ms);
            }
        }
    }
    let gaps: Vec<u64> = sessions.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(sessions[0], 0, "the first SESSION goes at once");
    assert_eq!(
        gaps,
        [2, 4, 8, 16, 20, 20, 20],
        "SESSION at {sessions:?} ms"
    );
}

/// JOIN_ACKs queued by the sender, by receiver id, in order.
fn join_acks(s: &mut Sender, now: Instant) -> Vec<u64> {
    let mut acks = Vec::new();
    while let Some(bytes) = s.poll_transmit(now) {
        if let Ok(wire::Datagram {
            frame: Frame::JoinAck { receiver },
            session: 7,
        }) = wire::decode(bytes)
        {
            acks.push(receiver);
        }
    }
    acks
}

#[test]
fn every_join_is_acknowledged_at_most_every_100_ms_per_receiver() {
    let t0 = Instant::now();
    let mut s = ten_block_sender(t0, SenderConfig::default());
    let from: SocketAddr = "10.0.0.2:5000".parse().unwrap();
    let join = |receiver| {
        Frame::Feedback {
            receiver,
            feedback: Feedback::Join,
        }
        .encode(7)
    };
    s.handle_datagram(t0, from, &join(1));
    s.handle_datagram(t0, from, &join(2));
    // Repeated at once: one acknowledgement each.
    s.handle_datagram(t0, from, &join(1));
    assert_eq!(join_acks(&mut s, t0), [1, 2]);
    // Another session's JOIN is not acknowledged.
    let other = Frame::Feedback {
        receiver: 3,
        feedback: Feedback::Join,
    }
    .encode(8);
    s.handle_datagram(t0, from, &other);
    let t1 = t0 + Duration::from_millis(100);
    s.handle_datagram(t1, from, &join(1));
    assert_eq!(join_acks(&mut s, t1), [1]);
}

#[test]
fn made_up_receivers_do_not_grow_the_table_past_its_bound() {
    let t0 = Instant::now();
    let mut s = ten_block_sender(t0, SenderConfig::default());
    let from: SocketAddr = "10.0.0.2:5000".parse().unwrap();
    for receiver in 0..(MAX_RECEIVERS as u64 + 500) {
        let join = Frame::Feedback {
            receiver,
            feedback: Feedback::Join,
        };
        s.handle_datagram(t0, from, &join.encode(7));
    }
    assert_eq!(s.peers.len(), MAX_RECEIVERS);
    assert_eq!(s.stats().dropped_datagrams, 500);
    // Once they have gone silent, a newcomer takes a place.
    let later = t0 + s.cfg.receiver_timeout + Duration::from_secs(1);
    s.check_silent_peers(later);
    let join = Frame::Feedback {
        receiver: u64::MAX,
        feedback: Feedback::Join,
    };
    s.handle_datagram(later, from, &join.encode(7));
    assert_eq!(s.peers.len(), MAX_RECEIVERS);
    assert!(s.peers.contains_key(&u64::MAX));
}
