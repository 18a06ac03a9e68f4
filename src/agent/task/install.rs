//! After the package is verified and cached: pin it, or run the task's
//! command with its path.

use super::*;

/// Bytes of an install command's output kept in the task status.
const OUTPUT_TAIL: usize = 4096;

/// The object is in the cache: pin it, or run the command.
pub(super) async fn finish(r: &Run, path: &Path) -> anyhow::Result<()> {
    let path_s = path.display().to_string();
    if let Some(t) = r.agent.tasks().get_mut(&r.id) {
        t.holding = Some(Holding::whole(r.m.layout.block_count(), path.to_owned()));
    }
    update(&r.agent, &r.id, |s| {
        s.path = Some(path_s.clone());
        s.blocks_done = s.block_count;
    });
    if r.spec.cache_only {
        let days = u64::from(r.spec.pin_days.unwrap_or(DEFAULT_PIN_DAYS));
        let until = now_unix() + days * 86_400;
        r.agent.cache.pin(&r.m.id(), until)?;
        update(&r.agent, &r.id, |s| s.pinned_until = Some(until));
        return Ok(());
    }
    let Some(cmd) = r.spec.run.clone() else {
        return Ok(());
    };
    // A paused task does not start its command until resumed.
    if r.paused() {
        r.note("paused before the install: waiting for a resume".into());
        r.until_resumed().await;
        if r.cancelled() {
            anyhow::bail!("cancelled");
        }
    }
    // Durable before the command starts: after a crash from here on the
    // command is never started again (see `restore`).
    update(&r.agent, &r.id, |s| {
        s.state = State::Installing;
        s.install_started = Some(now_unix());
    });
    try_save(&r.agent, &r.id)
        .context("recording the install's start on disk; the command was not started")?;
    let timeout = Duration::from_secs(r.spec.run_timeout_s.unwrap_or(DEFAULT_RUN_TIMEOUT_S));
    let result = run_command(&cmd, path, timeout, r).await?;
    let code = result.exit_code;
    let timed_out = result.timed_out;
    update(&r.agent, &r.id, |s| s.install = Some(result));
    if timed_out {
        bail!("the install command did not finish within {timeout:?} and was stopped");
    }
    match code {
        Some(0) => Ok(()),
        Some(c) => bail!("the install command exited with status {c}"),
        None => bail!("the install command was killed by a signal"),
    }
}

async fn run_command(
    cmd: &str,
    path: &Path,
    timeout: Duration,
    r: &Run,
) -> anyhow::Result<InstallResult> {
    #[cfg(unix)]
    let mut c = {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c").arg(cmd).arg("somcast-install").arg(path);
        // A process group of its own, so that stopping it stops whatever
        // it started too.
        c.process_group(0);
        c
    };
    #[cfg(windows)]
    let mut c = {
        // cmd.exe does its own parsing of its command line: /S /C "..."
        // takes everything between the first and the last quote as it is,
        // so a command with quoted paths of its own survives. /D: no
        // AutoRun from the registry. The package is %SOMCAST_FILE%.
        let mut c = tokio::process::Command::new("cmd");
        c.raw_arg(format!("/D /S /C \"{cmd}\""));
        // A console process group of its own, no window.
        c.creation_flags(0x0000_0200 | 0x0800_0000);
        c
    };
    #[cfg(not(any(unix, windows)))]
    let mut c = {
        let mut c = tokio::process::Command::new(cmd);
        c.arg(path);
        c
    };
    c.env("SOMCAST_FILE", path)
        .env("SOMCAST_TASK", &r.id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = c.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut tree = ProcessTree::of(&child);
    let out = tokio::select! {
        out = child.wait_with_output() => Some(out?),
        _ = tokio::time::sleep(timeout) => None,
        _ = r.until_cancelled() => bail!("cancelled"),
    };
    if out.is_some() {
        // It ended by itself: what it left running (a service it started)
        // is its business.
        tree.release();
    }
    Ok(match out {
        Some(o) => {
            let mut text = o.stdout;
            text.extend_from_slice(&o.stderr);
            let tail = &text[text.len().saturating_sub(OUTPUT_TAIL)..];
            InstallResult {
                exit_code: o.status.code(),
                timed_out: false,
                output_tail: String::from_utf8_lossy(tail).into_owned(),
            }
        }
        None => InstallResult {
            exit_code: None,
            timed_out: true,
            output_tail: String::new(),
        },
    })
}

/// Ends an install command's whole process tree when dropped before the
/// command ended by itself: on timeout, on cancel, and when the agent
/// stops. On Unix the command leads a process group of its own, killed with
/// killpg; on Windows it runs in a job object (what it starts joins the
/// job), terminated as a whole. Elsewhere the command alone is killed, by
/// `kill_on_drop`.
struct ProcessTree {
    #[cfg(unix)]
    group: Option<i32>,
    #[cfg(windows)]
    job: Option<job::Job>,
}

impl ProcessTree {
    fn of(child: &tokio::process::Child) -> Self {
        #[cfg(not(any(unix, windows)))]
        let _ = child;
        ProcessTree {
            #[cfg(unix)]
            group: child.id().and_then(|p| i32::try_from(p).ok()),
            #[cfg(windows)]
            job: child.raw_handle().and_then(|h| {
                job::Job::holding(h)
                    .inspect_err(|e| {
                        tracing::warn!("no job object for the install command ({e}): stopping it will not stop what it started")
                    })
                    .ok()
            }),
        }
    }

    /// The command ended by itself: what it left running (a service it
    /// started) is its business.
    fn release(&mut self) {
        #[cfg(unix)]
        {
            self.group = None;
        }
        #[cfg(windows)]
        {
            self.job = None;
        }
    }
}

impl Drop for ProcessTree {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.group {
            // SAFETY: killpg only sends a signal; the group id is the one
            // the command was started with.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
        #[cfg(windows)]
        if let Some(job) = &self.job {
            job.terminate();
        }
    }
}

#[cfg(windows)]
mod job {
    use std::os::windows::io::RawHandle;

    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, TerminateJobObject,
    };

    /// A job object that holds one process and what it starts.
    pub struct Job(HANDLE);

    // SAFETY: a job handle may be used and closed from any thread.
    unsafe impl Send for Job {}
    unsafe impl Sync for Job {}

    impl Job {
        /// A new, unnamed job with `process` in it; what the process starts
        /// from then on is in the job too. Called right after the spawn: a
        /// child started in that instant would escape, and cmd.exe takes
        /// far longer than that to start anything.
        pub fn holding(process: RawHandle) -> std::io::Result<Job> {
            // SAFETY: plain Win32 calls; the job handle is owned by the
            // returned value (or closed here), the process handle is the
            // live child's, borrowed.
            unsafe {
                let job = CreateJobObjectW(std::ptr::null(), std::ptr::null());
                if job.is_null() {
                    return Err(std::io::Error::last_os_error());
                }
                let job = Job(job);
                if AssignProcessToJobObject(job.0, process as HANDLE) == 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(job)
            }
        }

        pub fn terminate(&self) {
            // SAFETY: the handle is open for as long as self lives.
            unsafe {
                TerminateJobObject(self.0, 1);
            }
        }
    }

    impl Drop for Job {
        fn drop(&mut self) {
            // SAFETY: the handle is ours and closed once. Closing does not
            // end the processes (no kill-on-close limit).
            unsafe {
                CloseHandle(self.0);
            }
        }
    }
}
