//! `mini-vmm`: run the KVM guest, or live-migrate it between two processes.
//!
//! ```text
//! mini-vmm run                         # the guest alone: prints its result
//! mini-vmm dest --listen 127.0.0.1:0   # prints "listening on ADDR", receives, runs the guest on
//! mini-vmm source --connect ADDR       # runs the guest and migrates it while it runs
//! mini-vmm run --boot-sector FILE --memory 150M --serial out.txt --run-for-s 5
//! mini-vmm source --boot-sector FILE --memory 150M --connect ADDR
//! mini-vmm guest sweeper --out sweeper.img   # write one of our boot-sector guests
//! ```
//! The table program: both ends print `result: 0x...` when the guest
//! finishes. A boot sector runs until stopped: `run` and `dest` let it run
//! `--run-for-s` seconds, the source stops once it migrated it. Both ends
//! print `digest: ...` of the guest memory at the switch-over (the paused
//! source; the destination before its vCPU runs). Exit status: 0 done, 1
//! migration failed (the source guest ran on), 2 setup.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use migrate_core::protocol::RefusalCode;
use migrate_core::{IncomingMigration, SourceConfig, SourceMigration};
use mini_vmm::boot;
use mini_vmm::machine::{GUEST_TIMEOUT, KvmDestination, KvmSource, Machine};
use mini_vmm::program::TableProgram;
use mini_vmm::state::VmState;
use mini_vmm::vcpu::{SerialSink, VcpuRunner};
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
    /// Write one of our boot-sector guests to a file.
    Guest(GuestImageArgs),
}

#[derive(Args)]
struct GuestImageArgs {
    /// `sweeper` (adds one to a byte of every page, sweep after sweep;
    /// prints `B`) or `ledger` (a table whose words step by a constant,
    /// rewritten and checked each pass; prints `G`, or `E` and stops).
    kind: String,
    /// The file to write (512 bytes).
    #[arg(long)]
    out: PathBuf,
    /// First byte of the range the guest writes (above 1 MiB).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    start: u64,
    /// End of that range.
    #[arg(long, default_value = "100M", value_parser = parse_size)]
    end: u64,
    /// Print once every this many sweeps or passes.
    #[arg(long, default_value_t = 1)]
    every: u32,
}

/// `N`, `NK`, `NM` or `NG` bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 150M)"))
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
    /// Boot this PC boot sector (512 bytes, 0x55AA) instead of running the
    /// table program.
    #[arg(long)]
    boot_sector: Option<PathBuf>,
    /// The PC's memory, from address 0 (with `--boot-sector`).
    #[arg(long, default_value = "150M", value_parser = parse_size)]
    memory: u64,
    /// Where the guest's serial port (COM1) writes (default: stdout).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// How long `run` lets a boot sector run before it stops it.
    #[arg(long, default_value_t = 5)]
    run_for_s: u64,
}

/// The serial sink `path` names (stdout without one).
fn serial_sink(path: Option<&Path>) -> Result<SerialSink> {
    Ok(match path {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout()),
    })
}

/// The machine and boot state `g` asks for.
fn boot_guest(g: &GuestArgs) -> Result<(Machine, VmState)> {
    if let Some(path) = &g.boot_sector {
        let image = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let sector = boot::check(&image).with_context(|| path.display().to_string())?;
        let mut m = Machine::pc(g.memory)?;
        let state = m.load_boot_sector(&sector)?;
        m.set_serial(serial_sink(g.serial.as_deref())?);
        return Ok((m, state));
    }
    let program = TableProgram::new(g.table_mib, g.passes);
    let m = Machine::new(program.table_bytes())?;
    let state = m.load_table_program(&program)?;
    Ok((m, state))
}

/// A boot sector runs until stopped: let it run `secs`, then say how it
/// fared. `Ok(false)` when its vCPU failed (e.g. a triple fault).
fn run_for(vcpu: &VcpuRunner, secs: u64) -> Result<bool> {
    let halted = vcpu.wait_halted(Duration::from_secs(secs));
    let d = vcpu.device();
    match halted {
        Ok(h) => {
            eprintln!(
                "guest {} after {secs} s: {} bytes on its serial port",
                if h.is_some() {
                    "halted"
                } else {
                    "still running"
                },
                d.pc.serial_bytes
            );
            Ok(true)
        }
        Err(e) => {
            eprintln!(
                "mini-vmm: {e} ({} bytes on its serial port)",
                d.pc.serial_bytes
            );
            Ok(false)
        }
    }
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
    /// Where a boot sector's serial port writes once it runs here
    /// (default: stdout).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// How long a boot sector runs here after the migration before
    /// mini-vmm stops it and exits.
    #[arg(long, default_value_t = 5)]
    run_for_s: u64,
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
            let (mut m, boot) = boot_guest(&g)?;
            let vcpu = m.start(&boot, g.pages_per_sec)?;
            if g.boot_sector.is_some() {
                run_for(&vcpu, g.run_for_s)
            } else {
                finish(&vcpu)
            }
        }
        Cmd::Source(a) => source(a),
        Cmd::Dest(a) => dest(a),
        Cmd::Guest(a) => {
            let (start, end) = (a.start as u32, a.end as u32);
            if a.start < 1 << 20 || a.end <= a.start || a.end > u64::from(u32::MAX) {
                bail!("the range must lie between 1 MiB and 4 GiB");
            }
            let sector = match a.kind.as_str() {
                "sweeper" => boot::sweeper(start & !0xfff, end, a.every)?,
                "ledger" => boot::ledger(start & !3, end & !3, boot::LEDGER_STEP, a.every)?,
                other => bail!("no guest named {other:?} (sweeper, ledger)"),
            };
            std::fs::write(&a.out, sector).with_context(|| a.out.display().to_string())?;
            Ok(true)
        }
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
    let (mut m, boot) = boot_guest(&a.guest)?;
    let tracking = m.dirty_tracking()?;
    let vcpu = m.start(&boot, a.guest.pages_per_sec)?;
    std::thread::sleep(Duration::from_millis(a.start_after_ms));
    let before = vcpu.device();
    eprintln!(
        "guest running: {} passes, {} pages written, {} serial bytes; migrating to {}",
        before.passes, before.pages, before.pc.serial_bytes, a.connect
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
            if a.guest.boot_sector.is_some() {
                run_for(&vcpu, a.guest.run_for_s)?;
            } else {
                finish(&vcpu)?;
            }
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
    m.set_serial(serial_sink(a.serial.as_deref())?);
    let mut vm = KvmDestination::new(&mut m, a.pages_per_sec);
    let report = incoming.receive(&mut t, &mem, &mut vm);
    if let Err(e) = report {
        bail!("incoming migration failed: {e}; nothing was started");
    }
    if let Some(d) = vm.digest_at_resume {
        println!("digest: {d:032x}");
    }
    let vcpu = vm.running.take().context("the guest was not started")?;
    if vcpu.device().boot_sector {
        run_for(&vcpu, a.run_for_s)
    } else {
        finish(&vcpu)
    }
}
