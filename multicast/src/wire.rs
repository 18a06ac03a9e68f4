//! Wire format of every somcast datagram.
//!
//! ```text
//! +-------+---------+------+------------+------------------+-----------+
//! | magic | version | kind | session id | postcard body    | CRC-32    |
//! | 2 B   | 1 B     | 1 B  | 8 B (LE)   | variable         | 4 B (LE)  |
//! +-------+---------+------+------------+------------------+-----------+
//! ```
//!
//! The CRC covers everything before it. Decoding is strict: a wrong magic,
//! version, kind, CRC, a body that does not parse, trailing bytes after the
//! body or a field outside its limits is an [`WireError`], never a panic.
//! The limits checked here are those that need no session context (symbol
//! ESI range, list lengths); the session checks the rest (block index,
//! payload length against T).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// "SC": identifies a somcast datagram among whatever else shares the port.
pub const MAGIC: [u8; 2] = *b"SC";
/// Bumped on any incompatible change of a body or of the header.
pub const VERSION: u8 = 3;
/// magic + version + kind + session id.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 8;
/// CRC-32 (IEEE) of header and body.
pub const TRAILER_LEN: usize = 4;
/// Largest UDP payload over IPv4; nothing longer can arrive in one datagram.
pub const MAX_DATAGRAM: usize = 65_507;
/// RFC 6330 encoding symbol ids are 24 bits wide.
pub const MAX_ESI: u32 = (1 << 24) - 1;
/// Block hashes per `Hashes` frame: 40 x 32 B keeps the frame under a
/// 1500-byte MTU with room for the header.
pub const HASHES_PER_FRAME: usize = 40;
/// Entries per `Need` report: keeps a report inside one 1500-byte frame even
/// with five-byte varints.
pub const MAX_NEEDS_PER_FRAME: usize = 96;
/// Longest file name a session may announce.
pub const MAX_NAME_LEN: usize = 255;
/// Addresses one presence announcement may list.
pub const MAX_ADDRS: usize = 8;
/// Contents one presence announcement may summarize: the newest first; the
/// rest is for repair's HAVE exchange, not for presence.
pub const MAX_HELD: usize = 16;
/// HAVE ranges per held content.
pub const MAX_RANGES: usize = 32;
/// Longest version string an agent may announce.
pub const MAX_VERSION_LEN: usize = 32;
/// Shortest and longest presence interval an agent may announce: peers
/// expire it after three of them, so both ends must stay sane.
pub const MIN_INTERVAL_MS: u32 = 100;
pub const MAX_INTERVAL_MS: u32 = 600_000;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// What a session announces about the object it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub file_size: u64,
    /// Bytes per block in the file; a multiple of `symbol_size`.
    pub block_size: u32,
    /// T: bytes of every symbol payload.
    pub symbol_size: u16,
    /// Redundant with the sizes above, and checked against them.
    pub block_count: u32,
    /// SHA-256 of the whole file. A sender that hashes the file as it sends
    /// it (rather than before) announces `None` until it has read all of
    /// it, then this in every SESSION; receivers check the file against it
    /// once they hold every block.
    pub file_sha256: Option<Digest>,
    /// UDP port on the sender's address that takes receiver feedback.
    pub feedback_port: u16,
    /// How often receivers report what they need, in milliseconds.
    pub feedback_interval_ms: u32,
    /// File name for display; may be empty.
    pub name: String,
    /// The sender is paused (an operator's order): no data comes until it
    /// resumes, and the session is alive all the same.
    pub paused: bool,
}

/// One symbol of one block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data<'a> {
    pub block: u32,
    pub esi: u32,
    /// The sender's clock when it sent this, in microseconds, wrapping:
    /// receivers follow the trend of the one-way delay from it (a queue
    /// building up on the path), never its absolute value.
    pub sent_us: u32,
    #[serde(borrow)]
    pub payload: &'a [u8],
}

/// What a receiver still needs of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    pub block: u32,
    /// Symbols still needed to decode.
    pub need: u32,
    /// Highest ESI of this block seen so far, `None` if none was seen.
    /// Lets the sender count the symbols still in flight.
    pub highest_esi: Option<u32>,
}

/// What a receiver saw of the path from the sender since its last report:
/// the rate controller's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    /// Symbols the sender sent for blocks this receiver followed in the
    /// interval, counted by ESI (those lost included).
    pub span: u32,
    /// Of those, how many never arrived.
    pub lost: u32,
    /// DATA that arrived in the interval, per second, in kbit/s, counted
    /// as on the wire (each datagram with 42 bytes of Ethernet, IP and UDP
    /// headers), as the sender's rate is.
    pub recv_kbps: u32,
    /// Queueing delay: the least one-way delay in the interval above the
    /// least seen recently, in microseconds.
    pub delay_us: u32,
    /// How long the interval was, in microseconds: the sender compares
    /// what arrived with what it sent over the same span.
    pub interval_us: u32,
}

/// A receiver's message to the sender (unicast).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Feedback {
    Join,
    /// Sent every feedback interval while receiving, `needs` empty or not.
    Needs {
        /// Share of data symbols lost since the start, in parts per million:
        /// what the first pass provisions repair for.
        loss_ppm: u32,
        path: PathReport,
        needs: Vec<Need>,
    },
    Done,
}

/// The inputs of a representative election, as an agent announces them.
/// Better first: preference, then (in the election) share held, then wired,
/// free disk, uptime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rank {
    /// Operator preference: higher wins; 0 = no preference.
    pub preference: u8,
    /// Wired (`Some(true)`), wireless (`Some(false)`), or not known.
    pub wired: Option<bool>,
    /// Free space where the cache lives, in MiB.
    pub free_disk_mib: u64,
    /// Seconds since the agent started.
    pub uptime_s: u64,
}

/// How much of one content an agent holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The first 8 bytes of the content id (its SHA-256).
    pub content: [u8; 8],
    pub blocks_done: u32,
    pub block_count: u32,
    /// HAVE: the blocks held decoded, as [start, end) ranges in order; empty
    /// with `blocks_done > 0` when they do not fit (then only an agent that
    /// holds every block is asked).
    pub have: Vec<[u32; 2]>,
}

impl Held {
    /// Whether the ranges say block `b` is held.
    pub fn has(&self, b: u32) -> bool {
        self.blocks_done == self.block_count || self.have.iter().any(|r| (r[0]..r[1]).contains(&b))
    }
}

/// An IPv4 address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrV4 {
    pub addr: [u8; 4],
    pub prefix: u8,
}

/// An agent's presence announcement, on the control group every interval,
/// or unicast as the answer to a probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Survives restarts (stored in the agent's cache directory).
    pub node: u64,
    /// Random per start: a new one means the node restarted.
    pub incarnation: u32,
    pub seq: u32,
    /// How often this agent announces; peers expire it after three.
    pub interval_ms: u32,
    pub version: String,
    pub addrs: Vec<AddrV4>,
    /// Port of the control API, 0 if it has none.
    pub api_port: u16,
    /// TCP port of peer repair, 0 if it serves none.
    pub repair_port: u16,
    pub rank: Rank,
    pub held: Vec<Held>,
    /// The probe this announcement answers, if any.
    pub reply_to: Option<u64>,
}

/// What an agent stands on in a representative election, frozen when the
/// election starts so that every agent compares the same numbers. Ordered
/// best last (derive order: field by field, as listed).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Standing {
    pub preference: u8,
    /// Share of the content already held, in permille.
    pub held_permille: u16,
    pub wired: bool,
    /// Free disk in GiB: finer differences are noise.
    pub free_disk_gib: u32,
    /// Uptime in hours, for the same reason.
    pub uptime_h: u32,
    /// The tie-break.
    pub node: u64,
}

/// "I volunteer to be the representative for this content."
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub content: Digest,
    pub standing: Standing,
}

/// "I am the representative for this content": where and when it will be
/// multicast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub content: Digest,
    pub standing: Standing,
    /// The data-plane session id the multicast will carry.
    pub session: u64,
    pub data_group: [u8; 4],
    pub data_port: u16,
    /// Milliseconds from this datagram to the start of the multicast (0:
    /// started).
    pub start_in_ms: u32,
}

/// Every datagram somcast sends, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Session(SessionInfo),
    Hashes {
        first_block: u32,
        hashes: Vec<Digest>,
    },
    Data(Data<'a>),
    EndOfPass {
        pass: u32,
        closing: bool,
    },
    Feedback {
        receiver: u64,
        feedback: Feedback,
    },
    DoneAck {
        receiver: u64,
    },
    /// The sender took this receiver's JOIN. A receiver that follows the
    /// first session it hears binds to one only when it has this, so
    /// replayed announcements of a session that is not running cannot
    /// capture it.
    JoinAck {
        receiver: u64,
    },
    /// The rate controller leaves this receiver behind: it is far slower
    /// than the rest. It takes what the pass brings and then finishes from
    /// peers or the origin; the sender no longer waits for it.
    Leave {
        receiver: u64,
    },
    /// Control group: an agent is here.
    Presence(Announce),
    /// Control group or unicast: "who is there?" `from_node` is `None` when
    /// the prober is not an agent (`somcast scan --probe`). With
    /// `unicast_reply` the answer goes back to the prober alone; without, the
    /// agent announces itself to the group early instead, so one announcement
    /// answers every agent that asked at about the same time.
    Probe {
        nonce: u64,
        from_node: Option<u64>,
        unicast_reply: bool,
    },
    /// Control group: an agent leaves (clean shutdown).
    Bye {
        node: u64,
        incarnation: u32,
    },
    /// Control group: election.
    Claim(Claim),
    /// Control group: the representative's session announcement.
    Offer(Offer),
}

#[derive(Serialize, Deserialize)]
struct HashesBody {
    first_block: u32,
    hashes: Vec<Digest>,
}

#[derive(Serialize, Deserialize)]
struct EndOfPassBody {
    pass: u32,
    closing: bool,
}

#[derive(Serialize, Deserialize)]
struct ProbeBody {
    nonce: u64,
    from_node: Option<u64>,
    unicast_reply: bool,
}

#[derive(Serialize, Deserialize)]
struct ByeBody {
    node: u64,
    incarnation: u32,
}

#[derive(Serialize, Deserialize)]
struct FeedbackBody {
    receiver: u64,
    feedback: Feedback,
}

mod kind {
    pub const SESSION: u8 = 1;
    pub const HASHES: u8 = 2;
    pub const DATA: u8 = 3;
    pub const END_OF_PASS: u8 = 4;
    pub const FEEDBACK: u8 = 5;
    pub const DONE_ACK: u8 = 6;
    pub const PRESENCE: u8 = 7;
    pub const PROBE: u8 = 8;
    pub const BYE: u8 = 9;
    pub const CLAIM: u8 = 10;
    pub const OFFER: u8 = 11;
    pub const JOIN_ACK: u8 = 12;
    pub const LEAVE: u8 = 13;
}

/// Why a datagram was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("datagram of {0} bytes is shorter than header and trailer")]
    TooShort(usize),
    #[error("datagram of {0} bytes is longer than any UDP datagram")]
    TooLong(usize),
    #[error("not a somcast datagram (bad magic)")]
    BadMagic,
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("CRC mismatch")]
    BadCrc,
    #[error("body does not parse: {0}")]
    BadBody(postcard::Error),
    #[error("{0} bytes left after the body")]
    TrailingBytes(usize),
    #[error("field out of range: {0}")]
    OutOfRange(&'static str),
}

/// A decoded datagram: the session it belongs to and its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub session: u64,
    pub frame: Frame<'a>,
}

impl Frame<'_> {
    /// Appends the complete datagram for this frame to `out` (cleared first).
    pub fn encode_into(&self, session: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&session.to_le_bytes());
        // Serializing into a Vec cannot fail for these plain types; the
        // `expect`s below hold as long as no body holds a map with non-string
        // keys or a custom serializer, which none does.
        let body = match self {
            Frame::Session(info) => postcard::to_extend(info, std::mem::take(out)),
            Frame::Hashes {
                first_block,
                hashes,
            } => postcard::to_extend(
                &HashesBody {
                    first_block: *first_block,
                    hashes: hashes.clone(),
                },
                std::mem::take(out),
            ),
            Frame::Data(data) => postcard::to_extend(data, std::mem::take(out)),
            Frame::EndOfPass { pass, closing } => postcard::to_extend(
                &EndOfPassBody {
                    pass: *pass,
                    closing: *closing,
                },
                std::mem::take(out),
            ),
            Frame::Feedback { receiver, feedback } => postcard::to_extend(
                &FeedbackBody {
                    receiver: *receiver,
                    feedback: feedback.clone(),
                },
                std::mem::take(out),
            ),
            Frame::DoneAck { receiver }
            | Frame::JoinAck { receiver }
            | Frame::Leave { receiver } => postcard::to_extend(receiver, std::mem::take(out)),
            Frame::Presence(announce) => postcard::to_extend(announce, std::mem::take(out)),
            Frame::Probe {
                nonce,
                from_node,
                unicast_reply,
            } => postcard::to_extend(
                &ProbeBody {
                    nonce: *nonce,
                    from_node: *from_node,
                    unicast_reply: *unicast_reply,
                },
                std::mem::take(out),
            ),
            Frame::Bye { node, incarnation } => postcard::to_extend(
                &ByeBody {
                    node: *node,
                    incarnation: *incarnation,
                },
                std::mem::take(out),
            ),
            Frame::Claim(c) => postcard::to_extend(c, std::mem::take(out)),
            Frame::Offer(o) => postcard::to_extend(o, std::mem::take(out)),
        };
        *out = body.expect("postcard serialization into a Vec is infallible for wire types");
        let crc = crc32fast::hash(out);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    /// Convenience for tests and control frames: a fresh buffer.
    pub fn encode(&self, session: u64) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(session, &mut out);
        out
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Session(_) => kind::SESSION,
            Frame::Hashes { .. } => kind::HASHES,
            Frame::Data(_) => kind::DATA,
            Frame::EndOfPass { .. } => kind::END_OF_PASS,
            Frame::Feedback { .. } => kind::FEEDBACK,
            Frame::DoneAck { .. } => kind::DONE_ACK,
            Frame::JoinAck { .. } => kind::JOIN_ACK,
            Frame::Leave { .. } => kind::LEAVE,
            Frame::Presence(_) => kind::PRESENCE,
            Frame::Probe { .. } => kind::PROBE,
            Frame::Bye { .. } => kind::BYE,
            Frame::Claim(_) => kind::CLAIM,
            Frame::Offer(_) => kind::OFFER,
        }
    }
}

/// Encodes a data frame straight from a payload slice, into a reused buffer:
/// the hot path of the sender, so it writes postcard's encoding of [`Data`]
/// by hand (three varints and the bytes) instead of letting serde copy the
/// payload a byte at a time. The bytes are the same as
/// `Frame::Data(..).encode_into` (a test checks).
pub fn encode_data(session: u64, data: &Data, out: &mut Vec<u8>) {
    let payload = data.payload;
    out.clear();
    out.reserve(HEADER_LEN + 4 * 5 + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind::DATA);
    out.extend_from_slice(&session.to_le_bytes());
    push_varint(out, data.block);
    push_varint(out, data.esi);
    push_varint(out, data.sent_us);
    push_varint(out, payload.len() as u32);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Appends postcard's unsigned varint: seven bits a byte, low bits first.
pub fn push_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Strictly decodes one datagram.
pub fn decode(bytes: &[u8]) -> Result<Datagram<'_>, WireError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(WireError::TooLong(bytes.len()));
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(WireError::TooShort(bytes.len()));
    }
    let (signed, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    if signed[0..2] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if signed[2] != VERSION {
        return Err(WireError::BadVersion(signed[2]));
    }
    let kind = signed[3];
    let mut crc = [0u8; 4];
    crc.copy_from_slice(trailer);
    if crc32fast::hash(signed) != u32::from_le_bytes(crc) {
        return Err(WireError::BadCrc);
    }
    let mut session = [0u8; 8];
    session.copy_from_slice(&signed[4..HEADER_LEN]);
    let session = u64::from_le_bytes(session);
    let body = &signed[HEADER_LEN..];
    let frame = match kind {
        kind::SESSION => Frame::Session(check_session(strict(body)?)?),
        kind::HASHES => {
            let h: HashesBody = strict(body)?;
            if h.hashes.is_empty() || h.hashes.len() > HASHES_PER_FRAME {
                return Err(WireError::OutOfRange("hash count"));
            }
            Frame::Hashes {
                first_block: h.first_block,
                hashes: h.hashes,
            }
        }
        kind::DATA => {
            let d: Data = strict(body)?;
            if d.esi > MAX_ESI {
                return Err(WireError::OutOfRange("encoding symbol id"));
            }
            Frame::Data(d)
        }
        kind::END_OF_PASS => {
            let e: EndOfPassBody = strict(body)?;
            Frame::EndOfPass {
                pass: e.pass,
                closing: e.closing,
            }
        }
        kind::FEEDBACK => {
            let f: FeedbackBody = strict(body)?;
            if let Feedback::Needs {
                needs,
                loss_ppm,
                path,
            } = &f.feedback
            {
                if needs.len() > MAX_NEEDS_PER_FRAME {
                    return Err(WireError::OutOfRange("need count"));
                }
                if *loss_ppm > 1_000_000 || path.lost > path.span {
                    return Err(WireError::OutOfRange("loss"));
                }
                if needs
                    .iter()
                    .any(|n| n.highest_esi.is_some_and(|e| e > MAX_ESI))
                {
                    return Err(WireError::OutOfRange("encoding symbol id"));
                }
            }
            Frame::Feedback {
                receiver: f.receiver,
                feedback: f.feedback,
            }
        }
        kind::DONE_ACK => Frame::DoneAck {
            receiver: strict(body)?,
        },
        kind::JOIN_ACK => Frame::JoinAck {
            receiver: strict(body)?,
        },
        kind::LEAVE => Frame::Leave {
            receiver: strict(body)?,
        },
        kind::PRESENCE => Frame::Presence(check_announce(strict(body)?)?),
        kind::PROBE => {
            let p: ProbeBody = strict(body)?;
            Frame::Probe {
                nonce: p.nonce,
                from_node: p.from_node,
                unicast_reply: p.unicast_reply,
            }
        }
        kind::BYE => {
            let b: ByeBody = strict(body)?;
            Frame::Bye {
                node: b.node,
                incarnation: b.incarnation,
            }
        }
        kind::CLAIM => Frame::Claim(strict(body)?),
        kind::OFFER => {
            let o: Offer = strict(body)?;
            if o.standing.held_permille > 1000 {
                return Err(WireError::OutOfRange("held share"));
            }
            Frame::Offer(o)
        }
        other => return Err(WireError::BadKind(other)),
    };
    Ok(Datagram { session, frame })
}

fn strict<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(WireError::BadBody)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

fn check_session(info: SessionInfo) -> Result<SessionInfo, WireError> {
    if info.name.len() > MAX_NAME_LEN {
        return Err(WireError::OutOfRange("name length"));
    }
    // The geometry itself is validated by `Layout::from_session`, which the
    // receiver calls before it trusts any of these numbers.
    Ok(info)
}

fn check_announce(a: Announce) -> Result<Announce, WireError> {
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&a.interval_ms) {
        return Err(WireError::OutOfRange("presence interval"));
    }
    if a.version.len() > MAX_VERSION_LEN {
        return Err(WireError::OutOfRange("version length"));
    }
    if a.addrs.len() > MAX_ADDRS || a.addrs.iter().any(|x| x.prefix > 32) {
        return Err(WireError::OutOfRange("addresses"));
    }
    // HAVE ranges: few, non-empty, inside the block count, in order.
    let bad_ranges = |h: &Held| {
        h.have.len() > MAX_RANGES
            || h.have.iter().any(|r| r[0] >= r[1] || r[1] > h.block_count)
            || h.have.windows(2).any(|w| w[0][1] > w[1][0])
    };
    if a.held.len() > MAX_HELD
        || a.held
            .iter()
            .any(|h| h.blocks_done > h.block_count || h.block_count == 0 || bad_ranges(h))
    {
        return Err(WireError::OutOfRange("held contents"));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
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
}
