//! End to end over real sockets: the `somcast` binary sending and receiving
//! on loopback multicast (IP_MULTICAST_IF 127.0.0.1, loop on). Needs no root.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use somcast::demo::{generate_file, private_group};

mod common;

use common::{BIN, TempDir, json};

fn spawn_recv(group: SocketAddrV4, out: &Path, drop_rate: f64, seed: u64) -> Child {
    Command::new(BIN)
        .args(["recv", "--iface", "127.0.0.1", "--json", "--timeout", "30s"])
        .arg("--group")
        .arg(group.to_string())
        .arg("--out")
        .arg(out)
        .arg("--drop-rate")
        .arg(drop_rate.to_string())
        .arg("--seed")
        .arg(seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn send(group: SocketAddrV4, file: &Path, min_receivers: u32) -> Output {
    Command::new(BIN)
        .args(["send", "--iface", "127.0.0.1", "--json", "--rate", "300M"])
        .arg("--group")
        .arg(group.to_string())
        .arg("--min-receivers")
        .arg(min_receivers.to_string())
        .arg("--join-timeout")
        .arg("20s")
        .arg(file)
        .output()
        .unwrap()
}

/// Sends a file of `size` bytes to two receivers losing `loss` each, and
/// checks both end with identical bytes.
fn transfer(size: u64, loss: f64) {
    let dir = TempDir::new("xfer");
    let src = dir.0.join("src.bin");
    generate_file(&src, size, size ^ 7).unwrap();
    let group = private_group();
    let outs: Vec<PathBuf> = (0..2).map(|i| dir.0.join(format!("out{i}.bin"))).collect();
    let receivers: Vec<Child> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| spawn_recv(group, o, loss, i as u64 + 1))
        .collect();
    let sent = send(group, &src, 2);
    assert!(
        sent.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let summary = json(&sent.stdout);
    assert_eq!(summary["receivers_done"], 2);
    assert_eq!(summary["bytes"], size);
    let original = fs::read(&src).unwrap();
    for (r, out) in receivers.into_iter().zip(&outs) {
        let o = r.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "recv failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let s = json(&o.stdout);
        assert_eq!(s["verified"], true);
        assert!(
            fs::read(out).unwrap() == original,
            "{} differs",
            out.display()
        );
        assert!(!multicast::driver::partial_path(out).exists());
    }
}

#[test]
fn empty_file_arrives() {
    transfer(0, 0.0);
}

#[test]
fn one_byte_file_arrives_at_20_percent_loss() {
    transfer(1, 0.2);
}

#[test]
fn ten_mib_and_change_arrives_without_loss() {
    transfer(10 * 1024 * 1024 + 123, 0.0);
}

#[test]
fn ten_mib_and_change_arrives_at_5_percent_loss() {
    transfer(10 * 1024 * 1024 + 123, 0.05);
}

#[test]
fn ten_mib_and_change_arrives_at_20_percent_loss() {
    transfer(10 * 1024 * 1024 + 123, 0.2);
}

/// A thread that hears the group and throws garbage, truncated,
/// bit-flipped and replayed copies of what it hears back at it.
fn start_vandal(group: SocketAddrV4, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let (listen, _) = multicast::socket::open_receiver(group, Ipv4Addr::LOCALHOST).unwrap();
    listen
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let out = multicast::socket::open_sender(Ipv4Addr::LOCALHOST, 1).unwrap();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, _)) = listen.recv_from(&mut buf) else {
                continue;
            };
            // Only a share of what it hears, to stay below the sender's rate.
            if rand() % 4 != 0 {
                continue;
            }
            let pkt = &buf[..n];
            let evil: Vec<u8> = match rand() % 4 {
                0 => (0..rand() % 1500).map(|_| rand() as u8).collect(),
                1 => pkt[..(rand() as usize % n.max(1))].to_vec(),
                2 => {
                    let mut p = pkt.to_vec();
                    let bit = rand() as usize % (p.len() * 8).max(1);
                    if !p.is_empty() {
                        p[bit / 8] ^= 1 << (bit % 8);
                    }
                    p
                }
                _ => pkt.to_vec(),
            };
            if out.send_to(&evil, group).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

#[test]
fn hostile_datagrams_mid_transfer_do_not_break_the_receiver() {
    let dir = TempDir::new("hostile");
    let src = dir.0.join("src.bin");
    generate_file(&src, 6 * 1024 * 1024 + 5, 11).unwrap();
    let group = private_group();
    let out = dir.0.join("out.bin");
    let receiver = spawn_recv(group, &out, 0.05, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let vandal = start_vandal(group, stop.clone());
    let sent = send(group, &src, 1);
    stop.store(true, Ordering::Relaxed);
    let injected = vandal.join().unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let o = receiver.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o.stdout);
    assert!(injected > 100, "vandal sent only {injected}");
    assert!(s["malformed_datagrams"].as_u64().unwrap() > 0, "{s}");
    assert!(fs::read(&out).unwrap() == fs::read(&src).unwrap());
}

#[test]
fn demo_delivers_identical_files() {
    let o = Command::new(BIN)
        .args([
            "demo",
            "--lab",
            "--size",
            "3M",
            "--receivers",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o.stdout);
    assert_eq!(s["ok"], true);
    for r in s["receivers"].as_array().unwrap() {
        assert_eq!(r["identical"], true);
    }
}

#[test]
fn bad_usage_exits_2() {
    let o = Command::new(BIN)
        .args(["send", "x", "--rate", "fast"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a rate"));
    let o = Command::new(BIN).args(["recv"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn unreadable_file_is_named_and_exits_1() {
    let o = Command::new(BIN)
        .args(["send", "/nonexistent/pkg.msi", "--iface", "127.0.0.1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/pkg.msi"), "{err}");
    assert!(err.contains("check the path"), "{err}");
    // The OS error is quoted once, not once more as the cause.
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

#[test]
fn unknown_interface_and_unicast_group_are_explained() {
    let o = Command::new(BIN)
        .args(["recv", "--out", "/tmp/x", "--iface", "nosuch0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuch0"));
    let o = Command::new(BIN)
        .args(["recv", "--out", "/tmp/x", "--iface", "127.0.0.1"])
        .args(["--group", "10.1.2.3:7400"])
        .output()
        .unwrap();
    // Bad usage: caught while parsing the arguments.
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an IPv4 multicast address"));
}

#[test]
fn receiver_without_sender_times_out_with_advice() {
    let dir = TempDir::new("nosender");
    let out = dir.0.join("never.bin");
    let o = Command::new(BIN)
        .args(["recv", "--iface", "127.0.0.1", "--timeout", "500ms"])
        .arg("--group")
        .arg(private_group().to_string())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no sender heard"), "{err}");
    assert!(!out.exists());
}

/// Sends SIGINT, as Ctrl-C on a terminal does.
#[cfg(unix)]
fn interrupt(child: &Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -INT failed");
}

/// A receiver (idle timeout `timeout`) and a 20 MiB send at 20 Mbit/s to
/// it, 1.5 s into the transfer; the caller interrupts or kills one of them.
fn slow_transfer(dir: &TempDir, timeout: &str) -> (Child, Child, PathBuf) {
    let src = dir.0.join("src.bin");
    generate_file(&src, 20 * 1024 * 1024, 9).unwrap();
    let group = private_group();
    let out = dir.0.join("out.bin");
    let receiver = Command::new(BIN)
        .args(["recv", "--iface", "127.0.0.1", "--timeout", timeout])
        .arg("--group")
        .arg(group.to_string())
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sender = Command::new(BIN)
        .args(["send", "--iface", "127.0.0.1", "--rate", "20M"])
        .args(["--min-receivers", "1", "--group"])
        .arg(group.to_string())
        .arg(&src)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    (receiver, sender, out)
}

#[cfg(unix)]
#[test]
fn ctrl_c_on_the_sender_tells_the_receivers_at_once() {
    let dir = TempDir::new("int-send");
    // An idle timeout far longer than the test may take: the receiver
    // must stop because it was told, not because it waited.
    let (receiver, sender, out) = slow_transfer(&dir, "120s");
    interrupt(&sender);
    let started = std::time::Instant::now();
    let s = sender.wait_with_output().unwrap();
    assert_eq!(s.status.code(), Some(1));
    let err = String::from_utf8_lossy(&s.stderr);
    assert!(err.contains("interrupted"), "{err}");
    let r = receiver.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("sender closed the session"), "{err}");
    assert!(!out.exists());
    assert!(!multicast::driver::partial_path(&out).exists());
}

#[cfg(unix)]
#[test]
fn ctrl_c_on_the_receiver_leaves_no_partial_file() {
    let dir = TempDir::new("int-recv");
    let (receiver, mut sender, out) = slow_transfer(&dir, "30s");
    assert!(
        multicast::driver::partial_path(&out).exists(),
        "receiving had started"
    );
    interrupt(&receiver);
    let r = receiver.wait_with_output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("interrupted; nothing was written"), "{err}");
    assert!(!out.exists());
    assert!(!multicast::driver::partial_path(&out).exists());
    sender.kill().unwrap();
    let _ = sender.wait();
}

#[test]
fn a_killed_sender_leaves_no_file_behind() {
    let dir = TempDir::new("killed");
    let (receiver, mut sender, out) = slow_transfer(&dir, "1s");
    sender.kill().unwrap();
    let _ = sender.wait();
    let o = receiver.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("fell silent") && err.contains("missing"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(!multicast::driver::partial_path(&out).exists());
}

#[test]
fn scan_json_lists_loopback_with_string_addresses() {
    let o = Command::new(BIN).args(["scan", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o.stdout);
    let ifaces = s["interfaces"].as_array().unwrap();
    let lo = ifaces
        .iter()
        .find(|i| i["loopback"] == true)
        .expect("a loopback interface");
    let addrs = lo["addresses"].as_array().unwrap();
    assert!(
        addrs
            .iter()
            .any(|a| a["address"] == "127.0.0.1" && a["subnet"] == "127.0.0.0/8"),
        "{lo}"
    );
    let o = Command::new(BIN)
        .args(["scan", "--iface", "127.0.0.1", "--json"])
        .output()
        .unwrap();
    assert_eq!(json(&o.stdout)["multicast_interface"], lo["name"]);
}
