//! `somcast demo`: a generated file sent to a few receivers over loopback
//! multicast, each with injected loss, then verified byte for byte. Needs no
//! root and no network.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};
use multicast::driver::{RecvReport, random_id};
use multicast::{ReceiverConfig, RecvOptions, SendOptions, SenderConfig};
use serde_json::json;

use crate::cli::DemoArgs;
use crate::lab::{goodput_mbps, recv_summary, send_summary};
use crate::units::human_bytes;

/// A group and port of our own, so demos and tests running side by side do
/// not hear each other: 239.255/16 is the site-local scope, and loopback
/// keeps it on this host anyway.
pub fn private_group() -> SocketAddrV4 {
    let r = random_id();
    let ip = Ipv4Addr::new(239, 255, (r >> 8) as u8, (r as u8).max(1));
    SocketAddrV4::new(ip, 20_000 + (r >> 16) as u16 % 40_000)
}

/// Writes `size` bytes of reproducible pseudo-random data.
pub fn generate_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut x = seed | 1;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

pub fn run(args: &DemoArgs) -> anyhow::Result<bool> {
    // A new directory every run (a process id alone is reused quickly on
    // Windows, and a leftover directory would hold the last run's tasks).
    let dir = tempfile::Builder::new()
        .prefix("somcast-demo-")
        .tempdir()
        .context("creating the demo's temporary directory")?
        .keep();
    let result = if args.lab {
        run_in(&dir, args)
    } else {
        crate::demo_flow::run(&dir, args)
    };
    if let Err(e) = crate::cache::remove_tree(&dir) {
        eprintln!("demo: could not remove {}: {e}", dir.display());
    }
    result
}

fn run_in(dir: &Path, args: &DemoArgs) -> anyhow::Result<bool> {
    let source = dir.join("package.bin");
    generate_file(&source, args.size, 42).context("generating the demo file")?;
    let group = private_group();
    let iface = Ipv4Addr::LOCALHOST;
    if !args.json {
        eprintln!(
            "demo: {} to {} receivers over loopback multicast {group}, {:.0}% loss injected at each, {} Mbit/s",
            human_bytes(args.size),
            args.receivers,
            args.loss * 100.0,
            args.rate / 1_000_000
        );
    }
    // Join every receiver before the sender starts, so none misses the start.
    let receivers = start_receivers(dir, args, group, iface)?;
    let opts = SendOptions {
        session: SenderConfig {
            rate_bps: args.rate,
            min_receivers: args.receivers,
            join_timeout: Duration::from_secs(10),
            ..SenderConfig::default()
        },
        ..SendOptions::default()
    };
    let bar = crate::lab::progress_bar(args.size, args.json);
    let sent = multicast::send_file(&source, group, iface, &opts, &mut |p| {
        bar.set_position(
            (u64::from(p.blocks_sent) * u64::from(p.layout.block_size())).min(args.size),
        );
    });
    bar.finish_and_clear();
    let sent = sent.context("sending the demo file")?;
    let rows = collect(receivers, &fs::read(&source)?)?;
    let all_ok = rows.iter().all(|(_, r, same, _, _)| r.is_some() && *same);
    if args.json {
        let recvs: Vec<_> = rows
            .iter()
            .map(|(i, r, same, err, out)| match r {
                Some(r) => {
                    let mut v = recv_summary(r, &out.display().to_string());
                    v["identical"] = json!(same);
                    v
                }
                None => json!({"receiver": i, "error": err}),
            })
            .collect();
        println!(
            "{}",
            json!({"ok": all_ok, "sender": send_summary(&sent), "receivers": recvs})
        );
    } else {
        print_table(&sent, &rows);
    }
    if !all_ok {
        bail!("demo failed: not every receiver ended with an identical file");
    }
    Ok(true)
}

/// A receiver's thread: the file it writes and how it went.
type Receiving = thread::JoinHandle<(PathBuf, Result<RecvReport, multicast::driver::RecvError>)>;

/// Joins every receiver to `group` and starts each on a thread of its own,
/// dropping `args.loss` of what it receives.
fn start_receivers(
    dir: &Path,
    args: &DemoArgs,
    group: std::net::SocketAddrV4,
    iface: Ipv4Addr,
) -> anyhow::Result<Vec<Receiving>> {
    let mut receivers = Vec::new();
    for i in 0..args.receivers {
        let (socket, rcvbuf) = multicast::socket::open_receiver(group, iface)
            .context("joining the demo group on loopback")?;
        let out: PathBuf = dir.join(format!("received-{i}.bin"));
        let opts = RecvOptions {
            fleet: None,
            auth: Default::default(),
            session: ReceiverConfig {
                receiver_id: random_id(),
                idle_timeout: Duration::from_secs(30),
                ..ReceiverConfig::default()
            },
            drop_rate: args.loss,
            drop_seed: u64::from(i) + 1,
            stop: None,
        };
        let handle = thread::Builder::new()
            .name(format!("demo-recv-{i}"))
            .spawn(move || {
                let r = multicast::driver::receive_on(socket, rcvbuf, &out, &opts, &mut |_| {});
                (out, r)
            })?;
        receivers.push(handle);
    }
    Ok(receivers)
}

/// Each receiver's row: its report, and whether its file is `original`.
fn collect(receivers: Vec<Receiving>, original: &[u8]) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, h) in receivers.into_iter().enumerate() {
        let (out, result) = h
            .join()
            .map_err(|_| anyhow::anyhow!("receiver {i} panicked"))?;
        match result {
            Ok(report) => {
                let same = fs::read(&out)? == original;
                rows.push((i, Some(report), same, String::new(), out));
            }
            Err(e) => rows.push((i, None, false, e.to_string(), out)),
        }
    }
    Ok(rows)
}

type Row = (usize, Option<RecvReport>, bool, String, PathBuf);

fn print_table(sent: &multicast::driver::SendReport, rows: &[Row]) {
    let s = &sent.stats;
    let size = sent.layout.file_size();
    println!(
        "sender: {} in {:.2} s, {:.1} Mbit/s goodput, {:.3}x the file on the wire ({} source + {} repair symbols, {} of them asked for by feedback)",
        human_bytes(size),
        sent.data_elapsed.as_secs_f64(),
        goodput_mbps(size, sent.data_elapsed),
        s.bytes as f64 / size.max(1) as f64,
        s.source_symbols,
        s.repair_symbols,
        s.feedback_repair_symbols
    );
    println!("receiver  seconds  Mbit/s  loss    repair used  result");
    for (i, r, same, err, _) in rows {
        match r {
            Some(r) => println!(
                "{:<8}  {:>7.2}  {:>6.1}  {:>5.1}%  {:>11}  {}",
                i,
                r.transfer_elapsed.as_secs_f64(),
                goodput_mbps(size, r.transfer_elapsed),
                r.stats.loss() * 100.0,
                r.stats.repair_symbols,
                if *same {
                    "verified, identical"
                } else {
                    "DIFFERENT"
                }
            ),
            None => println!("{i:<8}  failed: {err}"),
        }
    }
}
