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
use multicast::wire::{Frame, Offer, Standing};
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
        standing: Standing {
            preference: 255,
            held_permille: 1000,
            wired: true,
            free_disk_gib: u32::MAX,
            uptime_h: u32::MAX,
            node: u64::MAX - 1,
        },
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
