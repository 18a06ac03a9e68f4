//! Background threads (decoding, hashing, writing; the sender's encoder) run
//! at a lower priority than the thread that receives or sends datagrams.
//!
//! A receiver's socket buffer holds a fraction of a second of traffic; its
//! decode queue holds up to 48 MiB. So when the CPU is short, decoding is the
//! work that can wait: a block decoded 100 ms late costs nothing, a datagram
//! dropped because the receive loop was not scheduled costs a repair round.
//! On a host that runs other programs too, this keeps the receive loop
//! ahead of our own decoder; where several endpoints share few cores (a lab
//! of network namespaces) it also leaves more CPU to the sender.
//!
//! The sender's encoder works two blocks ahead of the pass, so it too can
//! wait, while its pacing loop cannot: a loop woken late loses sending time
//! that the pacer makes up only slowly. In the 8-receiver lab the encoder at
//! nice 6 shortened the pass by 50 and 100 ms (two rounds of 8 runs each,
//! side by side with it at 0).

/// The calling thread's niceness (Linux niceness is per thread). At 6 a
/// busy thread gets about a fifth of the CPU a nice-0 thread gets when both
/// want it (and all of it when nothing else does): still twice what decoding
/// at 200 Mbit/s needs, so the decode queue does not fill behind a CPU hog.
/// Measured in the 8-receiver lab: 6 and 10 both cut the wall time by about
/// a sixth against 0; at 10 one run in eight let a decoder fall 48 MiB
/// behind.
#[cfg(target_os = "linux")]
const BACKGROUND_NICE: libc::c_int = 6;

/// Lowers the calling thread's priority; best effort (a failure only means
/// the thread competes with the packet loop as before).
pub fn yield_to_packet_loop() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers and touch no
        // memory of ours; on Linux PRIO_PROCESS with a thread id sets that
        // thread's niceness alone.
        let rc = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE)
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower a background thread's priority");
        }
    }
}
