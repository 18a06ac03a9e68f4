//! Trust end to end on loopback: agents act only on tasks signed by a key
//! they trust, once, inside their validity window; everything else is
//! refused with its reason, counted, and runs nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    BIN, Proc, TOKEN, TempDir, get, get_json, http, json, origin_bytes, origin_dir, package,
    start_agent_with, start_origin, wait_done,
};
use serde_json::Value;
use somcast::cache::now_unix;
use somcast::demo::private_group;
use somcast::manifest::Manifest;
use somcast::trust::issue::{self, TaskOrder};
use somcast::trust::{Action, Bundle, ControlAction, Signer};

fn order(id: &str, marker: &Path) -> TaskOrder {
    TaskOrder {
        id: Some(id.into()),
        action: Action::Run {
            command: format!("echo \"$SOMCAST_FILE\" >> '{}'", marker.display()),
            timeout_s: 60,
        },
        delay_ms: 0,
        rate_bps: None,
        priority: 0,
        not_before: None,
        expires: now_unix() + 600,
        manifest_url: None,
        encrypt: false,
        targets: None,
        report_url: None,
    }
}

fn bundle(m: &Manifest, o: &TaskOrder, signer: Option<&Signer>) -> Bundle {
    issue::task(issue::manifest(m, signer).unwrap(), o, signer, now_unix()).unwrap()
}

fn post(agent: &Proc, b: &Bundle, token: Option<&str>) -> (u16, Value) {
    let (code, body) = http(
        agent.addr,
        "POST",
        "/v1/tasks",
        token,
        Some(&serde_json::to_string(b).unwrap()),
    );
    (code, json(body.as_bytes()))
}

fn lines(marker: &Path) -> usize {
    std::fs::read_to_string(marker).map_or(0, |s| s.lines().count())
}

fn trusting(cache: &Path, pubkey: &Path) -> Proc {
    start_agent_with(
        cache,
        private_group(),
        &["--trust", pubkey.to_str().unwrap()],
    )
}

fn write_pub(dir: &Path, s: &Signer) -> std::path::PathBuf {
    let p = dir.join("publisher.pub");
    std::fs::write(&p, format!("{}\n", s.public.to_line())).unwrap();
    p
}

/// An origin with one package, a publisher, a stranger, and an agent that
/// trusts only the publisher.
struct Fixture {
    dir: TempDir,
    origin: Proc,
    m: Manifest,
    publisher: Signer,
    stranger: Signer,
    cache: TempDir,
    pubkey: std::path::PathBuf,
}

impl Fixture {
    fn new(tag: &str, size: u64) -> (Fixture, Proc) {
        let dir = TempDir::new(tag);
        let origin = start_origin(&origin_dir(&dir), "0");
        let (m, _) = package(&dir.0, size, 7, origin.addr);
        let publisher = Signer::generate().unwrap();
        let pubkey = write_pub(&dir.0, &publisher);
        let cache = TempDir::new(tag);
        let agent = trusting(&cache.0, &pubkey);
        let f = Fixture {
            dir,
            origin,
            m,
            publisher,
            stranger: Signer::generate().unwrap(),
            cache,
            pubkey,
        };
        (f, agent)
    }
}

#[test]
fn a_signed_task_runs_once_and_every_bad_order_is_refused_with_its_reason() {
    let (f, agent) = Fixture::new("trust", 200_000);
    let Fixture {
        dir,
        origin,
        m,
        publisher,
        stranger,
        cache,
        pubkey,
    } = &f;
    let marker = dir.0.join("marker");

    // Refused before anything happens: none of these fetches or runs.
    let good = bundle(m, &order("t-good", &marker), Some(publisher));
    let mut tampered = good.clone();
    tampered.task.document = tampered.task.document.replacen("echo", "ech0", 1);
    let mut expired_order = order("t-expired", &marker);
    expired_order.expires = now_unix() - 1;
    let expired = Bundle {
        task: {
            // issue::task refuses to write an expired task; sign one by hand.
            let mut doc: serde_json::Value = serde_json::from_str(&good.task.document).unwrap();
            doc["id"] = "t-expired".into();
            doc["expires"] = (now_unix() - 1).into();
            somcast::trust::Envelope::sign(doc.to_string(), publisher, "x").unwrap()
        },
        manifest: good.manifest.clone(),
    };
    let mut future = order("t-future", &marker);
    future.not_before = Some(now_unix() + 3600);
    future.expires = now_unix() + 7200;
    let cases: Vec<(&str, Bundle, u16, &str)> = vec![
        ("tampered", tampered, 403, "bad signature"),
        (
            "unknown key",
            bundle(m, &order("t-stranger", &marker), Some(stranger)),
            403,
            "does not trust",
        ),
        ("expired", expired, 403, "expired"),
        (
            "not yet valid",
            bundle(m, &future, Some(publisher)),
            403,
            "not valid before",
        ),
        (
            "unsigned",
            bundle(m, &order("t-unsigned", &marker), None),
            403,
            "unsigned",
        ),
    ];
    for (what, b, code, reason) in &cases {
        let (c, v) = post(&agent, b, None);
        assert_eq!(c, *code, "{what}: {v}");
        assert!(v["error"].as_str().unwrap().contains(reason), "{what}: {v}");
    }
    // A manifest swapped under a validly signed task.
    let mut other = m.clone();
    other.urls = vec!["http://attacker.example/pkg.bin".into()];
    let mut swapped = good.clone();
    swapped.manifest = Some(issue::manifest(&other, None).unwrap());
    let (c, v) = post(&agent, &swapped, None);
    assert_eq!(c, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("not the manifest"),
        "{v}"
    );
    // Encryption asked of an agent without a fleet key.
    let mut enc = order("t-enc", &marker);
    enc.encrypt = true;
    let (c, v) = post(&agent, &bundle(m, &enc, Some(publisher)), None);
    assert_eq!(c, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no fleet key"), "{v}");
    // The bare unsigned spec of earlier versions, even with the token.
    let bare = serde_json::json!({ "id": "t-bare", "manifest": m, "run": "true" });
    let (c, body) = http(
        agent.addr,
        "POST",
        "/v1/tasks",
        Some(TOKEN),
        Some(&bare.to_string()),
    );
    assert_eq!(c, 403, "{body}");

    // The good one: accepted without the token (the signature is the
    // authority), run once.
    let (c, v) = post(&agent, &good, None);
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["signed_by"], publisher.public.id.to_string());
    let s = wait_done(&agent, "t-good", Duration::from_secs(30));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(lines(&marker), 1);
    // Started again: a replay.
    let (c, v) = post(&agent, &good, None);
    assert_eq!(c, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("accepted before"),
        "{v}"
    );

    let status = get_json(agent.addr, "/v1/status");
    let refused = &status["trust"]["refused"];
    for (reason, n) in [
        ("bad_signature", 1),
        ("untrusted_key", 1),
        ("expired", 1),
        ("not_yet_valid", 1),
        ("unsigned", 2),
        ("manifest", 1),
        ("malformed", 1),
        ("replayed", 1),
    ] {
        assert_eq!(refused[reason], n, "{reason}: {status}");
    }
    assert_eq!(status["trust"]["mode"], "signed");
    assert_eq!(status["trust"]["accepted"], 1);
    // Only the good task reached the origin, once.
    assert!(origin_bytes(origin) <= 200_000 * 105 / 100);
    assert_eq!(lines(&marker), 1);
    // The token still guards reads.
    assert_eq!(get(agent.addr, "/v1/tasks", None).0, 401);

    // After a restart the agent still remembers the id.
    drop(agent);
    let agent = trusting(&cache.0, pubkey);
    let (c, v) = post(&agent, &good, None);
    assert_eq!(c, 409, "{v}");
    assert_eq!(lines(&marker), 1);
}

#[test]
fn cancel_needs_a_signed_order_for_that_task() {
    let (f, agent) = Fixture::new("trust-cancel", 100_000);
    let (dir, m, publisher, stranger) = (&f.dir, &f.m, &f.publisher, &f.stranger);
    let mut o = order("t-slow", &dir.0.join("marker"));
    o.delay_ms = 60_000; // alone on its subnet it waits out the delay
    let (c, v) = post(&agent, &bundle(m, &o, Some(publisher)), None);
    assert_eq!(c, 201, "{v}");
    let cancel = |body: Option<String>| {
        let (c, b) = http(
            agent.addr,
            "POST",
            "/v1/tasks/t-slow/cancel",
            Some(TOKEN),
            body.as_deref(),
        );
        (c, json(b.as_bytes()))
    };
    let order_for = |task: &str, s: Option<&Signer>| {
        serde_json::to_string(&issue::control(ControlAction::Cancel, task, s, now_unix()).unwrap())
            .unwrap()
    };
    assert_eq!(cancel(None).0, 403, "no order at all");
    assert_eq!(cancel(Some(order_for("t-slow", None))).0, 403, "unsigned");
    assert_eq!(
        cancel(Some(order_for("t-slow", Some(stranger)))).0,
        403,
        "untrusted"
    );
    let (c, v) = cancel(Some(order_for("other-task", Some(publisher))));
    assert_eq!(c, 400, "an order for another task: {v}");
    // A signed pause sent to the cancel route is not taken for a cancel;
    // sent where it belongs, it pauses, and a signed resume resumes.
    let signed_order = |action| {
        serde_json::to_string(
            &issue::control(action, "t-slow", Some(publisher), now_unix()).unwrap(),
        )
        .unwrap()
    };
    let to = |verb: &str, body: Option<&str>| {
        let path = format!("/v1/tasks/t-slow/{verb}");
        let (c, b) = http(agent.addr, "POST", &path, Some(TOKEN), body);
        (c, json(b.as_bytes()))
    };
    let pause = signed_order(ControlAction::Pause);
    let (c, v) = cancel(Some(pause.clone()));
    assert_eq!(c, 400, "a pause order sent as a cancel: {v}");
    let (c, v) = to("pause", Some(&pause));
    assert_eq!(c, 200, "{v}");
    assert_eq!(get_json(agent.addr, "/v1/tasks/t-slow")["paused"], true);
    assert_eq!(to("resume", None).0, 403, "an unsigned resume");
    let (c, v) = to("resume", Some(&signed_order(ControlAction::Resume)));
    assert_eq!(c, 200, "{v}");
    assert_eq!(get_json(agent.addr, "/v1/tasks/t-slow")["paused"], false);
    assert_ne!(
        get_json(agent.addr, "/v1/tasks/t-slow")["state"],
        "cancelled"
    );
    let signed = order_for("t-slow", Some(publisher));
    let (c, v) = cancel(Some(signed.clone()));
    assert_eq!(c, 200, "{v}");
    let s = wait_done(&agent, "t-slow", Duration::from_secs(5));
    assert_eq!(s["state"], "cancelled", "{s}");
    // The same order again is a replay.
    assert_eq!(cancel(Some(signed)).0, 409);
}

#[test]
fn an_agent_without_a_trusted_key_refuses_every_task() {
    let dir = TempDir::new("trust-none");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, _) = package(&dir.0, 1000, 10, origin.addr);
    let publisher = Signer::generate().unwrap();
    let cache = TempDir::new("trust-none-agent");
    let agent = start_agent_with(&cache.0, private_group(), &[]);
    let (c, v) = post(
        &agent,
        &bundle(&m, &order("t1", &dir.0.join("m")), Some(&publisher)),
        Some(TOKEN),
    );
    assert_eq!(c, 403, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("trusts no publisher key"),
        "{v}"
    );
    assert_eq!(origin_bytes(&origin), 0);
}

/// The console path: key generate, a signed manifest, task sign, task start
/// --task, status, all through the binary.
#[test]
fn the_console_signs_and_starts_a_task_that_the_agent_runs() {
    let dir = TempDir::new("trust-cli");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (_, bytes) = package(&dir.0, 300_000, 11, origin.addr);
    let run = common::cli;
    let name = dir.0.join("publisher");
    run(&["key", "generate", name.to_str().unwrap()]);
    let pkg = dir.0.join("origin").join("pkg.bin");
    let manifest = dir.0.join("pkg.json");
    run(&[
        "manifest",
        "create",
        pkg.to_str().unwrap(),
        "--url",
        &format!("http://{}/pkg.bin", origin.addr),
        "-o",
        manifest.to_str().unwrap(),
        "--sign",
        name.with_extension("key").to_str().unwrap(),
    ]);
    let task = dir.0.join("task.json");
    let marker = dir.0.join("marker");
    let id = run(&[
        "task",
        "sign",
        "--manifest",
        manifest.to_str().unwrap(),
        "--sign",
        name.with_extension("key").to_str().unwrap(),
        "--run",
        &format!("cat \"$1\" > '{}'", marker.display()),
        "--delay",
        "0s",
        "--expires",
        "1h",
        "-o",
        task.to_str().unwrap(),
    ]);
    let id = id.trim().to_string();
    let cache = TempDir::new("trust-cli-agent");
    let agent = trusting(&cache.0, &name.with_extension("pub"));
    let url = format!("http://{}", agent.addr);
    // A console command that must fail (exit 1) saying `why`.
    let fails = |args: &[&str], why: &str| {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("SOMCAST_TOKEN")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    let task_arg = task.to_str().unwrap();
    // --wait reads status, which takes the token: refused up front.
    fails(
        &[
            "task",
            "start",
            "--task",
            task_arg,
            "--agent",
            "http://127.0.0.1:9",
            "--wait",
        ],
        "needs the agents' API token",
    );
    // No token needed to start a signed task; the token reads the status.
    run(&[
        "task",
        "start",
        "--task",
        task.to_str().unwrap(),
        "--agent",
        &url,
    ]);
    let s = wait_done(&agent, &id, Duration::from_secs(30));
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(std::fs::read(&marker).unwrap(), bytes);
    // The same document again: refused, exit 1.
    fails(
        &["task", "start", "--task", task_arg, "--agent", &url],
        "accepted before",
    );
}
