//! The `altroute` command: parses the command line and hands over to the library.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use altroute::policy_cmd::{self, PolicyCommand};
use altroute::serve::{self, ServeArgs};

/// altroute: an outbound mail relay whose routing decision is a sandboxed WebAssembly
/// policy module.
#[derive(Debug, Parser)]
#[command(name = "altroute", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compile, check, test and explain policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run the relay: `altroute serve -c altroute.toml`.
    Serve(ServeArgs),
    /// Self-contained showcase on loopback: routes sample mail and prints each decision.
    Demo,
    /// Check the policy audit log: `altroute audit verify FILE`.
    #[command(subcommand)]
    Audit(altroute::audit::AuditCommand),
    /// The running relay's queue: `altroute queue list | show ID | retry ID|--all | bounce ID`.
    Queue(altroute::queue_cmd::QueueArgs),
    /// Test the TLS connection to a mail host: `altroute host test NAME`.
    #[command(subcommand)]
    Host(altroute::host_test::HostCommand),
    /// TLS reports (RFC 8460): `altroute tlsrpt report --day YYYY-MM-DD -c altroute.toml`.
    #[command(subcommand)]
    Tlsrpt(altroute::tlsrpt::TlsRptCommand),
}

fn main() -> ExitCode {
    // Colours only for a person at a terminal: a log file, journald or a pipe gets plain
    // `key=value` fields that grep finds. NO_COLOR (https://no-color.org) turns them off.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The demo's DNS server (hickory_server) logs every query at info: only
                // its warnings, unless RUST_LOG asks for more.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn")),
        )
        .with_writer(altroute::output::LogLines)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Serve(args) => serve::command(args),
        Command::Demo => altroute::demo::run(),
        Command::Audit(cmd) => altroute::audit::run(cmd),
        Command::Queue(args) => altroute::queue_cmd::run(args),
        Command::Host(cmd) => altroute::host_test::run(cmd),
        Command::Tlsrpt(cmd) => altroute::tlsrpt::run(cmd),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // The reader of our output went away (`| head`): it has what it wanted.
        Err(e) if altroute::output::stdout_closed(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("altroute: {e:#}");
            ExitCode::from(2)
        }
    }
}
