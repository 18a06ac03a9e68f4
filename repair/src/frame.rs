//! Repair frames on a TCP stream: a 4-byte little-endian length, then a
//! postcard body. A length above [`MAX_FRAME`] or a body that does not parse
//! exactly is an error: the connection is dropped, never a panic.

use multicast::wire::Digest;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest frame body: 64 symbols of the largest T with room to spare.
pub const MAX_FRAME: usize = 4 * 1024 * 1024 + 1024;
/// Symbols per `Symbols` frame: about 90 KB at T = 1400, so a stop takes
/// effect within a frame or two.
pub const SYMBOLS_PER_FRAME: u32 = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte cap")]
    TooLong(usize),
    #[error("frame body does not parse: {0}")]
    BadBody(String),
}

/// Appends one frame, length first.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    // Serializing these plain types into a Vec cannot fail.
    let body = postcard::to_stdvec(frame).expect("postcard serialization into a Vec is infallible");
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
}

/// Decodes the first frame in `buf`: `Ok(None)` when more bytes are needed,
/// else the frame and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let (frame, rest) =
        postcard::take_from_bytes::<Frame>(body).map_err(|e| FrameError::BadBody(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::BadBody(format!(
            "{} bytes after the body",
            rest.len()
        )));
    }
    Ok(Some((frame, 4 + len)))
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
            while let Some((f, used)) = decode(&buf).unwrap() {
                got.push(f);
                buf.drain(..used);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn an_oversized_length_is_refused_before_anything_is_buffered() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        buf.push(0);
        assert_eq!(decode(&buf), Err(FrameError::TooLong(MAX_FRAME + 1)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn random_bodies_behind_a_valid_length_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = (body.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&body);
            let _ = decode(&buf);
        }
    }
}
