//! `migrate-cli`: live-migrate a guest's memory between two hosts, with the
//! same engine a VMM embeds. `dest` listens, `source` connects and migrates
//! its built-in guest (or an idle memory image), `demo` does both over
//! loopback.

#![forbid(unsafe_code)]

// `say!` and `out!`: `eprintln!` and `println!` that cannot panic (see
// `migrate_frontend`).
#[macro_use]
extern crate migrate_frontend;

mod args;
mod check;
mod control;
mod guest;
mod manual;
mod memory;
mod metrics;
mod protect;
mod report;
mod resources;
mod run;
mod sys;

use anyhow::Result;
use clap::Parser;
use std::io::IsTerminal;

fn main() {
    // Before the guest exists: what the process holds without it.
    let baseline_rss = resources::status_bytes("VmRSS");
    let cli = args::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log.as_str())),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file, a pipe to
        // an orchestrator or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        // Its own complaint about a closed stderr is an `eprintln!`, which
        // would panic the logging thread (see `say!`).
        .log_internal_errors(false)
        .init();
    let result: Result<run::Outcome> = match cli.command {
        args::Command::Source(a) => run::source(a, baseline_rss),
        args::Command::Dest(a) => run::dest(a, baseline_rss),
        args::Command::Demo(a) => run::demo(a),
        args::Command::Protect(a) => protect::protect(a, baseline_rss),
        args::Command::Standby(a) => protect::standby(a),
        args::Command::Witness(a) => protect::witness(a),
        args::Command::TlsGen(a) => run::tls_gen(a),
        args::Command::Ctl(a) => control::ctl(&a.socket, &a.command, &a.params).map(|ok| {
            if ok {
                run::Outcome::Done
            } else {
                run::Outcome::Refused
            }
        }),
        args::Command::Check(a) => check::check(&a).map(|ok| {
            if ok {
                run::Outcome::Done
            } else {
                run::Outcome::Refused
            }
        }),
        args::Command::Completions { shell } => {
            use std::io::Write;
            let script = completions(shell);
            std::io::stdout()
                .write_all(script.as_bytes())
                .map(|()| run::Outcome::Done)
                .map_err(anyhow::Error::from)
        }
        args::Command::Man { dir } => manual::man(dir.as_deref()).map(|()| run::Outcome::Done),
    };
    match result {
        Ok(outcome) => std::process::exit(outcome.code()),
        Err(e) => {
            say!("migrate-cli: error: {}", report::error_text(&e));
            std::process::exit(migrate_frontend::outcome::SETUP_ERROR);
        }
    }
}

/// The completion script for `shell`. clap_complete's bash script names
/// the subcommands' cases after the binary's name with its hyphen mangled
/// like a subcommand separator (`migrate__subcmd__cli__subcmd__source`)
/// while its dispatch sets `migrate__cli__subcmd__source`: no option of a
/// subcommand ever completed. The cases are renamed to what the dispatch
/// sets.
fn completions(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut cmd = args::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "migrate-cli", &mut out);
    let script = String::from_utf8_lossy(&out).into_owned();
    match shell {
        clap_complete::Shell::Bash => script.replace("migrate__subcmd__cli__", "migrate__cli__"),
        _ => script,
    }
}
