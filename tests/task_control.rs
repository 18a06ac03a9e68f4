//! Tasks under an operator's control on loopback: retention, refusals,
//! metrics, cancel, pause and priority; real agents (processes), a real
//! origin (`somcast serve`), real multicast.

mod common;

use std::time::Duration;

use common::{
    Proc, TOKEN, TempDir, cached, finished, get, http, origin_bytes, origin_dir, package, post,
    post_task, start_agent, start_origin, task, wait_done, wait_for,
};
use serde_json::json;
use somcast::demo::private_group;

const SIZE: u64 = 10 * 1024 * 1024 + 123;

#[test]
fn finished_tasks_are_pruned_after_the_retention() {
    let dir = TempDir::new("prune");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 100_000, 25, origin.addr);
    let cache = TempDir::new("prune-agent");
    let agent = start_agent(&cache.0, private_group(), &["--task-retention", "1s"]);
    let old = json!({ "id": "old", "manifest": m, "delay_ms": 0, "cache_only": true });
    assert_eq!(post_task(&agent, &old).0, 201);
    assert_eq!(
        wait_done(&agent, "old", Duration::from_secs(20))["state"],
        "done"
    );
    assert!(cache.0.join("tasks").join("old.json").exists());
    std::thread::sleep(Duration::from_millis(2500));
    // The next task's end prunes the old one, record and all.
    let new = json!({ "id": "new", "manifest": m, "delay_ms": 0, "cache_only": true });
    assert_eq!(post_task(&agent, &new).0, 201);
    assert_eq!(
        wait_done(&agent, "new", Duration::from_secs(20))["state"],
        "done"
    );
    wait_for("the old task is pruned", Duration::from_secs(5), || {
        get(agent.addr, "/v1/tasks/old", Some(TOKEN)).0 == 404
    });
    assert!(!cache.0.join("tasks").join("old.json").exists());
    assert_eq!(get(agent.addr, "/v1/tasks/new", Some(TOKEN)).0, 200);
}

#[test]
fn a_task_that_cannot_be_recorded_is_refused_and_not_kept() {
    let dir = TempDir::new("no-record");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, 1024 * 1024, 25, origin.addr);
    let cache = TempDir::new("no-record-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    // The task's record cannot be written: a directory stands where it
    // goes (permissions would not stop root).
    let record = cache.0.join("tasks").join("rec.json");
    std::fs::create_dir_all(record.join("in-the-way")).unwrap();
    let spec = json!({ "id": "rec", "manifest": m, "delay_ms": 0 });
    let (code, v) = post_task(&agent, &spec);
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("rec.json"), "{v}");
    assert_eq!(get(agent.addr, "/v1/tasks/rec", Some(TOKEN)).0, 404);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        origin_bytes(&origin),
        0,
        "nothing fetched for a refused task"
    );
    // Once it can be recorded, the same task is taken and done.
    std::fs::remove_dir_all(&record).unwrap();
    assert_eq!(post_task(&agent, &spec).0, 201);
    let s = wait_done(&agent, "rec", Duration::from_secs(30));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(cached(&cache.0, &m.content_id).as_deref(), Some(&bytes[..]));
    assert!(record.is_file());
}

/// The value of the sample `name` (with its labels, as written) in a
/// Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_count_tasks_bytes_peers_and_the_cache_for_a_scraper() {
    let dir = TempDir::new("metrics");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, SIZE, 28, origin.addr);
    let group = private_group();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = free.local_addr().unwrap();
    drop(free);
    let caches: Vec<TempDir> = (0..2).map(|_| TempDir::new("metrics-agent")).collect();
    let a = start_agent(
        &caches[0].0,
        group,
        &["--metrics", &metrics_addr.to_string()],
    );
    let b = start_agent(&caches[1].0, group, &[]);
    let spec = json!({ "id": "met", "manifest": m, "delay_ms": 1000 });
    assert_eq!(post_task(&a, &spec).0, 201);
    assert_eq!(post_task(&b, &spec).0, 201);
    for x in [&a, &b] {
        assert_eq!(
            wait_done(x, "met", Duration::from_secs(60))["state"],
            "done"
        );
    }
    // On the API: the token, like every read.
    assert_eq!(get(a.addr, "/metrics", None).0, 401);
    let mut origin_total = 0.0;
    let mut multicast_total = 0.0;
    for x in [&a, &b] {
        let (code, page) = get(x.addr, "/metrics", Some(TOKEN));
        assert_eq!(code, 200, "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
        assert_eq!(
            sample(&page, "somcast_tasks{state=\"done\"}"),
            Some(1.0),
            "{page}"
        );
        assert_eq!(sample(&page, "somcast_tasks{state=\"failed\"}"), Some(0.0));
        assert_eq!(sample(&page, "somcast_peers"), Some(1.0), "{page}");
        assert_eq!(sample(&page, "somcast_cache_objects"), Some(1.0));
        assert_eq!(sample(&page, "somcast_cache_bytes"), Some(SIZE as f64));
        origin_total += sample(&page, "somcast_task_bytes{source=\"origin\"}").unwrap();
        multicast_total += sample(&page, "somcast_multicast_symbols_received_total").unwrap();
        assert!(sample(&page, "somcast_dropped_total{reason=\"lan_bad_tag\"}").is_some());
        assert!(sample(&page, "somcast_repair_served_bytes_total").is_some());
    }
    // One of them fetched the package, the other had it by multicast.
    assert_eq!(origin_total, SIZE as f64);
    assert!(multicast_total > 0.0);
    // On its own address: no token, and nothing but the metrics.
    let (code, page) = get(metrics_addr, "/metrics", None);
    assert_eq!(code, 200);
    assert_eq!(sample(&page, "somcast_tasks{state=\"done\"}"), Some(1.0));
    assert_eq!(get(metrics_addr, "/v1/status", None).0, 404);
    assert_eq!(get(metrics_addr, "/v1/status", Some(TOKEN)).0, 404);
}

/// Posts a cancel for `id` once `state` is reached, and returns how long the
/// task took from the cancel's answer to "cancelled".
fn cancel_in(agent: &common::Proc, id: &str, state: &str) -> Duration {
    wait_for(
        &format!("task {id} {state}"),
        Duration::from_secs(60),
        || task(agent, id)["state"] == state,
    );
    let (code, body) = http(
        agent.addr,
        "POST",
        &format!("/v1/tasks/{id}/cancel"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 200, "{body}");
    let t0 = std::time::Instant::now();
    let s = wait_done(agent, id, Duration::from_secs(20));
    assert_eq!(s["state"], "cancelled", "{s}");
    t0.elapsed()
}

/// A cancel ends the task within about a second whatever it is doing:
/// fetching from the origin, waiting for the multicast start, receiving
/// the multicast, running the install command (which is stopped with it).
#[test]
fn a_cancel_takes_effect_at_once_in_every_state() {
    let dir = TempDir::new("cancel-states");
    // 20 MiB at 16 Mbit/s: 10 s from the origin.
    let origin = start_origin(&origin_dir(&dir), "16M");
    let (m, _) = package(&dir.0, 20 * 1024 * 1024, 29, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..2)
        .map(|_| TempDir::new("cancel-states-agent"))
        .collect();
    let a = start_agent(&caches[0].0, group, &[]);
    let b = start_agent(&caches[1].0, group, &[]);
    let mut took = Vec::new();
    // Fetching: a lone task on `a`, fetching before a start 30 s away.
    post(
        &a,
        &json!({ "id": "c-fetch", "manifest": m, "delay_ms": 30_000 }),
    );
    took.push(("fetching", cancel_in(&a, "c-fetch", "fetching")));
    // Waiting: the representative holds a small package and waits out a
    // minute's delay.
    let small_file = origin_dir(&dir).join("small.bin");
    somcast::demo::generate_file(&small_file, 100_000, 30).unwrap();
    let small_url = format!("http://{}/small.bin", origin.addr);
    let small = somcast::manifest::Manifest::create(&small_file, vec![small_url]).unwrap();
    post(
        &a,
        &json!({ "id": "c-wait", "manifest": small, "delay_ms": 60_000 }),
    );
    took.push(("waiting", cancel_in(&a, "c-wait", "waiting")));
    // Receiving: both agents, the multicast at 8 Mbit/s; cancel the receiver.
    let spec = json!({ "id": "c-recv", "manifest": m, "delay_ms": 1000, "rate_bps": 8_000_000 });
    post(&a, &spec);
    post(&b, &spec);
    let receiver = loop {
        let (sa, sb) = (task(&a, "c-recv"), task(&b, "c-recv"));
        if sa["state"] == "receiving" {
            break &a;
        }
        if sb["state"] == "receiving" {
            break &b;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    took.push(("receiving", cancel_in(receiver, "c-recv", "receiving")));
    // Installing: a command that would run for a minute.
    let marker = caches[1].0.join("still-running");
    let run = format!("sleep 60; touch '{}'", marker.display());
    post(
        &b,
        &json!({ "id": "c-inst", "manifest": small, "delay_ms": 0, "run": run }),
    );
    took.push(("installing", cancel_in(&b, "c-inst", "installing")));
    for (state, t) in &took {
        eprintln!("cancel while {state}: {t:?}");
        assert!(
            *t < Duration::from_secs(2),
            "cancel while {state} took {t:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!marker.exists());
}

#[test]
fn a_paused_task_multicasts_nothing_and_resumes_where_it_stood() {
    let dir = TempDir::new("pause");
    let origin = start_origin(&origin_dir(&dir), "0");
    let size = 12 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 24, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("pause-agent")).collect();
    // A fixed 20 Mbit/s: the pass takes about 5 s, the pause comes in it.
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &["--rate", "20M", "--rate-min", "20M"]))
        .collect();
    for a in &agents {
        let spec = json!({ "id": "p", "manifest": m, "delay_ms": 500 });
        assert_eq!(post_task(a, &spec).0, 201);
    }
    wait_for("a block multicast", Duration::from_secs(30), || {
        agents.iter().any(|a| {
            let s = task(a, "p");
            s["role"] == "receiver" && s["blocks_done"].as_u64().unwrap() >= 1
        })
    });
    for a in &agents {
        let (code, body) = http(a.addr, "POST", "/v1/tasks/p/pause", Some(TOKEN), None);
        assert_eq!(code, 200, "{body}");
    }
    let roles: Vec<String> = agents
        .iter()
        .map(|a| task(a, "p")["role"].to_string())
        .collect();
    let rep = agents
        .iter()
        .find(|a| task(a, "p")["role"] == "representative")
        .expect("a representative");
    // What the representative has put on the wire, once the pause took.
    std::thread::sleep(Duration::from_millis(500));
    let wire = |a: &Proc| task(a, "p")["multicast"]["wire_bytes"].as_u64().unwrap();
    let (sent, held): (u64, Vec<u64>) = (
        wire(rep),
        agents
            .iter()
            .map(|a| task(a, "p")["blocks_done"].as_u64().unwrap())
            .collect(),
    );
    std::thread::sleep(Duration::from_secs(3));
    // Announcements only (SESSION and a few HASHES every 100 ms), no DATA:
    // 3 s at 20 Mbit/s would be 7.5 MB.
    let grew = wire(rep) - sent;
    assert!(grew < 200_000, "{grew} bytes multicast while paused");
    for (i, a) in agents.iter().enumerate() {
        let s = task(a, "p");
        assert_eq!(s["paused"], true, "{s}");
        assert!(!finished(&s), "{s}");
        assert_eq!(
            s["blocks_done"].as_u64().unwrap(),
            held[i],
            "agent {i} moved while paused: {s}"
        );
    }
    for a in &agents {
        let (code, body) = http(a.addr, "POST", "/v1/tasks/p/resume", Some(TOKEN), None);
        assert_eq!(code, 200, "{body}");
    }
    for (i, a) in agents.iter().enumerate() {
        let s = wait_done(a, "p", Duration::from_secs(60));
        assert_eq!(s["state"], "done", "{s}");
        assert_eq!(s["paused"], false, "{s}");
        // The same representative carried on: no election after the pause.
        assert_eq!(s["role"].to_string(), roles[i], "{s}");
    }
    for c in &caches {
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
    }
    let served = origin_bytes(&origin);
    assert!(
        served <= size * 105 / 100,
        "origin sent {served} for {size}: something was fetched again"
    );
}

#[test]
fn a_higher_priority_task_is_fetched_first() {
    let dir = TempDir::new("priority");
    // 40 Mbit/s: 6 MiB take about 1.3 s; two at once share it.
    let origin = start_origin(&origin_dir(&dir), "40M");
    let (low, low_bytes) = package(&dir.0, 6 * 1024 * 1024, 25, origin.addr);
    let high_file = dir.0.join("origin").join("high.bin");
    somcast::demo::generate_file(&high_file, 6 * 1024 * 1024 + 7, 26).unwrap();
    let high = somcast::manifest::Manifest::create(
        &high_file,
        vec![format!("http://{}/high.bin", origin.addr)],
    )
    .unwrap();
    let cache = TempDir::new("priority-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    let spec = |id: &str, m: &somcast::manifest::Manifest, priority: u8| json!({ "id": id, "manifest": m, "delay_ms": 0, "cache_only": true, "priority": priority });
    assert_eq!(post_task(&agent, &spec("low", &low, 0)).0, 201);
    wait_for("the low task fetching", Duration::from_secs(30), || {
        task(&agent, "low")["blocks_done"].as_u64().unwrap() >= 1
    });
    assert_eq!(post_task(&agent, &spec("high", &high, 10)).0, 201);
    let s = wait_done(&agent, "high", Duration::from_secs(60));
    assert_eq!(s["state"], "done", "{s}");
    let l = task(&agent, "low");
    assert!(!finished(&l), "the low task finished first: {l}");
    let history = l["history"].to_string();
    assert!(history.contains("held while task high"), "{history}");
    let l = wait_done(&agent, "low", Duration::from_secs(60));
    assert_eq!(l["state"], "done", "{l}");
    assert_eq!(
        cached(&cache.0, &low.content_id).as_deref(),
        Some(&low_bytes[..])
    );
    let served = origin_bytes(&origin);
    let total = 2 * 6 * 1024 * 1024 + 7;
    assert!(
        served <= total * 105 / 100,
        "origin sent {served} for {total}"
    );
}
