//! The install command under faults: an agent killed while it runs never
//! starts it again, and a command stopped by its timeout takes what it
//! started with it.

mod common;

use std::time::Duration;

use common::{
    TempDir, cached, origin_dir, package, post, start_agent, start_origin, task, wait_done,
    wait_for,
};
use serde_json::json;
use somcast::demo::private_group;

fn lines(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |s| s.lines().count())
}

#[test]
fn an_agent_killed_during_the_install_does_not_run_it_again() {
    let dir = TempDir::new("install-crash");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, 100_000, 21, origin.addr);
    let cache = TempDir::new("install-crash-agent");
    let group = private_group();
    let mut agent = start_agent(&cache.0, group, &[]);
    let marker = dir.0.join("marker");
    let run = format!("echo started >> '{}'; sleep 3", marker.display());
    post(
        &agent,
        &json!({ "id": "inst", "manifest": m, "delay_ms": 0, "run": run }),
    );
    wait_for("the install started", Duration::from_secs(30), || {
        lines(&marker) == 1
    });
    assert_eq!(task(&agent, "inst")["state"], "installing");
    agent.child.kill().unwrap(); // SIGKILL, mid-install
    agent.child.wait().unwrap();
    agent = start_agent(&cache.0, group, &[]);
    let s = wait_done(&agent, "inst", Duration::from_secs(10));
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("not run again"),
        "{s}"
    );
    // Long enough for a second run to have written its line.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lines(&marker), 1, "the install ran twice");
    assert_eq!(cached(&cache.0, &m.content_id).as_deref(), Some(&bytes[..]));
}

#[cfg(unix)]
#[test]
fn a_timed_out_install_is_stopped_with_everything_it_started() {
    let dir = TempDir::new("install-group");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 50_000, 22, origin.addr);
    let cache = TempDir::new("install-group-agent");
    let agent = start_agent(&cache.0, private_group(), &[]);
    let pidfile = dir.0.join("child.pid");
    // The command starts a child of its own and waits on it.
    let run = format!("sleep 600 & echo $! > '{}'; wait", pidfile.display());
    post(
        &agent,
        &json!({ "id": "grp", "manifest": m, "delay_ms": 0, "run": run, "run_timeout_s": 1 }),
    );
    let s = wait_done(&agent, "grp", Duration::from_secs(30));
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("did not finish"),
        "{s}"
    );
    let pid = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .to_string();
    wait_for(
        "the command's child is gone",
        Duration::from_secs(5),
        || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        },
    );
}
