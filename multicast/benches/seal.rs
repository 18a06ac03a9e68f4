//! What the fleet key costs a datagram, next to what RaptorQ costs it:
//! `cargo bench -p somcast-multicast --bench seal`.
//!
//! Seals and opens 1425-byte datagrams (a 1400-byte symbol in its frame),
//! plain-authenticated and encrypted, and encodes a 4 MiB block's repair
//! symbols; prints MB/s of datagram bytes for each, side by side in one run.

use std::sync::Arc;
use std::time::Instant;

use multicast::Layout;
use multicast::auth::{FleetKey, FleetKeys, Opener, Sealer};
use multicast::codec::Plan;

const DATAGRAM: usize = 1425;
const ROUNDS: usize = 200_000;

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn seal_and_open(encrypt: bool) -> (f64, f64) {
    let keys = FleetKeys::new(vec![FleetKey::from_secret(&[9; 32])]).unwrap();
    let mut sealer = Sealer::new(keys.clone(), 1);
    sealer.set_encrypt(encrypt);
    let plain = vec![0x5Au8; DATAGRAM];
    let mut sealed: Vec<Vec<u8>> = Vec::with_capacity(ROUNDS);
    let t = Instant::now();
    for _ in 0..ROUNDS {
        let mut out = Vec::new();
        sealer.seal(1000, &plain, &mut out);
        sealed.push(out);
    }
    let seal = t.elapsed().as_secs_f64();
    let mut opener = Opener::new(keys, Arc::default());
    let t = Instant::now();
    for d in &sealed {
        assert!(opener.open(1000, d).is_ok());
    }
    let open = t.elapsed().as_secs_f64();
    (mbps(ROUNDS * DATAGRAM, seal), mbps(ROUNDS * DATAGRAM, open))
}

fn encode() -> f64 {
    let layout = Layout::for_file(4 << 20, 4 << 20, 1400).unwrap();
    let plan = Plan::new(layout);
    let block = vec![0x33u8; layout.block_size() as usize];
    let t = Instant::now();
    let mut bytes = 0;
    for _ in 0..3 {
        let enc = plan.encoder(&block);
        let symbols = enc.repair(layout.k(), layout.k() / 10);
        bytes += block.len() + symbols.len();
    }
    mbps(bytes, t.elapsed().as_secs_f64())
}

fn main() {
    let (seal, open) = seal_and_open(false);
    let (seal_enc, open_enc) = seal_and_open(true);
    let enc = encode();
    println!("datagram bytes per second, one core (MB/s):");
    println!("  seal (MAC)              {seal:8.0}");
    println!("  open (MAC, window)      {open:8.0}");
    println!("  seal + encrypt          {seal_enc:8.0}");
    println!("  open + decrypt          {open_enc:8.0}");
    println!("  RaptorQ encode, 4 MiB   {enc:8.0}   (block + 10% repair symbols)");
    println!(
        "at 200 Mbit/s (25 MB/s) the seal takes {:.1}% of a core to send and {:.1}% to receive; with encryption {:.1}% and {:.1}%",
        2500.0 / seal,
        2500.0 / open,
        2500.0 / seal_enc,
        2500.0 / open_enc
    );
}
