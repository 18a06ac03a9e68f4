//! After the package is verified and cached: pin it, or run the task's
//! command with its path.

use super::*;

/// Bytes of an install command's output kept in the task status.
const OUTPUT_TAIL: usize = 4096;

/// The object is in the cache: pin it, or run the command.
pub(super) async fn finish(r: &Run, path: &Path) -> anyhow::Result<()> {
    let path_s = path.display().to_string();
    if let Some(t) = r.agent.tasks().get_mut(&r.id) {
        t.have = vec![true; r.m.layout.block_count() as usize];
        t.data = Some(path.to_owned());
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
    let mut group = ProcessGroup(child.id());
    let out = tokio::select! {
        out = child.wait_with_output() => Some(out?),
        _ = tokio::time::sleep(timeout) => None,
        _ = r.until_cancelled() => bail!("cancelled"),
    };
    if out.is_some() {
        // It ended by itself: what it left running (a service it started)
        // is its business.
        group.0 = None;
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

/// Kills an install command's whole process group when dropped before the
/// command ended by itself: on timeout, on cancel, and when the agent
/// stops. Elsewhere the command alone is killed, by `kill_on_drop`.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: killpg only sends a signal; the group id is the one
            // the command was started with.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
        // Windows has no process groups to signal: taskkill /T ends the
        // command's whole tree (what cmd started too).
        #[cfg(windows)]
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("taskkill")
                .args(["/T", "/F", "/PID", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
