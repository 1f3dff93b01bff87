//! `migrate-cli`: live-migrate a guest's memory between two hosts, with the
//! same engine a VMM embeds. `dest` listens, `source` connects and migrates
//! its built-in guest (or an idle memory image), `demo` does both over
//! loopback.

#![deny(unsafe_code)]

mod args;
mod check;
mod control;
mod guest;
mod memory;
mod report;
#[allow(unsafe_code)]
mod resources;
mod run;
mod security;
#[allow(unsafe_code)]
mod sys;
mod transport;

use anyhow::Result;
use clap::Parser;

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
        .init();
    let result: Result<run::Outcome> = match cli.command {
        args::Command::Source(a) => run::source(a, baseline_rss),
        args::Command::Dest(a) => run::dest(a, baseline_rss),
        args::Command::Demo(a) => run::demo(a),
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
            use clap::CommandFactory;
            let mut cmd = args::Cli::command();
            clap_complete::generate(shell, &mut cmd, "migrate-cli", &mut std::io::stdout());
            Ok(run::Outcome::Done)
        }
        args::Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(args::Cli::command())
                .render(&mut std::io::stdout())
                .map(|()| run::Outcome::Done)
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(outcome) => std::process::exit(outcome.code()),
        Err(e) => {
            eprintln!("migrate-cli: error: {}", report::error_text(&e));
            std::process::exit(2);
        }
    }
}
