//! Peer repair and failover end to end on loopback: real agents, a real
//! origin with a rate-limited link, real multicast and TCP repair.

mod common;

use std::time::Duration;

use common::{
    Proc, TempDir, cached, finished, origin_bytes, package, post, start_agent, start_origin, task,
    wait_for, wait_peers,
};
use serde_json::{Value, json};
use somcast::demo::private_group;

#[test]
fn a_late_joiner_completes_from_peers_without_extra_origin_bytes() {
    let dir = TempDir::new("late");
    let origin_dir = dir.0.join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    // 40 Mbit/s: the pipelined pass of 24 MiB lasts about 5 s.
    let origin = start_origin(&origin_dir, "40M");
    let size = 24 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 11, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..5).map(|_| TempDir::new("late-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    let spec = json!({ "id": "late", "manifest": m, "delay_ms": 300 });
    for a in &agents[..3] {
        post(a, &spec);
    }
    // The fourth gets the task once the others hold half the package.
    wait_for("half the pass", Duration::from_secs(60), || {
        agents[..3]
            .iter()
            .map(|a| task(a, "late"))
            .filter(|s| s["role"] == "receiver")
            .any(|s| s["blocks_done"].as_u64().unwrap() >= 3)
    });
    post(&agents[3], &spec);
    for a in &agents[..4] {
        wait_for("done", Duration::from_secs(90), || {
            finished(&task(a, "late"))
        });
    }
    // The fifth gets it after the pass is over: nobody multicasts any more,
    // so it takes the role and fetches from its peers, not the origin.
    post(&agents[4], &spec);
    wait_for("done", Duration::from_secs(90), || {
        finished(&task(&agents[4], "late"))
    });
    let statuses: Vec<Value> = agents.iter().map(|a| task(a, "late")).collect();
    for s in &statuses {
        assert_eq!(s["state"], "done", "{s}");
    }
    for c in &caches {
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
    }
    // Joined mid-pass: the rest of the pass plus repair for what it missed.
    let mid = &statuses[3];
    assert_eq!(
        mid["bytes"]["origin"], 0,
        "the mid-pass joiner went to the origin: {mid}"
    );
    let after = &statuses[4];
    assert_eq!(
        after["bytes"]["origin"], 0,
        "the late joiner went to the origin: {after}"
    );
    // Whole blocks as source symbols: the last symbol of each block is
    // padded to T, nothing else is extra.
    let peers = after["bytes"]["peers"].as_u64().unwrap();
    assert!(
        peers >= size && peers as f64 <= size as f64 * 1.001,
        "{after}"
    );
    assert!(
        after["bytes"]["by_peer"].as_object().unwrap().len() >= 2,
        "load not spread: {after}"
    );
    let served = origin_bytes(&origin);
    assert!(
        served as f64 <= 1.05 * size as f64,
        "origin sent {served} for {size}"
    );
}

#[test]
fn the_representative_killed_mid_pass_costs_nobody_a_restart() {
    let dir = TempDir::new("failover");
    let origin_dir = dir.0.join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    let origin = start_origin(&origin_dir, "40M");
    let size = 24 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 12, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..4).map(|_| TempDir::new("failover-agent")).collect();
    let mut agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    let spec = json!({ "id": "fo", "manifest": m, "delay_ms": 300 });
    for a in &agents {
        post(a, &spec);
    }
    let mut rep = None;
    wait_for("half the pass", Duration::from_secs(60), || {
        let st: Vec<Value> = agents.iter().map(|a| task(a, "fo")).collect();
        rep = st.iter().position(|s| s["role"] == "representative");
        st.iter()
            .any(|s| s["role"] == "receiver" && s["blocks_done"].as_u64().unwrap() >= 3)
    });
    let rep = rep.expect("a representative");
    let mut dead = agents.remove(rep);
    dead.child.kill().unwrap(); // SIGKILL: no goodbye
    dead.child.wait().unwrap();
    let held_before: Vec<u64> = agents
        .iter()
        .map(|a| task(a, "fo")["blocks_done"].as_u64().unwrap())
        .collect();
    for a in &agents {
        wait_for("done after failover", Duration::from_secs(120), || {
            finished(&task(a, "fo"))
        });
        let s = task(a, "fo");
        assert_eq!(s["state"], "done", "{s}");
    }
    for (i, c) in caches.iter().enumerate().filter(|(i, _)| *i != rep) {
        assert_eq!(
            cached(&c.0, &m.content_id).as_deref(),
            Some(&bytes[..]),
            "agent {i}"
        );
    }
    // Nobody started over: multicast + peer + origin bytes of each survivor
    // cover what it lacked at the kill, not the whole package again.
    for (a, before) in agents.iter().zip(held_before) {
        let s = task(a, "fo");
        let got = s["bytes"]["multicast"].as_u64().unwrap()
            + s["bytes"]["peers"].as_u64().unwrap()
            + s["bytes"]["origin"].as_u64().unwrap();
        assert!(before > 0);
        assert!(got <= size + 5 * 1024 * 1024, "{s}");
    }
    let served = origin_bytes(&origin);
    for a in &agents {
        let s = task(a, "fo");
        eprintln!("survivor: role {} bytes {}", s["role"], s["bytes"]);
    }
    eprintln!(
        "origin sent {served} for {size} ({:.2}x)",
        served as f64 / size as f64
    );
    assert!(served <= 2 * size, "origin sent {served} for {size}");
}

#[test]
fn a_peer_serving_corrupted_symbols_is_detected_and_bypassed() {
    let dir = TempDir::new("corrupt");
    let origin_dir = dir.0.join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    let origin = start_origin(&origin_dir, "0");
    let size = 12 * 1024 * 1024 + 5;
    let (m, bytes) = package(&dir.0, size, 13, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("corrupt-agent")).collect();
    let bad = start_agent(&caches[0].0, group, &["--lab-corrupt-repair"]);
    let good = start_agent(&caches[1].0, group, &[]);
    let spec = json!({ "id": "c", "manifest": m, "delay_ms": 200 });
    post(&bad, &spec);
    post(&good, &spec);
    for a in [&bad, &good] {
        wait_for("done", Duration::from_secs(60), || finished(&task(a, "c")));
    }
    let before = origin_bytes(&origin);
    // The third agent comes after the pass: both hold the package; the
    // corrupting one is found out by the block hash and dropped.
    let late = start_agent(&caches[2].0, group, &[]);
    std::thread::sleep(Duration::from_millis(800)); // presence brings their HAVE
    post(&late, &spec);
    wait_for("done", Duration::from_secs(60), || {
        finished(&task(&late, "c"))
    });
    let s = task(&late, "c");
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(
        cached(&caches[2].0, &m.content_id).as_deref(),
        Some(&bytes[..])
    );
    let bad_node = task(&bad, "c")["node"].as_str().unwrap().to_string();
    let by_peer = s["bytes"]["by_peer"].as_object().unwrap();
    assert!(
        !by_peer.contains_key(&bad_node),
        "blocks accepted from the corrupting peer: {s}"
    );
    assert_eq!(s["bytes"]["origin"], 0, "{s}");
    assert_eq!(
        origin_bytes(&origin),
        before,
        "the origin was asked although a good peer holds it all"
    );
}

#[test]
fn where_multicast_does_not_reach_peers_carry_the_load_not_the_origin() {
    let dir = TempDir::new("nomcast");
    let origin_dir = dir.0.join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    let origin = start_origin(&origin_dir, "0");
    let size = 9 * 1024 * 1024 + 77;
    let (m, bytes) = package(&dir.0, size, 14, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("nomcast-agent")).collect();
    // Two preferred agents (one of them represents); the third hears the
    // control group but none of the multicast data (a Wi-Fi client behind
    // isolation, a switch that prunes the data group).
    let a = start_agent(&caches[0].0, group, &["--preference", "9"]);
    let b = start_agent(&caches[1].0, group, &["--preference", "9"]);
    let deaf = start_agent(&caches[2].0, group, &["--lab-drop-rate", "1"]);
    let spec = json!({ "id": "nm", "manifest": m, "delay_ms": 300 });
    for x in [&a, &b, &deaf] {
        post(x, &spec);
    }
    for x in [&a, &b, &deaf] {
        wait_for("done", Duration::from_secs(90), || finished(&task(x, "nm")));
    }
    let s = task(&deaf, "nm");
    assert_eq!(s["state"], "done", "{s}");
    // It followed the representative, heard nothing of the data, and once
    // the representative had finished (and fell silent) it took the role
    // for itself: either way the blocks come from peers.
    assert_eq!(s["bytes"]["multicast"], 0, "{s}");
    assert_eq!(s["bytes"]["origin"], 0, "{s}");
    assert!(s["bytes"]["peers"].as_u64().unwrap() >= size, "{s}");
    assert_eq!(
        cached(&caches[2].0, &m.content_id).as_deref(),
        Some(&bytes[..])
    );
    let served = origin_bytes(&origin);
    assert!(
        served as f64 <= 1.05 * size as f64,
        "origin sent {served} for {size}"
    );
}

/// A subnet whose switch passes the control group but no multicast data:
/// the representative fetches from the origin all the same, and every
/// receiver, hearing its offers but none of its session, takes the
/// package from peers over unicast instead of electing again and again.
#[test]
fn a_subnet_without_multicast_data_distributes_over_unicast_from_one_download() {
    let dir = TempDir::new("deaf-subnet");
    let origin_dir = dir.0.join("origin");
    std::fs::create_dir_all(&origin_dir).unwrap();
    let origin = start_origin(&origin_dir, "0");
    let size = 6 * 1024 * 1024 + 5;
    let (m, bytes) = package(&dir.0, size, 15, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..4).map(|_| TempDir::new("deaf-agent")).collect();
    let agents: Vec<_> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &["--lab-drop-rate", "1"]))
        .collect();
    for a in &agents {
        wait_peers(a, 3, "four agents hear each other");
    }
    let spec = json!({ "id": "deaf", "manifest": m, "delay_ms": 300 });
    for a in &agents {
        post(a, &spec);
    }
    let mut over_unicast = 0;
    for (a, c) in agents.iter().zip(&caches) {
        wait_for("done", Duration::from_secs(120), || {
            finished(&task(a, "deaf"))
        });
        let s = task(a, "deaf");
        assert_eq!(s["state"], "done", "{s}");
        assert_eq!(s["bytes"]["multicast"], 0, "nothing was heard: {s}");
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
        over_unicast += usize::from(s["history"].to_string().contains("over unicast"));
    }
    assert_eq!(over_unicast, 3, "every receiver switched to unicast");
    let served = origin_bytes(&origin);
    assert!(
        served as f64 <= 1.05 * size as f64,
        "origin sent {served} for {size}: one download for the subnet"
    );
}
