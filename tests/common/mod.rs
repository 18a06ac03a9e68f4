//! Helpers shared by the end-to-end tests.

#![allow(dead_code)] // each test file takes what it needs

use std::fs;
use std::path::PathBuf;

pub const BIN: &str = env!("CARGO_BIN_EXE_somcast");

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "somcast-test-{tag}-{}-{:x}",
            std::process::id(),
            multicast::driver::random_id()
        ));
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}", String::from_utf8_lossy(out));
    })
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-123";

/// A child process (agent, origin) killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `somcast ARGS` and waits for the stderr line holding `marker`
/// followed by an address; the rest of stderr is drained in the background.
fn spawn_until(args: &[&str], extra: &[&std::ffi::OsStr], marker: &str) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{args:?} exited before printing {marker:?}"))
            .unwrap();
        if let Some(i) = line.find(marker) {
            let rest = &line[i + marker.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '/')
                .unwrap_or(rest.len());
            break rest[..end].parse().unwrap();
        }
    };
    let log = std::env::var_os("SOMCAST_TEST_LOG").is_some();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if log {
                eprintln!("{l}");
            }
        }
    });
    Proc { child, addr }
}

/// An agent on loopback with a private control group, in the insecure lab
/// mode (unsigned tasks taken, the token guards them).
pub fn start_agent(cache: &Path, group: SocketAddrV4, extra: &[&str]) -> Proc {
    let mut args = vec!["--insecure-unsigned"];
    args.extend_from_slice(extra);
    start_agent_with(cache, group, &args)
}

/// An agent on loopback with a private control group and only `extra`
/// (its API on a free port unless `extra` gives `--api`).
pub fn start_agent_with(cache: &Path, group: SocketAddrV4, extra: &[&str]) -> Proc {
    let mut args = vec!["agent", "--iface", "127.0.0.1"];
    if !extra.contains(&"--api") {
        args.extend_from_slice(&["--api", "127.0.0.1:0"]);
    }
    args.extend_from_slice(&["--token", TOKEN, "--presence-interval", "300ms"]);
    args.extend_from_slice(extra);
    let g = group.to_string();
    spawn_until(
        &args,
        &[
            "--cache".as_ref(),
            cache.as_os_str(),
            "--control-group".as_ref(),
            g.as_ref(),
        ],
        "control API on http://",
    )
}

/// `somcast serve DIR` on a free port.
pub fn start_origin(dir: &Path, rate: &str) -> Proc {
    start_origin_with(dir, &["--listen", "127.0.0.1:0", "--rate", rate])
}

/// `somcast serve DIR ARGS`.
pub fn start_origin_with(dir: &Path, args: &[&str]) -> Proc {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    spawn_until(&all, &[dir.as_os_str()], " on http://")
}

/// A bare HTTP/1.1 request: status code and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

pub fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    http(addr, "GET", path, token, None)
}

pub fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (code, body) = get(addr, path, Some(TOKEN));
    assert_eq!(code, 200, "{path}: {body}");
    json(body.as_bytes())
}

pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A package of `size` bytes in `dir/origin/pkg.bin`, and its manifest for
/// an origin at `origin`.
pub fn package(
    dir: &Path,
    size: u64,
    seed: u64,
    origin: SocketAddr,
) -> (somcast::manifest::Manifest, Vec<u8>) {
    let d = dir.join("origin");
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("pkg.bin");
    somcast::demo::generate_file(&file, size, seed).unwrap();
    let m = somcast::manifest::Manifest::create(&file, vec![format!("http://{origin}/pkg.bin")])
        .unwrap();
    (m, std::fs::read(&file).unwrap())
}

/// `dir/origin`, created, for `start_origin`.
pub fn origin_dir(dir: &TempDir) -> std::path::PathBuf {
    let d = dir.0.join("origin");
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn post_task(agent: &Proc, spec: &serde_json::Value) -> (u16, serde_json::Value) {
    let (code, body) = http(
        agent.addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(&spec.to_string()),
    );
    (code, json(body.as_bytes()))
}

/// Starts a task that must be accepted.
pub fn post(agent: &Proc, spec: &serde_json::Value) {
    let (code, v) = post_task(agent, spec);
    assert_eq!(code, 201, "{v}");
}

pub fn task(agent: &Proc, id: &str) -> serde_json::Value {
    get_json(agent.addr, &format!("/v1/tasks/{id}"))
}

pub fn finished(s: &serde_json::Value) -> bool {
    matches!(s["state"].as_str(), Some("done" | "failed" | "cancelled"))
}

pub fn wait_done(agent: &Proc, id: &str, limit: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let last = task(agent, id);
        if finished(&last) {
            return last;
        }
        assert!(
            t0.elapsed() < limit,
            "task {id} on {}: not done within {limit:?}; last status: {last}",
            agent.addr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn origin_bytes(origin: &Proc) -> u64 {
    let (_, body) = get(origin.addr, "/stats", None);
    json(body.as_bytes())["bytes_served"].as_u64().unwrap()
}

/// The object the agent with `cache` holds for content `id`.
pub fn cached(cache: &Path, id: &str) -> Option<Vec<u8>> {
    std::fs::read(cache.join("objects").join(id)).ok()
}

/// `somcast scan --probe --json` on loopback for `group`, with `extra` args.
pub fn scan_probe(group: SocketAddrV4, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args([
            "scan",
            "--iface",
            "127.0.0.1",
            "--probe",
            "--json",
            "--wait",
            "700ms",
        ])
        .arg("--control-group")
        .arg(group.to_string())
        .args(extra)
        .output()
        .unwrap()
}

/// The best standing there is, under `node`: what a forger claims.
pub fn best_standing(node: u64) -> multicast::wire::Standing {
    multicast::wire::Standing {
        preference: 255,
        held_permille: 1000,
        wired: true,
        free_disk_gib: u32::MAX,
        uptime_h: u32::MAX,
        node,
    }
}

/// A presence announcement from 127.0.0.1 of `node` holding every one of
/// `blocks` blocks of `content`, served at `repair_port`.
pub fn announce_holding(
    node: u64,
    seq: u32,
    repair_port: u16,
    content: &[u8; 32],
    blocks: u32,
) -> Vec<u8> {
    use multicast::wire::{AddrV4, Announce, Frame, Held};
    Frame::Presence(Announce {
        node,
        incarnation: 1,
        seq,
        interval_ms: 600_000,
        version: "forged".into(),
        addrs: vec![AddrV4 {
            addr: [127, 0, 0, 1],
            prefix: 8,
        }],
        api_port: 0,
        repair_port,
        rank: Default::default(),
        held: vec![Held {
            content: content[..8].try_into().expect("a digest has 32 bytes"),
            blocks_done: blocks,
            block_count: blocks,
            have: vec![[0, blocks]],
        }],
        reply_to: None,
    })
    .encode(0)
}

/// `somcast ARGS`, which must succeed: its standard output.
pub fn cli(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until the agent's presence lists exactly `n` peers.
pub fn wait_peers(a: &Proc, n: usize, what: &str) {
    wait_for(what, Duration::from_secs(10), || {
        get_json(a.addr, "/v1/status")["peers"]
            .as_array()
            .unwrap()
            .len()
            == n
    });
}
