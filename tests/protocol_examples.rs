//! The worked examples of docs/PROTOCOL.md, decoded and re-encoded by the
//! code: the specification and the implementation cannot drift apart
//! without this test failing. Each example is a fenced block opened with
//! ```` ```hex example=NAME ````; every name below must appear exactly once,
//! and no other.

use std::collections::BTreeMap;
use std::sync::Arc;

use multicast::auth::{AuthState, FleetKey, FleetKeys, Opener, Sealer};
use multicast::wire::{
    self, AddrV4, Announce, Data, Feedback, Frame, Held, Need, Offer, PathReport, Rank,
    SessionInfo, Standing,
};
use repair::frame as rframe;

const SPEC: &str = include_str!("../docs/PROTOCOL.md");

/// The examples in the document, by name, as bytes.
fn examples() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut lines = SPEC.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("```hex example=") else {
            continue;
        };
        let mut bytes = Vec::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            // A line may end with a `# comment`.
            let data = l.split('#').next().unwrap_or("");
            for pair in data.split_whitespace() {
                let b = u8::from_str_radix(pair, 16)
                    .unwrap_or_else(|_| panic!("example {name}: {pair:?} is not a hex byte"));
                bytes.push(b);
            }
        }
        let previous = out.insert(name.trim().to_string(), bytes);
        assert!(previous.is_none(), "example {name} appears twice");
    }
    out
}

/// Bytes as the document writes them: 16 to a line.
fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(name: &str, doc: &BTreeMap<String, Vec<u8>>, encoded: &[u8]) {
    let Some(written) = doc.get(name) else {
        panic!(
            "docs/PROTOCOL.md has no example {name}; the code encodes it as\n{}",
            hex_lines(encoded)
        );
    };
    assert_eq!(
        written,
        encoded,
        "example {name} differs from the code, which encodes\n{}",
        hex_lines(encoded)
    );
}

fn content() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

const SESSION: u64 = 0x0123_4567_89ab_cdef;

fn datagram_examples() -> Vec<(&'static str, u64, Frame<'static>)> {
    vec![
        (
            "session",
            SESSION,
            Frame::Session(SessionInfo {
                file_size: 5000,
                block_size: 4096,
                symbol_size: 1024,
                block_count: 2,
                file_sha256: None,
                feedback_port: 40_000,
                feedback_interval_ms: 50,
                name: "a.msi".into(),
                paused: false,
            }),
        ),
        (
            "hashes",
            SESSION,
            Frame::Hashes {
                first_block: 1,
                hashes: vec![[0xaa; 32]],
            },
        ),
        (
            "data",
            SESSION,
            Frame::Data(Data {
                block: 1,
                esi: 300,
                sent_us: 1_500_000,
                payload: &[0x11; 16],
            }),
        ),
        ("leave", SESSION, Frame::Leave { receiver: 7 }),
        (
            "end-of-pass",
            SESSION,
            Frame::EndOfPass {
                pass: 1,
                closing: true,
            },
        ),
        (
            "feedback-join",
            SESSION,
            Frame::Feedback {
                receiver: 7,
                feedback: Feedback::Join,
            },
        ),
        (
            "feedback-needs",
            SESSION,
            Frame::Feedback {
                receiver: 7,
                feedback: Feedback::Needs {
                    loss_ppm: 20_000,
                    path: PathReport {
                        span: 400,
                        lost: 8,
                        recv_kbps: 95_000,
                        delay_us: 1_500,
                        interval_us: 40_000,
                    },
                    needs: vec![
                        Need {
                            block: 0,
                            need: 3,
                            highest_esi: Some(129),
                        },
                        Need {
                            block: 1,
                            need: 5,
                            highest_esi: None,
                        },
                    ],
                },
            },
        ),
        ("done-ack", SESSION, Frame::DoneAck { receiver: 7 }),
        ("join-ack", SESSION, Frame::JoinAck { receiver: 7 }),
        ("presence", 0, Frame::Presence(announce())),
        (
            "probe",
            0,
            Frame::Probe {
                nonce: 42,
                from_node: None,
                unicast_reply: true,
            },
        ),
        (
            "bye",
            0,
            Frame::Bye {
                node: 1000,
                incarnation: 5,
            },
        ),
        (
            "claim",
            0,
            Frame::Claim(wire::Claim {
                content: content(),
                standing: standing(),
            }),
        ),
        (
            "offer",
            0,
            Frame::Offer(Offer {
                content: content(),
                standing: standing(),
                session: SESSION,
                data_group: [239, 193, 0, 1],
                data_port: 7400,
                start_in_ms: 60_000,
            }),
        ),
    ]
}

fn announce() -> Announce {
    Announce {
        node: 1000,
        incarnation: 5,
        seq: 1,
        interval_ms: 5000,
        version: "1.0".into(),
        addrs: vec![AddrV4 {
            addr: [10, 0, 0, 7],
            prefix: 24,
        }],
        api_port: 0,
        repair_port: 7481,
        rank: Rank {
            preference: 0,
            wired: Some(true),
            free_disk_mib: 2048,
            uptime_s: 60,
        },
        held: vec![Held {
            content: [0, 1, 2, 3, 4, 5, 6, 7],
            blocks_done: 1,
            block_count: 2,
            have: vec![[0, 1]],
        }],
        reply_to: None,
    }
}

fn standing() -> Standing {
    Standing {
        preference: 0,
        held_permille: 500,
        wired: true,
        free_disk_gib: 2,
        uptime_h: 1,
        node: 1000,
    }
}

fn repair_examples() -> Vec<(&'static str, rframe::Frame)> {
    vec![
        (
            "repair-need",
            rframe::Frame::Need {
                content: content(),
                block: 1,
                held: 2,
                need: 3,
                highest_esi: Some(200),
            },
        ),
        (
            "repair-symbols",
            rframe::Frame::Symbols {
                block: 1,
                first_esi: 1 << 23,
                payload: vec![0x22; 16],
            },
        ),
        ("repair-not-held", rframe::Frame::NotHeld { block: 1 }),
        ("repair-busy", rframe::Frame::Busy),
        ("repair-stop", rframe::Frame::Stop { block: 1 }),
        ("repair-end", rframe::Frame::End { block: 1 }),
        (
            "repair-join",
            rframe::Frame::Join {
                content: content(),
                repair_port: 7481,
                fetching: true,
            },
        ),
        (
            "repair-members",
            rframe::Frame::Members {
                members: vec![([10, 0, 1, 11], 7481), ([10, 0, 2, 11], 9000)],
            },
        ),
    ]
}

/// The fleet secret of the sealed example: bytes 0, 1, ..., 31.
fn example_keys() -> FleetKeys {
    FleetKeys::new(vec![FleetKey::from_secret(&content())]).expect("one key")
}

const SEALED_SENDER: u64 = 0x1122_3344_5566_7788;
const SEALED_TIME: u64 = 1_800_000_000;

#[test]
fn every_datagram_example_decodes_to_its_frame_and_encodes_to_its_bytes() {
    let doc = examples();
    for (name, session, frame) in datagram_examples() {
        let encoded = frame.encode(session);
        check(name, &doc, &encoded);
        let decoded = wire::decode(&doc[name]).unwrap_or_else(|e| panic!("example {name}: {e}"));
        assert_eq!(decoded.session, session, "example {name}");
        assert_eq!(decoded.frame, frame, "example {name}");
    }
}

#[test]
fn every_repair_example_decodes_to_its_frame_and_encodes_to_its_bytes() {
    let doc = examples();
    for (name, frame) in repair_examples() {
        let mut encoded = Vec::new();
        rframe::encode(&frame, &mut encoded);
        check(name, &doc, &encoded);
        let (decoded, used) = rframe::decode(&doc[name], rframe::MAX_FRAME)
            .unwrap_or_else(|e| panic!("example {name}: {e}"))
            .unwrap_or_else(|| panic!("example {name} is cut short"));
        assert_eq!(used, doc[name].len(), "example {name}");
        assert_eq!(decoded, frame, "example {name}");
    }
}

#[test]
fn the_sealed_example_opens_with_the_documented_key() {
    let doc = examples();
    let plain = Frame::Bye {
        node: 1000,
        incarnation: 5,
    }
    .encode(0);
    let mut sealer = Sealer::new(example_keys(), SEALED_SENDER);
    let mut sealed = Vec::new();
    sealer.seal(SEALED_TIME, &plain, &mut sealed);
    check("sealed-bye", &doc, &sealed);
    let mut opener = Opener::new(example_keys(), Arc::new(AuthState::default()));
    let opened = opener
        .open(SEALED_TIME + 10, &doc["sealed-bye"])
        .expect("the documented datagram opens");
    assert_eq!(opened, &plain[..]);
    // One bit changed anywhere, and it does not.
    let mut tampered = doc["sealed-bye"].clone();
    tampered[30] ^= 1;
    let mut opener = Opener::new(example_keys(), Arc::new(AuthState::default()));
    assert!(opener.open(SEALED_TIME + 10, &tampered).is_err());
}

#[test]
fn the_document_has_no_example_the_tests_do_not_check() {
    let known: Vec<&str> = datagram_examples()
        .iter()
        .map(|e| e.0)
        .chain(repair_examples().iter().map(|e| e.0))
        .chain(["sealed-bye"])
        .collect();
    for name in examples().keys() {
        assert!(
            known.contains(&name.as_str()),
            "example {name} is not checked"
        );
    }
}
