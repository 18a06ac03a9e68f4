//! The task channel end to end on loopback: `task publish` and `task
//! withdraw` write static files that `somcast serve` serves, and agents with
//! --channel poll them every second.

mod common;

use std::path::{Path, PathBuf};
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

#[test]
fn published_tasks_reach_their_targets_and_withdrawn_ones_stop() {
    let dir = TempDir::new("channel");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (_, _) = package(&dir.0, 1024 * 1024, 40, origin.addr);
    let key = dir.0.join("publisher");
    cli(&["key", "generate", key.to_str().unwrap()]);
    let (key_file, pub_file) = (
        format!("{}.key", key.display()),
        format!("{}.pub", key.display()),
    );
    let manifest = manifest_for(&dir.0, &origin, &key_file, "pkg");
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
