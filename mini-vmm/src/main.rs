//! `mini-vmm`: run the KVM guest, or live-migrate it between two processes.
//!
//! ```text
//! mini-vmm run                         # the guest alone: prints its result
//! mini-vmm dest --listen 127.0.0.1:0   # prints "listening on ADDR", receives, runs the guest on
//! mini-vmm source --connect ADDR       # runs the guest and migrates it while it runs
//! ```
//! Both ends print `result: 0x...` when the guest finishes, and `digest: ...`
//! of the guest memory at the switch-over (the paused source; the
//! destination before its vCPU runs). Exit status: 0 done, 1 migration
//! failed (the source guest ran on to its result), 2 setup.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use migrate_core::protocol::RefusalCode;
use migrate_core::{IncomingMigration, SourceConfig, SourceMigration};
use mini_vmm::machine::{GUEST_TIMEOUT, KvmDestination, KvmSource, Machine};
use mini_vmm::program::TableProgram;
use mini_vmm::vcpu::VcpuRunner;
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};

#[derive(Parser)]
#[command(version, about = "A minimal KVM VMM whose running guest live-migrates")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the guest to its result, without migrating.
    Run(GuestArgs),
    /// Run the guest and migrate it to a `dest` while it runs.
    Source(SourceArgs),
    /// Receive a guest and run it on.
    Dest(DestArgs),
}

#[derive(Args, Clone)]
struct GuestArgs {
    /// Table size in MiB (the guest's working set).
    #[arg(long, default_value_t = 16)]
    table_mib: u32,
    /// Passes over the table.
    #[arg(long, default_value_t = 20)]
    passes: u32,
    /// Table pages the guest may write per second (0: as fast as it can).
    #[arg(long, default_value_t = 0)]
    pages_per_sec: u64,
}

#[derive(Args)]
struct SourceArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The destination's address.
    #[arg(long)]
    connect: String,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 300)]
    start_after_ms: u64,
    /// Downtime budget.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Bandwidth cap in MB/s (0: none).
    #[arg(long, default_value_t = 0)]
    bandwidth_mbs: u64,
    /// Compare every page's hash on both sides before commit.
    #[arg(long)]
    verify: bool,
    /// Write the migration statistics here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DestArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// Table pages the guest may write per second once it runs here.
    #[arg(long, default_value_t = 0)]
    pages_per_sec: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match run(Cli::parse()) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("mini-vmm: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<bool> {
    match cli.cmd {
        Cmd::Run(g) => {
            let program = TableProgram::new(g.table_mib, g.passes);
            let mut m = Machine::new(program.table_bytes())?;
            let boot = m.load_table_program(&program)?;
            let vcpu = m.start(&boot, g.pages_per_sec)?;
            finish(&vcpu)
        }
        Cmd::Source(a) => source(a),
        Cmd::Dest(a) => dest(a),
    }
}

/// Wait for the guest's answer and print it.
fn finish(vcpu: &VcpuRunner) -> Result<bool> {
    let d = vcpu
        .wait_halted(GUEST_TIMEOUT)?
        .context("the guest did not finish in time")?;
    let result = d.result.context("the guest halted without a result")?;
    println!("result: {result:#010x} after {} passes", d.passes);
    Ok(true)
}

fn source(a: SourceArgs) -> Result<bool> {
    let program = TableProgram::new(a.guest.table_mib, a.guest.passes);
    let mut m = Machine::new(program.table_bytes())?;
    let boot = m.load_table_program(&program)?;
    let tracking = m.dirty_tracking()?;
    let vcpu = m.start(&boot, a.guest.pages_per_sec)?;
    std::thread::sleep(Duration::from_millis(a.start_after_ms));
    let before = vcpu.device();
    eprintln!(
        "guest running: {} passes, {} pages written; migrating to {}",
        before.passes, before.pages, a.connect
    );
    let cfg = SourceConfig {
        downtime_limit: Duration::from_millis(a.downtime_ms.max(1)),
        bandwidth_limit: (a.bandwidth_mbs > 0).then_some(a.bandwidth_mbs * 1_000_000),
        verify: a.verify,
        ..SourceConfig::default()
    };
    let result = TcpSource::connect(&a.connect, TcpConfig::default())
        .map_err(migrate_core::MigrationError::from)
        .and_then(|mut t| {
            SourceMigration::new(cfg).run(&mut t, m.memory(), &tracking, &mut KvmSource::new(&vcpu))
        });
    match result {
        Ok(stats) => {
            println!("digest: {:032x}", m.digest());
            println!(
                "migrated: {} rounds, {:.1} ms downtime, {:.1} ms total, {} B",
                stats.rounds, stats.downtime_ms, stats.total_ms, stats.bytes_transferred
            );
            if let Some(p) = &a.json {
                let v = serde_json::json!({
                    "status": "completed", "rounds": stats.rounds, "downtime_ms": stats.downtime_ms,
                    "total_ms": stats.total_ms, "bytes_transferred": stats.bytes_transferred,
                    "throttle_percent": stats.throttle_percent, "verified": stats.verified,
                });
                std::fs::write(p, v.to_string()).context("writing the JSON report")?;
            }
            Ok(true)
        }
        Err(e) => {
            eprintln!("migration failed: {e}; the guest runs on here");
            finish(&vcpu)?;
            Ok(false)
        }
    }
}

fn dest(a: DestArgs) -> Result<bool> {
    let listener = TcpMigrationListener::bind(&a.listen, TcpConfig::default())?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush().ok();
    let mut t = listener.accept()?;
    let incoming = IncomingMigration::accept(&mut t)?;
    let mut m = match Machine::for_layout(incoming.layout()) {
        Ok(m) => m,
        Err(e) => {
            // Tell the source why, so it resumes its guest with a clear error.
            let msg = format!("destination cannot build the VM: {e}");
            incoming.refuse(&mut t, RefusalCode::Setup, &msg);
            bail!(msg);
        }
    };
    let mem = m.memory().clone();
    let mut vm = KvmDestination::new(&mut m, a.pages_per_sec);
    let report = incoming.receive(&mut t, &mem, &mut vm);
    if let Err(e) = report {
        bail!("incoming migration failed: {e}; nothing was started");
    }
    if let Some(d) = vm.digest_at_resume {
        println!("digest: {d:032x}");
    }
    let vcpu = vm.running.take().context("the guest was not started")?;
    finish(&vcpu)
}
