//! What the sender says about its session: SESSION and HASHES each
//! announce interval (and as beacons while it waits for joins), the
//! hashes its encoder finds, and the feedback interval it asks for.

use super::*;

impl Sender {
    pub(super) fn note_worst_receivers(&mut self) {
        let mut worst: Vec<ReceiverLoss> = (self.peers.iter())
            .filter(|(_, p)| !p.done && !p.lost)
            .map(|(&receiver, p)| ReceiverLoss {
                receiver,
                loss_ppm: p.loss_ppm,
                left: p.left,
            })
            .collect();
        worst.sort_unstable_by_key(|r| (std::cmp::Reverse(r.loss_ppm), r.receiver));
        worst.truncate(WORST_RECEIVERS);
        self.stats.worst_receivers = worst;
    }

    /// How often receivers report: the configured interval, stretched with
    /// their number so feedback stays near 500 datagrams a second at most.
    pub(super) fn feedback_interval(&self) -> Duration {
        let peers = self.peers.len() as u32;
        self.cfg
            .feedback_interval
            .max(Duration::from_millis(2) * peers)
    }

    /// The gap after a SESSION sent while waiting for joins (see
    /// [`BEACON_FIRST_GAP`]); counts the SESSION.
    pub(super) fn beacon_gap(&mut self) -> Duration {
        let gap = (BEACON_FIRST_GAP * (1 << self.beacons.min(4))).min(BEACON_INTERVAL);
        self.beacons = self.beacons.saturating_add(1);
        gap
    }

    pub(super) fn announce(&mut self) {
        self.note_worst_receivers();
        self.info.feedback_interval_ms = self.feedback_interval().as_millis() as u32;
        self.queue_control(&Frame::Session(self.info.clone()));
        // Receivers left behind that may have lost their LEAVE and still
        // wait for repair: told again, a few per announcement.
        let left: Vec<u64> = (self.peers.iter())
            .filter(|(_, p)| p.left && !p.done && !p.lost)
            .map(|(&id, _)| id)
            .take(MAX_LEAVES_PER_ANNOUNCE)
            .collect();
        for receiver in left {
            self.queue_control(&Frame::Leave { receiver });
        }
        if self.pass_done_at.is_some() {
            // Repeated: a receiver that lost every symbol of the last block
            // learns only from this that it should ask for it (one that had
            // also lost the first END-OF-PASS fell silent, with nothing to
            // ask for, until the sender gave up on it).
            self.queue_control(&Frame::EndOfPass {
                pass: 1,
                closing: false,
            });
        }
        let chunks = self.hashes.len().div_ceil(HASHES_PER_FRAME);
        let per_tick = match self.phase {
            Phase::Announcing { .. } => chunks,
            _ => chunks.min(2),
        };
        for _ in 0..per_tick {
            let first = self.hash_cursor * HASHES_PER_FRAME;
            let end = (first + HASHES_PER_FRAME).min(self.hashes.len());
            self.queue_known_hashes(first, end);
            self.hash_cursor = (self.hash_cursor + 1) % chunks;
        }
    }

    /// Queues HASHES frames for the known hashes of blocks `first..end`,
    /// one frame for each run of known ones.
    pub(super) fn queue_known_hashes(&mut self, first: usize, end: usize) {
        let mut at = first;
        while at < end {
            let run: Vec<Digest> = self.hashes[at..end].iter().map_while(|h| *h).collect();
            if run.is_empty() {
                at += 1;
                continue;
            }
            let len = run.len();
            self.queue_control(&Frame::Hashes {
                first_block: at as u32,
                hashes: run,
            });
            at += len;
        }
    }

    /// Learns hashes the encoder found, and tells receivers at once: a
    /// block's hash before its symbols, the file's well before the end.
    pub(super) fn learn_hashes(&mut self, hashes: Vec<(u32, Digest)>, file_sha256: Option<Digest>) {
        for (block, digest) in hashes {
            if let Some(slot @ None) = self.hashes.get_mut(block as usize) {
                *slot = Some(digest);
                let b = block as usize;
                self.queue_known_hashes(b, b + 1);
            }
        }
        if self.info.file_sha256.is_none() && file_sha256.is_some() {
            self.info.file_sha256 = file_sha256;
            self.queue_control(&Frame::Session(self.info.clone()));
        }
    }
}
