//! `somcast send` and `somcast recv`: the lab CLI over the data plane.

use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use multicast::driver::{RecvProgress, RecvReport, SendProgress, SendReport, random_id};
use multicast::sender::SenderEvent;
use multicast::{ReceiverConfig, RecvOptions, SendOptions, SenderConfig};
use serde_json::json;

use crate::cli::{RecvArgs, SendArgs};
use crate::units::human_bytes;

/// Resolves `--iface`, or picks the interface of the default route.
pub fn pick_iface(spec: Option<&str>) -> anyhow::Result<Ipv4Addr> {
    match spec {
        Some(s) => Ok(scanner::resolve(s)?),
        None => {
            let i = scanner::default_ipv4()
                .context("no --iface given and no default interface found")?;
            tracing::info!("using interface {} ({})", i.name, i.addr);
            Ok(i.addr)
        }
    }
}

/// Set on Ctrl-C (and on SIGTERM or SIGHUP): the send or receive then stops
/// cleanly. A second one exits at once. Installed once per process, which
/// runs one send or receive.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if seen.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    if let Err(e) = installed {
        tracing::warn!("Ctrl-C will not stop cleanly: {e}");
    }
    flag
}

/// A progress bar on a terminal, nothing otherwise (or with `--json`).
pub fn progress_bar(len: u64, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("template is valid")
        .progress_chars("=> "),
    );
    bar
}

pub fn send(args: &SendArgs) -> anyhow::Result<bool> {
    let iface = pick_iface(args.iface.as_deref())?;
    let opts = send_options(args)?;
    let bar = progress_bar(0, args.json);
    let started = std::time::Instant::now();
    let mut trace: Vec<(f64, u64, Option<String>)> = Vec::new();
    let mut on_progress = |p: SendProgress| {
        let total = p.layout.file_size();
        bar.set_length(total);
        let sent = (u64::from(p.blocks_sent) * u64::from(p.layout.block_size())).min(total);
        bar.set_position(sent);
        bar.set_message(format!(
            "receivers {}/{} done, {} Mbit/s{}",
            p.stats.receivers_done,
            p.stats.receivers_joined,
            p.stats.rate_bps / 1_000_000,
            p.stats
                .rate_reason
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ));
        // The rate each time it changed, by seconds since the start.
        if trace.last().is_none_or(|(_, r, _)| *r != p.stats.rate_bps) {
            let why = p.stats.rate_reason.map(|r| r.to_string());
            trace.push((started.elapsed().as_secs_f64(), p.stats.rate_bps, why));
        }
        if let Some(SenderEvent::StartedShort { joined, wanted }) = p.event {
            bar.println(format!(
                "warning: only {joined} of {wanted} receivers joined within --join-timeout; sending anyway"
            ));
        }
    };
    let result = multicast::send_file(&args.file, args.group, iface, &opts, &mut on_progress);
    bar.finish_and_clear();
    let report = match result {
        Err(multicast::driver::SendError::Stopped) => bail!(
            "sending {}: interrupted; the receivers were told that the session is closed",
            args.file.display()
        ),
        r => r.with_context(|| format!("sending {}", args.file.display()))?,
    };
    let s = &report.stats;
    let ok = s.receivers_lost == 0 && s.receivers_done + s.receivers_left >= args.min_receivers;
    if args.json {
        let mut summary = send_summary(&report);
        summary["rate_trace"] = json!(
            trace
                .iter()
                .map(|(t, r, why)| json!([t, *r as f64 / 1e6, why]))
                .collect::<Vec<_>>()
        );
        println!("{summary}");
    } else {
        eprintln!(
            "sent {} in {:.2} s ({:.1} Mbit/s goodput) to {}: {} receivers done, {} lost; {:.3}x the file on the wire, {} repair symbols",
            human_bytes(report.layout.file_size()),
            report.data_elapsed.as_secs_f64(),
            goodput_mbps(report.layout.file_size(), report.data_elapsed),
            args.group,
            s.receivers_done,
            s.receivers_lost,
            wire_ratio(s.wire_bytes, report.layout.file_size()),
            s.repair_symbols,
        );
    }
    if s.receivers_lost > 0 {
        eprintln!(
            "error: {} receiver(s) fell silent before finishing; check their logs and the path between you",
            s.receivers_lost
        );
    } else if s.receivers_done + s.receivers_left < args.min_receivers {
        eprintln!(
            "error: only {} of the {} receivers asked for with --min-receivers finished",
            s.receivers_done, args.min_receivers
        );
    }
    Ok(ok)
}

/// The sender's settings from `somcast send`'s flags.
fn send_options(args: &SendArgs) -> anyhow::Result<SendOptions> {
    let block_size = u32::try_from(args.block_size).map_err(|_| {
        anyhow::anyhow!(
            "--block-size {} is too large (64M at most)",
            args.block_size
        )
    })?;
    Ok(SendOptions {
        session: SenderConfig {
            rate_bps: args.rate,
            rate_min_bps: args.rate_min,
            rate_mode: args.mode.into(),
            slow_receivers: args.slow_receivers.into(),
            overhead_pct: args.overhead,
            min_receivers: args.min_receivers,
            join_timeout: args.join_timeout,
            ..SenderConfig::default()
        },
        block_size,
        symbol_size: args.symbol_size,
        ttl: args.ttl,
        stop: Some(interrupt_flag()),
        fleet: crate::trust::keys::read_fleet_keys(args.key.as_slice())?,
        encrypt: args.encrypt,
        ..SendOptions::default()
    })
}

pub fn goodput_mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn wire_ratio(bytes: u64, size: u64) -> f64 {
    bytes as f64 / size.max(1) as f64
}

pub fn send_summary(r: &SendReport) -> serde_json::Value {
    let s = &r.stats;
    let size = r.layout.file_size();
    json!({
        "role": "send",
        "session": format!("{:016x}", r.session),
        "bytes": size,
        "sha256": hex(&r.file_sha256),
        "blocks": r.layout.block_count(),
        "block_size": r.layout.block_size(),
        "symbol_size": r.layout.symbol_size(),
        "seconds": r.elapsed.as_secs_f64(),
        "data_seconds": r.data_elapsed.as_secs_f64(),
        "goodput_mbps": goodput_mbps(size, r.data_elapsed),
        "datagrams": s.datagrams,
        "bytes_sent": s.bytes,
        "bytes_on_wire": s.wire_bytes,
        // Ethernet, IP and UDP headers included: what a switch port carries.
        "wire_ratio": wire_ratio(s.wire_bytes, size),
        "payload_ratio": wire_ratio(s.bytes, size),
        "symbols_sent": s.source_symbols + s.repair_symbols,
        "source_symbols": s.source_symbols,
        "repair_symbols": s.repair_symbols,
        "feedback_repair_symbols": s.feedback_repair_symbols,
        "feedback_datagrams": s.feedback_datagrams,
        "dropped_datagrams": s.dropped_datagrams,
        "max_loss_reported": f64::from(s.max_loss_ppm) / 1e6,
        "receivers_joined": s.receivers_joined,
        "receivers_done": s.receivers_done,
        "receivers_lost": s.receivers_lost,
        "receivers_left_behind": s.receivers_left,
        // The rate control's last word: the rate and why.
        "rate_mbps": s.rate_bps as f64 / 1e6,
        "rate_reason": s.rate_reason.map(|r| r.to_string()),
    })
}

pub fn recv(args: &RecvArgs) -> anyhow::Result<bool> {
    let iface = pick_iface(args.iface.as_deref())?;
    let opts = RecvOptions {
        session: ReceiverConfig {
            receiver_id: random_id(),
            idle_timeout: args.timeout,
            max_buffered_bytes: args.buffer,
            ..ReceiverConfig::default()
        },
        drop_rate: args.drop_rate,
        drop_seed: args.seed,
        stop: Some(interrupt_flag()),
        fleet: crate::trust::keys::read_fleet_keys(args.key.as_slice())?,
        auth: Default::default(),
    };
    let bar = progress_bar(0, args.json);
    let mut on_progress = |p: RecvProgress| {
        if let Some(l) = p.layout {
            bar.set_length(l.file_size());
            let done =
                (u64::from(p.stats.blocks_done) * u64::from(l.block_size())).min(l.file_size());
            bar.set_position(done);
            bar.set_message(format!("loss {:.1}%", p.stats.loss() * 100.0));
        }
    };
    let result = multicast::receive_file(args.group, iface, &args.out, &opts, &mut on_progress);
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(multicast::driver::RecvError::Stopped) => bail!(
            "receiving into {}: interrupted; nothing was written (the partial file is removed)",
            args.out.display()
        ),
        Err(e) => bail!(
            "receiving into {} from {} on {iface}: {e}",
            args.out.display(),
            args.group
        ),
    };
    if args.json {
        println!("{}", recv_summary(&report, &args.out.display().to_string()));
    } else {
        eprintln!(
            "received {} in {:.2} s ({:.1} Mbit/s), verified SHA-256 {}, loss {:.1}%, {} repair symbols used; wrote {}",
            human_bytes(report.layout.file_size()),
            report.transfer_elapsed.as_secs_f64(),
            goodput_mbps(report.layout.file_size(), report.transfer_elapsed),
            &hex(&report.file_sha256)[..16],
            report.stats.loss() * 100.0,
            report.stats.repair_symbols,
            args.out.display()
        );
    }
    Ok(true)
}

pub fn recv_summary(r: &RecvReport, out: &str) -> serde_json::Value {
    let s = &r.stats;
    let size = r.layout.file_size();
    json!({
        "role": "recv",
        "out": out,
        "session": format!("{:016x}", r.session),
        "bytes": size,
        "sha256": hex(&r.file_sha256),
        "verified": true,
        "blocks": r.layout.block_count(),
        "seconds": r.transfer_elapsed.as_secs_f64(),
        "goodput_mbps": goodput_mbps(size, r.transfer_elapsed),
        "datagrams": s.datagrams,
        "symbols_received": s.data_symbols,
        "repair_symbols": s.repair_symbols,
        "redundant_symbols": s.redundant_symbols,
        "loss_seen": s.loss(),
        "injected_drops": r.injected_drops,
        "malformed_datagrams": s.malformed,
        "other_session_datagrams": s.other_session,
        "dropped_no_buffer": s.dropped_no_buffer,
        "hash_failures": s.hash_failures,
        "decode_retries": s.decode_retries,
        "settled_decodes": s.settled_decodes,
        "feedback_sent": s.feedback_sent,
        "rcvbuf_bytes": r.rcvbuf.granted,
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
