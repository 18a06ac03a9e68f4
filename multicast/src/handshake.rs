//! The fleet key on a repair connection: both ends prove they hold it
//! before a single frame of the repair protocol is read.
//!
//! Protocol flow (sans-IO: the caller moves the bytes, with a deadline):
//!
//! ```text
//! client -> server  Hello  "SRH1" | key id (4 LE) | client nonce (16)              24 B
//! server -> client  Answer "SRA1" | key id (4 LE) | server nonce (16) | tag S (16)  40 B
//!
//! (Key ids are 16 bits, sent as a 32-bit number.)
//! client -> server  Proof  tag C (16)                                              16 B
//! ```
//!
//! tag S = first 16 bytes of keyed BLAKE3 under the key's repair key over
//! `"server" | client nonce | server nonce`; tag C the same over
//! `"client" | client nonce | server nonce`. Nonces are 128 random bits, so
//! neither side can be fooled by a recorded handshake: a replayed Answer
//! does not match the client's new nonce, a replayed Proof not the server's.
//! The server picks the key by the client's key id among the ones it holds
//! (current and next), so connections work through a key roll.

use chacha20::XChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};

use crate::auth::{FleetKey, FleetKeys, same};

pub const HELLO_LEN: usize = 24;
pub const ANSWER_LEN: usize = 40;
pub const PROOF_LEN: usize = 16;
const HELLO_MAGIC: &[u8; 4] = b"SRH1";
const ANSWER_MAGIC: &[u8; 4] = b"SRA1";

/// Why a handshake failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer did not open with a fleet-key handshake (no fleet key, or another one)")]
    NotAHandshake,
    #[error("the peer uses fleet key {0:08x}, which this agent does not hold")]
    UnknownKey(u32),
    #[error("the peer could not prove it holds the fleet key")]
    BadProof,
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).expect("the OS random source is available");
    n
}

fn tag(key: &FleetKey, label: &[u8], client: &[u8; 16], server: &[u8; 16]) -> [u8; 16] {
    let mut h = blake3::Hasher::new_keyed(key.repair_key());
    h.update(label);
    h.update(client);
    h.update(server);
    let mut t = [0u8; 16];
    t.copy_from_slice(&h.finalize().as_bytes()[..16]);
    t
}

/// A connection that completed the handshake: its stream key, the keyed
/// BLAKE3 (repair cipher key) of both nonces, fresh for every connection.
pub struct Session {
    key: [u8; 32],
}

impl Session {
    fn new(fleet: &FleetKey, client: &[u8; 16], server: &[u8; 16]) -> Session {
        let mut h = blake3::Hasher::new_keyed(fleet.repair_cipher_key());
        h.update(client);
        h.update(server);
        Session {
            key: *h.finalize().as_bytes(),
        }
    }

    /// The ciphers of both directions, (what this side sends, what it
    /// receives): XChaCha20 streams with a nonce per direction.
    pub fn ciphers(&self, client_side: bool) -> (Cipher, Cipher) {
        let dir = |label: &[u8; 3]| {
            let mut nonce = [0u8; 24];
            nonce[..3].copy_from_slice(label);
            Cipher(XChaCha20::new(&self.key.into(), &nonce.into()))
        };
        let (c2s, s2c) = (dir(b"c2s"), dir(b"s2c"));
        if client_side { (c2s, s2c) } else { (s2c, c2s) }
    }
}

/// One direction of an encrypted repair connection.
pub struct Cipher(XChaCha20);

impl Cipher {
    /// Encrypts or decrypts the next bytes of the stream in place.
    pub fn apply(&mut self, data: &mut [u8]) {
        self.0.apply_keystream(data);
    }
}

/// The client's side.
pub struct Client {
    key: FleetKey,
    nonce: [u8; 16],
}

impl Client {
    /// Starts a handshake with the current key; returns what to send.
    pub fn start(keys: &FleetKeys) -> (Client, [u8; HELLO_LEN]) {
        let c = Client {
            key: keys.current().clone(),
            nonce: nonce(),
        };
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(HELLO_MAGIC);
        hello[4..8].copy_from_slice(&u32::from(c.key.id()).to_le_bytes());
        hello[8..].copy_from_slice(&c.nonce);
        (c, hello)
    }

    /// Checks the server's answer; returns the proof to send and the
    /// connection's session.
    pub fn finish(
        self,
        answer: &[u8; ANSWER_LEN],
    ) -> Result<([u8; PROOF_LEN], Session), HandshakeError> {
        if &answer[..4] != ANSWER_MAGIC {
            return Err(HandshakeError::NotAHandshake);
        }
        let id = u32::from_le_bytes([answer[4], answer[5], answer[6], answer[7]]);
        if id != u32::from(self.key.id()) {
            return Err(HandshakeError::UnknownKey(id));
        }
        let mut server = [0u8; 16];
        server.copy_from_slice(&answer[8..24]);
        if !same(
            &tag(&self.key, b"server", &self.nonce, &server),
            &answer[24..],
        ) {
            return Err(HandshakeError::BadProof);
        }
        Ok((
            tag(&self.key, b"client", &self.nonce, &server),
            Session::new(&self.key, &self.nonce, &server),
        ))
    }
}

/// The server's side, between its answer and the client's proof.
pub struct Server {
    key: FleetKey,
    client: [u8; 16],
    server: [u8; 16],
}

impl Server {
    /// Answers a client's hello.
    pub fn answer(
        keys: &FleetKeys,
        hello: &[u8; HELLO_LEN],
    ) -> Result<(Server, [u8; ANSWER_LEN]), HandshakeError> {
        if &hello[..4] != HELLO_MAGIC {
            return Err(HandshakeError::NotAHandshake);
        }
        let id = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
        let key = u16::try_from(id)
            .ok()
            .and_then(|i| keys.find(i))
            .ok_or(HandshakeError::UnknownKey(id))?
            .clone();
        let mut client = [0u8; 16];
        client.copy_from_slice(&hello[8..]);
        let s = Server {
            key,
            client,
            server: nonce(),
        };
        let mut answer = [0u8; ANSWER_LEN];
        answer[..4].copy_from_slice(ANSWER_MAGIC);
        answer[4..8].copy_from_slice(&id.to_le_bytes());
        answer[8..24].copy_from_slice(&s.server);
        answer[24..].copy_from_slice(&tag(&s.key, b"server", &s.client, &s.server));
        Ok((s, answer))
    }

    /// Checks the client's proof; the connection's session.
    pub fn finish(self, proof: &[u8; PROOF_LEN]) -> Result<Session, HandshakeError> {
        if same(
            &tag(&self.key, b"client", &self.client, &self.server),
            proof,
        ) {
            Ok(Session::new(&self.key, &self.client, &self.server))
        } else {
            Err(HandshakeError::BadProof)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(s: u8) -> FleetKeys {
        FleetKeys::new(vec![FleetKey::from_secret(&[s; 32])]).unwrap()
    }

    #[test]
    fn both_ends_with_the_key_complete() {
        let (c, hello) = Client::start(&keys(1));
        let (s, answer) = Server::answer(&keys(1), &hello).unwrap();
        let (proof, client) = c.finish(&answer).unwrap();
        let server = s.finish(&proof).ok().unwrap();
        // What one side encrypts, the other decrypts.
        let (mut c_tx, mut c_rx) = client.ciphers(true);
        let (mut s_tx, mut s_rx) = server.ciphers(false);
        let mut m = *b"need block 7";
        c_tx.apply(&mut m);
        assert_ne!(&m, b"need block 7");
        s_rx.apply(&mut m);
        assert_eq!(&m, b"need block 7");
        let mut r = *b"symbols";
        s_tx.apply(&mut r);
        c_rx.apply(&mut r);
        assert_eq!(&r, b"symbols");
    }

    #[test]
    fn an_end_without_the_key_fails_and_recordings_do_not_help() {
        // A client with another key.
        let (_, hello) = Client::start(&keys(2));
        assert!(matches!(
            Server::answer(&keys(1), &hello),
            Err(HandshakeError::UnknownKey(_))
        ));
        // A server that answers with a recorded answer from another run.
        let (c1, hello1) = Client::start(&keys(1));
        let (_, answer1) = Server::answer(&keys(1), &hello1).unwrap();
        assert!(c1.finish(&answer1).is_ok());
        let (c2, _) = Client::start(&keys(1));
        assert!(matches!(c2.finish(&answer1), Err(HandshakeError::BadProof)));
        // A client that replays a recorded proof to a new server nonce.
        let (c3, hello3) = Client::start(&keys(1));
        let (_, answer3) = Server::answer(&keys(1), &hello3).unwrap();
        let (proof3, _) = c3.finish(&answer3).unwrap();
        let (s4, _) = Server::answer(&keys(1), &hello3).unwrap();
        assert!(matches!(s4.finish(&proof3), Err(HandshakeError::BadProof)));
        // A peer speaking the plain repair protocol.
        let mut plain = [0u8; HELLO_LEN];
        plain[..2].copy_from_slice(b"SR");
        assert!(matches!(
            Server::answer(&keys(1), &plain),
            Err(HandshakeError::NotAHandshake)
        ));
    }
}
