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
//!
//! The pacing loop itself asks the scheduler for a short slice instead
//! ([`PacingSlice`]): the same share of the CPU, but picked sooner when it
//! wakes.

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

/// The pacing loop's scheduler slice: it wakes every half millisecond or
/// more and runs for tens of microseconds, so it asks for no longer a slice
/// than that. Under Linux's EEVDF scheduler (6.6 and later; a custom slice
/// from 6.12) a thread's deadline is its slice away, so a short slice gets
/// it picked sooner after a wakeup, with the same share of the CPU when the
/// CPU is short. The default is 0.75 ms times 1 + log2(CPUs), 1.5 ms on two.
/// Measured in the 8-receiver lab, 8 runs each side by side: the pass took
/// 3.198 s with the default, 3.171 with 0.5 ms and 3.170 with 0.1 ms
/// (3.138 s is what the pacing alone needs); two earlier rounds with 0.1 ms
/// gave 3.218 against 3.171 and 3.213 against 3.169.
#[cfg(target_os = "linux")]
const PACING_SLICE_NS: u64 = 500_000;

/// The calling thread's scheduler slice, shortened for the pacing loop while
/// this lives and put back when it is dropped. Best effort: an older
/// kernel ignores it, a thread under another policy (`chrt`) is left as it
/// is, and the thread's niceness stays what it was. A no-op off Linux.
pub struct PacingSlice {
    #[cfg(target_os = "linux")]
    previous: Option<sched::Attr>,
}

impl PacingSlice {
    pub fn enter() -> Self {
        #[cfg(target_os = "linux")]
        {
            let previous = sched::get().filter(|a| a.policy == sched::SCHED_OTHER);
            if let Some(old) = previous {
                sched::set(&sched::Attr {
                    runtime: PACING_SLICE_NS,
                    ..old
                });
            }
            Self { previous }
        }
        #[cfg(not(target_os = "linux"))]
        Self {}
    }
}

impl Drop for PacingSlice {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(old) = self.previous {
            sched::set(&old);
        }
    }
}

/// `sched_getattr` / `sched_setattr` for the calling thread; libc has no
/// wrapper for either.
#[cfg(target_os = "linux")]
mod sched {
    pub const SCHED_OTHER: u32 = 0;

    /// `struct sched_attr`, its first version (48 bytes), which every kernel
    /// since 3.14 takes.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Attr {
        pub size: u32,
        pub policy: u32,
        pub flags: u64,
        pub nice: i32,
        pub priority: u32,
        /// For the fair class: the slice, in nanoseconds (0 = the default).
        pub runtime: u64,
        pub deadline: u64,
        pub period: u64,
    }

    const SIZE: u32 = std::mem::size_of::<Attr>() as u32;

    pub fn get() -> Option<Attr> {
        let mut attr = Attr::default();
        // SAFETY: the kernel writes at most SIZE bytes into `attr`, which
        // is a live, properly aligned Attr of exactly that size.
        let rc =
            unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut Attr, SIZE, 0) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "sched_getattr failed");
            return None;
        }
        Some(attr)
    }

    pub fn set(attr: &Attr) {
        let attr = Attr {
            size: SIZE,
            ..*attr
        };
        // SAFETY: the kernel only reads `attr`, a live Attr whose size
        // field says how much of it there is.
        let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const Attr, 0) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "sched_setattr failed");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_pacing_slice_keeps_the_niceness_and_is_put_back() {
        // A thread of its own: niceness and slice are per thread.
        std::thread::spawn(|| {
            // SAFETY: as in yield_to_packet_loop.
            let tid = unsafe { libc::gettid() } as libc::id_t;
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 3) }, 0);
            let before = sched::get().expect("sched_getattr works on Linux");
            {
                let _slice = PacingSlice::enter();
                let during = sched::get().unwrap();
                assert_eq!(during.nice, 3);
                // Kernels before the custom slice (6.12) ignore it.
                if kernel_at_least(6, 12) {
                    assert_eq!(during.runtime, PACING_SLICE_NS, "{during:?}");
                }
            }
            let after = sched::get().unwrap();
            assert_eq!(after.nice, 3);
            assert_eq!(after.runtime, before.runtime);
        })
        .join()
        .unwrap();
    }

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let found = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|p| p.parse::<u32>().ok()),
        );
        matches!(found, (Some(a), Some(b)) if (a, b) >= (major, minor))
    }
}
