use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use somcast::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent is a daemon: its events are its output.
    let quiet = if matches!(cli.command, Command::Agent(_)) {
        "info"
    } else {
        "warn"
    };
    let default = match cli.verbose {
        0 => quiet,
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SOMCAST_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match &cli.command {
        Command::Send(a) => somcast::lab::send(a),
        Command::Recv(a) => somcast::lab::recv(a),
        Command::Demo(a) => somcast::demo::run(a),
        Command::Scan(a) => somcast::scan::run(a),
        Command::Agent(a) => somcast::agent::main(a),
        Command::Key(k) => somcast::console::key(k),
        Command::Manifest(m) => somcast::console::manifest(m),
        Command::Task(t) => somcast::console::task(t),
        Command::Serve(s) => somcast::serve::main(&s.dir, s.listen, s.rate),
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
