//! Distribution tasks end to end on loopback: real agents (processes), a
//! real origin (`somcast serve`), real multicast.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{
    Proc, TOKEN, TempDir, cached, get, get_json, http, json, origin_bytes, origin_dir, package,
    post_task, start_agent, start_origin, task, wait_done, wait_for,
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
