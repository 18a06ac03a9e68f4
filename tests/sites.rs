//! Sites on loopback: a signed topology puts agents in sites; a subnet
//! fetches from its site's rendezvous point (the next one when the first
//! does not answer) instead of the origin; a Wi-Fi site shares over TCP
//! without multicast; VPN agents fetch on their own and serve nobody.
//! Each "subnet" here is a private control group.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Proc, TempDir, cached, cli, get_json, origin_bytes, origin_dir, package, post, start_agent,
    start_origin, wait_done,
};
use serde_json::{Value, json};
use somcast::demo::private_group;

const SIZE: u64 = 12 * 1024 * 1024 + 77;

/// Signs `sites` with a new publisher key: the topology file and the key's
/// .pub.
fn topology(dir: &Path, sites: Value) -> (PathBuf, PathBuf) {
    let key = dir.join("publisher");
    cli(&["key", "generate", key.to_str().unwrap()]);
    let sites_file = dir.join("sites.json");
    std::fs::write(&sites_file, json!({ "sites": sites }).to_string()).unwrap();
    let out = dir.join("topology.json");
    cli(&[
        "topology",
        "sign",
        sites_file.to_str().unwrap(),
        "--sign",
        dir.join("publisher.key").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    (out, dir.join("publisher.pub"))
}

/// A free port whose successor is free too (an agent's API and repair).
fn free_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn agent(cache: &Path, topo: &Path, trust: &Path, api: Option<u16>) -> Proc {
    let api = api.map(|p| format!("127.0.0.1:{p}"));
    let mut args = vec![
        "--topology",
        topo.to_str().unwrap(),
        "--trust",
        trust.to_str().unwrap(),
    ];
    if let Some(a) = &api {
        args.extend(["--api", a.as_str()]);
    }
    start_agent(cache, private_group(), &args)
}

#[test]
fn a_subnet_fetches_from_its_sites_rendezvous_and_the_next_when_one_is_down() {
    let dir = TempDir::new("sites-rvp");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, SIZE, 5, origin.addr);
    let rvp_api = free_pair();
    // The first rendezvous listed is down (nothing listens there).
    let dead = free_pair();
    let (topo, trust) = topology(
        &dir.0,
        json!([{
            "name": "office",
            "subnets": ["127.0.0.0/8"],
            "rendezvous": [format!("127.0.0.1:{}", dead + 1), format!("127.0.0.1:{}", rvp_api + 1)],
        }]),
    );
    let (c1, c2) = (TempDir::new("sites-rvp-a"), TempDir::new("sites-rvp-b"));
    // Each on a subnet (control group) of its own.
    let rvp = agent(&c1.0, &topo, &trust, Some(rvp_api));
    let other = agent(&c2.0, &topo, &trust, None);
    let st = get_json(rvp.addr, "/v1/status");
    assert_eq!(st["site"]["site"], "office", "{st}");
    assert_eq!(st["site"]["rendezvous"], true, "{st}");
    assert_eq!(
        get_json(other.addr, "/v1/status")["site"]["rendezvous"],
        false
    );
    let spec = json!({ "id": "site-1", "manifest": m, "delay_ms": 500 });
    post(&rvp, &spec);
    post(&other, &spec);
    for (a, c) in [(&rvp, &c1), (&other, &c2)] {
        let s = wait_done(a, "site-1", Duration::from_secs(90));
        assert_eq!(s["state"], "done", "{s}");
        assert_eq!(s["site"], "office", "{s}");
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
    }
    let s = common::task(&other, "site-1");
    assert_eq!(s["bytes"]["origin"], 0, "{s}");
    // Prometheus sees the rendezvous as a source of its own.
    let (_, page) = common::get(other.addr, "/metrics", Some(common::TOKEN));
    let line = page
        .lines()
        .find(|l| l.starts_with("somcast_task_bytes{source=\"rendezvous\"}"))
        .unwrap_or_else(|| panic!("no rendezvous bytes in {page}"));
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= SIZE, "{line}");
    assert!(s["bytes"]["rendezvous"].as_u64().unwrap() >= SIZE, "{s}");
    let history = s["history"].to_string();
    assert!(
        history.contains(&format!("rendezvous 127.0.0.1:{}", dead + 1)),
        "the dead rendezvous is named: {history}"
    );
    let served = origin_bytes(&origin);
    assert!(
        served as f64 <= 1.05 * SIZE as f64,
        "one download for the site: the origin sent {served} for {SIZE}"
    );
}

/// N agents on one subnet, all in one site of type `kind` spanning
/// loopback, each given the task `<kind>-task`.
struct OneSite {
    _dir: TempDir,
    origin: Proc,
    manifest: somcast::manifest::Manifest,
    bytes: Vec<u8>,
    caches: Vec<TempDir>,
    agents: Vec<Proc>,
}

fn one_site(kind: &str, n: usize) -> OneSite {
    let dir = TempDir::new("sites-one");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (manifest, bytes) = package(&dir.0, SIZE, 6, origin.addr);
    let (topo, trust) = topology(
        &dir.0,
        json!([{ "name": "office", "subnets": ["127.0.0.0/8"], "type": kind }]),
    );
    let group = private_group();
    let caches: Vec<TempDir> = (0..n).map(|_| TempDir::new("sites-one-a")).collect();
    let args = [
        "--topology",
        topo.to_str().unwrap(),
        "--trust",
        trust.to_str().unwrap(),
    ];
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &args))
        .collect();
    let spec = json!({ "id": format!("{kind}-task"), "manifest": manifest, "delay_ms": 500 });
    for a in &agents {
        post(a, &spec);
    }
    OneSite {
        _dir: dir,
        origin,
        manifest,
        bytes,
        caches,
        agents,
    }
}

#[test]
fn a_wifi_site_shares_over_tcp_without_multicast() {
    let lab = one_site("wifi", 4);
    let (agents, caches, m) = (&lab.agents, &lab.caches, &lab.manifest);
    let mut from_peers = 0;
    for (a, c) in agents.iter().zip(caches) {
        let s = wait_done(a, "wifi-task", Duration::from_secs(90));
        assert_eq!(s["state"], "done", "{s}");
        assert_eq!(s["bytes"]["multicast"], 0, "no multicast on Wi-Fi: {s}");
        assert!(s["multicast"].is_null(), "nothing sent: {s}");
        if s["bytes"]["peers"].as_u64().unwrap() >= SIZE {
            from_peers += 1;
        }
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&lab.bytes[..]));
    }
    assert_eq!(
        from_peers, 3,
        "all but the one that fetched took it from peers"
    );
    let served = origin_bytes(&lab.origin);
    assert!(served as f64 <= 1.05 * SIZE as f64, "origin sent {served}");
}

#[test]
fn vpn_agents_fetch_on_their_own_and_serve_no_peer() {
    let lab = one_site("vpn", 2);
    let (agents, m) = (&lab.agents, &lab.manifest);
    for a in agents {
        let s = wait_done(a, "vpn-task", Duration::from_secs(60));
        assert_eq!(s["state"], "done", "{s}");
        assert!(s["role"].is_null(), "no election: {s}");
        assert_eq!(s["bytes"]["origin"].as_u64(), Some(SIZE), "{s}");
        assert_eq!(s["bytes"]["peers"], 0, "{s}");
    }
    // Each fetched on its own: twice the package.
    assert!(origin_bytes(&lab.origin) >= 2 * SIZE);
    // A VPN agent holds the package and still serves no block of it.
    let port = get_json(agents[0].addr, "/v1/status")["repair_port"]
        .as_u64()
        .unwrap() as u16;
    let mut content = [0u8; 32];
    for (i, b) in content.iter_mut().enumerate() {
        *b = u8::from_str_radix(&m.content_id[2 * i..2 * i + 2], 16).unwrap();
    }
    let mut request = Vec::new();
    repair::frame::encode(
        &repair::frame::Frame::Need {
            content,
            block: 0,
            held: 0,
            need: 10,
            highest_esi: None,
        },
        &mut request,
    );
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&request).unwrap();
    let mut answer = vec![0u8; 64];
    let n = conn.read(&mut answer).unwrap();
    let (frame, _) = repair::frame::decode(&answer[..n], 4096).unwrap().unwrap();
    assert_eq!(frame, repair::frame::Frame::NotHeld { block: 0 });
}

#[test]
fn a_channel_topology_replaces_the_agents_only_when_signed_and_newer() {
    let dir = TempDir::new("sites-channel");
    let origin = start_origin(&origin_dir(&dir), "0");
    let chan = dir.0.join("origin").join("chan");
    let key = dir.0.join("publisher");
    cli(&["key", "generate", key.to_str().unwrap()]);
    let (key_file, pub_file) = (dir.0.join("publisher.key"), dir.0.join("publisher.pub"));
    let sign = |name: &str| -> PathBuf {
        let sites = dir.0.join(format!("{name}.sites.json"));
        let doc = json!({ "sites": [{ "name": name, "subnets": ["127.0.0.0/8"] }] });
        std::fs::write(&sites, doc.to_string()).unwrap();
        let out = dir.0.join(format!("{name}.topology.json"));
        cli(&[
            "topology",
            "sign",
            sites.to_str().unwrap(),
            "--sign",
            key_file.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--channel",
            chan.to_str().unwrap(),
        ]);
        out
    };
    let set_index = |env: &Path| {
        // Put a topology file on the channel by hand, under a fresh index id.
        std::fs::copy(env, chan.join("topology.json")).unwrap();
        let path = chan.join("channel.json");
        let mut index: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        index["topology"] = json!(format!("x{}", somcast::trust::document::new_id()));
        std::fs::write(&path, index.to_string()).unwrap();
    };
    let first = sign("first");
    let cache = TempDir::new("sites-channel-a");
    let url = format!("http://{}/chan", origin.addr);
    let args = [
        "--trust",
        pub_file.to_str().unwrap(),
        "--channel",
        url.as_str(),
        "--poll",
        "1s",
    ];
    let site = |a: &Proc| get_json(a.addr, "/v1/status")["site"]["site"].clone();
    let a = start_agent(&cache.0, private_group(), &args);
    common::wait_for("the first topology", Duration::from_secs(15), || {
        site(&a) == "first"
    });
    // The document changed on the server, its signature kept: refused.
    let forged = dir.0.join("forged.json");
    let text = std::fs::read_to_string(&first).unwrap();
    std::fs::write(&forged, text.replace("\\\"first\\\"", "\\\"forged\\\"")).unwrap();
    assert_ne!(std::fs::read_to_string(&forged).unwrap(), text);
    set_index(&forged);
    common::wait_for(
        "the forged topology refused",
        Duration::from_secs(15),
        || get_json(a.addr, "/v1/status")["channel"]["refused"].as_u64() == Some(1),
    );
    assert_eq!(site(&a), "first");
    // A newer one is taken; the older one served again is not.
    std::thread::sleep(Duration::from_millis(1100)); // a later `issued`
    sign("second");
    common::wait_for("the second topology", Duration::from_secs(15), || {
        site(&a) == "second"
    });
    set_index(&first);
    common::wait_for("the old topology judged", Duration::from_secs(15), || {
        let m = std::fs::read_to_string(cache.0.join("channel-state.json")).unwrap_or_default();
        serde_json::from_str::<Value>(&m)
            .is_ok_and(|v| v["topology"].as_str().is_some_and(|t| t.starts_with('x')))
    });
    assert_eq!(site(&a), "second");
    // Kept across a restart, without the channel.
    drop(a);
    let a = start_agent(&cache.0, private_group(), &args[..2]);
    assert_eq!(site(&a), "second");
}

/// One JOIN from source address `from`: the members the rendezvous at
/// `to` lists, or why none. With `fleet`, the connection opens with the
/// fleet-key handshake and every byte after it is enciphered, as agents do.
fn join_from(
    from: std::net::Ipv4Addr,
    to: std::net::SocketAddr,
    fetching: bool,
    fleet: Option<&multicast::auth::FleetKeys>,
) -> Result<Vec<(std::net::Ipv4Addr, u16)>, String> {
    use multicast::handshake;
    use repair::frame::{self, Frame};
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    s.bind(&std::net::SocketAddr::from((from, 0)).into())
        .map_err(|e| e.to_string())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // As the agent's: the proof and the JOIN, two writes in a row, are
    // not held for an ACK.
    s.set_nodelay(true).unwrap();
    let mut ciphers = None;
    if let Some(keys) = fleet {
        let (client, hello) = handshake::Client::start(keys);
        s.write_all(&hello).map_err(|e| format!("hello: {e}"))?;
        let mut answer = [0u8; handshake::ANSWER_LEN];
        s.read_exact(&mut answer)
            .map_err(|e| format!("answer: {e}"))?;
        let (proof, session) = client.finish(&answer).map_err(|e| e.to_string())?;
        s.write_all(&proof).map_err(|e| format!("proof: {e}"))?;
        ciphers = Some(session.ciphers(true));
    }
    let join = Frame::Join {
        content: [9; 32],
        repair_port: 4000,
        fetching,
    };
    let mut out = Vec::new();
    frame::encode(&join, &mut out);
    if let Some((tx, _)) = &mut ciphers {
        tx.apply(&mut out);
    }
    s.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed".into());
        }
        if let Some((_, rx)) = &mut ciphers {
            rx.apply(&mut chunk[..n]);
        }
        buf.extend_from_slice(&chunk[..n]);
        match frame::decode(&buf, 1 << 16).map_err(|e| e.to_string())? {
            Some((Frame::Members { members }, _)) => {
                return Ok(members.into_iter().map(|(ip, p)| (ip.into(), p)).collect());
            }
            Some((f, _)) => return Err(format!("answered {}", f.name())),
            None => {}
        }
    }
}

/// The listeners of a large subnet start a task together, each sending
/// its first JOIN at a random moment of its first half second (as the
/// agents do). Five hundred of them, each from an address of its own, are all
/// answered with the member list at the first try: the rendezvous closes
/// what comes past its 64 repair connections at once, and a JOIN is
/// answered long before that many pile up.
#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "JOINs from 127.0.x.y: only Linux routes all of 127/8 to loopback"
)]
fn hundreds_of_listeners_joining_together_are_each_answered_at_once() {
    join_burst(None);
}

/// The same burst on a fleet that holds a fleet key: each JOIN now opens
/// with the handshake (a round trip more, two keyed BLAKE3 tags on each
/// side) and is enciphered, and every one is still answered at once.
#[test]
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "JOINs from 127.0.x.y: only Linux routes all of 127/8 to loopback"
)]
fn hundreds_of_listeners_joining_with_the_fleet_key_are_each_answered_at_once() {
    let dir = TempDir::new("sites-join-key");
    cli(&[
        "key",
        "generate",
        "--fleet",
        dir.0.join("lan").to_str().unwrap(),
    ]);
    join_burst(Some(&dir.0.join("lan.fleet")));
}

/// 500 listeners JOIN a real agent's rendezvous, each at a random moment
/// of the first 500 ms and from a 127.0.x.y address of its own (the
/// server takes 8 connections per address); every one must get the
/// member list at the first try. With `fleet_key`, the agent and the
/// listeners hold that key.
fn join_burst(fleet_key: Option<&Path>) {
    const LISTENERS: u32 = 500;
    let dir = TempDir::new("sites-join");
    let api = free_pair();
    let mut args = vec!["--api".to_string(), format!("127.0.0.1:{api}")];
    let mut keys = None;
    if let Some(k) = fleet_key {
        args.extend(["--fleet-key".to_string(), k.display().to_string()]);
        keys = somcast::trust::keys::read_fleet_keys(&[k.to_path_buf()]).unwrap();
        assert!(keys.is_some(), "the fleet key read");
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _rvp = start_agent(&dir.0.join("rvp"), private_group(), &args);
    let rvp: std::net::SocketAddr = ([127, 0, 0, 1], api + 1).into();
    let member = std::net::Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(
        join_from(member, rvp, true, keys.as_ref()),
        Ok(vec![(member, 4000)])
    );
    if keys.is_some() {
        // Without the key the rendezvous answers nobody.
        assert!(join_from(member, rvp, true, None).is_err());
    }

    // A random moment of the first 500 ms for each (an LCG from the clock).
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    let start = std::time::Instant::now();
    let joiners: Vec<_> = (0..LISTENERS)
        .map(|i| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = start + Duration::from_millis((seed >> 33) % 500);
            let from = std::net::Ipv4Addr::new(127, 0, 1 + (i / 200) as u8, 1 + (i % 200) as u8);
            let keys = keys.clone();
            std::thread::spawn(move || {
                std::thread::sleep(at.saturating_duration_since(std::time::Instant::now()));
                (from, join_from(from, rvp, false, keys.as_ref()))
            })
        })
        .collect();
    let mut refused = Vec::new();
    for j in joiners {
        let (from, got) = j.join().unwrap();
        if got != Ok(vec![(member, 4000)]) {
            refused.push((from, got));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {LISTENERS} listeners not answered at the first JOIN, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(3)]
    );
}
