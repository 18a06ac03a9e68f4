//! Frames on a repair connection, both sides: reading (a whole frame
//! within a deadline, its header checked before the body is buffered) and
//! writing, through the fleet-key ciphers once the handshake is done.

use multicast::auth::FleetKeys;
use multicast::handshake;
use repair::frame::{self, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{MAX_REQUEST, PEER_TIMEOUT};

/// Why a repair connection's frames stopped, on either side.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("no whole frame within {PEER_TIMEOUT:?}")]
    FrameTimeout,
    #[error("a write not taken within {PEER_TIMEOUT:?}")]
    WriteTimeout,
    #[error("no fleet-key handshake within {PEER_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("fleet-key handshake: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    /// A frame that breaks the protocol (bad magic, version, length, body).
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// Reading or writing (the OS's words).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The reading side of a repair connection, with the fleet key's cipher of
/// that direction (every byte after the handshake is encrypted).
pub(super) struct FrameReader {
    pub(super) rd: tokio::net::tcp::OwnedReadHalf,
    rx: Option<handshake::Cipher>,
    /// Longest frame body this side takes: a request on the server.
    max_frame: usize,
    /// Acknowledge at once (a requester: the peer's upload pace reads the
    /// RTT).
    quickack: bool,
    /// Bytes read and deciphered; those before `used` are decoded already.
    buf: Vec<u8>,
    used: usize,
}

/// The writing side, with its cipher.
pub(super) struct FrameWriter {
    pub(super) wr: tokio::net::tcp::OwnedWriteHalf,
    tx: Option<handshake::Cipher>,
}

/// Splits a connection (after the handshake, if any) into its two sides.
pub(super) fn split(
    stream: TcpStream,
    ciphers: Option<(handshake::Cipher, handshake::Cipher)>,
    max_frame: usize,
) -> (FrameReader, FrameWriter) {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = ciphers.unzip();
    let reader = FrameReader {
        rd,
        rx,
        max_frame,
        // A server's requests need no quick ACKs; a requester's answers do.
        quickack: max_frame > MAX_REQUEST,
        buf: Vec::new(),
        used: 0,
    };
    (reader, FrameWriter { wr, tx })
}

impl FrameReader {
    /// The next frame, which must arrive whole within [`PEER_TIMEOUT`].
    pub(super) async fn read_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        tokio::time::timeout(PEER_TIMEOUT, self.next_frame())
            .await
            .map_err(|_| StreamError::FrameTimeout)?
    }

    /// The next frame, however long it takes.
    pub(super) async fn next_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            let from = self.make_room(READ_AT_ONCE);
            let n = self.rd.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
            if self.quickack {
                crate::agent::tcp::quickack(self.rd.as_ref());
            }
            self.decipher(from);
        }
    }

    /// A whole frame if one has arrived, without waiting.
    pub(super) fn try_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            let from = self.make_room(4096);
            match self.rd.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(None), // closed: the next read says so
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            self.decipher(from);
        }
    }

    /// The first whole frame in the buffer. The header is checked (and the
    /// frame refused) before more of a frame declared too long is read.
    fn buffered(&mut self) -> Result<Option<Frame>, StreamError> {
        let rest = &self.buf[self.used..];
        frame::check_header(rest, self.max_frame)?;
        let Some((f, used)) = frame::decode(rest, self.max_frame)? else {
            return Ok(None);
        };
        self.used += used;
        if self.used == self.buf.len() {
            self.buf.clear();
            self.used = 0;
        }
        Ok(Some(f))
    }

    /// Room for `n` more bytes at the buffer's end (the decoded ones moved
    /// out first when that saves growing it); returns where new bytes land.
    fn make_room(&mut self, n: usize) -> usize {
        if self.used > 0 && self.buf.capacity() - self.buf.len() < n {
            self.buf.drain(..self.used);
            self.used = 0;
        }
        self.buf.reserve(n);
        self.buf.len()
    }

    /// Deciphers the bytes read from `from` on.
    fn decipher(&mut self, from: usize) {
        if let Some(rx) = &mut self.rx {
            rx.apply(&mut self.buf[from..]);
        }
    }
}

/// Most bytes one read takes: a few frames of symbols, so a fast link
/// costs few reads.
const READ_AT_ONCE: usize = 256 * 1024;

impl FrameWriter {
    pub(super) async fn write_frame(&mut self, f: &Frame) -> Result<(), StreamError> {
        let mut out = Vec::new();
        frame::encode(f, &mut out);
        self.write_encoded(&mut out).await
    }

    /// Writes frames already encoded (enciphered here, in place).
    pub(super) async fn write_encoded(&mut self, out: &mut [u8]) -> Result<(), StreamError> {
        if let Some(tx) = &mut self.tx {
            tx.apply(out);
        }
        tokio::time::timeout(PEER_TIMEOUT, self.wr.write_all(out))
            .await
            .map_err(|_| StreamError::WriteTimeout)??;
        Ok(())
    }
}

/// The fleet-key handshake, server side: the client proves it holds the
/// key (and learns that this agent does) before any frame is read.
pub(super) async fn prove_server(
    stream: &mut TcpStream,
    keys: &FleetKeys,
) -> Result<handshake::Session, StreamError> {
    tokio::time::timeout(PEER_TIMEOUT, async {
        let mut hello = [0u8; handshake::HELLO_LEN];
        stream.read_exact(&mut hello).await?;
        let (server, answer) = handshake::Server::answer(keys, &hello)?;
        stream.write_all(&answer).await?;
        let mut proof = [0u8; handshake::PROOF_LEN];
        stream.read_exact(&mut proof).await?;
        Ok::<_, StreamError>(server.finish(&proof)?)
    })
    .await
    .map_err(|_| StreamError::HandshakeTimeout)?
}

/// The fleet-key handshake, client side.
pub(super) async fn prove_client(
    stream: &mut TcpStream,
    keys: &FleetKeys,
) -> Result<handshake::Session, StreamError> {
    tokio::time::timeout(PEER_TIMEOUT, async {
        let (client, hello) = handshake::Client::start(keys);
        stream.write_all(&hello).await?;
        let mut answer = [0u8; handshake::ANSWER_LEN];
        stream.read_exact(&mut answer).await?;
        let (proof, session) = client.finish(&answer)?;
        stream.write_all(&proof).await?;
        Ok::<_, StreamError>(session)
    })
    .await
    .map_err(|_| StreamError::HandshakeTimeout)?
}
