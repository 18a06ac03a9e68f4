//! The task channel end to end on loopback: `task publish` and `task
//! withdraw` write static files that `somcast serve` serves, and agents with
//! --channel poll them every second.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    Proc, TempDir, cli, get, get_json, origin_bytes, origin_dir, package, start_agent_with,
    start_origin, wait_done, wait_for,
};
use serde_json::Value;
use somcast::demo::private_group;

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Waits for the agent to take task `id` from the channel, then for it to
/// end.
fn taken_and_done(a: &Proc, id: &str) -> Value {
    wait_for(&format!("task {id} taken"), Duration::from_secs(30), || {
        get(a.addr, &format!("/v1/tasks/{id}"), Some(common::TOKEN)).0 == 200
    });
    wait_done(a, id, Duration::from_secs(60))
}

fn channel(a: &Proc) -> Value {
    get_json(a.addr, "/v1/status")["channel"].clone()
}

/// The signed manifest `NAME.json` of the origin's `NAME.bin`.
fn manifest_for(dir: &Path, origin: &Proc, key: &str, name: &str) -> PathBuf {
    let manifest = dir.join(format!("{name}.json"));
    cli(&[
        "manifest",
        "create",
        dir.join("origin")
            .join(format!("{name}.bin"))
            .to_str()
            .unwrap(),
        "--url",
        &format!("http://{}/{name}.bin", origin.addr),
        "-o",
        manifest.to_str().unwrap(),
        "--sign",
        key,
    ]);
    manifest
}

/// Another 2 MiB package `NAME.bin` next to `pkg.bin`, with its signed
/// manifest.
fn another_package(dir: &Path, origin: &Proc, key: &str, name: &str, seed: u64) -> PathBuf {
    let file = dir.join("origin").join(format!("{name}.bin"));
    somcast::demo::generate_file(&file, 2 * 1024 * 1024, seed).unwrap();
    manifest_for(dir, origin, key, name)
}

/// A publisher key pair and a signed manifest of a 1 MiB `pkg.bin` on the
/// origin: (key file, public key file, manifest).
fn publisher_and_package(dir: &Path, origin: &Proc, seed: u64) -> (String, String, PathBuf) {
    package(dir, 1024 * 1024, seed, origin.addr);
    let key = dir.join("publisher");
    cli(&["key", "generate", key.to_str().unwrap()]);
    let (key_file, pub_file) = (
        format!("{}.key", key.display()),
        format!("{}.pub", key.display()),
    );
    let manifest = manifest_for(dir, origin, &key_file, "pkg");
    (key_file, pub_file, manifest)
}

#[test]
fn published_tasks_reach_their_targets_and_withdrawn_ones_stop() {
    let dir = TempDir::new("channel");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (key_file, pub_file, manifest) = publisher_and_package(&dir.0, &origin, 40);
    let chan = dir.0.join("origin").join("chan");
    let chan_s = chan.to_str().unwrap();
    let url = format!("http://{}/chan", origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("channel-agent")).collect();
    let tags = ["kiosk", "office", ""];
    let agents: Vec<Proc> = caches
        .iter()
        .zip(tags)
        .map(|(c, tag)| {
            let mut args = vec!["--trust", &pub_file, "--channel", &url, "--poll", "1s"];
            if !tag.is_empty() {
                args.extend(["--tag", tag]);
            }
            start_agent_with(&c.0, group, &args)
        })
        .collect();
    // The command leaves a line in the agent's cache directory.
    let mark = "echo \"$SOMCAST_TASK\" >> \"$(dirname \"$(dirname \"$1\")\")/marker\"";
    let publish = |manifest: &Path, extra: &[&str]| -> String {
        let mut args = vec![
            "task",
            "publish",
            "--channel",
            chan_s,
            "--manifest",
            manifest.to_str().unwrap(),
            "--sign",
            &key_file,
            "--run",
            mark,
        ];
        args.extend_from_slice(extra);
        cli(&args).trim().to_string()
    };

    // 1. For the kiosks only: the kiosk runs it, the others never take it.
    let kiosk = publish(&manifest, &["--delay", "2s", "--target-tag", "kiosk"]);
    let s = taken_and_done(&agents[0], &kiosk);
    assert_eq!(s["state"], "done", "{s}");
    wait_for("the others judged it", Duration::from_secs(20), || {
        agents[1..]
            .iter()
            .all(|a| channel(a)["not_targeted"].as_u64() == Some(1))
    });
    for a in &agents[1..] {
        assert_eq!(
            get(a.addr, &format!("/v1/tasks/{kiosk}"), Some(common::TOKEN)).0,
            404
        );
    }
    assert_eq!(lines(&caches[0].0.join("marker")), 1);

    // 2. For everyone, a package none holds: each runs it once, and the
    //    subnet fetches it about once although they poll apart.
    let pkg2 = another_package(&dir.0, &origin, &key_file, "pkg2", 41);
    let before = origin_bytes(&origin);
    let all = publish(&pkg2, &["--delay", "3s"]);
    for a in &agents {
        let s = taken_and_done(a, &all);
        assert_eq!(s["state"], "done", "{s}");
    }
    let fetched = origin_bytes(&origin) - before;
    assert!(
        fetched <= 2 * 1024 * 1024 * 105 / 100,
        "origin sent {fetched} for one 2 MiB package"
    );
    for (i, c) in caches.iter().enumerate() {
        let want = if i == 0 { 2 } else { 1 };
        assert_eq!(lines(&c.0.join("marker")), want, "agent {i}");
    }

    // 3. An unchanged channel costs a 304 per poll.
    std::thread::sleep(Duration::from_secs(3));
    for a in &agents {
        assert!(
            channel(a)["not_modified"].as_u64().unwrap() >= 1,
            "{}",
            channel(a)
        );
    }
    let stats = get_json(origin.addr, "/stats");
    assert!(stats["not_modified"].as_u64().unwrap() >= 3, "{stats}");

    // 4. A task whose document was changed on the server: refused by all.
    let tasks_dir = chan.join("tasks");
    let mut forged: Value =
        serde_json::from_slice(&std::fs::read(tasks_dir.join(format!("{all}.json"))).unwrap())
            .unwrap();
    let text = forged["task"]["document"].as_str().unwrap().to_string();
    forged["task"]["document"] = Value::String(text.replace(&all, "forged-task"));
    std::fs::write(
        tasks_dir.join("forged-task.json"),
        serde_json::to_vec(&forged).unwrap(),
    )
    .unwrap();
    let index_path = chan.join("channel.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["tasks"]
        .as_array_mut()
        .unwrap()
        .push("forged-task".into());
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    wait_for("the forged task refused", Duration::from_secs(20), || {
        agents
            .iter()
            .all(|a| channel(a)["refused"].as_u64() == Some(1))
    });
    for a in &agents {
        assert_eq!(
            get(a.addr, "/v1/tasks/forged-task", Some(common::TOKEN)).0,
            404
        );
    }

    // 5. Withdrawn while the agents wait out a minute's delay: cancelled.
    // A package nobody holds yet, or a task would be done at once.
    let pkg3 = another_package(&dir.0, &origin, &key_file, "pkg3", 42);
    let late = publish(&pkg3, &["--delay", "60s"]);
    for a in &agents {
        wait_for("the late task taken", Duration::from_secs(20), || {
            get(a.addr, &format!("/v1/tasks/{late}"), Some(common::TOKEN)).0 == 200
        });
    }
    // Paused and resumed through the channel; a forged order changes
    // nothing.
    let paused =
        |a: &Proc| get_json(a.addr, &format!("/v1/tasks/{late}"))["paused"].as_bool() == Some(true);
    for action in ["pause", "resume"] {
        cli(&[
            "task",
            action,
            &late,
            "--channel",
            chan_s,
            "--sign",
            &key_file,
        ]);
        let want = action == "pause";
        for a in &agents {
            wait_for(
                &format!("the {action} carried out"),
                Duration::from_secs(20),
                || paused(a) == want,
            );
        }
    }
    let order_path = chan.join("orders").join(format!("{late}.json"));
    let mut forged: Value = serde_json::from_slice(&std::fs::read(&order_path).unwrap()).unwrap();
    let text = forged["document"]
        .as_str()
        .unwrap()
        .replace("resume", "pause");
    forged["document"] = Value::String(text);
    std::fs::write(&order_path, serde_json::to_vec(&forged).unwrap()).unwrap();
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["orders"][&late] = Value::String("forged-order".into());
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    wait_for("the forged order refused", Duration::from_secs(20), || {
        agents
            .iter()
            .all(|a| channel(a)["refused"].as_u64() == Some(2))
    });
    for a in &agents {
        assert!(!paused(a), "a forged pause was carried out");
        assert_eq!(channel(a)["orders"].as_u64(), Some(2), "{}", channel(a));
    }
    cli(&[
        "task",
        "withdraw",
        &late,
        "--channel",
        chan_s,
        "--sign",
        &key_file,
    ]);
    for a in &agents {
        let s = wait_done(a, &late, Duration::from_secs(20));
        assert_eq!(s["state"], "cancelled", "{s}");
    }
    // An agent that polls only after the withdrawal never starts it.
    let cache_d = TempDir::new("channel-agent");
    let d = start_agent_with(
        &cache_d.0,
        group,
        &[
            "--trust",
            &pub_file,
            "--channel",
            &url,
            "--poll",
            "1s",
            "--tag",
            "other",
        ],
    );
    wait_for(
        "the newcomer judged the withdrawal",
        Duration::from_secs(20),
        || channel(&d)["withdrawn"].as_u64() == Some(1),
    );
    assert_eq!(
        get(d.addr, &format!("/v1/tasks/{late}"), Some(common::TOKEN)).0,
        404
    );
    for (i, c) in caches.iter().enumerate() {
        let want = if i == 0 { 2 } else { 1 };
        assert_eq!(
            lines(&c.0.join("marker")),
            want,
            "agent {i} ran a withdrawn task"
        );
    }
}

/// Agents POST a report when a task ends, to the URL the signed task
/// names; a collector that is down gets it later (the report waits on
/// disk); `task status --reports` sums them up from the directory or URL.
#[test]
fn reports_reach_the_collector_even_late_and_task_status_sums_them() {
    let dir = TempDir::new("reports");
    let rdir = dir.0.join("reports");
    let origin = common::start_origin_with(
        &origin_dir(&dir),
        &[
            "--listen",
            "127.0.0.1:0",
            "--reports",
            rdir.to_str().unwrap(),
        ],
    );
    let (key_file, pub_file, manifest) = publisher_and_package(&dir.0, &origin, 43);
    let group = private_group();
    let caches: Vec<TempDir> = (0..2).map(|_| TempDir::new("reports-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent_with(&c.0, group, &["--trust", &pub_file]))
        .collect();
    // The second agent's command fails with status 3.
    std::fs::write(caches[1].0.join("fail-me"), "").unwrap();
    let run = "test -e \"$(dirname \"$(dirname \"$1\")\")/fail-me\" && exit 3; true";
    let start = |report_url: &str| -> String {
        let mut args = vec![
            "task",
            "start",
            "--manifest",
            manifest.to_str().unwrap(),
            "--sign",
            &key_file,
            "--run",
            run,
            "--delay",
            "1s",
            "--report-url",
            report_url,
        ];
        let urls: Vec<String> = agents
            .iter()
            .map(|a| format!("http://{}", a.addr))
            .collect();
        for u in &urls {
            args.extend(["--agent", u]);
        }
        let out = Command::new(common::BIN).args(&args).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let id = start(&format!("http://{}/reports", origin.addr));
    for a in &agents {
        wait_done(a, &id, Duration::from_secs(60));
    }
    wait_for("both reports", Duration::from_secs(30), || {
        std::fs::read_dir(rdir.join(&id)).map_or(0, |d| d.count()) == 2
    });
    for src in [
        rdir.to_str().unwrap().to_string(),
        format!("http://{}/reports", origin.addr),
    ] {
        let out = Command::new(common::BIN)
            .args(["task", "status", &id, "--reports", &src, "--json"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "one agent failed: exit 1");
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(s["agents"], 2, "{s}");
        assert_eq!(s["by_state"]["done"], 1, "{s}");
        assert_eq!(s["by_state"]["failed"], 1, "{s}");
        assert_eq!(
            s["failures"]["the install command exited with status N"], 1,
            "{s}"
        );
        let origin_ratio = s["origin_by_subnet"]["127.0.0.0/8"]["per_package"]
            .as_f64()
            .unwrap_or(f64::NAN);
        assert!(origin_ratio <= 1.05, "{s}");
    }

    // A collector that is down: the report waits in the agents' caches and
    // goes out once the collector is up.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let late_addr = free.local_addr().unwrap();
    drop(free);
    let id2 = start(&format!("http://{late_addr}/reports"));
    for (a, c) in agents.iter().zip(&caches) {
        wait_done(a, &id2, Duration::from_secs(60));
        wait_for("the report queued", Duration::from_secs(10), || {
            c.0.join("reports").join(format!("{id2}.json")).exists()
        });
    }
    let rdir2 = dir.0.join("reports-late");
    let _late = common::start_origin_with(
        &origin_dir(&dir),
        &[
            "--listen",
            &late_addr.to_string(),
            "--reports",
            rdir2.to_str().unwrap(),
        ],
    );
    wait_for("the late reports", Duration::from_secs(40), || {
        std::fs::read_dir(rdir2.join(&id2)).map_or(0, |d| d.count()) == 2
    });
    // Each agent drops its queued copy once the collector answered, which
    // may be a moment after the collector wrote it.
    for c in &caches {
        wait_for("the queued report dropped", Duration::from_secs(10), || {
            !c.0.join("reports").join(format!("{id2}.json")).exists()
        });
    }
}

/// A channel server that answers 503 with Retry-After: 4 is asked again
/// only after that, not every poll; the error shows in the status.
#[test]
fn a_busy_channel_server_is_asked_again_only_after_its_retry_after() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(AtomicU64::new(0));
    // When each request came, by the server's clock: the agent's wait is
    // measured from the answer it got, which comes after.
    let asked_at = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (asked, asked_at) = (asked.clone(), asked_at.clone());
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                asked_at.lock().unwrap().push(std::time::Instant::now());
                asked.fetch_add(1, Ordering::Relaxed);
                let _ = c.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 4\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
    }
    let cache = TempDir::new("busy-channel-agent");
    let url = format!("http://{addr}/chan");
    let pubkey = cache.0.join("none.pub");
    let signer = somcast::trust::Signer::generate().unwrap();
    std::fs::write(&pubkey, format!("{}\n", signer.public.to_line())).unwrap();
    let a = start_agent_with(
        &cache.0,
        private_group(),
        &[
            "--trust",
            pubkey.to_str().unwrap(),
            "--channel",
            &url,
            "--poll",
            "1s",
        ],
    );
    wait_for("the first poll", Duration::from_secs(10), || {
        asked.load(Ordering::Relaxed) >= 1
    });
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        asked.load(Ordering::Relaxed),
        1,
        "asked again within the Retry-After"
    );
    wait_for("the second poll", Duration::from_secs(10), || {
        asked.load(Ordering::Relaxed) >= 2
    });
    let at = asked_at.lock().unwrap().clone();
    let gap = at[1] - at[0];
    assert!(gap >= Duration::from_secs(4), "asked again after {gap:?}");
    let c = channel(&a);
    assert!(c["errors"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["last_error"].as_str().unwrap().contains("503"), "{c}");
}

/// Even an agent in the insecure lab mode (which takes unsigned tasks
/// through its API, behind the token) takes no unsigned task from a
/// channel: whoever can write the web server's files is no publisher.
#[test]
fn a_lab_agent_takes_no_unsigned_task_from_a_channel() {
    use somcast::trust::issue::{self, TaskOrder};
    let dir = TempDir::new("unsigned-channel");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 100_000, 44, origin.addr);
    let order = TaskOrder {
        id: Some("unsigned-1".into()),
        action: somcast::trust::Action::Fetch,
        delay_ms: 0,
        rate_bps: None,
        priority: 0,
        not_before: None,
        expires: somcast::cache::now_unix() + 600,
        manifest_url: None,
        encrypt: false,
        targets: None,
        report_url: None,
    };
    let now = somcast::cache::now_unix();
    let bundle = issue::task(issue::manifest(&m, None).unwrap(), &order, None, now).unwrap();
    let chan = dir.0.join("origin").join("chan");
    somcast::channel::publish(&chan, "unsigned-1", &bundle).unwrap();
    let cache = TempDir::new("unsigned-channel-agent");
    let url = format!("http://{}/chan", origin.addr);
    let a = common::start_agent(
        &cache.0,
        private_group(),
        &["--channel", &url, "--poll", "1s"],
    );
    wait_for("the unsigned task refused", Duration::from_secs(15), || {
        channel(&a)["refused"].as_u64() == Some(1)
    });
    assert_eq!(
        get(a.addr, "/v1/tasks/unsigned-1", Some(common::TOKEN)).0,
        404
    );
    // The index and the bundle, never the package.
    assert!(origin_bytes(&origin) < 100_000, "{}", origin_bytes(&origin));
}

/// A collector that takes the connection and never answers does not hold
/// up the agent's clean stop: on SIGTERM it exits at once, the report
/// still queued for the next start.
#[cfg(unix)]
#[test]
fn a_silent_collector_does_not_hold_up_the_agents_stop() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for c in silent.incoming().flatten() {
                held.lock().unwrap().push(c);
            }
        });
    }
    let dir = TempDir::new("silent-collector");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 100_000, 45, origin.addr);
    let cache = TempDir::new("silent-collector-agent");
    let mut a = common::start_agent(&cache.0, private_group(), &[]);
    let spec = serde_json::json!({
        "id": "rep", "manifest": m, "delay_ms": 0,
        "report_url": format!("http://{silent_addr}/reports"),
    });
    assert_eq!(common::post_task(&a, &spec).0, 201);
    wait_done(&a, "rep", Duration::from_secs(30));
    wait_for("the report being sent", Duration::from_secs(10), || {
        !held.lock().unwrap().is_empty()
    });
    let t0 = std::time::Instant::now();
    let pid = a.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still stopping after 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        cache.0.join("reports").join("rep.json").exists(),
        "the report is kept"
    );
}
