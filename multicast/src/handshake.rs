//! The fleet key on a repair connection: both ends prove they hold it
//! before a single frame of the repair protocol is read.
//!
//! Protocol flow (sans-IO: the caller moves the bytes, with a deadline):
//!
//! ```text
//! client -> server  Hello  "SRH1" | key id (4 LE) | client nonce (16)              24 B
//! server -> client  Answer "SRA1" | key id (4 LE) | server nonce (16) | tag S (16)  40 B
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
        hello[4..8].copy_from_slice(&c.key.id().to_le_bytes());
        hello[8..].copy_from_slice(&c.nonce);
        (c, hello)
    }

    /// Checks the server's answer; returns the proof to send.
    pub fn finish(self, answer: &[u8; ANSWER_LEN]) -> Result<[u8; PROOF_LEN], HandshakeError> {
        if &answer[..4] != ANSWER_MAGIC {
            return Err(HandshakeError::NotAHandshake);
        }
        let id = u32::from_le_bytes([answer[4], answer[5], answer[6], answer[7]]);
        if id != self.key.id() {
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
        Ok(tag(&self.key, b"client", &self.nonce, &server))
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
        let key = keys.find(id).ok_or(HandshakeError::UnknownKey(id))?.clone();
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

    /// Checks the client's proof.
    pub fn finish(self, proof: &[u8; PROOF_LEN]) -> Result<(), HandshakeError> {
        if same(
            &tag(&self.key, b"client", &self.client, &self.server),
            proof,
        ) {
            Ok(())
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
        let proof = c.finish(&answer).unwrap();
        assert_eq!(s.finish(&proof), Ok(()));
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
        let _ = c1.finish(&answer1).unwrap();
        let (c2, _) = Client::start(&keys(1));
        assert_eq!(c2.finish(&answer1), Err(HandshakeError::BadProof));
        // A client that replays a recorded proof to a new server nonce.
        let (c3, hello3) = Client::start(&keys(1));
        let (_, answer3) = Server::answer(&keys(1), &hello3).unwrap();
        let proof3 = c3.finish(&answer3).unwrap();
        let (s4, _) = Server::answer(&keys(1), &hello3).unwrap();
        assert_eq!(s4.finish(&proof3), Err(HandshakeError::BadProof));
        // A peer speaking the plain repair protocol.
        let mut plain = [0u8; HELLO_LEN];
        plain[..2].copy_from_slice(b"SR");
        assert!(matches!(
            Server::answer(&keys(1), &plain),
            Err(HandshakeError::NotAHandshake)
        ));
    }
}
