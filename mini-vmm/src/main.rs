//! `mini-vmm`: run the KVM guest, or live-migrate it between two processes.
//!
//! ```text
//! mini-vmm run                         # the guest alone: prints its result
//! mini-vmm dest --listen 127.0.0.1:0   # prints "listening on ADDR", receives, runs the guest on
//! mini-vmm source --connect ADDR       # runs the guest and migrates it while it runs
//! mini-vmm run --boot-sector FILE --memory 150M --serial out.txt --run-for-s 5
//! mini-vmm source --boot-sector FILE --memory 150M --connect ADDR --json src.json
//! mini-vmm dest --listen 127.0.0.1:0 --memory-file ram.img --json dst.json
//! mini-vmm guest sweeper --out sweeper.img   # write one of our boot-sector guests
//! mini-vmm standby --listen 127.0.0.1:0 --no-witness --serial out.txt
//! mini-vmm protect --boot-sector FILE --standby ADDR --no-witness --serial out.txt
//! ```
//! The table program: both ends print `result: 0x...` when the guest
//! finishes. A boot sector runs until stopped: `run` and `dest` let it run
//! `--run-for-s` seconds, the source stops once it migrated it. With
//! `--digest`, both ends print `digest: ...` of the guest memory at the
//! switch-over (the paused source; the destination before its vCPU runs).
//! The options shared with `migrate-cli` (transport, credentials, the
//! migration's knobs) and the exit statuses are `migrate_frontend`'s: 0
//! done, 1 migration failed (the source guest ran on), 2 setup, 3 commit
//! sent but not acknowledged (the source guest stays paused: the
//! destination may run it), 4 the link broke during post-copy, 5 a
//! protection degraded (the standby lost, the guest runs on here), 6
//! fenced (the other end of a protection holds the run right).

// `say!` and `out!`: `eprintln!` and `println!` that cannot panic (see
// `migrate_frontend`).
#[macro_use]
extern crate migrate_frontend;

use std::io::IsTerminal;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use migrate_core::protocol::RefusalCode;
use migrate_core::{IncomingMigration, SourceMigration, report};
use migrate_frontend::args::{MigrationArgs, TransportArgs};
use migrate_frontend::outcome::SETUP_ERROR;
use migrate_frontend::{Outcome, output, security, transport};
use mini_vmm::boot;
use mini_vmm::machine::{GUEST_TIMEOUT, KvmDestination, KvmSource, Machine};
use mini_vmm::program::TableProgram;
use mini_vmm::state::VmState;
use mini_vmm::vcpu::{SerialSink, VcpuRunner};

mod protect;

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
    /// Run a boot-sector guest protected: mirrored to a `standby` in
    /// epochs, its serial output released once the standby holds it.
    Protect(protect::ProtectArgs),
    /// Stand by for a protected guest; take it over when its primary is
    /// lost and the witness agrees.
    Standby(protect::StandbyArgs),
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

/// A boot sector runs until stopped: let it run `secs`, or only until it
/// has printed `until_serial` more bytes here when given (`secs` then only
/// bounds a guest that never prints), then say how it fared. `Ok(false)`
/// when its vCPU failed (e.g. a triple fault).
fn run_for(vcpu: &VcpuRunner, secs: u64, until_serial: Option<u64>) -> Result<bool> {
    let start = std::time::Instant::now();
    let limit = Duration::from_secs(secs);
    let printed = vcpu.device().pc.serial_bytes;
    let halted = loop {
        let left = limit.saturating_sub(start.elapsed());
        let step = if until_serial.is_some() {
            left.min(Duration::from_millis(50))
        } else {
            left
        };
        match vcpu.wait_halted(step) {
            Ok(None) if !left.is_zero() => {
                let more = vcpu.device().pc.serial_bytes.saturating_sub(printed);
                if until_serial.is_some_and(|n| more >= n) {
                    break Ok(None);
                }
            }
            other => break other,
        }
    };
    let d = vcpu.device();
    match halted {
        Ok(h) => {
            say!(
                "guest {} after {:.1} s: {} bytes on its serial port ({} here)",
                if h.is_some() {
                    "halted"
                } else {
                    "still running"
                },
                start.elapsed().as_secs_f64(),
                d.pc.serial_bytes,
                d.pc.serial_bytes.saturating_sub(printed)
            );
            Ok(true)
        }
        Err(e) => {
            say!(
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
    transport: TransportArgs,
    #[command(flatten)]
    migration: MigrationArgs,
    #[command(flatten)]
    guest: GuestArgs,
    /// The destination's address.
    #[arg(long)]
    connect: String,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 300)]
    start_after_ms: u64,
    /// Write the migration's report here as JSON (the fields of
    /// `migrate-cli source --json`, plus `digest` with `--digest`).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct DestArgs {
    #[command(flatten)]
    transport: TransportArgs,
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// Back the guest's memory with this file (created at the guest's
    /// size, or of exactly that size), so it can be read after mini-vmm
    /// exits.
    #[arg(long)]
    memory_file: Option<PathBuf>,
    /// Write the migration's report here as JSON (the fields of
    /// `migrate-cli dest --json`, plus `digest` with `--digest`).
    #[arg(long)]
    json: Option<PathBuf>,
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
    /// Stop as soon as the guest has printed this many bytes here
    /// (`--run-for-s` then bounds a guest that never does).
    #[arg(long)]
    run_until_serial: Option<u64>,
    /// Print (and report) `digest:` of the guest memory at the commit,
    /// before the vCPU runs: hashing all of it there lengthens the downtime.
    #[arg(long)]
    digest: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIGRATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file, a pipe to
        // an orchestrator or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        // Its own complaint about a closed stderr is an `eprintln!`, which
        // would panic (migrate-cli's `say!` says why that matters).
        .log_internal_errors(false)
        .init();
    let code = match run(Cli::parse()) {
        Ok(outcome) => outcome.code(),
        Err(e) => {
            say!("mini-vmm: {e:#}");
            SETUP_ERROR
        }
    };
    std::process::exit(code);
}

/// Done when `ok`, else failed.
fn done(ok: bool) -> Outcome {
    if ok { Outcome::Done } else { Outcome::Failed }
}

fn run(cli: Cli) -> Result<Outcome> {
    let ok = match cli.cmd {
        Cmd::Source(a) => return source(a),
        Cmd::Run(g) => {
            let (mut m, boot) = boot_guest(&g)?;
            let vcpu = m.start(&boot, g.pages_per_sec)?;
            if g.boot_sector.is_some() {
                run_for(&vcpu, g.run_for_s, None)?
            } else {
                finish(&vcpu)?
            }
        }
        Cmd::Dest(a) => return dest(a),
        Cmd::Protect(a) => return protect::protect(a),
        Cmd::Standby(a) => return protect::standby(a),
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
            true
        }
    };
    Ok(done(ok))
}

/// CPU time this process has used (user + system, all threads, the vCPU's
/// guest time included), ms at the kernel's 10 ms resolution; 0 when
/// `/proc` cannot say. Reported as `resources.process_cpu_ms`: unlike
/// migrate-cli's `cpu_ms`, it holds the running guest's time too.
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime, in USER_HZ (100 on every Linux that reports here).
    ticks(11)
        .zip(ticks(12))
        .map_or(0.0, |(u, s)| (u + s) * 10.0)
}

/// `resources` of mini-vmm's reports: the process's CPU, its running
/// guest's included.
fn process_cpu(ms: f64) -> report::Resources {
    let mut r = report::Resources::default();
    r.process_cpu_ms = Some(ms);
    r
}

/// Wait for the guest's answer and print it.
fn finish(vcpu: &VcpuRunner) -> Result<bool> {
    let d = vcpu
        .wait_halted(GUEST_TIMEOUT)?
        .context("the guest did not finish in time")?;
    let result = d.result.context("the guest halted without a result")?;
    out!("result: {result:#010x} after {} passes", d.passes);
    Ok(true)
}

fn source(a: SourceArgs) -> Result<Outcome> {
    let tls = security::tls(
        &a.transport,
        &security::Role::Source {
            connect: &a.connect,
            hostname: None,
        },
    )?;
    output::check_outputs(output::Outputs {
        json: a.json.as_deref(),
        ..Default::default()
    })?;
    let (mut m, boot) = boot_guest(&a.guest)?;
    let before_connect = cpu_ms();
    let mut t = transport::connect(
        &a.connect,
        &a.transport,
        a.migration.compress,
        tls,
        a.migration.postcopy(),
    )?;
    let migration = SourceMigration::new(a.migration.source_config(&a.transport));
    let handle = migration.handle();
    // The memory is bound to the transport (RDMA registers it) before
    // dirty tracking starts: the engine refuses the other order.
    let bound = migration.bind(t.as_dyn(), m.memory())?;
    // The migration's CPU: connecting and binding, then everything from
    // its start on (not the guest's run before it).
    let connecting = cpu_ms() - before_connect;
    let tracking = m.dirty_tracking()?;
    let vcpu = m.start(&boot, a.guest.pages_per_sec)?;
    std::thread::sleep(Duration::from_millis(a.start_after_ms));
    let before = vcpu.device();
    say!(
        "guest running: {} passes, {} pages written, {} serial bytes; migrating to {}",
        before.passes,
        before.pages,
        before.pc.serial_bytes,
        a.connect
    );
    let cpu_at_start = cpu_ms();
    say_postcopy(&handle);
    let result = bound.run(&tracking, &mut KvmSource::new(&vcpu));
    let fallback = t.fallback_reason();
    let cpu = connecting + cpu_ms() - cpu_at_start;
    if let Some(p) = &a.json {
        let error = result.as_ref().err().map(ToString::to_string);
        let v = report::source_json(&handle.stats(), fallback.as_deref(), error.as_deref());
        let mut extras = report::Extras::default();
        extras.authentication = Some(a.transport.authentication());
        extras.resources = Some(process_cpu(cpu));
        extras.digest =
            (result.is_ok() && a.migration.digest).then(|| format!("{:032x}", m.digest()));
        output::write_report("mini-vmm", p, &report::with_extras(v, &extras));
    }
    let outcome = Outcome::of_source(&result);
    match &result {
        Ok(stats) => {
            if a.migration.digest {
                out!("digest: {:032x}", m.digest());
            }
            out!(
                "migrated: {} rounds, {:.1} ms downtime, {:.1} ms total, {} B, throttled to {} %",
                stats.precopy.rounds,
                stats.downtime_ms,
                stats.total_ms,
                stats.bytes_transferred,
                stats.precopy.throttle_percent
            );
        }
        // Not resumed here: the destination runs the guest (post-copy:
        // these pages are its only copy) or may run it (commit unknown).
        Err(e) if outcome != Outcome::Failed => say!("migration failed: {e}"),
        Err(e) => {
            say!("migration failed: {e}; the guest runs on here");
            if a.guest.boot_sector.is_some() {
                run_for(&vcpu, a.guest.run_for_s, None)?;
            } else {
                finish(&vcpu)?;
            }
        }
    }
    Ok(outcome)
}

/// Tell the operator when the guest runs at the destination in post-copy
/// (the commit acknowledged; its missing pages go from here).
fn say_postcopy(handle: &migrate_core::MigrationHandle) {
    let events = handle.subscribe();
    std::thread::spawn(move || {
        for e in events {
            if matches!(e, migrate_core::MigrationEvent::Postcopy(_)) {
                say!(
                    "post-copy: the guest runs at the destination; its missing pages go from here"
                );
            }
        }
    });
}

/// Accept one source over the chosen transport.
fn accept(a: &DestArgs) -> Result<transport::Destination> {
    let tls = security::tls(
        &a.transport,
        &security::Role::Destination {
            listen: &a.listen,
            allow: &[],
        },
    )?;
    let listener = transport::Listener::bind(&a.listen, &a.transport, tls)?;
    out!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush().ok();
    // Dropped after the migration: RDMA's memory keys die with it.
    Ok(listener.accept()?)
}

fn dest(a: DestArgs) -> Result<Outcome> {
    output::check_outputs(output::Outputs {
        json: a.json.as_deref(),
        ..Default::default()
    })?;
    let mut t = accept(&a)?;
    let t = t.as_dyn();
    let cpu_at_accept = cpu_ms();
    let incoming = IncomingMigration::accept(t)?;
    let mut m = match Machine::for_layout_in(incoming.layout(), a.memory_file.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            // Tell the source why, so it resumes its guest with a clear error.
            let msg = format!("destination cannot build the VM: {e}");
            incoming.refuse(t, RefusalCode::Setup, &msg);
            bail!(msg);
        }
    };
    let incoming = incoming.memory_reads_zero(m.reads_zero());
    let mem = m.memory().clone();
    m.set_serial(serial_sink(a.serial.as_deref())?);
    let mut vm = KvmDestination::new(&mut m, a.pages_per_sec);
    vm.digest = a.digest;
    vm.on_postcopy_resume = Some(Box::new(|| {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "post-copy: the guest runs here; its missing pages follow from the source"
        );
        let _ = out.flush();
    }));
    let handle = incoming.handle();
    let received = incoming.receive(t, &mem, &mut vm);
    let cpu = cpu_ms() - cpu_at_accept;
    if let Some(p) = &a.json {
        let error = received.as_ref().err().map(ToString::to_string);
        // The engine's final figures and status, failed or not.
        let v = report::destination_json(Some(&handle.stats()), None, error.as_deref());
        let mut extras = report::Extras::default();
        extras.authentication = Some(a.transport.authentication());
        extras.resources = Some(process_cpu(cpu));
        extras.digest = vm.digest_at_resume.map(|d| format!("{d:032x}"));
        output::write_report("mini-vmm", p, &report::with_extras(v, &extras));
    }
    let outcome = Outcome::of_destination(&received, true);
    if let Err(e) = &received {
        if outcome == Outcome::PostcopyInterrupted {
            say!("{e}: the guest runs here without all of its pages; the source keeps them");
        } else {
            say!("incoming migration failed: {e}; nothing was started");
        }
        return Ok(outcome);
    }
    if let Some(d) = vm.digest_at_resume {
        out!("digest: {d:032x}");
    }
    let vcpu = vm.running.take().context("the guest was not started")?;
    let ran = if vcpu.device().boot_sector {
        run_for(&vcpu, a.run_for_s, a.run_until_serial)?
    } else {
        finish(&vcpu)?
    };
    Ok(if ran { outcome } else { Outcome::Failed })
}
