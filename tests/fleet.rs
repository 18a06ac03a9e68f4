//! The fleet key on loopback: sealed datagrams and authenticated repair
//! connections between agents that hold it; a host without it can neither
//! join, be heard, be elected, serve nor take repair.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    BIN, Proc, TempDir, get_json, json, origin_bytes, origin_dir, package, post, start_agent,
    start_origin, wait_done, wait_for, wait_peers,
};
use somcast::demo::{generate_file, private_group};

fn fleet_key(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new(BIN)
        .args(["key", "generate", "--fleet"])
        .arg(dir.join(name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(format!("{name}.fleet"))
}

#[test]
fn a_sealed_transfer_reaches_only_receivers_with_the_key() {
    let dir = TempDir::new("fleet-lab");
    let key = fleet_key(&dir.0, "lan");
    let other = fleet_key(&dir.0, "other");
    let src = dir.0.join("src.bin");
    generate_file(&src, 3 * 1024 * 1024 + 5, 3).unwrap();
    let group = private_group().to_string();
    let recv = |out: &str, key: Option<&Path>, timeout: &str| {
        let mut c = Command::new(BIN);
        c.args([
            "recv",
            "--iface",
            "127.0.0.1",
            "--json",
            "--timeout",
            timeout,
        ])
        .args(["--group", &group])
        .arg("--out")
        .arg(dir.0.join(out));
        if let Some(k) = key {
            c.arg("--key").arg(k);
        }
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let with_key = recv("with.bin", Some(&key), "30s");
    let without = recv("without.bin", None, "4s");
    let wrong = recv("wrong.bin", Some(&other), "4s");
    let sent = Command::new(BIN)
        .args(["send", "--iface", "127.0.0.1", "--json", "--rate", "200M"])
        .args([
            "--group",
            &group,
            "--min-receivers",
            "1",
            "--join-timeout",
            "20s",
        ])
        .arg("--key")
        .arg(&key)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let summary = json(&sent.stdout);
    // Only the receiver with the key could join.
    assert_eq!(summary["receivers_done"], 1, "{summary}");
    let o = with_key.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(dir.0.join("with.bin")).unwrap(),
        std::fs::read(&src).unwrap()
    );
    for (what, child, out) in [
        ("no key", without, "without.bin"),
        ("another key", wrong, "wrong.bin"),
    ] {
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!dir.0.join(out).exists(), "{what} wrote a file");
    }
}

/// Waits until agent `a` has `n` peers.
fn repair_port(a: &Proc) -> SocketAddr {
    let port = get_json(a.addr, "/v1/status")["repair_port"]
        .as_u64()
        .unwrap();
    SocketAddr::from(([127, 0, 0, 1], port as u16))
}

#[test]
fn an_agent_without_the_fleet_key_can_neither_join_nor_serve_nor_take_repair() {
    let dir = TempDir::new("fleet-agents");
    let key = fleet_key(&dir.0, "lan");
    let key_arg = key.to_str().unwrap();
    let origin = start_origin(&origin_dir(&dir), "0");
    let size = 6 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 4, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("fleet-agent")).collect();
    let keyed: Vec<Proc> = caches[..2]
        .iter()
        .map(|c| start_agent(&c.0, group, &["--fleet-key", key_arg]))
        .collect();
    let outsider = start_agent(&caches[2].0, group, &[]);
    // The two with the key see each other, and only each other.
    for a in &keyed {
        wait_peers(a, 1, "keyed agents see each other");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        get_json(outsider.addr, "/v1/status")["peers"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // scan --probe sees the agents that hold the key it is given.
    let probe = |key: Option<&str>| {
        let extra: Vec<&str> = key.map(|k| vec!["--fleet-key", k]).unwrap_or_default();
        let v = json(&common::scan_probe(group, &extra).stdout);
        let mut nodes: Vec<String> = v["probe"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["node"].as_str().unwrap().to_string())
            .collect();
        nodes.sort();
        nodes
    };
    let node = |a: &Proc| {
        get_json(a.addr, "/v1/status")["node"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut pair = vec![node(&keyed[0]), node(&keyed[1])];
    pair.sort();
    assert_eq!(probe(Some(key_arg)), pair);
    assert_eq!(probe(None), vec![node(&outsider)]);
    let heard = get_json(keyed[0].addr, "/v1/status");
    assert_eq!(heard["lan"]["authenticated"], true);
    assert!(
        heard["lan"]["datagrams"]["unsealed"].as_u64().unwrap() > 0,
        "{heard}"
    );
    assert!(
        heard["lan"]["datagrams"]["accepted"].as_u64().unwrap() > 0,
        "{heard}"
    );

    // One task to all three: the keyed pair shares one origin download;
    // the outsider, alone in its own world, fetches everything itself.
    let spec = serde_json::json!({ "id": "f1", "manifest": m, "delay_ms": 1500 });
    for a in keyed.iter().chain([&outsider]) {
        post(a, &spec);
    }
    let mut roles = Vec::new();
    for a in &keyed {
        let s = wait_done(a, "f1", Duration::from_secs(60));
        assert_eq!(s["state"], "done", "{s}");
        roles.push(s["role"].as_str().unwrap().to_string());
    }
    assert!(
        roles.contains(&"representative".to_string()) && roles.contains(&"receiver".to_string())
    );
    let s = wait_done(&outsider, "f1", Duration::from_secs(60));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["role"], "representative", "{s}");
    assert_eq!(s["bytes"]["multicast"], 0, "{s}");
    assert_eq!(s["bytes"]["peers"], 0, "{s}");
    assert_eq!(s["bytes"]["origin"], size, "{s}");
    for c in &caches {
        assert_eq!(
            common::cached(&c.0, &m.content_id).as_deref(),
            Some(&bytes[..])
        );
    }
    // Two downloads: the pair's and the outsider's.
    assert!(origin_bytes(&origin) <= 2 * size * 105 / 100);

    // The repair port of a keyed agent: a plain request gets nothing.
    let port = repair_port(&keyed[0]);
    let mut s = TcpStream::connect(port).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[0x53; 24]).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "served {} bytes without the key", got.len());
    wait_for("the refusal is counted", Duration::from_secs(5), || {
        get_json(keyed[0].addr, "/v1/status")["lan"]["datagrams"]["repair_refused"]
            .as_u64()
            .unwrap()
            >= 1
    });
}

/// Every datagram of a lab transfer, as a host on the LAN hears it.
fn sniff(
    group: std::net::SocketAddrV4,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Vec<u8>> {
    let (socket, _) =
        multicast::socket::open_receiver(group, std::net::Ipv4Addr::LOCALHOST).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut heard = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(n) = socket.recv(&mut buf) {
            heard.push(buf[..n].to_vec());
        }
    }
    heard
}

#[test]
fn with_encrypt_the_package_bytes_never_appear_on_the_wire() {
    let dir = TempDir::new("fleet-encrypt");
    let key = fleet_key(&dir.0, "lan");
    let src = dir.0.join("src.bin");
    generate_file(&src, 1024 * 1024 + 9, 5).unwrap();
    let original = std::fs::read(&src).unwrap();
    // 32 bytes of the file from its first symbol, which a plain transfer
    // carries verbatim.
    let pattern = &original[700..732];
    for encrypt in [false, true] {
        let group = private_group();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sniffer = {
            let stop = stop.clone();
            std::thread::spawn(move || sniff(group, stop))
        };
        let out = dir.0.join(format!("out-{encrypt}.bin"));
        let recv = Command::new(BIN)
            .args(["recv", "--iface", "127.0.0.1", "--timeout", "30s"])
            .args(["--group", &group.to_string()])
            .arg("--out")
            .arg(&out)
            .arg("--key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut send = Command::new(BIN);
        send.args(["send", "--iface", "127.0.0.1", "--rate", "200M"])
            .args(["--group", &group.to_string(), "--min-receivers", "1"])
            .arg("--key")
            .arg(&key)
            .arg(&src);
        if encrypt {
            send.arg("--encrypt");
        }
        let sent = send.output().unwrap();
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        let r = recv.wait_with_output().unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(std::fs::read(&out).unwrap(), original);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let heard = sniffer.join().unwrap();
        assert!(
            heard.len() > 700,
            "the sniffer heard {} datagrams",
            heard.len()
        );
        let seen = heard
            .iter()
            .any(|d| d.windows(pattern.len()).any(|w| w == pattern));
        assert_eq!(
            seen, !encrypt,
            "encrypt {encrypt}: file bytes on the wire: {seen}"
        );
    }
}

/// Mid-roll: one agent seals with the old key, the other with the new, and
/// each holds both: they hear each other and share one transfer.
#[test]
fn agents_mid_key_roll_still_share_a_transfer() {
    let dir = TempDir::new("fleet-roll");
    let old = fleet_key(&dir.0, "old");
    let new = fleet_key(&dir.0, "new");
    let (old, new) = (old.to_str().unwrap(), new.to_str().unwrap());
    let origin = start_origin(&origin_dir(&dir), "0");
    let size = 3 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 6, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..2).map(|_| TempDir::new("fleet-roll-agent")).collect();
    let agents = [
        start_agent(
            &caches[0].0,
            group,
            &["--fleet-key", old, "--fleet-key", new],
        ),
        start_agent(
            &caches[1].0,
            group,
            &["--fleet-key", new, "--fleet-key", old],
        ),
    ];
    for a in &agents {
        wait_peers(a, 1, "the two agents hear each other");
    }
    let spec = serde_json::json!({ "id": "roll", "manifest": m, "delay_ms": 1500 });
    for a in &agents {
        post(a, &spec);
    }
    let mut multicast = 0;
    for a in &agents {
        let s = wait_done(a, "roll", Duration::from_secs(60));
        assert_eq!(s["state"], "done", "{s}");
        multicast += s["bytes"]["multicast"].as_u64().unwrap();
    }
    assert_eq!(multicast, size, "one agent received the other's multicast");
    assert!(origin_bytes(&origin) <= size * 105 / 100);
    for c in &caches {
        assert_eq!(
            common::cached(&c.0, &m.content_id).as_deref(),
            Some(&bytes[..])
        );
    }
}

/// The repair server bounds what a client can hold: eight connections from
/// one address, and a request frame declared longer than any request is
/// refused before it is buffered.
#[test]
fn the_repair_server_caps_connections_per_source_and_request_size() {
    let dir = TempDir::new("repair-caps");
    let agent = start_agent(&dir.0, private_group(), &[]);
    let port = repair_port(&agent);
    let open = || {
        let s = TcpStream::connect(port).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s
    };
    // A closed connection reads 0 at once; an open one times out.
    let closed = |s: &mut TcpStream| match s.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    let mut held: Vec<TcpStream> = (0..8).map(|_| open()).collect();
    let mut ninth = open();
    assert!(
        closed(&mut ninth),
        "a ninth connection from one address is refused"
    );
    assert!(!closed(&mut held[0]), "the first eight stay open");
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = open();
    assert!(!closed(&mut again), "a slot given back is taken again");
    // A 4 MiB frame declared: closed before the body, whatever follows.
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let mut big = open();
    big.write_all(b"SR\x01\x01").unwrap();
    big.write_all(&(4u32 << 20).to_le_bytes()).unwrap();
    assert!(closed(&mut big), "a huge request frame is refused at once");
    // Something that is no repair frame (an old length-first client, or
    // another protocol) is refused on its first eight bytes.
    let mut stranger = open();
    stranger.write_all(b"GET / HT").unwrap();
    assert!(
        closed(&mut stranger),
        "a frame without the magic is refused"
    );
    let refused = get_json(agent.addr, "/v1/status")["lan"]["datagrams"]["repair_refused"]
        .as_u64()
        .unwrap();
    assert!(refused >= 1, "the refused connection is counted");
}
