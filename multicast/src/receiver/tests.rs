use super::*;

#[test]
fn the_file_hash_may_come_later_but_nothing_else_of_a_session_changes() {
    let now = Instant::now();
    let from: SocketAddr = "10.0.0.1:7400".parse().unwrap();
    let info = |size: u64, sha: Option<Digest>| SessionInfo {
        file_size: size,
        block_size: 10_000,
        symbol_size: 1000,
        block_count: size.div_ceil(10_000) as u32,
        file_sha256: sha,
        feedback_port: 7401,
        feedback_interval_ms: 40,
        name: String::new(),
        paused: false,
    };
    let mut rx = Receiver::new(
        now,
        ReceiverConfig {
            session: Some(5),
            ..ReceiverConfig::default()
        },
    );
    let session = |i: SessionInfo| Frame::Session(i).encode(5);
    rx.handle_datagram(now, from, &session(info(25_000, None)));
    assert!(rx.session().is_some());
    assert_eq!(rx.file_sha256(), None);
    // Another geometry under the same session id: not this session's.
    rx.handle_datagram(now, from, &session(info(26_000, Some([1; 32]))));
    assert_eq!(rx.file_sha256(), None);
    rx.handle_datagram(now, from, &session(info(25_000, Some([2; 32]))));
    assert_eq!(rx.file_sha256(), Some([2; 32]));
    // Once known, it stays.
    rx.handle_datagram(now, from, &session(info(25_000, Some([3; 32]))));
    assert_eq!(rx.file_sha256(), Some([2; 32]));
    assert_eq!(rx.layout().map(|l| l.file_size()), Some(25_000));
}

fn small_session(feedback_port: u16) -> SessionInfo {
    SessionInfo {
        file_size: 25_000,
        block_size: 10_000,
        symbol_size: 1000,
        block_count: 3,
        file_sha256: None,
        feedback_port,
        feedback_interval_ms: 40,
        name: String::new(),
        paused: false,
    }
}

fn joins(rx: &mut Receiver) -> Vec<(SocketAddr, u64)> {
    std::iter::from_fn(|| rx.poll_transmit())
        .map(|t| {
            let (to, bytes) = match t.dest {
                crate::transmit::Dest::To(to) => (to, t.bytes),
                crate::transmit::Dest::Group => panic!("feedback to the group"),
            };
            let d = wire::decode(&bytes).unwrap();
            assert!(matches!(
                d.frame,
                Frame::Feedback {
                    receiver: 9,
                    feedback: Feedback::Join
                }
            ));
            (to, d.session)
        })
        .collect()
}

#[test]
fn following_the_first_session_binds_only_to_one_that_acknowledges_the_join() {
    let t0 = Instant::now();
    let stale: SocketAddr = "10.0.0.7:7400".parse().unwrap();
    let live: SocketAddr = "10.0.0.1:7400".parse().unwrap();
    let mut rx = Receiver::new(
        t0,
        ReceiverConfig {
            receiver_id: 9,
            ..ReceiverConfig::default()
        },
    );
    // A replayed announcement of a session that is not running: joined,
    // not followed; its data and its closing end of pass change nothing.
    rx.handle_datagram(t0, stale, &Frame::Session(small_session(7401)).encode(1));
    assert_eq!(joins(&mut rx), vec![("10.0.0.7:7401".parse().unwrap(), 1)]);
    assert!(rx.session().is_none());
    let data = Frame::Data(wire::Data {
        block: 0,
        esi: 0,
        sent_us: 0,
        payload: &[0; 1000],
    });
    rx.handle_datagram(t0, stale, &data.encode(1));
    let close = Frame::EndOfPass {
        pass: 1,
        closing: true,
    };
    rx.handle_datagram(t0, stale, &close.encode(1));
    assert!(rx.session().is_none());
    assert!(rx.poll_event().is_none());
    // Repeated announcements: JOIN again only a feedback interval later.
    let t1 = t0 + Duration::from_millis(10);
    rx.handle_datagram(t1, stale, &Frame::Session(small_session(7401)).encode(1));
    assert!(joins(&mut rx).is_empty());
    let t2 = t0 + Duration::from_millis(50);
    rx.handle_datagram(t2, stale, &Frame::Session(small_session(7401)).encode(1));
    assert_eq!(joins(&mut rx).len(), 1);
    // The live sender: joined too.
    rx.handle_datagram(t2, live, &Frame::Session(small_session(7401)).encode(2));
    assert_eq!(joins(&mut rx), vec![("10.0.0.1:7401".parse().unwrap(), 2)]);
    // Acknowledgements that are not this receiver's, not from the
    // session's sender, or of a session never heard: nothing.
    rx.handle_datagram(t2, live, &Frame::JoinAck { receiver: 8 }.encode(2));
    rx.handle_datagram(t2, stale, &Frame::JoinAck { receiver: 9 }.encode(2));
    rx.handle_datagram(t2, live, &Frame::JoinAck { receiver: 9 }.encode(3));
    assert!(rx.session().is_none());
    assert_eq!(rx.stats().unanswered_sessions, 2);
    // The live sender's acknowledgement: bound to it, and from then on
    // the stale session's frames are another session's.
    rx.handle_datagram(t2, live, &Frame::JoinAck { receiver: 9 }.encode(2));
    assert_eq!(rx.session().map(|(s, _)| s), Some(2));
    assert!(matches!(
        rx.poll_event(),
        Some(ReceiverEvent::SessionFound { session: 2, .. })
    ));
    let other = rx.stats().other_session;
    rx.handle_datagram(t2, stale, &close.encode(1));
    assert_eq!(rx.stats().other_session, other + 1);
    assert!(rx.poll_event().is_none());
    assert!(!rx.is_over());
}

#[test]
fn sessions_waiting_for_an_acknowledgement_are_bounded() {
    let t0 = Instant::now();
    let from: SocketAddr = "10.0.0.1:7400".parse().unwrap();
    let mut rx = Receiver::new(
        t0,
        ReceiverConfig {
            receiver_id: 9,
            ..ReceiverConfig::default()
        },
    );
    for session in 0..100 {
        rx.handle_datagram(
            t0,
            from,
            &Frame::Session(small_session(7401)).encode(session),
        );
    }
    assert_eq!(rx.candidates.len(), MAX_CANDIDATES);
    // The newest are kept: an acknowledgement of one of them binds.
    rx.handle_datagram(t0, from, &Frame::JoinAck { receiver: 9 }.encode(3));
    assert!(rx.session().is_none());
    rx.handle_datagram(t0, from, &Frame::JoinAck { receiver: 9 }.encode(99));
    assert_eq!(rx.session().map(|(s, _)| s), Some(99));
}

#[test]
fn a_receiver_told_its_session_follows_it_without_waiting() {
    let t0 = Instant::now();
    let from: SocketAddr = "10.0.0.1:7400".parse().unwrap();
    let mut rx = Receiver::new(
        t0,
        ReceiverConfig {
            receiver_id: 9,
            session: Some(4),
            ..ReceiverConfig::default()
        },
    );
    rx.handle_datagram(t0, from, &Frame::Session(small_session(7401)).encode(3));
    assert!(rx.session().is_none());
    assert!(joins(&mut rx).is_empty());
    rx.handle_datagram(t0, from, &Frame::Session(small_session(7401)).encode(4));
    assert_eq!(rx.session().map(|(s, _)| s), Some(4));
    assert_eq!(joins(&mut rx).len(), 1);
}

#[test]
fn reported_loss_is_the_estimate_less_one_standard_error() {
    let mut s = ReceiverStats::default();
    assert_eq!(s.reported_loss(), 0.0);
    s.span = 1000;
    s.data_symbols = 950;
    let se = (0.05f64 * 0.95 / 1000.0).sqrt();
    assert!((s.loss() - 0.05).abs() < 1e-9);
    assert!((s.reported_loss() - (0.05 - se)).abs() < 1e-9);
    // A small sample says little: little of its loss is reported.
    s.span = 20;
    s.data_symbols = 19;
    assert!(s.reported_loss() < s.loss() / 20.0);
    s.data_symbols = 20;
    assert_eq!(s.reported_loss(), 0.0);
    // A large one converges on the estimate.
    s.span = 1_000_000;
    s.data_symbols = 950_000;
    assert!((s.reported_loss() - 0.05).abs() < 0.0003);
}
