//! Distribution tasks end to end on loopback: real agents (processes), a
//! real origin (`somcast serve`), real multicast.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    Proc, TOKEN, TempDir, cached, finished, get, get_json, http, json, origin_bytes, origin_dir,
    package, post, post_task, start_agent, start_origin, task, wait_done, wait_for,
};
use serde_json::{Value, json};
use somcast::demo::private_group;

const SIZE: u64 = 10 * 1024 * 1024 + 123;

#[test]
fn five_agents_share_one_origin_download_and_all_verify() {
    let dir = TempDir::new("fleet");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, SIZE, 1, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..5).map(|_| TempDir::new("fleet-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    let spec = json!({ "id": "fleet-1", "manifest": m, "delay_ms": 1500 });
    for a in &agents {
        let (code, v) = post_task(a, &spec);
        assert_eq!(code, 201, "{v}");
    }
    let mut roles = Vec::new();
    for a in &agents {
        let s = wait_done(a, "fleet-1", Duration::from_secs(60));
        assert_eq!(s["state"], "done", "{s}");
        roles.push(s["role"].as_str().unwrap().to_string());
        // The history starts with the role and why.
        let first = s["history"][0]["what"].as_str().unwrap_or_default();
        match s["role"].as_str() {
            Some("representative") => {
                assert!(first.starts_with("representative: multicast to"), "{s}")
            }
            _ => assert!(first.starts_with("receiver of "), "{s}"),
        }
    }
    for c in &caches {
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
    }
    let reps = roles.iter().filter(|r| *r == "representative").count();
    assert_eq!(reps, 1, "{roles:?}");
    let served = origin_bytes(&origin);
    assert!(
        served as f64 <= 1.05 * SIZE as f64,
        "origin sent {served} for {SIZE}"
    );

    // The same content again: every agent has it cached, so it completes at
    // once without the origin (which is gone).
    drop(origin);
    let again = json!({ "id": "fleet-2", "manifest": m, "delay_ms": 60_000 });
    for a in &agents {
        assert_eq!(post_task(a, &again).0, 201);
        let s = wait_done(a, "fleet-2", Duration::from_secs(10));
        assert_eq!(s["state"], "done", "{s}");
        assert_eq!(s["role"], "cached");
        assert_eq!(s["bytes"]["origin"], 0);
        assert_eq!(s["bytes"]["multicast"], 0);
    }
}

#[test]
fn cache_only_pins_the_object_and_runs_nothing() {
    let dir = TempDir::new("precache");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, 3 * 1024 * 1024, 2, origin.addr);
    let cache = TempDir::new("precache-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    let spec = json!({ "id": "stage", "manifest": m, "cache_only": true, "delay_ms": 0 });
    assert_eq!(post_task(&agent, &spec).0, 201);
    let s = wait_done(&agent, "stage", Duration::from_secs(30));
    assert_eq!(s["state"], "done", "{s}");
    assert!(
        s["install"].is_null(),
        "a cache-only task ran something: {s}"
    );
    assert!(s["pinned_until"].as_u64().unwrap() > somcast::cache::now_unix() + 86_400);
    assert_eq!(cached(&cache.0, &m.content_id).as_deref(), Some(&bytes[..]));
    let meta: Value = json(
        &std::fs::read(
            cache
                .0
                .join("objects")
                .join(format!("{}.meta.json", m.content_id)),
        )
        .unwrap(),
    );
    assert_eq!(meta["pinned_until"], s["pinned_until"]);
}

#[test]
fn the_install_command_gets_the_verified_path_and_its_status_is_reported() {
    let dir = TempDir::new("install");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, 100_000, 3, origin.addr);
    let cache = TempDir::new("install-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    let copy = dir.0.join("installed.bin");
    let ok = json!({
        "id": "inst-ok", "manifest": m, "delay_ms": 0,
        "run": format!("cp \"$1\" '{}' && echo installed from \"$SOMCAST_FILE\"", copy.display()),
    });
    assert_eq!(post_task(&agent, &ok).0, 201);
    let s = wait_done(&agent, "inst-ok", Duration::from_secs(30));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["install"]["exit_code"], 0);
    assert!(
        s["install"]["output_tail"]
            .as_str()
            .unwrap()
            .contains("installed from")
    );
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
    let bad =
        json!({ "id": "inst-bad", "manifest": m, "delay_ms": 0, "run": "echo nope >&2; exit 3" });
    assert_eq!(post_task(&agent, &bad).0, 201);
    let s = wait_done(&agent, "inst-bad", Duration::from_secs(30));
    assert_eq!(s["state"], "failed");
    assert_eq!(s["install"]["exit_code"], 3);
    assert!(s["error"].as_str().unwrap().contains("status 3"), "{s}");
    assert!(
        s["install"]["output_tail"]
            .as_str()
            .unwrap()
            .contains("nope")
    );
}

#[test]
fn an_agent_killed_mid_download_resumes_without_fetching_finished_blocks_again() {
    let dir = TempDir::new("resume");
    // 40 Mbit/s: 5 blocks of 4 MiB take about 4 s.
    let origin = start_origin(&origin_dir(&dir), "40M");
    let size = 20 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 4, origin.addr);
    let cache = TempDir::new("resume-agent");
    let group = private_group();
    let mut agent = start_agent(&cache.0, group, &[]);
    let spec = json!({ "id": "resume", "manifest": m, "delay_ms": 500 });
    assert_eq!(post_task(&agent, &spec).0, 201);
    wait_for("two blocks fetched", Duration::from_secs(30), || {
        task(&agent, "resume")["blocks_done"].as_u64().unwrap() >= 2
    });
    agent.child.kill().unwrap(); // SIGKILL
    agent.child.wait().unwrap();
    let before = task_file_blocks(&cache.0);
    assert!(before >= 2);
    agent = start_agent(&cache.0, group, &[]);
    let s = wait_done(&agent, "resume", Duration::from_secs(60));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(cached(&cache.0, &m.content_id).as_deref(), Some(&bytes[..]));
    // Finished blocks are not fetched again: at most the block in flight
    // when it was killed comes twice.
    let served = origin_bytes(&origin);
    assert!(
        served <= size + 4 * 1024 * 1024,
        "origin sent {served} for {size} ({before} blocks were done at the kill)"
    );
}

/// Blocks the persisted partial state of the only download calls done.
fn task_file_blocks(cache: &Path) -> usize {
    let dir = cache.join("partial");
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".state.json") {
            let v: Value = json(&std::fs::read(e.path()).unwrap());
            return v["done"]
                .as_str()
                .unwrap()
                .chars()
                .filter(|c| *c == '1')
                .count();
        }
    }
    0
}

#[test]
fn bad_manifests_and_requests_are_refused_with_their_reason_and_change_nothing() {
    let dir = TempDir::new("refuse");
    origin_dir(&dir);
    let fake_origin: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (m, _) = package(&dir.0, 5 * 1024 * 1024, 5, fake_origin);
    let cache = TempDir::new("refuse-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    let mut short = serde_json::to_value(&m).unwrap();
    short["block_hashes"].as_array_mut().unwrap().pop();
    let mut bad_url = serde_json::to_value(&m).unwrap();
    bad_url["urls"] = json!(["file:///etc/passwd"]);
    let cases = [
        ("{not json".to_string(), "not JSON"),
        (json!({ "manifest": short }).to_string(), "block hashes for"),
        (json!({ "manifest": bad_url }).to_string(), "not an http"),
        (
            json!({ "manifest": m, "cache_only": true, "run": "x" }).to_string(),
            "never runs",
        ),
        (
            json!({ "manifest": m, "id": "../x" }).to_string(),
            "task id",
        ),
        (
            json!({ "manifest": m, "surprise": 1 }).to_string(),
            "unknown field",
        ),
    ];
    for (body, reason) in cases {
        let (code, text) = http(agent.addr, "POST", "/v1/tasks", Some(TOKEN), Some(&body));
        assert_eq!(code, 400, "{body}: {text}");
        let err = json(text.as_bytes())["error"].as_str().unwrap().to_string();
        assert!(err.contains(reason), "{err:?} lacks {reason:?}");
    }
    assert_eq!(
        http(agent.addr, "POST", "/v1/tasks", None, Some("{}")).0,
        401,
        "no token, no task"
    );
    let tasks = get_json(agent.addr, "/v1/tasks");
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 0);
    let partial: Vec<_> = std::fs::read_dir(cache.0.join("partial"))
        .unwrap()
        .collect();
    assert!(partial.is_empty(), "a refused task left files behind");
    assert_eq!(get(agent.addr, "/v1/tasks/nope", Some(TOKEN)).0, 404);
}

#[test]
fn the_demo_runs_the_whole_flow_with_one_origin_download() {
    let o = std::process::Command::new(common::BIN)
        .args([
            "demo", "--agents", "3", "--size", "9M", "--delay", "1s", "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = json(&o.stdout);
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["identical"], 3);
    assert!(s["origin_ratio"].as_f64().unwrap() <= 1.05, "{s}");
    let roles: Vec<&str> = s["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "representative").count(),
        1,
        "{roles:?}"
    );
}

#[test]
fn a_fetch_slower_than_the_delay_is_multicast_as_it_arrives() {
    let dir = TempDir::new("pipeline");
    // 30 Mbit/s: 12 MiB take over 3 s, the delay is 0.3 s.
    let origin = start_origin(&origin_dir(&dir), "30M");
    let size = 12 * 1024 * 1024 + 7;
    let (m, bytes) = package(&dir.0, size, 6, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("pipe-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    let spec = json!({ "id": "pipe", "manifest": m, "delay_ms": 300 });
    for a in &agents {
        assert_eq!(post_task(a, &spec).0, 201);
    }
    // While the representative is still fetching, receivers already hold
    // blocks from the multicast.
    let mut overlapped = false;
    wait_for("all done", Duration::from_secs(60), || {
        let st: Vec<Value> = agents.iter().map(|a| task(a, "pipe")).collect();
        let rep_fetching = st.iter().any(|s| {
            s["role"] == "representative"
                && s["blocks_done"].as_u64().unwrap() < s["block_count"].as_u64().unwrap()
        });
        let rx_has = st
            .iter()
            .any(|s| s["role"] == "receiver" && s["bytes"]["multicast"].as_u64().unwrap() > 0);
        overlapped |= rep_fetching && rx_has;
        st.iter().all(|s| s["state"] == "done")
    });
    assert!(overlapped, "receivers got nothing before the fetch ended");
    for c in &caches {
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
    }
    assert!(origin_bytes(&origin) as f64 <= 1.05 * size as f64);
}

#[test]
fn the_console_starts_waits_for_and_reports_a_task() {
    let dir = TempDir::new("console");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 5 * 1024 * 1024, 7, origin.addr);
    let manifest = dir.0.join("pkg.json");
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    let group = private_group();
    let caches: Vec<TempDir> = (0..2).map(|_| TempDir::new("console-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    let list = dir.0.join("targets.txt");
    let lines: Vec<String> = agents
        .iter()
        .map(|a| format!("http://{}  # an agent", a.addr))
        .collect();
    std::fs::write(&list, lines.join("\n")).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(common::BIN)
            .args(args)
            .args(["--agents", list.to_str().unwrap(), "--token", TOKEN])
            .output()
            .unwrap()
    };
    let m_path = manifest.to_str().unwrap();
    let out = run(&[
        "task",
        "start",
        "--manifest",
        m_path,
        "--delay",
        "1s",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.lines().next().unwrap().trim().to_string();
    assert_eq!(id.len(), 32, "a 128-bit random id: {stdout}");
    // Progress lines per agent (not a terminal: a line per change).
    let stderr = String::from_utf8_lossy(&out.stderr);
    for a in &agents {
        assert!(stderr.contains(&a.addr.to_string()), "{stderr}");
    }
    let out = run(&["task", "status", &id, "--json"]);
    assert!(out.status.success());
    let v = json(&out.stdout);
    let states: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"]["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["done", "done"]);
    // Cancelling a finished task is refused by every agent: exit 1.
    let out = run(&["task", "cancel", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already ended"));
}

#[test]
fn two_packages_at_once_each_cross_the_origin_once() {
    let dir = TempDir::new("two");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m1, b1) = package(&dir.0, 6 * 1024 * 1024 + 1, 21, origin.addr);
    // A second file beside the first.
    let second = dir.0.join("origin").join("second.bin");
    somcast::demo::generate_file(&second, 5 * 1024 * 1024 + 3, 22).unwrap();
    let m2 = somcast::manifest::Manifest::create(
        &second,
        vec![format!("http://{}/second.bin", origin.addr)],
    )
    .unwrap();
    let b2 = std::fs::read(&second).unwrap();
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("two-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    for a in &agents {
        assert_eq!(
            post_task(a, &json!({ "id": "one", "manifest": m1, "delay_ms": 500 })).0,
            201
        );
        assert_eq!(
            post_task(a, &json!({ "id": "two", "manifest": m2, "delay_ms": 500 })).0,
            201
        );
    }
    for a in &agents {
        for id in ["one", "two"] {
            let s = wait_done(a, id, Duration::from_secs(60));
            assert_eq!(s["state"], "done", "{s}");
        }
    }
    for c in &caches {
        assert_eq!(cached(&c.0, &m1.content_id).as_deref(), Some(&b1[..]));
        assert_eq!(cached(&c.0, &m2.content_id).as_deref(), Some(&b2[..]));
    }
    let total = (b1.len() + b2.len()) as f64;
    let served = origin_bytes(&origin) as f64;
    assert!(served <= 1.05 * total, "origin sent {served} for {total}");
}

#[test]
fn a_cancelled_task_stops_and_leaves_nothing_in_the_cache() {
    let dir = TempDir::new("cancel");
    // 20 Mbit/s: 20 MiB take 8 s; the cancel comes after the first block.
    let origin = start_origin(&origin_dir(&dir), "20M");
    let (m, _) = package(&dir.0, 20 * 1024 * 1024, 23, origin.addr);
    let cache = TempDir::new("cancel-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    assert_eq!(
        post_task(&agent, &json!({ "id": "c", "manifest": m, "delay_ms": 0 })).0,
        201
    );
    wait_for("a block fetched", Duration::from_secs(30), || {
        task(&agent, "c")["blocks_done"].as_u64().unwrap() >= 1
    });
    let (code, body) = http(agent.addr, "POST", "/v1/tasks/c/cancel", Some(TOKEN), None);
    assert_eq!(code, 200, "{body}");
    let s = wait_done(&agent, "c", Duration::from_secs(20));
    assert_eq!(s["state"], "cancelled", "{s}");
    assert!(cached(&cache.0, &m.content_id).is_none());
    let served = origin_bytes(&origin);
    assert!(
        served < 20 * 1024 * 1024,
        "the fetch went on after the cancel: {served}"
    );
}

#[test]
fn tasks_for_the_same_content_at_once_share_one_download() {
    let dir = TempDir::new("same-content");
    let origin = start_origin(&origin_dir(&dir), "100M");
    let size = 6 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 23, origin.addr);
    let cache = TempDir::new("same-content-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    for i in 0..3 {
        let spec =
            json!({ "id": format!("same-{i}"), "manifest": m, "delay_ms": 0, "cache_only": true });
        assert_eq!(post_task(&agent, &spec).0, 201);
    }
    for i in 0..3 {
        let s = wait_done(&agent, &format!("same-{i}"), Duration::from_secs(60));
        assert_eq!(s["state"], "done", "{s}");
    }
    assert_eq!(cached(&cache.0, &m.content_id).as_deref(), Some(&bytes[..]));
    let served = origin_bytes(&origin);
    assert!(
        served <= size * 105 / 100,
        "origin sent {served} for {size}: the content was fetched more than once"
    );
}

#[test]
fn a_download_that_does_not_fit_is_refused_up_front_and_leaves_nothing() {
    let dir = TempDir::new("no-room");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 3 * 1024 * 1024, 24, origin.addr);
    let cache = TempDir::new("no-room-agent");
    // A free-disk floor no disk here meets.
    let agent = start_agent(&cache.0, private_group(), &["--cache-min-free", "1000T"]);
    let spec = json!({ "id": "big", "manifest": m, "delay_ms": 0 });
    assert_eq!(post_task(&agent, &spec).0, 201);
    let s = wait_done(&agent, "big", Duration::from_secs(20));
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("not enough disk space"),
        "{s}"
    );
    assert_eq!(origin_bytes(&origin), 0, "nothing fetched");
    let partial: Vec<_> = std::fs::read_dir(cache.0.join("partial"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "left behind: {partial:?}");
}

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
