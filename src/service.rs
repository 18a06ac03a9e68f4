//! `somcast agent` as a Windows service: `somcast service install |
//! uninstall | start | stop`, and the entry point the service control
//! manager starts (`service run`).
//!
//! What does not need Windows (where files live, the starting config, the
//! firewall rules, the log file) is built on every platform, so the tests
//! run everywhere; the service control manager's side is Windows only.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::cli::ServiceCommand;

/// The service's name in the service control manager (`sc query somcast`).
pub const SERVICE_NAME: &str = "somcast";
/// The name of the inbound firewall rule `service install` adds.
pub const FIREWALL_RULE: &str = "somcast agent";
/// The log file is moved aside to `agent.log.old` when the service starts
/// and it is larger than this.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// `%ProgramData%\somcast`: the service's config, cache and logs (the
/// agent's default cache directory on Windows is the same).
pub fn data_dir() -> PathBuf {
    let base = std::env::var_os("ProgramData").unwrap_or_else(|| "C:\\ProgramData".into());
    PathBuf::from(base).join("somcast")
}

/// Where the service writes its log.
pub fn log_path(data: &Path) -> PathBuf {
    data.join("logs").join("agent.log")
}

/// The config file `service install` writes when there is none: every
/// setting commented out, with where to put the keys.
pub fn starting_config(data: &Path) -> String {
    let d = data.display();
    format!(
        "# somcast agent, run by the Windows service \"{SERVICE_NAME}\".\n\
         # Keys are the agent's flags (somcast agent --help); unknown keys are refused.\n\
         # After a change: somcast service stop, then somcast service start.\n\
         #\n\
         # Publisher keys whose signed tasks this agent acts on. Without one the\n\
         # agent runs, answers presence and repair, and refuses every task.\n\
         # trusted_keys = ['{d}\\publisher.pub']\n\
         #\n\
         # The fleet key: seals every datagram and repair connection on the LAN.\n\
         # fleet_keys = ['{d}\\fleet.fleet']\n\
         #\n\
         # The task channel this agent polls, and the tags tasks can target.\n\
         # channel = \"http://origin.example:8080/somcast\"\n\
         # poll = \"5m\"\n\
         # tags = [\"kiosk\", \"floor-2\"]\n\
         #\n\
         # iface = \"Ethernet\"          # default: the interface of the default route\n\
         # api = \"127.0.0.1:7480\"      # the control API (repair listens on the next port)\n\
         cache = '{d}'\n\
         # cache_max = \"20G\"\n\
         # cache_min_free = \"2G\"\n\
         # rate = \"1G\"                 # the most it multicasts; it adapts below\n\
         # rate_min = \"1M\"\n\
         # rate_mode = \"background\"     # or \"foreground\"\n"
    )
}

/// netsh's arguments that let `exe` receive what the agent needs
/// (presence and session datagrams, peer repair connections) on domain and
/// private networks. One rule by program, so the repair port may move.
pub fn firewall_add_args(exe: &Path) -> Vec<String> {
    vec![
        "advfirewall".into(),
        "firewall".into(),
        "add".into(),
        "rule".into(),
        format!("name={FIREWALL_RULE}"),
        "dir=in".into(),
        "action=allow".into(),
        format!("program={}", exe.display()),
        "profile=domain,private".into(),
        "enable=yes".into(),
    ]
}

/// netsh's arguments that remove the rule `firewall_add_args` made.
pub fn firewall_delete_args() -> Vec<String> {
    ["advfirewall", "firewall", "delete", "rule"]
        .into_iter()
        .map(String::from)
        .chain([format!("name={FIREWALL_RULE}")])
        .collect()
}

/// Opens the service's log for appending, creating its directory; a log
/// grown past 16 MiB is first moved to `agent.log.old` (replacing it).
pub fn open_log(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = path.as_os_str().to_os_string();
        old.push(".old");
        let _ = std::fs::remove_file(&old);
        std::fs::rename(path, &old)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Runs a `somcast service` command.
pub fn main(cmd: &ServiceCommand) -> anyhow::Result<bool> {
    #[cfg(windows)]
    {
        scm::main(cmd)
    }
    #[cfg(not(windows))]
    {
        let _ = cmd;
        anyhow::bail!(
            "`somcast service` manages a Windows service; elsewhere run `somcast agent` \
             under the system's service manager (systemd, launchd)"
        )
    }
}

#[cfg(windows)]
mod scm {
    use std::ffi::{OsStr, OsString};
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use clap::Parser;
    use windows_service::service::{
        ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
        ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
        ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
    };
    use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
    use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

    use super::*;
    use crate::cli::{Cli, Command};

    /// How long the service waits between attempts to start the agent.
    const START_RETRY: Duration = Duration::from_secs(10);
    /// How long `start` and `stop` wait for the service to get there.
    const STATE_DEADLINE: Duration = Duration::from_secs(30);

    pub fn main(cmd: &ServiceCommand) -> anyhow::Result<bool> {
        match cmd {
            ServiceCommand::Install {
                config,
                no_firewall,
            } => install(config.as_deref(), *no_firewall),
            ServiceCommand::Uninstall => uninstall(),
            ServiceCommand::Start => start(),
            ServiceCommand::Stop => stop(),
            ServiceCommand::Run { config, .. } => run(config),
        }
    }

    fn manager(access: ServiceManagerAccess) -> anyhow::Result<ServiceManager> {
        ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT | access)
            .context("opening the service control manager (this needs an elevated prompt)")
    }

    fn install(config: Option<&Path>, no_firewall: bool) -> anyhow::Result<bool> {
        let exe = std::env::current_exe().context("finding somcast.exe")?;
        let data = data_dir();
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let config = config.map_or_else(|| data.join("agent.toml"), Path::to_path_buf);
        if !config.exists() {
            std::fs::write(&config, starting_config(&data))
                .with_context(|| format!("writing {}", config.display()))?;
            println!("wrote {}: add trusted_keys to it", config.display());
        }
        let info = ServiceInfo {
            name: SERVICE_NAME.into(),
            display_name: "somcast agent".into(),
            service_type: ServiceType::OWN_PROCESS,
            start_type: ServiceStartType::AutoStart,
            error_control: ServiceErrorControl::Normal,
            executable_path: exe.clone(),
            launch_arguments: vec![
                "service".into(),
                "run".into(),
                "--config".into(),
                config.clone().into(),
                "--log".into(),
                log_path(&data).into(),
            ],
            dependencies: vec![],
            account_name: None,
            account_password: None,
        };
        let service = manager(ServiceManagerAccess::CREATE_SERVICE)?
            .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
            .context("creating the service (is it installed already? somcast service uninstall)")?;
        let _ = service
            .set_description("Self-organizing subnet multicast distribution of software packages");
        let restart = ServiceAction {
            action_type: ServiceActionType::Restart,
            delay: Duration::from_secs(10),
        };
        if let Err(e) = service.update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart.clone(), restart.clone(), restart]),
        }) {
            eprintln!("warning: restart on failure not set: {e}");
        }
        println!(
            "installed service {SERVICE_NAME}: {} service run --config {}",
            exe.display(),
            config.display()
        );
        println!("log: {}", log_path(&data).display());
        if !no_firewall {
            let _ = netsh(&firewall_delete_args());
            match netsh(&firewall_add_args(&exe)) {
                Ok(()) => println!("firewall: inbound rule \"{FIREWALL_RULE}\" added"),
                Err(e) => eprintln!(
                    "warning: the firewall rule was not added ({e}); add it by hand: netsh {}",
                    firewall_add_args(&exe).join(" ")
                ),
            }
        }
        println!("start it: somcast service start");
        Ok(true)
    }

    fn netsh(args: &[String]) -> anyhow::Result<()> {
        let out = std::process::Command::new("netsh")
            .args(args)
            .output()
            .context("running netsh")?;
        if !out.status.success() {
            bail!(
                "netsh exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }

    fn uninstall() -> anyhow::Result<bool> {
        let service = manager(ServiceManagerAccess::empty())?
            .open_service(
                SERVICE_NAME,
                ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
            )
            .context("opening the service (is it installed?)")?;
        if service.query_status()?.current_state != ServiceState::Stopped {
            let _ = service.stop();
            wait_for(&service, ServiceState::Stopped)?;
        }
        service.delete().context("removing the service")?;
        if netsh(&firewall_delete_args()).is_ok() {
            println!("firewall: rule \"{FIREWALL_RULE}\" removed");
        }
        println!(
            "removed service {SERVICE_NAME}; config, cache and logs stay in {}",
            data_dir().display()
        );
        Ok(true)
    }

    fn start() -> anyhow::Result<bool> {
        let service = manager(ServiceManagerAccess::empty())?
            .open_service(
                SERVICE_NAME,
                ServiceAccess::QUERY_STATUS | ServiceAccess::START,
            )
            .context("opening the service (is it installed? somcast service install)")?;
        service
            .start(&[] as &[&OsStr])
            .context("starting the service")?;
        wait_for(&service, ServiceState::Running)?;
        println!("service {SERVICE_NAME} running");
        Ok(true)
    }

    fn stop() -> anyhow::Result<bool> {
        let service = manager(ServiceManagerAccess::empty())?
            .open_service(
                SERVICE_NAME,
                ServiceAccess::QUERY_STATUS | ServiceAccess::STOP,
            )
            .context("opening the service (is it installed?)")?;
        if service.query_status()?.current_state != ServiceState::Stopped {
            service.stop().context("stopping the service")?;
            wait_for(&service, ServiceState::Stopped)?;
        }
        println!("service {SERVICE_NAME} stopped");
        Ok(true)
    }

    /// Waits, at most `STATE_DEADLINE`, for the service to reach `want`; a
    /// service that stops on its way to running has failed.
    fn wait_for(
        service: &windows_service::service::Service,
        want: ServiceState,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + STATE_DEADLINE;
        loop {
            let status = service.query_status()?;
            if status.current_state == want {
                return Ok(());
            }
            if status.current_state == ServiceState::Stopped {
                bail!(
                    "the service stopped (exit code {:?}); its log: {}",
                    status.exit_code,
                    log_path(&data_dir()).display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the service is still {:?} after {STATE_DEADLINE:?}",
                    status.current_state
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The config file `service run` was started with, for the dispatcher's
    /// callback (which takes no arguments of ours).
    static CONFIG: OnceLock<PathBuf> = OnceLock::new();

    windows_service::define_windows_service!(ffi_service_main, service_main);

    /// Hands this thread to the service control manager, which calls
    /// `service_main` on another; returns when the service has stopped.
    fn run(config: &Path) -> anyhow::Result<bool> {
        let _ = CONFIG.set(config.to_owned());
        windows_service::service_dispatcher::start(SERVICE_NAME, ffi_service_main).context(
            "connecting to the service control manager: `service run` is started by it, \
             not by hand (use `somcast agent` in a console)",
        )?;
        Ok(true)
    }

    fn service_main(_args: Vec<OsString>) {
        if let Err(e) = serve() {
            tracing::error!("service: {}", crate::error_text(e.as_ref()));
        }
    }

    /// The agent's configuration: the service's config file, read as
    /// `somcast agent --config FILE` reads it.
    fn service_config() -> anyhow::Result<crate::agent::AgentConfig> {
        let path = CONFIG.get().context("no config file")?;
        let cli = Cli::try_parse_from([
            OsStr::new("somcast"),
            OsStr::new("agent"),
            OsStr::new("--config"),
            path.as_os_str(),
        ])?;
        let Command::Agent(args) = &cli.command else {
            bail!("not an agent command");
        };
        crate::agent::AgentConfig::load(args)
    }

    /// Starts the agent; at boot the network may not be up yet, so it
    /// tries again until it starts, or (`None`) until told to stop.
    async fn start_until_stopped(
        config: &crate::agent::AgentConfig,
        stop_rx: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<crate::agent::Running> {
        loop {
            match crate::agent::start(config.clone()).await {
                Ok(r) => return Some(r),
                Err(e) => tracing::warn!(
                    "the agent did not start ({}); trying again in {START_RETRY:?}",
                    crate::error_text(e.as_ref())
                ),
            }
            tokio::select! {
                _ = stop_rx.wait_for(|stop| *stop) => return None,
                _ = tokio::time::sleep(START_RETRY) => {}
            }
        }
    }

    /// Runs the agent until the service control manager says stop (or
    /// shutdown), then stops it the way SIGTERM does on Linux.
    fn serve() -> anyhow::Result<()> {
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let handler = move |control| match control {
            ServiceControl::Stop | ServiceControl::Shutdown => {
                let _ = stop_tx.send(true);
                ServiceControlHandlerResult::NoError
            }
            ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
            _ => ServiceControlHandlerResult::NotImplemented,
        };
        let handle = service_control_handler::register(SERVICE_NAME, handler)?;
        let status = |state, accept, code| ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: ServiceExitCode::Win32(code),
            checkpoint: 0,
            wait_hint: Duration::from_secs(15),
            process_id: None,
        };
        handle.set_service_status(status(
            ServiceState::StartPending,
            ServiceControlAccept::empty(),
            0,
        ))?;
        let result = (|| {
            let config = service_config()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("somcast-agent")
                .build()
                .context("starting the async runtime")?;
            handle.set_service_status(status(
                ServiceState::Running,
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
                0,
            ))?;
            runtime.block_on(async {
                let Some(running) = start_until_stopped(&config, &mut stop_rx).await else {
                    return Ok(());
                };
                tracing::info!("service {SERVICE_NAME} running");
                let _ = stop_rx.wait_for(|stop| *stop).await;
                handle.set_service_status(status(
                    ServiceState::StopPending,
                    ServiceControlAccept::empty(),
                    0,
                ))?;
                running.stop().await
            })
        })();
        if let Err(e) = &result {
            tracing::error!("service: {}", crate::error_text(e.as_ref()));
        }
        // ERROR_SERVICE_SPECIFIC_ERROR-free: a plain Win32 code, 1 = failed.
        let code = u32::from(result.is_err());
        handle.set_service_status(status(
            ServiceState::Stopped,
            ServiceControlAccept::empty(),
            code,
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_config_is_a_valid_agent_config() {
        use crate::agent::config::{load_text, uncomment_keys};
        let dir = tempfile::tempdir().unwrap();
        load_text(
            &starting_config(Path::new("C:\\ProgramData\\somcast")),
            dir.path(),
        )
        .unwrap();
        // The commented keys are ones the agent knows: uncommented, they load.
        let live = uncomment_keys(&starting_config(dir.path()));
        assert!(live.contains("cache_max"), "{live}");
        let config = load_text(&live.replace("\"Ethernet\"", "\"127.0.0.1\""), dir.path()).unwrap();
        assert_eq!(config.cache, dir.path());
        assert_eq!(config.api.port(), 7480);
        assert_eq!(config.tags, ["kiosk", "floor-2"]);
        assert!(config.channel.is_some());
    }

    #[test]
    fn firewall_rule_names_the_program_and_is_removed_by_name() {
        let add = firewall_add_args(Path::new("C:\\Program Files\\somcast\\somcast.exe"));
        assert!(add.contains(&"program=C:\\Program Files\\somcast\\somcast.exe".to_string()));
        assert!(add.contains(&"dir=in".to_string()));
        let del = firewall_delete_args();
        assert_eq!(del.last(), add.iter().find(|a| a.starts_with("name=")));
        assert_eq!(del[2], "delete");
    }

    #[test]
    fn log_is_appended_and_moved_aside_when_large() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        open_log(&path).unwrap().write_all(b"one\n").unwrap();
        open_log(&path).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        let big = vec![b'x'; LOG_ROTATE_BYTES as usize + 1];
        std::fs::write(&path, &big).unwrap();
        open_log(&path).unwrap().write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let old = dir.path().join("logs").join("agent.log.old");
        assert_eq!(std::fs::metadata(old).unwrap().len(), big.len() as u64);
    }
}
