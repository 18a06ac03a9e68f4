//! Repair frames on a TCP stream. Every frame has an 8-byte header, then a
//! postcard body:
//!
//! ```text
//! +-------+---------+------+-------------+------------------+
//! | magic | version | kind | body length | postcard body    |
//! | "SR"  | 1 B     | 1 B  | 4 B (LE)    | `length` bytes   |
//! +-------+---------+------+-------------+------------------+
//! ```
//!
//! A wrong magic or version, an unknown kind, a length above the reader's
//! cap (checked before any of the body is buffered), or a body that does not
//! parse exactly is a [`FrameError`]: the connection is dropped, never a
//! panic. docs/PROTOCOL.md §4 specifies each body.

use multicast::wire::{Digest, push_varint};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// "SR": a somcast repair frame.
pub const MAGIC: [u8; 2] = *b"SR";
/// Bumped on any incompatible change of a body or of the header.
pub const VERSION: u8 = 1;
/// magic + version + kind + body length.
pub const HEADER_LEN: usize = 8;
/// Largest frame body: 64 symbols of the largest T with room to spare.
pub const MAX_FRAME: usize = 4 * 1024 * 1024 + 1024;
/// Symbols per `Symbols` frame: about 90 KB at T = 1400, so a stop takes
/// effect within a frame or two.
pub const SYMBOLS_PER_FRAME: u32 = 64;

mod kind {
    pub const NEED: u8 = 1;
    pub const SYMBOLS: u8 = 2;
    pub const NOT_HELD: u8 = 3;
    pub const BUSY: u8 = 4;
    pub const STOP: u8 = 5;
    pub const END: u8 = 6;
    pub const JOIN: u8 = 7;
    pub const MEMBERS: u8 = 8;
}

/// Most members a MEMBERS frame lists: a site's subnets, with room.
pub const MAX_MEMBERS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Requester: what it lacks of one block.
    Need {
        content: Digest,
        block: u32,
        /// Symbols of the block the requester holds.
        held: u32,
        /// Symbols it still needs to decode.
        need: u32,
        /// Highest ESI it has seen of the block.
        highest_esi: Option<u32>,
    },
    /// Peer: consecutive symbols from `first_esi`; the payload is a whole
    /// number of T-byte symbols.
    Symbols {
        block: u32,
        first_esi: u32,
        payload: Vec<u8>,
    },
    /// Peer: it does not hold that block (or content).
    NotHeld { block: u32 },
    /// Peer: at its upload limit; ask another.
    Busy,
    /// Requester: the block decoded; send no more of it.
    Stop { block: u32 },
    /// Peer: every symbol it planned for the block is sent (or the
    /// requester stopped it); its answer to the next request follows.
    End { block: u32 },
    /// Requester, to a rendezvous point: it wants the members of
    /// `content`; with `fetching`, it is one (it fetches the content for
    /// its subnet and serves repair on `repair_port` of the connection's
    /// source address).
    Join {
        content: Digest,
        repair_port: u16,
        fetching: bool,
    },
    /// Rendezvous point: who has joined for that content, the asker too
    /// (address and repair port), at most [`MAX_MEMBERS`].
    Members { members: Vec<([u8; 4], u16)> },
}

#[derive(Serialize, Deserialize)]
struct NeedBody {
    content: Digest,
    block: u32,
    held: u32,
    need: u32,
    highest_esi: Option<u32>,
}

#[derive(Serialize, Deserialize)]
struct JoinBody {
    content: Digest,
    repair_port: u16,
    fetching: bool,
}

#[derive(Deserialize)]
struct SymbolsBody<'a> {
    block: u32,
    first_esi: u32,
    #[serde(borrow)]
    payload: &'a [u8],
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a somcast repair frame (bad magic)")]
    BadMagic,
    #[error("repair protocol version {0} is not supported (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown repair frame kind {0}")]
    BadKind(u8),
    #[error("frame of {len} bytes is over the {max}-byte cap")]
    TooLong { len: usize, max: usize },
    #[error("frame body does not parse: {0}")]
    BadBody(postcard::Error),
    #[error("{0} bytes left after the frame body")]
    TrailingBytes(usize),
    #[error("{0} members listed (at most {MAX_MEMBERS})")]
    TooManyMembers(usize),
}

/// Appends one frame, header first.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(frame.kind());
    out.extend_from_slice(&[0; 4]);
    // Serializing these plain types into a Vec cannot fail.
    let infallible = "postcard serialization into a Vec is infallible for repair frames";
    match frame {
        Frame::Need {
            content,
            block,
            held,
            need,
            highest_esi,
        } => {
            let body = NeedBody {
                content: *content,
                block: *block,
                held: *held,
                need: *need,
                highest_esi: *highest_esi,
            };
            *out = postcard::to_extend(&body, std::mem::take(out)).expect(infallible);
        }
        Frame::Symbols {
            block,
            first_esi,
            payload,
        } => symbols_body(out, *block, *first_esi, payload),
        Frame::NotHeld { block } | Frame::Stop { block } | Frame::End { block } => {
            push_varint(out, *block)
        }
        Frame::Busy => {}
        Frame::Join {
            content,
            repair_port,
            fetching,
        } => {
            let body = JoinBody {
                content: *content,
                repair_port: *repair_port,
                fetching: *fetching,
            };
            *out = postcard::to_extend(&body, std::mem::take(out)).expect(infallible);
        }
        Frame::Members { members } => {
            let listed = &members[..members.len().min(MAX_MEMBERS)];
            *out = postcard::to_extend(&listed, std::mem::take(out)).expect(infallible);
        }
    }
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start + 4..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// Appends a SYMBOLS frame straight from `payload` (a server sends a
/// block's symbols from the block itself, with no frame in between).
pub fn encode_symbols(out: &mut Vec<u8>, block: u32, first_esi: u32, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind::SYMBOLS);
    out.extend_from_slice(&[0; 4]);
    symbols_body(out, block, first_esi, payload);
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start + 4..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// By hand: serde would copy the payload a byte at a time. The bytes are
/// postcard's encoding of (u32, u32, &[u8]).
fn symbols_body(out: &mut Vec<u8>, block: u32, first_esi: u32, payload: &[u8]) {
    out.reserve(15 + payload.len());
    push_varint(out, block);
    push_varint(out, first_esi);
    push_varint(out, payload.len() as u32);
    out.extend_from_slice(payload);
}

impl Frame {
    /// The kind's name, as docs/PROTOCOL.md §4.1 writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Need { .. } => "NEED",
            Frame::Symbols { .. } => "SYMBOLS",
            Frame::NotHeld { .. } => "NOT_HELD",
            Frame::Busy => "BUSY",
            Frame::Stop { .. } => "STOP",
            Frame::End { .. } => "END",
            Frame::Join { .. } => "JOIN",
            Frame::Members { .. } => "MEMBERS",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Need { .. } => kind::NEED,
            Frame::Symbols { .. } => kind::SYMBOLS,
            Frame::NotHeld { .. } => kind::NOT_HELD,
            Frame::Busy => kind::BUSY,
            Frame::Stop { .. } => kind::STOP,
            Frame::End { .. } => kind::END,
            Frame::Join { .. } => kind::JOIN,
            Frame::Members { .. } => kind::MEMBERS,
        }
    }
}

/// Checks the header at the start of `buf`, once it is all there: the body
/// length it declares, or why the connection must be dropped. `max` is the
/// reader's cap on the body ([`MAX_FRAME`] or less).
pub fn check_header(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if header[..2] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if header[2] != VERSION {
        return Err(FrameError::BadVersion(header[2]));
    }
    if !(kind::NEED..=kind::MEMBERS).contains(&header[3]) {
        return Err(FrameError::BadKind(header[3]));
    }
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLong {
            len,
            max: max.min(MAX_FRAME),
        });
    }
    Ok(Some(len))
}

/// Decodes the first frame in `buf`, whose body may be at most `max` bytes:
/// `Ok(None)` when more bytes are needed, else the frame and the bytes it
/// took.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(len) = check_header(buf, max)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = match buf[3] {
        kind::NEED => {
            let b: NeedBody = strict(body)?;
            Frame::Need {
                content: b.content,
                block: b.block,
                held: b.held,
                need: b.need,
                highest_esi: b.highest_esi,
            }
        }
        kind::SYMBOLS => {
            let b: SymbolsBody = strict(body)?;
            Frame::Symbols {
                block: b.block,
                first_esi: b.first_esi,
                payload: b.payload.to_vec(),
            }
        }
        kind::NOT_HELD => Frame::NotHeld {
            block: strict(body)?,
        },
        kind::STOP => Frame::Stop {
            block: strict(body)?,
        },
        kind::END => Frame::End {
            block: strict(body)?,
        },
        kind::JOIN => {
            let b: JoinBody = strict(body)?;
            Frame::Join {
                content: b.content,
                repair_port: b.repair_port,
                fetching: b.fetching,
            }
        }
        kind::MEMBERS => {
            let members: Vec<([u8; 4], u16)> = strict(body)?;
            if members.len() > MAX_MEMBERS {
                return Err(FrameError::TooManyMembers(members.len()));
            }
            Frame::Members { members }
        }
        _ => {
            if !body.is_empty() {
                return Err(FrameError::TrailingBytes(body.len()));
            }
            Frame::Busy
        }
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

/// Parses a whole body: trailing bytes are an error.
fn strict<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (v, rest) = postcard::take_from_bytes(body).map_err(FrameError::BadBody)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_arrive_in_pieces() {
        let frames = vec![
            Frame::Need {
                content: [3; 32],
                block: 7,
                held: 10,
                need: 5,
                highest_esi: Some(900),
            },
            Frame::Symbols {
                block: 7,
                first_esi: 8_000_000,
                payload: vec![1; 2800],
            },
            Frame::NotHeld { block: 2 },
            Frame::Busy,
            Frame::Stop { block: 7 },
            Frame::End { block: 7 },
            Frame::Join {
                content: [4; 32],
                repair_port: 7481,
                fetching: true,
            },
            Frame::Members {
                members: vec![([10, 0, 1, 11], 7481), ([10, 0, 2, 11], 9000)],
            },
            Frame::Members { members: vec![] },
        ];
        let mut stream = Vec::new();
        for f in &frames {
            encode(f, &mut stream);
        }
        // Fed a byte at a time, the decoder waits, then yields each frame.
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for b in stream {
            buf.push(b);
            while let Some((f, used)) = decode(&buf, MAX_FRAME).unwrap() {
                got.push(f);
                buf.drain(..used);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn an_oversized_length_is_refused_before_anything_is_buffered() {
        let mut buf = b"SR\x01\x02".to_vec();
        buf.extend_from_slice(&((MAX_FRAME + 1) as u32).to_le_bytes());
        let too_long = FrameError::TooLong {
            len: MAX_FRAME + 1,
            max: MAX_FRAME,
        };
        assert_eq!(decode(&buf, MAX_FRAME), Err(too_long));
        // A reader's own cap is lower: a requester's frame is small.
        buf[4..8].copy_from_slice(&5000u32.to_le_bytes());
        let too_long = FrameError::TooLong {
            len: 5000,
            max: 4096,
        };
        assert_eq!(decode(&buf, 4096), Err(too_long));
    }

    #[test]
    fn a_wrong_magic_version_or_kind_is_refused() {
        let mut good = Vec::new();
        encode(&Frame::Stop { block: 3 }, &mut good);
        assert!(decode(&good, MAX_FRAME).unwrap().is_some());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad, MAX_FRAME), Err(FrameError::BadMagic));
        let mut bad = good.clone();
        bad[2] = VERSION + 1;
        assert_eq!(
            decode(&bad, MAX_FRAME),
            Err(FrameError::BadVersion(VERSION + 1))
        );
        let mut bad = good.clone();
        bad[3] = 9;
        assert_eq!(decode(&bad, MAX_FRAME), Err(FrameError::BadKind(9)));
        // A list longer than the cap is refused, not taken.
        let long: Vec<([u8; 4], u16)> = vec![([1, 2, 3, 4], 5); MAX_MEMBERS + 1];
        let body = postcard::to_stdvec(&long).unwrap();
        let mut bad = b"SR\x01\x08".to_vec();
        bad.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bad.extend_from_slice(&body);
        assert_eq!(
            decode(&bad, MAX_FRAME),
            Err(FrameError::TooManyMembers(MAX_MEMBERS + 1))
        );
        // Busy has no body; a byte after it is refused.
        let mut bad = Vec::new();
        encode(&Frame::Busy, &mut bad);
        bad[4] = 1;
        bad.push(0);
        assert_eq!(decode(&bad, MAX_FRAME), Err(FrameError::TrailingBytes(1)));
    }

    #[test]
    fn symbols_encoded_by_hand_are_postcards_bytes() {
        let payload = vec![7u8; 300];
        let mut out = Vec::new();
        let f = Frame::Symbols {
            block: 200,
            first_esi: 1 << 23,
            payload: payload.clone(),
        };
        encode(&f, &mut out);
        let by_serde = postcard::to_stdvec(&(200u32, 1u32 << 23, payload)).unwrap();
        assert_eq!(&out[HEADER_LEN..], &by_serde[..]);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes, MAX_FRAME);
        }

        #[test]
        fn random_bodies_behind_a_valid_header_never_panic(kind in 0u8..10, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = vec![b'S', b'R', VERSION, kind];
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&body);
            let _ = decode(&buf, MAX_FRAME);
        }
    }
}
