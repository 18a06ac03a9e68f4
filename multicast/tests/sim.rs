//! Sender and receivers over a simulated subnet with a virtual clock and
//! seeded loss: the protocol logic without sockets, deterministically.

mod common;

use std::time::Duration;

use common::*;
use multicast::codec::sha256;
use multicast::sender::SenderConfig;
use multicast::wire::{self, Frame};

fn cfg() -> SenderConfig {
    SenderConfig {
        rate_bps: 100_000_000,
        ..SenderConfig::default()
    }
}

fn deliver_at_loss(loss: f64, seed: u64) -> Sim {
    let data = file_bytes(3 * 100_000 + 123, seed);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), seed);
    for _ in 0..4 {
        sim.add_receiver(loss, Duration::ZERO, 48 << 20);
    }
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    sim
}

#[test]
fn every_receiver_gets_the_file_without_loss() {
    let sim = deliver_at_loss(0.0, 1);
    // 5% overhead plus headers and announcements.
    assert!(
        sim.wire_ratio() < 1.15,
        "ratio {} {:?}",
        sim.wire_ratio(),
        sim.sender.stats()
    );
    assert_eq!(sim.sender.stats().receivers_done, 4);
}

/// Three seeds at `loss`; the sender may put at most `max_ratio` times the
/// file on the wire (UDP payload).
fn deliver_at_loss_within(loss: f64, max_ratio: f64) {
    for seed in 1..4 {
        let sim = deliver_at_loss(loss, seed);
        let ratio = sim.wire_ratio();
        assert!(ratio < max_ratio, "loss {loss}, seed {seed}: ratio {ratio}");
    }
}

#[test]
fn every_receiver_gets_the_file_at_5_percent_loss() {
    deliver_at_loss_within(0.05, 1.2);
}

#[test]
fn every_receiver_gets_the_file_at_20_percent_loss() {
    // Fountain repair: one fresh symbol serves every receiver, so the total
    // stays near what the lossiest receiver needs.
    deliver_at_loss_within(0.20, 1.5);
}

#[test]
fn large_blocks_decode_fast_when_symbols_allow_and_settle_for_k_plus_2_otherwise() {
    // K = 2000: blocks this large are decoded from K+20 symbols (raptorq's
    // GF(2)-only solve), and the sender's first pass provides for them.
    let data = file_bytes(11 * 200_000 + 77, 5);
    let mut sim = Sim::new(data, 200_000, 100, cfg(), 5);
    let layout = multicast::Layout::for_file(1, 200_000, 100).unwrap();
    assert_eq!(layout.decode_margin(), multicast::codec::FAST_DECODE_MARGIN);
    for _ in 0..4 {
        sim.add_receiver(0.05, Duration::ZERO, 48 << 20);
    }
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    let stats = sim.sender.stats();
    // Payload ratio (headers of 100-byte symbols weigh more than at 1400).
    let symbols = (stats.source_symbols + stats.repair_symbols) as f64;
    let ratio = symbols / stats.source_symbols as f64;
    assert!(
        ratio < 1.09,
        "symbols sent per source symbol {ratio}: {stats:?}"
    );
}

#[test]
fn blocks_short_of_the_fast_margin_settle_and_decode_from_k_plus_2() {
    // No fixed overhead: the first pass provides for K+2 at the loss the
    // receivers report, so most blocks end between K+2 and K+20 symbols.
    // They must decode once they settle, without asking for the margin.
    let data = file_bytes(7 * 200_000 + 77, 6);
    let cfg = SenderConfig {
        overhead_pct: 0,
        ..cfg()
    };
    let mut sim = Sim::new(data, 200_000, 100, cfg, 6);
    for _ in 0..3 {
        sim.add_receiver(0.03, Duration::ZERO, 48 << 20);
    }
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    let settled: u32 = sim
        .receivers
        .iter()
        .map(|r| r.rx.stats().settled_decodes)
        .sum();
    let done: u32 = sim.receivers.iter().map(|r| r.rx.stats().blocks_done).sum();
    assert_eq!(done, 3 * 8);
    assert!(settled >= done / 2, "{settled} of {done} blocks settled");
    let stats = sim.sender.stats();
    let ratio = (stats.source_symbols + stats.repair_symbols) as f64 / stats.source_symbols as f64;
    assert!(
        ratio < 1.06,
        "symbols sent per source symbol {ratio}: {stats:?}"
    );
}

#[test]
fn empty_and_one_byte_files_arrive() {
    for len in [0usize, 1] {
        let mut sim = Sim::new(file_bytes(len, 3), 100_000, 500, cfg(), 3);
        sim.add_receiver(0.0, Duration::ZERO, 48 << 20);
        sim.add_receiver(0.2, Duration::ZERO, 48 << 20);
        sim.run(Duration::from_secs(30));
        sim.assert_all_verified();
    }
}

#[test]
fn late_joiner_completes_after_the_pass() {
    let data = file_bytes(2_000_000, 4);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 4);
    sim.add_receiver(0.0, Duration::ZERO, 48 << 20);
    // Data starts after 300 ms of announcements and 2 MB at 100 Mbit/s
    // takes about 0.17 s: join about halfway through the pass.
    let late = sim.add_receiver(0.0, Duration::from_millis(300 + 80), 48 << 20);
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    assert!(sim.receivers[late].rx.stats().repair_symbols > 0);
}

#[test]
fn receiver_memory_stays_within_its_buffer_cap() {
    let data = file_bytes(3_000_000, 5);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 5);
    // Room for four blocks of 100 kB, with 30% loss.
    let r = sim.add_receiver(0.3, Duration::ZERO, 4 * 100_100);
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    assert!(
        sim.receivers[r].max_buffered <= 4,
        "{}",
        sim.receivers[r].max_buffered
    );
}

#[test]
fn blocks_waiting_for_a_slow_decoder_count_against_the_buffer_cap() {
    let data = file_bytes(3_000_000, 8);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 8);
    let r = sim.add_receiver(0.05, Duration::ZERO, 4 * 100_100);
    // Each decode takes 20 ms while a block arrives every 8 ms or so.
    sim.receivers[r].decode_delay = Duration::from_millis(20);
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    assert!(
        sim.receivers[r].max_buffered <= 4,
        "{}",
        sim.receivers[r].max_buffered
    );
    assert!(sim.receivers[r].rx.stats().dropped_no_buffer > 0);
}

#[test]
fn hostile_datagrams_do_not_stop_or_corrupt_the_transfer() {
    let data = file_bytes(1_000_000, 6);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 6);
    let r = sim.add_receiver(0.05, Duration::ZERO, 48 << 20);
    let mut forged = 0u32;
    sim.tamper = Box::new(move |rng, bytes| {
        let mut extra = Vec::new();
        match rng.next_u64() % 20 {
            // Garbage.
            0 => extra.push(
                (0..rng.next_u64() % 1500)
                    .map(|_| rng.next_u64() as u8)
                    .collect(),
            ),
            // Truncated.
            1 => extra.push(bytes[..bytes.len() / 2].to_vec()),
            // A bit flipped.
            2 => {
                let mut b = bytes.to_vec();
                let bit = rng.next_u64() as usize % (b.len() * 8);
                b[bit / 8] ^= 1 << (bit % 8);
                extra.push(b);
            }
            // Replayed.
            3 => extra.push(bytes.to_vec()),
            // A forged symbol with a valid CRC: only the block hash catches it.
            4 if forged < 3 => {
                if let Ok(d) = wire::decode(bytes)
                    && let Frame::Data(data) = d.frame
                {
                    forged += 1;
                    let junk = vec![0xA5; data.payload.len()];
                    // A fresh repair ESI the sender has not used yet.
                    extra.push(
                        Frame::Data(wire::Data {
                            block: data.block,
                            esi: 1_000_000 + forged,
                            sent_us: 0,
                            payload: &junk,
                        })
                        .encode(d.session),
                    );
                }
            }
            _ => {}
        }
        extra
    });
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    let stats = sim.receivers[r].rx.stats();
    assert!(stats.malformed > 0, "{stats:?}");
    assert!(stats.redundant_symbols > 0, "{stats:?}");
}

#[test]
fn a_receiver_of_another_session_is_not_confused() {
    let data = file_bytes(500_000, 7);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 7);
    let r = sim.add_receiver(0.0, Duration::ZERO, 48 << 20);
    let other = Frame::Data(wire::Data {
        block: 0,
        esi: 0,
        sent_us: 0,
        payload: &[1; 500],
    })
    .encode(0xBAD);
    sim.tamper = Box::new(move |_, _| vec![other.clone()]);
    sim.run(Duration::from_secs(30));
    sim.assert_all_verified();
    assert!(sim.receivers[r].rx.stats().other_session > 0);
}

#[test]
fn a_sender_that_hashes_as_it_sends_starts_at_once_and_tells_the_hash_in_time() {
    use std::cell::RefCell;
    use std::rc::Rc;
    for (len, loss) in [(1usize, 0.0), (2_000_077, 0.05), (2_000_077, 0.2)] {
        let data = file_bytes(len, 8);
        let want = sha256(&data);
        let mut sim = Sim::with_hashes(data, 100_000, 500, cfg(), 8, false);
        // What went out: data symbols before any SESSION named the file's
        // hash, and the hash every SESSION named.
        let seen = Rc::new(RefCell::new((0u64, Vec::new())));
        let log = Rc::clone(&seen);
        sim.tamper = Box::new(move |_, bytes| {
            let mut log = log.borrow_mut();
            match wire::decode(bytes).map(|d| d.frame) {
                Ok(Frame::Session(info)) => log.1.push(info.file_sha256),
                Ok(Frame::Data(_)) if !log.1.iter().any(Option::is_some) => log.0 += 1,
                _ => {}
            }
            Vec::new()
        });
        for _ in 0..3 {
            sim.add_receiver(loss, Duration::ZERO, 48 << 20);
        }
        if len > 1 {
            // And one that joins late in the pass (as in the late-joiner
            // test above), when most of the file is hashed.
            sim.add_receiver(loss, Duration::from_millis(300 + 80), 48 << 20);
        }
        sim.run(Duration::from_secs(60));
        sim.assert_all_verified();
        let (early_symbols, announced) = &*seen.borrow();
        assert_eq!(
            announced.first(),
            Some(&None),
            "{len} bytes: announced before hashing"
        );
        // A file of one block is hashed whole by its first read, before
        // its first symbol goes out.
        assert_eq!(
            *early_symbols > 0,
            len > 1,
            "{len} bytes: data before the hash"
        );
        assert!(announced.contains(&Some(want)), "{len} bytes");
        assert!(
            announced.iter().all(|h| h.is_none() || *h == Some(want)),
            "{len} bytes: a wrong hash was announced"
        );
    }
}

#[test]
fn a_receiver_that_lost_the_last_block_and_the_end_of_pass_still_asks_for_it() {
    // Every symbol of the last block's first pass and the first END-OF-PASS
    // are lost. Nothing tells the receiver the pass is over but a repeated
    // END-OF-PASS, and until it hears one it has nothing to ask for.
    let data = file_bytes(1_000_000 + 5, 9);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 9);
    let r = sim.add_receiver(0.0, Duration::ZERO, 48 << 20);
    let last = multicast::Layout::for_file(1_000_005, 100_000, 500)
        .unwrap()
        .block_count()
        - 1;
    let mut dropped_eop = false;
    sim.receivers[r].drop = Some(Box::new(move |bytes| {
        match wire::decode(bytes).map(|d| d.frame) {
            Ok(Frame::Data(d)) => d.block == last && !dropped_eop,
            Ok(Frame::EndOfPass { .. }) if !dropped_eop => {
                dropped_eop = true;
                true
            }
            _ => false,
        }
    }));
    sim.run(Duration::from_secs(60));
    sim.assert_all_verified();
    assert_eq!(sim.sender.stats().receivers_lost, 0);
}

#[test]
fn a_replayed_session_that_closes_does_not_capture_a_receiver() {
    // Datagrams of an earlier transfer, replayed from the sender's own
    // address around every real one: its SESSION, its data and its closing
    // end of pass. The receiver hears the stale SESSION first (it misses
    // the real one's first announcements) and must still take the real file.
    let data = file_bytes(400_000, 8);
    let mut sim = Sim::new(data, 100_000, 500, cfg(), 8);
    let r = sim.add_receiver(0.0, Duration::ZERO, 48 << 20);
    let stale = wire::SessionInfo {
        file_size: 300_000,
        block_size: 100_000,
        symbol_size: 500,
        block_count: 3,
        file_sha256: Some([7; 32]),
        feedback_port: 5000,
        feedback_interval_ms: 40,
        name: "old.bin".into(),
        paused: false,
    };
    let replay = vec![
        Frame::Session(stale).encode(0x01D),
        Frame::Data(wire::Data {
            block: 0,
            esi: 0,
            sent_us: 0,
            payload: &[3; 500],
        })
        .encode(0x01D),
        Frame::EndOfPass {
            pass: 1,
            closing: true,
        }
        .encode(0x01D),
    ];
    sim.tamper = Box::new(move |_, _| replay.clone());
    let mut real_sessions = 0;
    sim.receivers[r].drop = Some(Box::new(move |bytes| {
        let d = wire::decode(bytes).unwrap();
        let first_real = d.session != 0x01D && matches!(d.frame, Frame::Session(_));
        real_sessions += u32::from(first_real);
        first_real && real_sessions <= 3
    }));
    sim.run(Duration::from_secs(30));
    sim.assert_all_verified();
    let stats = sim.receivers[r].rx.stats();
    assert_eq!(stats.unanswered_sessions, 2, "{stats:?}");
    assert!(stats.other_session > 0, "{stats:?}");
}
