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

mod control;
mod data;

pub use control::{AddrV4, Announce, Claim, Held, Offer, Rank, Standing};
pub use data::{Data, Feedback, Need, PathReport, SessionInfo};

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
        kind::FEEDBACK => decode_feedback(body)?,
        kind::DONE_ACK => Frame::DoneAck {
            receiver: strict(body)?,
        },
        kind::JOIN_ACK => Frame::JoinAck {
            receiver: strict(body)?,
        },
        kind::LEAVE => Frame::Leave {
            receiver: strict(body)?,
        },
        control => decode_control(control, body)?,
    };
    Ok(Datagram { session, frame })
}

/// A receiver's feedback, its counts within their limits.
fn decode_feedback(body: &[u8]) -> Result<Frame<'_>, WireError> {
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
    Ok(Frame::Feedback {
        receiver: f.receiver,
        feedback: f.feedback,
    })
}

/// The control plane's frames (presence, probe, bye, claim, offer): any
/// other kind is unknown.
fn decode_control(kind: u8, body: &[u8]) -> Result<Frame<'_>, WireError> {
    Ok(match kind {
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
    })
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
mod tests;
