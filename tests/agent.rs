//! `somcast agent` and `somcast scan --probe` over loopback multicast:
//! presence with real sockets, the control API's token, restart identity.

mod common;

use std::net::SocketAddrV4;
use std::process::Command;
use std::time::Duration;

use common::{BIN, Proc, TOKEN, TempDir, get, json, start_agent, wait_for};
use somcast::demo::private_group;

type Agent = Proc;

fn start(cache: &std::path::Path, group: SocketAddrV4) -> Agent {
    start_agent(cache, group, &[])
}

fn status(a: &Agent) -> serde_json::Value {
    let (code, body) = get(a.addr, "/v1/status", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    json(body.as_bytes())
}

fn peer_nodes(a: &Agent) -> Vec<String> {
    let mut v: Vec<String> = status(a)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn scan_probe(group: SocketAddrV4) -> std::process::Output {
    common::scan_probe(group, &[])
}

#[test]
fn agents_on_loopback_find_each_other_and_scan_probe_lists_them() {
    let group = private_group();
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("agent")).collect();
    let agents: Vec<Agent> = dirs.iter().map(|d| start(&d.0, group)).collect();
    let nodes: Vec<String> = agents
        .iter()
        .map(|a| status(a)["node"].as_str().unwrap().to_string())
        .collect();
    for (i, a) in agents.iter().enumerate() {
        let mut want: Vec<String> = nodes.iter().filter(|n| **n != nodes[i]).cloned().collect();
        want.sort();
        wait_for(
            "every agent sees the other two",
            Duration::from_secs(5),
            || peer_nodes(a) == want,
        );
    }
    let out = scan_probe(group);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    let found = v["probe"]["agents"].as_array().unwrap();
    let mut got: Vec<String> = found
        .iter()
        .map(|a| a["node"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want = nodes.clone();
    want.sort();
    assert_eq!(got, want);
    for a in found {
        assert_eq!(a["address"], "127.0.0.1", "addresses are strings: {a}");
        assert!(a["rtt_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(a["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(a["reached_by"], "multicast", "the group passes here: {a}");
    }
    let advice = v["advice"].to_string();
    assert!(!advice.contains("IGMP"), "no cause to name: {advice}");
}

#[test]
fn the_api_wants_its_token_and_names_unknown_endpoints() {
    let dir = TempDir::new("api");
    let a = start(&dir.0, private_group());
    let (code, body) = get(a.addr, "/v1/status", None);
    assert_eq!(code, 401);
    assert!(
        json(body.as_bytes())["error"]
            .as_str()
            .unwrap()
            .contains("bearer token")
    );
    assert_eq!(get(a.addr, "/v1/status", Some("wrong-token-xx")).0, 401);
    let (code, body) = get(a.addr, "/v1/nothing", Some(TOKEN));
    assert_eq!(code, 404);
    assert!(body.contains("no such endpoint"), "{body}");
    // The auth scheme is case-insensitive.
    let mut s = std::net::TcpStream::connect(a.addr).unwrap();
    std::io::Write::write_all(
        &mut s,
        format!("GET /v1/status HTTP/1.1\r\nHost: t\r\nauthorization: bearer {TOKEN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[test]
fn the_cache_and_the_generated_token_are_private() {
    let dir = TempDir::new("private");
    let cache = dir.0.join("cache");
    let a = common::start_agent_with(&cache, private_group(), &[]);
    drop(a);
    // Without --token, an agent makes one from the OS random source.
    let b = Command::new(BIN)
        .args(["agent", "--iface", "127.0.0.1", "--api", "127.0.0.1:0"])
        .arg("--cache")
        .arg(dir.0.join("cache2"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token = dir.0.join("cache2").join("api-token");
    wait_for("the token file", Duration::from_secs(5), || token.exists());
    let mut b = b;
    let _ = b.kill();
    let _ = b.wait();
    let t = std::fs::read_to_string(&token).unwrap();
    assert_eq!(t.trim().len(), 32, "128 bits in hex: {t:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&dir.0.join("cache2")), 0o700);
        assert_eq!(mode(&token), 0o600);
    }
}

#[test]
fn a_killed_agent_leaves_the_table_and_comes_back_with_its_node_id() {
    let group = private_group();
    let (da, db) = (TempDir::new("stay"), TempDir::new("killed"));
    let a = start(&da.0, group);
    let mut b = start(&db.0, group);
    let b_node = status(&b)["node"].as_str().unwrap().to_string();
    wait_for("a sees b", Duration::from_secs(5), || {
        peer_nodes(&a) == [b_node.clone()]
    });
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    // Three 300 ms intervals and the margin, plus scheduling slack.
    wait_for("a drops the killed b", Duration::from_secs(4), || {
        peer_nodes(&a).is_empty()
    });
    b = start(&db.0, group);
    assert_eq!(
        status(&b)["node"],
        b_node.as_str(),
        "node id survives a restart"
    );
    wait_for("a sees b again", Duration::from_secs(5), || {
        peer_nodes(&a) == [b_node.clone()]
    });
}

#[test]
fn scan_probe_with_no_agent_says_what_to_check() {
    let out = scan_probe(private_group());
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out.stdout);
    assert_eq!(v["probe"]["agents"].as_array().unwrap().len(), 0);
    let advice = v["advice"].to_string();
    for hint in ["firewall", "IGMP snooping", "client isolation"] {
        assert!(advice.contains(hint), "{advice}");
    }
}

#[test]
fn a_bad_config_is_refused_with_its_reason() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.0.join("somcast.toml");
    std::fs::write(&cfg, "cache = 5\n").unwrap();
    let out = Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("somcast.toml") && err.contains("cache"),
        "{err}"
    );
}
