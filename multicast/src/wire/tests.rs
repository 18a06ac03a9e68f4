use super::*;
use proptest::prelude::*;

fn sample_frames() -> Vec<Frame<'static>> {
    vec![
        Frame::Session(SessionInfo {
            file_size: 10 * 1024 * 1024 + 123,
            block_size: 1400 * 2996,
            symbol_size: 1400,
            block_count: 3,
            file_sha256: Some([7; 32]),
            feedback_port: 40_000,
            feedback_interval_ms: 50,
            name: "pkg.msi".into(),
            paused: true,
        }),
        Frame::Hashes {
            first_block: 40,
            hashes: vec![[1; 32], [2; 32]],
        },
        Frame::Data(Data {
            block: 2,
            esi: 3000,
            sent_us: u32::MAX,
            payload: &[9; 1400],
        }),
        Frame::Leave { receiver: 79 },
        Frame::EndOfPass {
            pass: 1,
            closing: false,
        },
        Frame::Feedback {
            receiver: 77,
            feedback: Feedback::Needs {
                loss_ppm: 50_000,
                path: PathReport {
                    span: 400,
                    lost: 20,
                    recv_kbps: 95_000,
                    delay_us: 1_200,
                    interval_us: 40_000,
                },
                needs: vec![Need {
                    block: 1,
                    need: 12,
                    highest_esi: Some(3100),
                }],
            },
        },
        Frame::Feedback {
            receiver: 78,
            feedback: Feedback::Join,
        },
        Frame::DoneAck { receiver: 78 },
        Frame::JoinAck { receiver: 79 },
        Frame::Presence(sample_announce()),
        Frame::Probe {
            nonce: 99,
            from_node: Some(3),
            unicast_reply: false,
        },
        Frame::Probe {
            nonce: 100,
            from_node: None,
            unicast_reply: true,
        },
        Frame::Bye {
            node: 3,
            incarnation: 7,
        },
        Frame::Claim(Claim {
            content: [5; 32],
            standing: Standing {
                preference: 1,
                held_permille: 250,
                wired: true,
                free_disk_gib: 100,
                uptime_h: 30,
                node: 9,
            },
        }),
        Frame::Offer(Offer {
            content: [5; 32],
            standing: Standing::default(),
            session: 77,
            data_group: [239, 192, 1, 2],
            data_port: 7400,
            start_in_ms: 60_000,
        }),
    ]
}

fn sample_announce() -> Announce {
    Announce {
        node: 0x0123_4567_89AB_CDEF,
        incarnation: 17,
        seq: 4,
        interval_ms: 5000,
        version: "0.1.0".into(),
        addrs: vec![AddrV4 {
            addr: [10, 99, 0, 2],
            prefix: 24,
        }],
        api_port: 7480,
        repair_port: 7481,
        rank: Rank {
            preference: 0,
            wired: Some(true),
            free_disk_mib: 120_000,
            uptime_s: 3600,
        },
        held: vec![Held {
            content: [1; 8],
            blocks_done: 3,
            block_count: 16,
            have: vec![[0, 2], [5, 6]],
        }],
        reply_to: None,
    }
}

#[test]
fn announcements_outside_their_limits_are_refused() {
    type Spoil = fn(&mut Announce);
    let cases: Vec<(Spoil, &str)> = vec![
        (|a| a.interval_ms = 0, "presence interval"),
        (|a| a.interval_ms = MAX_INTERVAL_MS + 1, "presence interval"),
        (
            |a| a.version = "x".repeat(MAX_VERSION_LEN + 1),
            "version length",
        ),
        (|a| a.addrs[0].prefix = 33, "addresses"),
        (|a| a.held[0].blocks_done = 17, "held contents"),
        (|a| a.held[0].block_count = 0, "held contents"),
        (|a| a.held[0].have = vec![[5, 6], [0, 2]], "held contents"),
        (|a| a.held[0].have = vec![[3, 3]], "held contents"),
        (|a| a.held[0].have = vec![[0, 17]], "held contents"),
    ];
    for (spoil, what) in cases {
        let mut a = sample_announce();
        spoil(&mut a);
        let bytes = Frame::Presence(a).encode(0);
        assert_eq!(decode(&bytes), Err(WireError::OutOfRange(what)));
    }
}

#[test]
fn every_kind_round_trips() {
    for frame in sample_frames() {
        let bytes = frame.encode(0xDEAD_BEEF);
        let got = decode(&bytes).unwrap();
        assert_eq!(got.session, 0xDEAD_BEEF);
        assert_eq!(got.frame, frame);
    }
}

#[test]
fn every_truncation_and_every_bit_flip_is_an_error() {
    for frame in sample_frames() {
        let bytes = frame.encode(42);
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&flipped).is_err(), "bit {bit} flipped");
        }
    }
}

#[test]
fn trailing_bytes_inside_the_crc_are_refused() {
    let mut bytes = Frame::DoneAck { receiver: 5 }.encode(1);
    bytes.truncate(bytes.len() - TRAILER_LEN);
    bytes.push(0);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(decode(&bytes), Err(WireError::TrailingBytes(1)));
}

#[test]
fn an_esi_beyond_24_bits_is_refused() {
    let bytes = Frame::Data(Data {
        block: 0,
        esi: MAX_ESI + 1,
        sent_us: 0,
        payload: &[0; 8],
    })
    .encode(1);
    assert_eq!(
        decode(&bytes),
        Err(WireError::OutOfRange("encoding symbol id"))
    );
}

fn arb_need() -> impl Strategy<Value = Need> {
    (
        any::<u32>(),
        any::<u32>(),
        proptest::option::of(0..=MAX_ESI),
    )
        .prop_map(|(block, need, highest_esi)| Need {
            block,
            need,
            highest_esi,
        })
}

proptest! {
    #[test]
    fn the_data_fast_path_encodes_as_the_frame_does(session: u64, block: u32, esi: u32,
                        sent_us: u32,
                        payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut fast = Vec::new();
        let data = Data { block, esi, sent_us, payload: &payload };
        encode_data(session, &data, &mut fast);
        let frame = Frame::Data(data);
        prop_assert_eq!(fast, frame.encode(session));
    }

    #[test]
    fn data_round_trips(session: u64, block: u32, esi in 0..=MAX_ESI, sent_us: u32,
                        payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut buf = Vec::new();
        let data = Data { block, esi, sent_us, payload: &payload };
        encode_data(session, &data, &mut buf);
        let got = decode(&buf).unwrap();
        prop_assert_eq!(got.session, session);
        prop_assert_eq!(got.frame, Frame::Data(data));
    }

    #[test]
    fn session_round_trips(file_size: u64, block_size: u32, symbol_size: u16,
                           block_count: u32, sha: Option<[u8; 32]>, port: u16, fb: u32,
                           name in "[a-z.]{0,40}") {
        let frame = Frame::Session(SessionInfo {
            file_size, block_size, symbol_size, block_count, file_sha256: sha,
            feedback_port: port, feedback_interval_ms: fb, name, paused: fb % 2 == 0,
        });
        let bytes = frame.encode(9);
        let got = decode(&bytes).unwrap();
        prop_assert_eq!(got.frame, frame);
    }

    #[test]
    fn feedback_round_trips(receiver: u64, loss in 0u32..=1_000_000,
                            span: u32, recv_kbps: u32, delay_us: u32,
                            needs in proptest::collection::vec(arb_need(), 0..MAX_NEEDS_PER_FRAME)) {
        let path = PathReport { span, lost: span / 3, recv_kbps, delay_us, interval_us: 40_000 };
        let frame = Frame::Feedback { receiver, feedback: Feedback::Needs { loss_ppm: loss, path, needs } };
        let bytes = frame.encode(3);
        let got = decode(&bytes).unwrap();
        prop_assert_eq!(got.frame, frame);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn random_bodies_behind_a_valid_header_and_crc_never_panic(
        kind in 0u8..14, body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = Vec::from(MAGIC);
        bytes.push(VERSION);
        bytes.push(kind);
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&body);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let _ = decode(&bytes);
    }
}
