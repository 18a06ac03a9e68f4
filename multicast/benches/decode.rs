//! Block decode time against the symbols a receiver holds when it decodes:
//! `cargo bench -p somcast-multicast --bench decode`.
//!
//! For 1, 2 and 4 MiB blocks at 5% and 20% source loss, decodes from the
//! surviving source symbols plus repair symbols up to K+2 (the least raptorq
//! can use, which makes it solve with the GF(256) HDPC rows) and up to
//! K+FAST_DECODE_MARGIN (what the receiver collects, which lets raptorq try a
//! GF(2)-only solve first). Prints milliseconds per block, the mean of
//! several decodes with different losses, side by side in one run; then,
//! for 4 MiB at 5% loss, the time against the margin, K+12 to K+60.

use std::time::Instant;

use multicast::Layout;
use multicast::codec::{Collector, FAST_DECODE_MARGIN, MIN_DECODE_MARGIN, Plan};

const ROUNDS: u64 = 10;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = multicast::rng::SplitMix64(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Milliseconds per decode of a block that lost `loss_pct`% of its source
/// symbols, decoded from exactly K+`margin` symbols.
fn decode_ms(layout: &Layout, block: &[u8], repair: &[u8], loss_pct: u64, margin: u32) -> f64 {
    let k = layout.k();
    let t = usize::from(layout.symbol_size());
    let mut total = 0.0;
    for round in 0..ROUNDS {
        let mut rng = multicast::rng::SplitMix64(round + 1);
        let mut c = Box::new(Collector::new(layout));
        for esi in 0..k {
            if rng.next_u64() % 100 >= loss_pct {
                c.insert(esi, &block[esi as usize * t..][..t])
                    .expect("fresh symbol");
            }
        }
        let mut r = 0;
        while c.held() < k + margin {
            c.insert(k + r as u32, &repair[r * t..][..t])
                .expect("fresh symbol");
            r += 1;
        }
        let start = Instant::now();
        let out = c
            .decode(layout)
            .map_err(|_| ())
            .expect("enough symbols to decode");
        total += start.elapsed().as_secs_f64();
        assert!(out == block, "decoded block differs");
    }
    total * 1e3 / ROUNDS as f64
}

fn main() {
    let mut sweep = None;
    println!("| block | K | loss | K+2 ms | K+{FAST_DECODE_MARGIN} ms | ratio |");
    println!("|---|---|---|---|---|---|");
    for block_size in [1u32 << 20, 2 << 20, 4 << 20] {
        let rounded = Layout::for_file(1, block_size, 1400).expect("valid layout");
        let layout = Layout::for_file(u64::from(rounded.block_size()), block_size, 1400)
            .expect("valid layout");
        let k = layout.k();
        let block = pseudo_random(layout.block_size() as usize, 7);
        let plan = Plan::new(layout);
        let repair = plan.encoder(&block).repair(k, k / 2);
        for loss in [5, 20] {
            let slow = decode_ms(&layout, &block, &repair, loss, MIN_DECODE_MARGIN);
            let fast = decode_ms(&layout, &block, &repair, loss, FAST_DECODE_MARGIN);
            println!(
                "| {} MiB | {k} | {loss}% | {slow:.1} | {fast:.1} | {:.2}x |",
                block_size >> 20,
                slow / fast
            );
            if block_size == 4 << 20 && loss == 5 {
                sweep = Some((layout, block.clone(), repair.clone()));
            }
        }
    }
    // Where more symbols stop paying: the default block at 5% loss.
    if let Some((layout, block, repair)) = sweep {
        println!();
        println!("| 4 MiB, 5% loss: decoded from | ms |");
        println!("|---|---|");
        for margin in [12, 16, FAST_DECODE_MARGIN, 30, 60] {
            let ms = decode_ms(&layout, &block, &repair, 5, margin);
            println!("| K+{margin} | {ms:.1} |");
        }
    }
}
