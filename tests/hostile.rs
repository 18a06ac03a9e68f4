//! Hostile traffic on the LAN of agents without a fleet key (an insider, a
//! broken agent): tasks still complete with one origin download.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    Proc, TempDir, cached, origin_bytes, origin_dir, package, post, start_agent, start_origin,
    wait_done,
};
use multicast::wire::{Frame, Offer};
use somcast::demo::private_group;

/// A forger offers the content with the best standing, the right data group
/// and a near start, again and again, and never sends a byte of it: the
/// agents follow it, hear nothing, elect one of their own without it, and
/// fetch the package once.
#[test]
fn an_offer_never_followed_by_a_session_is_abandoned_not_a_reason_for_n_downloads() {
    let dir = TempDir::new("silent-offer");
    let origin = start_origin(&origin_dir(&dir), "0");
    let size = 3 * 1024 * 1024;
    let (m, bytes) = package(&dir.0, size, 26, origin.addr);
    let group = private_group();
    let caches: Vec<TempDir> = (0..3).map(|_| TempDir::new("silent-offer-agent")).collect();
    let agents: Vec<Proc> = caches
        .iter()
        .map(|c| start_agent(&c.0, group, &[]))
        .collect();
    let content = m.check().unwrap().content;
    let offer = Frame::Offer(Offer {
        content,
        standing: common::best_standing(u64::MAX - 1),
        session: 0xBAD,
        data_group: somcast::agent::task::data_group(&content).ip().octets(),
        data_port: somcast::agent::task::DATA_PORT,
        start_in_ms: 500,
    })
    .encode(0);
    let stop = Arc::new(AtomicBool::new(false));
    let forger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = multicast::socket::open_sender(std::net::Ipv4Addr::LOCALHOST, 1).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = s.send_to(&offer, group);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let spec = serde_json::json!({ "id": "so", "manifest": m, "delay_ms": 1000 });
    for a in &agents {
        post(a, &spec);
    }
    let mut abandoned = 0;
    for a in &agents {
        let s = wait_done(a, "so", Duration::from_secs(90));
        assert_eq!(s["state"], "done", "{s}");
        // The status says why the agent moved on.
        let history = s["history"].to_string();
        abandoned += usize::from(history.contains(&format!(
            "representative {:016x} offered the content but sent nothing: electing again without it",
            u64::MAX - 1
        )));
    }
    assert!(
        abandoned > 0,
        "no agent's history tells of the silent offer"
    );
    stop.store(true, Ordering::Relaxed);
    forger.join().unwrap();
    for c in &caches {
        assert_eq!(cached(&c.0, &m.content_id).as_deref(), Some(&bytes[..]));
    }
    let served = origin_bytes(&origin);
    assert!(
        served <= size * 105 / 100,
        "origin sent {served} for {size}: the agents went to the origin each"
    );
}

/// Ten node ids announce (each twice, so confirmed) that they hold the
/// package, all at one repair port that accepts and then trickles a byte
/// every 3 s. The agent asks that endpoint once (a few blocks at once),
/// drops it when the deadline passes, and does not ask it again under the
/// other ids: the task is done from the origin in about one deadline.
#[test]
fn peers_that_announce_what_they_cannot_serve_cost_one_deadline_not_one_each() {
    use std::io::Write;
    let dir = TempDir::new("slow-peers");
    let origin = start_origin(&origin_dir(&dir), "0");
    let (m, bytes) = package(&dir.0, 2 * 1024 * 1024, 27, origin.addr);
    let checked = m.check().unwrap();
    let group = private_group();
    let cache = TempDir::new("slow-peers-agent");
    let agent = start_agent(&cache.0, group, &[]);
    let slow = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        slow.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((c, _)) = slow.accept() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    held.push(c);
                }
                for c in &mut held {
                    let _ = c.write_all(&[0]);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
    }
    let s = multicast::socket::open_sender(std::net::Ipv4Addr::LOCALHOST, 1).unwrap();
    let blocks = checked.layout.block_count();
    for seq in 1..=2 {
        for node in 0..10 {
            let a =
                common::announce_holding(0xBAD0 + node, seq, slow_port, &checked.content, blocks);
            s.send_to(&a, group).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let t0 = std::time::Instant::now();
    post(
        &agent,
        &serde_json::json!({ "id": "sp", "manifest": m, "delay_ms": 0 }),
    );
    let st = wait_done(&agent, "sp", Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(st["state"], "done", "{st}");
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "took {:?}: each forged id cost a deadline",
        t0.elapsed()
    );
    let asked = accepted.load(Ordering::Relaxed);
    assert!(
        (1..=4).contains(&asked),
        "{asked} connections to the slow endpoint"
    );
    assert_eq!(cached(&cache.0, &m.content_id).as_deref(), Some(&bytes[..]));
    assert!(
        st["history"].to_string().contains("dropped for this task"),
        "{st}"
    );
}
