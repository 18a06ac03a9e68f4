//! The soak test: one agent (and two helpers on its subnet) without a fleet
//! key completes real signed tasks, one after another, while a stream of
//! hostile input goes on the whole time:
//!
//! - forged datagrams on the control group and every data group: garbage,
//!   claims with the best standing, offers with a data group that is not
//!   multicast, a start far away, or no session behind them, presence
//!   announcements of peers that hold everything and answer a byte every
//!   few seconds (the slow peer), data of sessions that do not exist;
//! - connection floods on the agent's repair port and API port: frames that
//!   declare 4 GiB and trickle, headers that never end;
//! - random API calls: unknown paths, bad JSON, bodies past the limit,
//!   no token or a wrong one, cancels of tasks that do not exist.
//!
//! Every task must end done, each install command run exactly once per
//! agent, the cached bytes right; the API answers within a second
//! throughout (p99), and the agent's peak memory stays bounded. It reports
//! peak RSS, API latency percentiles and the agent's drops by reason.
//!
//! Minutes long, so not in the normal run: `scripts/soak.sh [TASKS]`
//! (`SOMCAST_SOAK_TASKS`, default 20).

#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Proc, TOKEN, TempDir, cached, get_json, origin_bytes, origin_dir, start_agent_with,
    start_origin,
};
use multicast::rng::SplitMix64;
use multicast::wire::{Claim, Digest, Frame, Offer};
use somcast::demo::private_group;
use somcast::manifest::Manifest;
use somcast::trust::issue::{self, TaskOrder};
use somcast::trust::{Action, Signer};

/// Peak resident memory the agent may reach under the soak.
const RSS_LIMIT_MIB: u64 = 300;

/// What the hostile threads have sent, for the report.
#[derive(Default)]
struct Sent {
    datagrams: AtomicU64,
    slow_peer_connections: AtomicU64,
    flood_connections: AtomicU64,
    api_calls: AtomicU64,
}

/// The contents of the tasks so far: (content id, block count).
type Contents = Arc<Mutex<Vec<(Digest, u32)>>>;

/// One forged datagram of a random kind, and where it goes.
fn forged(
    rng: &mut SplitMix64,
    control: SocketAddrV4,
    contents: &[(Digest, u32)],
    slow_port: u16,
) -> (Vec<u8>, SocketAddrV4) {
    let pick = contents.get(rng.next_u64() as usize % contents.len().max(1));
    let Some(&(content, blocks)) = pick else {
        return (vec![0x5a; 64], control);
    };
    let data_group = somcast::agent::task::data_group(&content);
    let node = rng.next_u64() | 1 << 63;
    match rng.next_u64() % 7 {
        0 => {
            let len = rng.next_u64() as usize % 1400;
            let junk = (0..len).map(|_| rng.next_u64() as u8).collect();
            let to = if rng.next_u64() % 2 == 0 {
                control
            } else {
                data_group
            };
            (junk, to)
        }
        1 => (
            Frame::Claim(Claim {
                content,
                standing: common::best_standing(node),
            })
            .encode(0),
            control,
        ),
        2..=3 => {
            // Not multicast, far away, or right but never followed.
            let (group, start_in_ms) = match rng.next_u64() % 3 {
                0 => ([10, 1, 2, 3], 500),
                1 => (data_group.ip().octets(), u32::MAX),
                _ => (data_group.ip().octets(), 500),
            };
            let offer = Offer {
                content,
                standing: common::best_standing(node),
                session: rng.next_u64(),
                data_group: group,
                data_port: data_group.port(),
                start_in_ms,
            };
            (Frame::Offer(offer).encode(0), control)
        }
        4..=5 => {
            // A peer that holds everything and serves a byte at a time,
            // under one of 40 node ids, each announced again and again (so
            // confirmed).
            let announce = common::announce_holding(
                0xBAD0_0000 + rng.next_u64() % 40,
                (rng.next_u64() >> 40) as u32,
                slow_port,
                &content,
                blocks,
            );
            (announce, control)
        }
        _ => {
            let payload = vec![0xA5; 1000];
            let data = Frame::Data(multicast::wire::Data {
                block: (rng.next_u64() % u64::from(blocks.max(1))) as u32,
                esi: rng.next_u64() as u32 % 100_000,
                sent_us: 0,
                payload: &payload,
            });
            (data.encode(rng.next_u64()), data_group)
        }
    }
}

fn forger(
    stop: Arc<AtomicBool>,
    sent: Arc<Sent>,
    control: SocketAddrV4,
    contents: Contents,
    slow_port: u16,
) {
    let socket = multicast::socket::open_sender(Ipv4Addr::LOCALHOST, 1).unwrap();
    let mut rng = SplitMix64(0x50A4);
    while !stop.load(Ordering::Relaxed) {
        let now = contents.lock().unwrap().clone();
        for _ in 0..20 {
            let (bytes, to) = forged(&mut rng, control, &now, slow_port);
            if socket.send_to(&bytes, to).is_ok() {
                sent.datagrams.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Accepts repair connections and answers each with a byte every 3 s.
fn slow_peer(stop: Arc<AtomicBool>, sent: Arc<Sent>, listener: TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let open = Arc::new(AtomicU64::new(0));
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if open.load(Ordering::Relaxed) >= 64 {
            continue; // dropped: closes it
        }
        sent.slow_peer_connections.fetch_add(1, Ordering::Relaxed);
        open.fetch_add(1, Ordering::Relaxed);
        let (stop, open) = (stop.clone(), open.clone());
        std::thread::spawn(move || {
            let _ = conn.set_nonblocking(false);
            while !stop.load(Ordering::Relaxed) && conn.write_all(&[0]).is_ok() {
                std::thread::sleep(Duration::from_secs(3));
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Every 2 s, 100 connections to the repair port that declare a 4 GiB frame
/// and 50 to the API that never finish their headers, held for a second.
fn flooder(stop: Arc<AtomicBool>, sent: Arc<Sent>, repair: SocketAddr, api: SocketAddr) {
    while !stop.load(Ordering::Relaxed) {
        let mut held = Vec::new();
        for i in 0..150 {
            let (to, bytes): (SocketAddr, &[u8]) = if i < 100 {
                (repair, &[0xff, 0xff, 0xff, 0xff, 1])
            } else {
                (api, b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            };
            if let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                let _ = c.write_all(bytes);
                held.push(c);
                sent.flood_connections.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        drop(held);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One HTTP request with deadlines; the status code, or 0 when it failed.
fn request(addr: SocketAddr, head: &str, body: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let head = format!(
        "{head}Host: soak\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() || s.write_all(body).is_err() {
        return 0;
    }
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text);
    std::str::from_utf8(text.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn api_chaos(stop: Arc<AtomicBool>, sent: Arc<Sent>, api: SocketAddr) {
    let mut rng = SplitMix64(0xA91);
    let big = vec![b'{'; 20 << 20];
    while !stop.load(Ordering::Relaxed) {
        let auth = match rng.next_u64() % 3 {
            0 => String::new(),
            1 => "Authorization: Bearer wrong\r\n".into(),
            _ => format!("Authorization: bearer {TOKEN}\r\n"),
        };
        let (head, body): (String, &[u8]) = match rng.next_u64() % 6 {
            0 => (
                format!("GET /v1/{:x} HTTP/1.1\r\n{auth}", rng.next_u64()),
                b"",
            ),
            1 => (
                format!("POST /v1/tasks HTTP/1.1\r\n{auth}Content-Type: application/json\r\n"),
                b"{\"manifest\": 12, \"id\": [",
            ),
            2 => (
                format!("POST /v1/tasks HTTP/1.1\r\n{auth}Content-Type: application/json\r\n"),
                &big[..],
            ),
            3 => (
                format!(
                    "POST /v1/tasks/{:x}/cancel HTTP/1.1\r\n{auth}Content-Type: application/json\r\n",
                    rng.next_u64()
                ),
                b"{}",
            ),
            4 => (
                format!("GET /v1/tasks/..%2f..%2fetc%2fpasswd HTTP/1.1\r\n{auth}"),
                b"",
            ),
            _ => (format!("GET /v1/tasks HTTP/1.1\r\n{auth}"), b""),
        };
        request(api, &head, body);
        sent.api_calls.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// `GET /v1/status` every 100 ms: how long each took (5 s when it failed).
fn latency_probe(stop: Arc<AtomicBool>, api: SocketAddr) -> Vec<Duration> {
    let mut out = Vec::new();
    let head = format!("GET /v1/status HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n");
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let code = request(api, &head, b"");
        out.push(if code == 200 {
            t0.elapsed()
        } else {
            Duration::from_secs(5)
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn marker_lines(cache: &Path) -> Vec<String> {
    std::fs::read_to_string(cache.join("marker"))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

#[test]
#[ignore = "minutes long: scripts/soak.sh runs it"]
fn one_agent_under_hostile_input_completes_every_task_once() {
    let tasks: usize = std::env::var("SOMCAST_SOAK_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = TempDir::new("soak");
    let origin_root = origin_dir(&dir);
    let origin = start_origin(&origin_root, "0");
    let publisher = Signer::generate().unwrap();
    let pubkey = dir.0.join("publisher.pub");
    std::fs::write(&pubkey, format!("{}\n", publisher.public.to_line())).unwrap();
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("soak-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent_with(&c.0, group, &["--trust", pubkey.to_str().unwrap()]))
        .collect();
    let target = &agents[0];
    let pid = target.child.id();
    let repair_port = get_json(target.addr, "/v1/status")["repair_port"]
        .as_u64()
        .unwrap() as u16;
    let repair = SocketAddr::from(([127, 0, 0, 1], repair_port));

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Sent::default());
    let contents: Contents = Arc::default();
    let slow = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    let mut threads = Vec::new();
    {
        let (st, se, c) = (stop.clone(), sent.clone(), contents.clone());
        threads.push(std::thread::spawn(move || {
            forger(st, se, group, c, slow_port)
        }));
        let (st, se) = (stop.clone(), sent.clone());
        threads.push(std::thread::spawn(move || slow_peer(st, se, slow)));
        let (st, se, api) = (stop.clone(), sent.clone(), target.addr);
        threads.push(std::thread::spawn(move || flooder(st, se, repair, api)));
        let (st, se, api) = (stop.clone(), sent.clone(), target.addr);
        threads.push(std::thread::spawn(move || api_chaos(st, se, api)));
    }
    let latency = {
        let (st, api) = (stop.clone(), target.addr);
        std::thread::spawn(move || latency_probe(st, api))
    };

    let t0 = Instant::now();
    let mut sizes = 0u64;
    let mut ids = Vec::new();
    let mut rss_max_kib = 0;
    for i in 0..tasks {
        let size = (1 + (i as u64 * 7) % 6) * 1024 * 1024 + i as u64 * 4099;
        let file: PathBuf = origin_root.join(format!("pkg{i}.bin"));
        somcast::demo::generate_file(&file, size, 1000 + i as u64).unwrap();
        let url = format!("http://{}/pkg{i}.bin", origin.addr);
        let m = Manifest::create(&file, vec![url]).unwrap();
        let checked = m.check().unwrap();
        contents
            .lock()
            .unwrap()
            .push((checked.content, checked.layout.block_count()));
        let id = format!("soak-{i}");
        let order = TaskOrder {
            id: Some(id.clone()),
            action: Action::Run {
                command: "echo \"$SOMCAST_TASK\" >> \"$(dirname \"$(dirname \"$1\")\")/marker\""
                    .into(),
                timeout_s: 60,
            },
            delay_ms: 1000,
            rate_bps: None,
            priority: 0,
            not_before: None,
            expires: somcast::cache::now_unix() + 3600,
            manifest_url: None,
            encrypt: false,
            targets: None,
            report_url: None,
        };
        let manifest = issue::manifest(&m, Some(&publisher)).unwrap();
        let bundle = issue::task(
            manifest,
            &order,
            Some(&publisher),
            somcast::cache::now_unix(),
        )
        .unwrap();
        let body = serde_json::to_string(&bundle).unwrap();
        for a in &agents {
            let (code, text) = common::http(a.addr, "POST", "/v1/tasks", None, Some(&body));
            assert_eq!(code, 201, "task {id}: {text}");
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        for (n, a) in agents.iter().enumerate() {
            let s = loop {
                let s = common::task(a, &id);
                if common::finished(&s) {
                    break s;
                }
                if Instant::now() > deadline {
                    for b in &agents {
                        eprintln!("{}", common::task(b, &id));
                        let st = get_json(b.addr, "/v1/status");
                        let peers: Vec<_> = st["peers"]
                            .as_array()
                            .map(|v| v.iter().map(|p| p["node"].clone()).collect())
                            .unwrap_or_default();
                        eprintln!(
                            "node {} peers {} {:?} presence {} election {}",
                            st["node"],
                            peers.len(),
                            &peers[..peers.len().min(5)],
                            st["presence"],
                            st["election"]
                        );
                    }
                    panic!("task {id} not finished within 180 s on agent {n}");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(s["state"], "done", "task {id} on agent {n}: {s}");
        }
        for c in &caches {
            let want = std::fs::read(&file).unwrap();
            assert!(cached(&c.0, &checked.id()).as_deref() == Some(&want[..]));
        }
        sizes += size;
        ids.push(id);
        rss_max_kib = rss_max_kib.max(proc_status_kib(pid, "VmRSS:"));
        eprintln!(
            "soak: task {}/{tasks} done on 3 agents at {:.0} s, agent RSS {} MiB",
            i + 1,
            t0.elapsed().as_secs_f64(),
            proc_status_kib(pid, "VmRSS:") / 1024
        );
    }
    let hwm_kib = proc_status_kib(pid, "VmHWM:");
    stop.store(true, Ordering::Relaxed);
    let mut lat = latency.join().unwrap();
    for t in threads {
        t.join().unwrap();
    }
    let status = get_json(target.addr, "/v1/status");

    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    let served = origin_bytes(&origin);
    eprintln!(
        "soak report: {tasks} tasks, {} MiB, {:.0} s",
        sizes >> 20,
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "  hostile input: {} datagrams, {} slow-peer connections, {} flood connections, {} API calls",
        sent.datagrams.load(Ordering::Relaxed),
        sent.slow_peer_connections.load(Ordering::Relaxed),
        sent.flood_connections.load(Ordering::Relaxed),
        sent.api_calls.load(Ordering::Relaxed)
    );
    eprintln!(
        "  agent peak RSS {} MiB (VmHWM); API /v1/status latency over {} calls: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        hwm_kib / 1024,
        lat.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        lat[lat.len() - 1]
    );
    eprintln!(
        "  origin served {:.2}x the package bytes",
        served as f64 / sizes as f64
    );
    eprintln!(
        "  drops: presence {} | election {} | lan {}",
        status["presence"], status["election"], status["lan"]["datagrams"]
    );

    for (n, c) in caches.iter().enumerate() {
        let mut lines = marker_lines(&c.0);
        lines.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(lines, want, "agent {n}: each install exactly once");
    }
    assert!(
        pct(0.99) < Duration::from_secs(1),
        "API p99 {:?} is over a second",
        pct(0.99)
    );
    assert!(
        hwm_kib / 1024 < RSS_LIMIT_MIB,
        "agent peak RSS {} MiB over {RSS_LIMIT_MIB} MiB",
        hwm_kib / 1024
    );
    assert!(status["presence"]["malformed"].as_u64().unwrap() > 0);
    assert!(status["election"]["offers_refused"].as_u64().unwrap() > 0);
}
