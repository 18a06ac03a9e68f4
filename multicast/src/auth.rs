//! The fleet key: who may speak on the LAN.
//!
//! Every agent of a fleet holds the same 256-bit secret. With it, every
//! datagram is sealed: an authentication header in front of the plain
//! datagram (the [`wire`](crate::wire) format, unchanged) and a tag behind
//! it.
//!
//! ```text
//! +------+---------+-------+--------+--------+---------+-------+-------------------+--------+
//! | "SK" | version | flags | key id | sender | counter | time  | plain datagram    | tag    |
//! | 2 B  | 1 B = 1 | 1 B=0 | 2 B LE | 8 B LE | 6 B LE  | 4 B LE| "SC" ... CRC-32   | 16 B   |
//! +------+---------+-------+--------+--------+---------+-------+-------------------+--------+
//! ```
//!
//! The tag is the first 16 bytes of keyed BLAKE3 (the key derived from the
//! secret for datagrams) over everything before it. With flag 1 (a sender
//! with `--encrypt`) the plain datagram travels encrypted: XOR-ed with
//! XChaCha20 under the key's cipher key, nonce = sender id (8 bytes) ||
//! counter (6) || 10 zero bytes, and the tag covers the ciphertext
//! (encrypt, then MAC). A receiver checks, in
//! order and before it parses a byte of the plain datagram: the magic and
//! version, the key id among the keys it holds (a current and a next one,
//! so a fleet rolls its key without a flag day), the tag, the time (within
//! [`MAX_SKEW_S`] of its clock), and the counter against a sliding window
//! per sender id (64 random bits per socket): a counter seen before, or
//! older than the window, is a replay, whoever resends it. A datagram that
//! fails is dropped and counted by reason. The windows and the counts are
//! shared by every socket of an agent ([`AuthState`]), so a datagram heard
//! on one task's data socket is a replay on the next task's.
//!
//! Replay: within a sender's stream the window stops every repeat; a
//! stream recorded earlier and replayed to a receiver that has forgotten
//! the sender (restarted, or evicted it) is refused by its time once
//! [`MAX_SKEW_S`] has passed. What is left, a replay within minutes to a
//! receiver that never heard the sender (a unicast it was not sent),
//! delivers what that sender said moments ago to someone else; sessions
//! bind their data to the session id their offer announced, and every
//! block is checked against its hash.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20::XChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};

/// "SK": a sealed datagram (plain ones start with "SC").
pub const MAGIC: [u8; 2] = *b"SK";
pub const VERSION: u8 = 1;
/// Magic, version, flags, key id, sender, counter, time.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 2 + 8 + 6 + 4;
/// Counters are 48 bits: at a million datagrams a second, 9 years; a
/// sealer that gets there takes a new sender id.
const COUNTER_LIMIT: u64 = 1 << 48;
/// 128 bits: forging one tag takes 2^128 tries.
pub const TAG_LEN: usize = 16;
/// What sealing adds to every datagram.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Clock difference tolerated between sender and receiver; also how long
/// a recorded datagram stays dangerous to a receiver that never saw its
/// sender. Five minutes: office clocks synced by the domain are seconds
/// apart; a host minutes off is refused, and counted as `stale`.
pub const MAX_SKEW_S: u64 = 300;
/// Counters below a sender's highest that are still taken once (datagrams
/// reordered on the way).
pub const WINDOW: u64 = 64;
/// Senders whose windows a receiver keeps; the least recently heard goes
/// first. Only validly tagged datagrams create entries.
pub const MAX_SENDERS: usize = 4096;
/// Keys one agent holds at once: the current and the next.
pub const MAX_KEYS: usize = 2;

/// Flag bit: the plain datagram is encrypted.
pub const FLAG_ENCRYPTED: u8 = 1;

/// Length of a fleet secret.
pub const SECRET_LEN: usize = 32;

/// One fleet key: its id and the keys derived from its secret.
#[derive(Clone)]
pub struct FleetKey {
    id: u16,
    datagram: [u8; 32],
    cipher: [u8; 32],
    repair: [u8; 32],
    repair_cipher: [u8; 32],
}

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FleetKey({:04x})", self.id)
    }
}

impl FleetKey {
    /// Derives the key id and the per-use keys from a secret.
    pub fn from_secret(secret: &[u8; SECRET_LEN]) -> FleetKey {
        let id = blake3::derive_key("somcast 2026-12 fleet key id", secret);
        FleetKey {
            id: u16::from_le_bytes([id[0], id[1]]),
            datagram: blake3::derive_key("somcast 2026-12 fleet datagram mac", secret),
            cipher: blake3::derive_key("somcast 2026-12 fleet datagram cipher", secret),
            repair: blake3::derive_key("somcast 2026-12 fleet repair handshake", secret),
            repair_cipher: blake3::derive_key("somcast 2026-12 fleet repair cipher", secret),
        }
    }

    /// The id datagrams carry, to pick the key among a current and a next.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The key of the repair handshake.
    pub fn repair_key(&self) -> &[u8; 32] {
        &self.repair
    }

    /// The key repair connections' stream keys are derived from.
    pub fn repair_cipher_key(&self) -> &[u8; 32] {
        &self.repair_cipher
    }

    /// XORs `data` with the keystream of (sender, counter).
    fn keystream(&self, sender: u64, counter: u64, data: &mut [u8]) {
        let mut nonce = [0u8; 24];
        nonce[..8].copy_from_slice(&sender.to_le_bytes());
        nonce[8..14].copy_from_slice(&counter.to_le_bytes()[..6]);
        XChaCha20::new(&self.cipher.into(), &nonce.into()).apply_keystream(data);
    }

    fn tag(&self, sealed: &[u8]) -> [u8; TAG_LEN] {
        let h = blake3::keyed_hash(&self.datagram, sealed);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&h.as_bytes()[..TAG_LEN]);
        tag
    }
}

/// A fresh secret from the OS random source.
pub fn new_secret() -> [u8; SECRET_LEN] {
    let mut s = [0u8; SECRET_LEN];
    getrandom::fill(&mut s).expect("the OS random source is available");
    s
}

/// The keys an agent holds: the first seals, every one opens.
#[derive(Clone, Debug)]
pub struct FleetKeys {
    keys: Arc<Vec<FleetKey>>,
}

impl FleetKeys {
    /// At least one key, at most [`MAX_KEYS`].
    pub fn new(keys: Vec<FleetKey>) -> Option<FleetKeys> {
        (!keys.is_empty() && keys.len() <= MAX_KEYS).then(|| FleetKeys {
            keys: Arc::new(keys),
        })
    }

    pub fn current(&self) -> &FleetKey {
        &self.keys[0]
    }

    pub fn find(&self, id: u16) -> Option<&FleetKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn ids(&self) -> Vec<u16> {
        self.keys.iter().map(|k| k.id).collect()
    }
}

/// Seals what one socket sends: a random sender id, a counter.
pub struct Sealer {
    keys: FleetKeys,
    sender: u64,
    counter: u64,
    encrypt: bool,
}

impl Sealer {
    pub fn new(keys: FleetKeys, sender: u64) -> Sealer {
        Sealer {
            keys,
            sender,
            counter: 0,
            encrypt: false,
        }
    }

    /// Encrypt what is sealed from now on (`--encrypt`).
    pub fn set_encrypt(&mut self, on: bool) {
        self.encrypt = on;
    }

    /// Writes the sealed form of `plain` to `out` (cleared first).
    pub fn seal(&mut self, now_unix: u64, plain: &[u8], out: &mut Vec<u8>) {
        if self.counter >= COUNTER_LIMIT {
            self.sender = random_u64();
            self.counter = 0;
        }
        let key = self.keys.current();
        out.clear();
        out.reserve(plain.len() + OVERHEAD);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(if self.encrypt { FLAG_ENCRYPTED } else { 0 });
        out.extend_from_slice(&key.id.to_le_bytes());
        out.extend_from_slice(&self.sender.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes()[..6]);
        out.extend_from_slice(&(now_unix as u32).to_le_bytes());
        out.extend_from_slice(plain);
        if self.encrypt {
            key.keystream(self.sender, self.counter, &mut out[HEADER_LEN..]);
        }
        let tag = key.tag(out);
        out.extend_from_slice(&tag);
        self.counter += 1;
    }
}

/// Why a datagram was dropped before its body was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// Not sealed (a host without the fleet key, or an old agent).
    Unsealed,
    /// Sealed, but too short, or of a version this build does not read.
    Malformed,
    /// Sealed with a key this agent does not hold.
    UnknownKey,
    /// The tag does not match: forged or damaged.
    BadTag,
    /// Its time is more than [`MAX_SKEW_S`] from the receiver's clock.
    Stale,
    /// A counter this receiver has taken from that sender already.
    Replayed,
}

/// What every socket of an agent shares: the replay windows of the senders
/// it has heard, and the datagrams dropped by reason, and taken.
#[derive(Debug, Default)]
pub struct AuthState {
    windows: std::sync::Mutex<HashMap<u64, Window>>,
    pub accepted: AtomicU64,
    pub unsealed: AtomicU64,
    pub malformed: AtomicU64,
    pub unknown_key: AtomicU64,
    pub bad_tag: AtomicU64,
    pub stale: AtomicU64,
    pub replayed: AtomicU64,
    /// Repair connections that failed the fleet-key handshake.
    pub repair_refused: AtomicU64,
}

impl AuthState {
    fn count(&self, r: Result<(), AuthError>) {
        let c = match r {
            Ok(()) => &self.accepted,
            Err(AuthError::Unsealed) => &self.unsealed,
            Err(AuthError::Malformed) => &self.malformed,
            Err(AuthError::UnknownKey) => &self.unknown_key,
            Err(AuthError::BadTag) => &self.bad_tag,
            Err(AuthError::Stale) => &self.stale,
            Err(AuthError::Replayed) => &self.replayed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Name and count of every counter.
    pub fn snapshot(&self) -> [(&'static str, u64); 8] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", g(&self.accepted)),
            ("unsealed", g(&self.unsealed)),
            ("malformed", g(&self.malformed)),
            ("unknown_key", g(&self.unknown_key)),
            ("bad_tag", g(&self.bad_tag)),
            ("stale", g(&self.stale)),
            ("replayed", g(&self.replayed)),
            ("repair_refused", g(&self.repair_refused)),
        ]
    }
}

/// A sender's sliding window of counters.
#[derive(Clone, Copy, Debug)]
struct Window {
    top: u64,
    /// Bit i: counter `top - i` taken.
    seen: u64,
    last_heard: u64,
}

impl Window {
    /// Takes `c` unless it was taken or is below the window.
    fn take(&mut self, c: u64) -> bool {
        if c > self.top {
            let shift = c - self.top;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = c;
            return true;
        }
        let off = self.top - c;
        if off >= WINDOW || self.seen & (1 << off) != 0 {
            return false;
        }
        self.seen |= 1 << off;
        true
    }
}

/// Opens what one socket receives: checks and strips the seal.
pub struct Opener {
    keys: FleetKeys,
    state: Arc<AuthState>,
    /// Where an encrypted datagram is decrypted.
    scratch: Vec<u8>,
}

impl Opener {
    pub fn new(keys: FleetKeys, state: Arc<AuthState>) -> Opener {
        Opener {
            keys,
            state,
            scratch: Vec::new(),
        }
    }

    /// The plain datagram inside `bytes`, or why it is dropped (counted).
    pub fn open<'a>(&'a mut self, now_unix: u64, bytes: &'a [u8]) -> Result<&'a [u8], AuthError> {
        let r = self.check(now_unix, bytes);
        self.state.count(r.map(|_| ()));
        let (key, sender, counter) = r?;
        let body = &bytes[HEADER_LEN..bytes.len() - TAG_LEN];
        if bytes[3] & FLAG_ENCRYPTED == 0 {
            return Ok(body);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(body);
        let key = self.keys.find(key).expect("found by check");
        key.keystream(sender, counter, &mut self.scratch);
        Ok(&self.scratch)
    }

    /// The key id, sender and counter of a datagram that passes.
    fn check(&mut self, now_unix: u64, bytes: &[u8]) -> Result<(u16, u64, u64), AuthError> {
        if bytes.get(..2) != Some(&MAGIC[..]) {
            return Err(AuthError::Unsealed);
        }
        if bytes.len() < OVERHEAD || bytes[2] != VERSION || bytes[3] & !FLAG_ENCRYPTED != 0 {
            return Err(AuthError::Malformed);
        }
        let le = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&bytes[r]);
            u64::from_le_bytes(b)
        };
        let key_id = le(4..6) as u16;
        let key = self.keys.find(key_id).ok_or(AuthError::UnknownKey)?;
        let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        if !same(&key.tag(signed), tag) {
            return Err(AuthError::BadTag);
        }
        let (sender, counter, time) = (le(6..14), le(14..20), le(20..24));
        if time.abs_diff(now_unix & 0xFFFF_FFFF) > MAX_SKEW_S {
            return Err(AuthError::Stale);
        }
        let mut windows = self
            .state
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = windows.get_mut(&sender) {
            if !w.take(counter) {
                return Err(AuthError::Replayed);
            }
            w.last_heard = now_unix;
        } else {
            if windows.len() >= MAX_SENDERS
                && let Some(oldest) = windows
                    .iter()
                    .min_by_key(|(_, w)| w.last_heard)
                    .map(|(k, _)| *k)
            {
                windows.remove(&oldest);
            }
            windows.insert(
                sender,
                Window {
                    top: counter,
                    seen: 1,
                    last_heard: now_unix,
                },
            );
        }
        Ok((key_id, sender, counter))
    }
}

/// Compares in time that does not depend on where the inputs differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source is available");
    u64::from_le_bytes(b)
}

/// Seconds since 1970 by the system clock (0 if it is before).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The sealing side and the opening side of one socket, or neither (no
/// fleet key: datagrams pass as they are). What the drivers call.
pub struct Link {
    sealer: Option<Sealer>,
    opener: Option<Opener>,
    scratch: Vec<u8>,
}

impl Link {
    /// A link sealing with `keys`, or a plain one when `None`; `state` is
    /// shared by the sockets of one agent.
    pub fn new(keys: Option<&FleetKeys>, state: Arc<AuthState>) -> Link {
        Link {
            sealer: keys.map(|k| Sealer::new(k.clone(), random_u64())),
            opener: keys.map(|k| Opener::new(k.clone(), state)),
            scratch: Vec::new(),
        }
    }

    /// Encrypt what this link sends (it must be sealed to).
    pub fn set_encrypt(&mut self, on: bool) {
        if let Some(s) = &mut self.sealer {
            s.set_encrypt(on);
        }
    }

    /// What to send for the plain datagram `bytes`.
    pub fn outgoing<'a>(&'a mut self, bytes: &'a [u8]) -> &'a [u8] {
        match &mut self.sealer {
            Some(s) => {
                s.seal(unix_now(), bytes, &mut self.scratch);
                &self.scratch
            }
            None => bytes,
        }
    }

    /// The plain datagram inside what arrived, `None` when it is dropped.
    pub fn incoming<'a>(&'a mut self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        match &mut self.opener {
            Some(o) => o.open(unix_now(), bytes).ok(),
            None => Some(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(secret: u8) -> FleetKeys {
        FleetKeys::new(vec![FleetKey::from_secret(&[secret; 32])]).unwrap()
    }

    #[test]
    fn a_sealed_datagram_opens_once_and_only_with_the_key() {
        let mut s = Sealer::new(keys(1), 42);
        let mut out = Vec::new();
        s.seal(1000, b"SC plain", &mut out);
        assert_eq!(out.len(), 8 + OVERHEAD);
        let stats = Arc::new(AuthState::default());
        let mut o = Opener::new(keys(1), stats.clone());
        assert_eq!(o.open(1000, &out), Ok(&b"SC plain"[..]));
        assert_eq!(o.open(1000, &out), Err(AuthError::Replayed));
        let mut other = Opener::new(keys(2), stats.clone());
        assert_eq!(other.open(1000, &out), Err(AuthError::UnknownKey));
        assert_eq!(o.open(1000, b"SC plain"), Err(AuthError::Unsealed));
        assert_eq!(stats.replayed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn old_and_repeated_counters_are_replays_but_reordering_is_not() {
        let mut s = Sealer::new(keys(1), 1);
        let sealed: Vec<Vec<u8>> = (0..100)
            .map(|_| {
                let mut out = Vec::new();
                s.seal(1000, b"x", &mut out);
                out
            })
            .collect();
        let mut o = Opener::new(keys(1), Arc::default());
        assert!(o.open(1000, &sealed[90]).is_ok());
        // Reordered within the window: taken once.
        assert!(o.open(1000, &sealed[60]).is_ok());
        assert_eq!(o.open(1000, &sealed[60]), Err(AuthError::Replayed));
        // Older than the window.
        assert_eq!(o.open(1000, &sealed[10]), Err(AuthError::Replayed));
        assert!(o.open(1000, &sealed[99]).is_ok());
        // Whoever resends it, and on another socket of the same agent.
        let mut other_socket = Opener::new(keys(1), o.state.clone());
        assert_eq!(
            other_socket.open(1000, &sealed[99]),
            Err(AuthError::Replayed)
        );
    }

    #[test]
    fn a_recording_replayed_later_is_stale() {
        let mut s = Sealer::new(keys(1), 1);
        let mut out = Vec::new();
        s.seal(1000, b"x", &mut out);
        // A receiver that restarted (an empty window table) an hour later.
        let mut o = Opener::new(keys(1), Arc::default());
        assert_eq!(o.open(4600, &out), Err(AuthError::Stale));
        assert!(o.open(1000 + MAX_SKEW_S, &out).is_ok());
    }

    #[test]
    fn a_next_key_opens_too_so_a_fleet_can_roll_its_key() {
        let old = FleetKey::from_secret(&[1; 32]);
        let new = FleetKey::from_secret(&[2; 32]);
        let mut before = Sealer::new(FleetKeys::new(vec![old.clone()]).unwrap(), 1);
        let mut after = Sealer::new(FleetKeys::new(vec![new.clone()]).unwrap(), 2);
        let mut o = Opener::new(FleetKeys::new(vec![new, old]).unwrap(), Arc::default());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        before.seal(5, b"old", &mut a);
        after.seal(5, b"new", &mut b);
        assert_eq!(o.open(5, &a), Ok(&b"old"[..]));
        assert_eq!(o.open(5, &b), Ok(&b"new"[..]));
    }

    #[test]
    fn an_encrypted_datagram_hides_its_body_and_opens_to_it() {
        let mut s = Sealer::new(keys(1), 5);
        s.set_encrypt(true);
        let secret = b"SC the package bytes, a block of them";
        let mut out = Vec::new();
        s.seal(1000, secret, &mut out);
        assert_eq!(out[3], FLAG_ENCRYPTED);
        assert!(
            !out.windows(12).any(|w| w == &secret[3..15]),
            "plaintext on the wire"
        );
        let mut o = Opener::new(keys(1), Arc::default());
        assert_eq!(o.open(1000, &out), Ok(&secret[..]));
        // Another counter: another keystream.
        let mut again = Vec::new();
        s.seal(1000, secret, &mut again);
        assert_ne!(
            out[HEADER_LEN..out.len() - TAG_LEN],
            again[HEADER_LEN..again.len() - TAG_LEN]
        );
        // A flipped ciphertext bit fails the tag, as any change does.
        again[HEADER_LEN + 3] ^= 1;
        assert_eq!(o.open(1000, &again), Err(AuthError::BadTag));
    }

    #[test]
    fn the_sender_table_is_bounded() {
        let mut o = Opener::new(keys(1), Arc::default());
        let mut out = Vec::new();
        for sender in 0..(MAX_SENDERS as u64 + 10) {
            Sealer::new(keys(1), sender).seal(7, b"x", &mut out);
            assert!(o.open(7, &out).is_ok());
        }
        assert_eq!(o.state.windows.lock().unwrap().len(), MAX_SENDERS);
    }

    proptest! {
        /// No single-byte change of a sealed datagram opens, and random
        /// bytes never panic.
        #[test]
        fn no_single_byte_change_opens(
            plain in proptest::collection::vec(any::<u8>(), 0..200),
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut s = Sealer::new(keys(3), 9);
            let mut out = Vec::new();
            s.seal(100, &plain, &mut out);
            let i = pos.index(out.len());
            prop_assume!(out[i] != byte);
            out[i] = byte;
            let mut o = Opener::new(keys(3), Arc::default());
            prop_assert!(o.open(100, &out).is_err());
        }

        #[test]
        fn random_bytes_are_refused_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut o = Opener::new(keys(3), Arc::default());
            let mut b = bytes;
            if b.len() >= 2 { b[0] = b'S'; b[1] = b'K'; }
            prop_assert!(o.open(100, &b).is_err());
        }
    }
}
