use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use somcast::cli::{Cli, Command, ServiceCommand};
use somcast::service;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent is a daemon: its events are its output.
    let quiet = if matches!(
        cli.command,
        Command::Agent(_) | Command::Service(ServiceCommand::Run { .. })
    ) {
        "info"
    } else {
        "warn"
    };
    let default = match cli.verbose {
        0 => quiet,
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("SOMCAST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // The Windows service has no console: its log is a file.
    if let Command::Service(ServiceCommand::Run { log, .. }) = &cli.command {
        match service::open_log(log) {
            Ok(file) => tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init(),
            Err(e) => {
                eprintln!("error: opening the log {}: {e}", log.display());
                return ExitCode::from(1);
            }
        }
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
    let result = match &cli.command {
        Command::Send(a) => somcast::lab::send(a),
        Command::Recv(a) => somcast::lab::recv(a),
        Command::Demo(a) => somcast::demo::run(a),
        Command::Scan(a) => somcast::scan::run(a),
        Command::Agent(a) => somcast::agent::main(a),
        Command::Key(k) => somcast::console::key(k),
        Command::Manifest(m) => somcast::console::manifest(m),
        Command::Task(t) => somcast::console::task(t),
        Command::Serve(s) => somcast::serve::main(&s.dir, s.listen, s.rate, s.reports.as_deref()),
        Command::Service(s) => service::main(s),
        Command::Topology(t) => somcast::console::topology(t),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", somcast::error_text(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
