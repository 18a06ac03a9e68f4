//! Peer repair over a simulated subnet: a receiver that lost part of a
//! multicast pass completes from peers: the right bytes, repair traffic
//! close to what it lacked, a corrupting peer detected and bypassed.

use multicast::codec::{Collector, Layout, Plan, sha256};
use multicast::wire::Digest;
use repair::fetch::Rejected;
use repair::{BlockFetch, Chooser, FetchStep, Frame, Serving, Want};

use multicast::rng::SplitMix64 as Rng;

struct Peer {
    holds: Vec<bool>,
    /// Flips a bit in every payload it serves.
    corrupt: bool,
    served_bytes: u64,
}

struct World {
    layout: Layout,
    plan: Plan,
    file: Vec<u8>,
    hashes: Vec<Digest>,
    peers: Vec<Peer>,
}

impl World {
    fn new(size: usize, block: u32, seed: u64) -> Self {
        let layout = Layout::for_file(size as u64, block, 1000).unwrap();
        let mut rng = Rng(seed);
        let file: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
        let hashes = (0..layout.block_count())
            .map(|b| {
                let o = layout.offset(b) as usize;
                sha256(&file[o..o + layout.block_len(b)])
            })
            .collect();
        World {
            plan: Plan::new(layout),
            layout,
            file,
            hashes,
            peers: Vec::new(),
        }
    }

    fn block(&self, b: u32) -> &[u8] {
        let o = self.layout.offset(b) as usize;
        &self.file[o..o + self.layout.block_len(b)]
    }

    /// What a multicast pass with `loss` left a receiver: per block a
    /// collector of the K + 5% symbols that arrived (source, then repair).
    fn multicast_pass(&self, loss: f64, rng: &mut Rng) -> Vec<Collector> {
        let k = self.layout.k();
        (0..self.layout.block_count())
            .map(|b| {
                let padded = multicast::codec::pad_block(&self.layout, b, self.block(b));
                let enc = self.plan.encoder(&padded);
                let mut c = Collector::for_block(&self.layout, b);
                let t = usize::from(self.layout.symbol_size());
                for esi in 0..self.layout.data_symbols(b) {
                    if rng.unit() >= loss {
                        c.insert(esi, &padded[esi as usize * t..(esi as usize + 1) * t])
                            .unwrap();
                    }
                }
                let extra = k / 20;
                let repair = enc.repair(k, extra);
                for (i, sym) in repair.chunks_exact(t).enumerate() {
                    if rng.unit() >= loss {
                        c.insert(k + i as u32, sym).unwrap();
                    }
                }
                c
            })
            .collect()
    }

    /// Runs one block fetch against peer `p` over a reliable stream.
    fn fetch(
        &mut self,
        p: usize,
        mut f: BlockFetch,
        salt: u32,
    ) -> (Result<Vec<u8>, String>, BlockFetch) {
        let b = f.block();
        if !self.peers[p].holds[b as usize] {
            return (Err("not held".into()), f);
        }
        let Frame::Need {
            held,
            need,
            highest_esi,
            ..
        } = f.request([0; 32])
        else {
            unreachable!("a request is a Need")
        };
        let data = self.block(b).to_vec();
        let want = Want {
            block: b,
            held,
            need,
            highest_esi,
        };
        let mut serving = Serving::new(&self.layout, Some(&self.plan), want, data, salt);
        loop {
            let Some(mut frame) = serving.next_frame() else {
                // The planned symbols did not suffice: ask for a few more.
                serving.extend(4);
                continue;
            };
            if self.peers[p].corrupt
                && let Frame::Symbols { payload, .. } = &mut frame
            {
                payload[7] ^= 0x40;
            }
            if let Frame::Symbols { payload, .. } = &frame {
                self.peers[p].served_bytes += payload.len() as u64;
            }
            match f.handle(frame) {
                FetchStep::More => {}
                FetchStep::Decode => match f.decode() {
                    Ok(block) => return (Ok(block), f),
                    Err(Rejected::NeedMore) => {}
                    Err(Rejected::Corrupt) => return (Err("corrupt".into()), f),
                },
                FetchStep::Elsewhere | FetchStep::Busy => return (Err("declined".into()), f),
                FetchStep::Misbehaved(why) => return (Err(why.to_string()), f),
            }
        }
    }
}

/// Repairs every block the receiver lacks from the peers; returns the
/// assembled file and the repair bytes received.
fn repair_all(
    w: &mut World,
    have: Vec<Option<Box<Collector>>>,
    decoded: &[bool],
) -> (Vec<u8>, u64, Chooser<usize>) {
    let mut out = w.file.clone();
    let mut chooser = Chooser::new(2);
    let mut bytes = 0;
    for b in 0..w.layout.block_count() {
        if decoded[b as usize] {
            continue;
        }
        let o = w.layout.offset(b) as usize;
        out[o..o + w.layout.block_len(b)].fill(0);
        let holders: Vec<usize> = (0..w.peers.len())
            .filter(|&p| w.peers[p].holds[b as usize])
            .collect();
        let mut collector = have[b as usize]
            .as_ref()
            .map(|c| Box::new(clone_collector(c, &w.layout, b)));
        let mut got = None;
        while let Some(p) = chooser.pick(&holders) {
            let f = BlockFetch::new(w.layout, b, w.hashes[b as usize], collector.take());
            let (result, f) = w.fetch(p, f, 1000 + p as u32 * 7919);
            bytes += f.bytes;
            match result {
                Ok(data) => {
                    chooser.succeeded(p, f.bytes);
                    got = Some(data);
                    break;
                }
                Err(_) => chooser.failed(p),
            }
        }
        let data = got.expect("some honest peer holds every block");
        out[o..o + data.len()].copy_from_slice(&data);
    }
    (out, bytes, chooser)
}

fn clone_collector(c: &Collector, _l: &Layout, _b: u32) -> Collector {
    c.clone()
}

#[test]
fn a_late_joiner_with_nothing_gets_whole_blocks_from_peers() {
    let mut w = World::new(300_000, 50_000, 1);
    let n = w.layout.block_count() as usize;
    w.peers.push(Peer {
        holds: vec![true; n],
        corrupt: false,
        served_bytes: 0,
    });
    w.peers.push(Peer {
        holds: (0..n).map(|b| b % 2 == 0).collect(),
        corrupt: false,
        served_bytes: 0,
    });
    // It joined after half the pass: the first half is missing entirely.
    let decoded: Vec<bool> = (0..n).map(|b| b >= n / 2).collect();
    let (file, bytes, _) = repair_all(&mut w, (0..n).map(|_| None).collect(), &decoded);
    assert_eq!(file, w.file);
    let lacked: usize = (0..n / 2).map(|b| w.layout.block_len(b as u32)).sum();
    // Whole blocks as source symbols: the last symbol of a block may carry
    // padding, nothing else is extra.
    assert!(bytes as f64 <= lacked as f64 * 1.02, "{bytes} for {lacked}");
    // Both peers served: load was spread.
    assert!(w.peers.iter().all(|p| p.served_bytes > 0));
}

#[test]
fn receivers_at_20_percent_loss_complete_with_repair_near_what_they_lacked() {
    let mut w = World::new(4_000_000, 1_000_000, 2);
    let n = w.layout.block_count() as usize;
    for _ in 0..3 {
        w.peers.push(Peer {
            holds: vec![true; n],
            corrupt: false,
            served_bytes: 0,
        });
    }
    let mut rng = Rng(99);
    let collectors = w.multicast_pass(0.20, &mut rng);
    let t = u64::from(w.layout.symbol_size());
    let k = u64::from(w.layout.k());
    let mut lacked = 0u64;
    let mut have = Vec::new();
    for (b, c) in collectors.into_iter().enumerate() {
        let padding = k - u64::from(w.layout.data_symbols(b as u32));
        let held = u64::from(c.held()) - padding;
        lacked += (k - padding).saturating_sub(held) * t;
        have.push(Some(Box::new(c)));
    }
    let decoded = vec![false; n];
    let (file, bytes, _) = repair_all(&mut w, have, &decoded);
    assert_eq!(file, w.file);
    assert!(lacked > 0);
    let ratio = bytes as f64 / lacked as f64;
    eprintln!("repair {bytes} bytes for {lacked} lacked ({ratio:.3}x)");
    assert!(
        ratio <= 1.15,
        "repair {bytes} bytes for {lacked} lacked ({ratio:.3}x)"
    );
}

#[test]
fn a_peer_serving_corrupted_symbols_is_detected_and_bypassed() {
    let mut w = World::new(400_000, 50_000, 3);
    let n = w.layout.block_count() as usize;
    // The corrupt peer sorts first, so it is asked first.
    w.peers.push(Peer {
        holds: vec![true; n],
        corrupt: true,
        served_bytes: 0,
    });
    w.peers.push(Peer {
        holds: vec![true; n],
        corrupt: false,
        served_bytes: 0,
    });
    let decoded = vec![false; n];
    let (file, _, chooser) = repair_all(&mut w, (0..n).map(|_| None).collect(), &decoded);
    assert_eq!(file, w.file, "a wrong byte reached the file");
    assert!(chooser.is_dropped(&0), "the corrupt peer was not dropped");
    assert!(!chooser.is_dropped(&1));
}
