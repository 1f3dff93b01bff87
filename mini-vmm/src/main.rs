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
//! ```
//! The table program: both ends print `result: 0x...` when the guest
//! finishes. A boot sector runs until stopped: `run` and `dest` let it run
//! `--run-for-s` seconds, the source stops once it migrated it. With
//! `--digest`, both ends print `digest: ...` of the guest memory at the
//! switch-over (the paused source; the destination before its vCPU runs).
//! Exit status: 0 done, 1
//! migration failed (the source guest ran on), 2 setup, 3 commit sent but
//! not acknowledged (the source guest stays paused: the destination may run
//! it), as `migrate-cli`'s.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use migrate_core::protocol::RefusalCode;
use migrate_core::{
    DestinationTransport, IncomingMigration, MigrationError, PostcopyMode, SourceConfig,
    SourceMigration, SourceTransport, report,
};
use mini_vmm::boot;
use mini_vmm::machine::{GUEST_TIMEOUT, KvmDestination, KvmSource, Machine};
use mini_vmm::program::TableProgram;
use mini_vmm::state::VmState;
use mini_vmm::vcpu::{SerialSink, VcpuRunner};
use transport_rdma::{RdmaConfig, RdmaMigrationListener, RdmaSource};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource, TlsConfig, is_loopback};

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
            eprintln!(
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
            eprintln!(
                "mini-vmm: {e} ({} bytes on its serial port)",
                d.pc.serial_bytes
            );
            Ok(false)
        }
    }
}

/// How the two mini-vmms reach each other.
#[derive(Args, Clone)]
struct NetArgs {
    /// `auto` (RDMA when both ends have a device, else TCP, with the
    /// reason), `rdma` (RDMA or fail) or `tcp`.
    #[arg(long, default_value = "auto")]
    transport: String,
    /// Data streams (TCP connections, or RDMA queue pairs).
    #[arg(long, default_value_t = 2)]
    streams: u16,
    /// Offer zstd compression of page batches over TCP (used when both
    /// ends offer it).
    #[arg(long)]
    compress: bool,
    /// Send every data page whole over TCP, also those with a few non-zero
    /// words (to compare; by default they travel as those words).
    #[arg(long)]
    no_sparse: bool,
    /// Authenticate both ends with this pre-shared key (TLS 1.3 PSK, as
    /// `migrate-cli --psk-file`).
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Send a guest's memory in the clear to or from a non-loopback address
    /// (isolated test networks only).
    #[arg(long)]
    insecure: bool,
}

impl NetArgs {
    /// The TLS settings, checked against `addr` before anything else
    /// happens: plaintext only on loopback or with `--insecure`.
    fn tls(&self, addr: &str, source: bool) -> Result<Option<TlsConfig>> {
        if let Some(path) = &self.psk_file {
            let key = TlsConfig::read_psk(path).context("--psk-file")?;
            let tls = if source {
                TlsConfig::source_psk(key)
            } else {
                TlsConfig::destination_psk(key)
            };
            return Ok(Some(tls.context("--psk-file")?));
        }
        if !self.insecure && !is_loopback(addr) {
            bail!(
                "refusing to move a guest's memory over {addr} without authentication: give \
                 --psk-file FILE, or --insecure on an isolated test network"
            );
        }
        Ok(None)
    }

    /// The RDMA settings (TCP within them), or `None` for `--transport tcp`.
    fn rdma(&self, tls: Option<TlsConfig>) -> Result<(TcpConfig, Option<RdmaConfig>)> {
        let tcp = TcpConfig {
            tls,
            data_streams: self.streams.max(1),
            compress: self.compress,
            sparse: !self.no_sparse,
            any_local_user: self.insecure,
            ..TcpConfig::default()
        };
        let require = match self.transport.as_str() {
            "tcp" => return Ok((tcp, None)),
            "auto" => false,
            "rdma" => true,
            other => bail!("--transport {other}: use tcp, rdma or auto"),
        };
        let rdma = RdmaConfig {
            tcp: tcp.clone(),
            queue_pairs: self.streams.max(1),
            require,
            ..RdmaConfig::default()
        };
        Ok((tcp, Some(rdma)))
    }
}

#[derive(Args)]
struct SourceArgs {
    #[command(flatten)]
    net: NetArgs,
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
    /// Write the migration's report here as JSON (the fields of
    /// `migrate-cli source --json`, plus `digest` with `--digest`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print (and report) `digest:` of the paused guest's memory after the
    /// migration.
    #[arg(long)]
    digest: bool,
    /// When pre-copy does not converge, resume the guest on the
    /// destination at once and let it fetch its missing pages (post-copy;
    /// the destination's `--digest` is then not taken: its memory is
    /// incomplete at the commit).
    #[arg(long)]
    postcopy: bool,
    /// Post-copy after this many rounds at the latest (implies
    /// `--postcopy`).
    #[arg(long, value_name = "N")]
    postcopy_after_rounds: Option<u32>,
}

#[derive(Args)]
struct DestArgs {
    #[command(flatten)]
    net: NetArgs,
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
        .init();
    let code = match run(Cli::parse()) {
        Ok(Exit::Done) => 0,
        Ok(Exit::Failed) => 1,
        Ok(Exit::CommitUnknown) => 3,
        Ok(Exit::PostcopyInterrupted) => 4,
        Err(e) => {
            eprintln!("mini-vmm: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

/// How a command ended (besides set-up errors, 2).
enum Exit {
    /// 0.
    Done,
    /// 1: the migration failed; the source guest ran on.
    Failed,
    /// 3: commit sent, never acknowledged; the source guest stays paused.
    CommitUnknown,
    /// 4: the link broke during post-copy: the destination runs the guest
    /// without all of its pages; the source's stays paused.
    PostcopyInterrupted,
}

impl From<bool> for Exit {
    fn from(ok: bool) -> Self {
        if ok { Exit::Done } else { Exit::Failed }
    }
}

fn run(cli: Cli) -> Result<Exit> {
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
        Cmd::Dest(a) => dest(a)?,
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
    Ok(Exit::from(ok))
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

/// Wait for the guest's answer and print it.
fn finish(vcpu: &VcpuRunner) -> Result<bool> {
    let d = vcpu
        .wait_halted(GUEST_TIMEOUT)?
        .context("the guest did not finish in time")?;
    let result = d.result.context("the guest halted without a result")?;
    println!("result: {result:#010x} after {} passes", d.passes);
    Ok(true)
}

fn source(a: SourceArgs) -> Result<Exit> {
    let tls = a.net.tls(&a.connect, true)?;
    let (tcp, rdma) = a.net.rdma(tls)?;
    let (mut m, boot) = boot_guest(&a.guest)?;
    let before_connect = cpu_ms();
    // RDMA registers the guest memory here, before dirty tracking starts.
    let connected: Result<(Box<dyn SourceTransport>, Option<String>), MigrationError> = match rdma {
        None => TcpSource::connect(&a.connect, tcp)
            .map(|t| (Box::new(t) as Box<dyn SourceTransport>, None))
            .map_err(MigrationError::from),
        Some(cfg) => RdmaSource::connect(
            &a.connect,
            m.memory(),
            RdmaConfig {
                postcopy_reads: a.postcopy || a.postcopy_after_rounds.is_some(),
                ..cfg
            },
        )
        .map(|t| {
            let why = t.fallback_reason().map(String::from);
            (Box::new(t) as Box<dyn SourceTransport>, why)
        })
        .map_err(MigrationError::from),
    };
    // The migration's CPU: connecting, then everything from its start on
    // (not the guest's run before it).
    let connecting = cpu_ms() - before_connect;
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
        postcopy: if a.postcopy || a.postcopy_after_rounds.is_some() {
            PostcopyMode::Auto
        } else {
            PostcopyMode::Never
        },
        postcopy_after_rounds: a.postcopy_after_rounds,
        ..SourceConfig::default()
    };
    let migration = SourceMigration::new(cfg);
    let cpu_at_start = cpu_ms();
    let handle = migration.handle();
    // The operator learns when the guest runs at the destination in
    // post-copy (the commit acknowledged; its missing pages go from here).
    let events = handle.subscribe();
    std::thread::spawn(move || {
        for e in events {
            if matches!(e, migrate_core::MigrationEvent::Postcopy(_)) {
                eprintln!(
                    "post-copy: the guest runs at the destination; its missing pages go from here"
                );
            }
        }
    });
    let mut fallback = None;
    let result = connected.and_then(|(mut t, why)| {
        fallback = why;
        migration.run(
            t.as_mut(),
            m.memory(),
            &tracking,
            &mut KvmSource::new(&vcpu),
        )
    });
    let stats = handle.stats();
    let cpu = connecting + cpu_ms() - cpu_at_start;
    let json = |error: Option<&str>| -> Result<()> {
        if let Some(p) = &a.json {
            let mut v = report::source_json(&stats, fallback.as_deref(), error);
            v["resources"] = serde_json::json!({ "process_cpu_ms": cpu });
            if error.is_none() && a.digest {
                v["digest"] = serde_json::json!(format!("{:032x}", m.digest()));
            }
            std::fs::write(p, v.to_string() + "\n")
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    };
    match &result {
        Ok(stats) => {
            if a.digest {
                println!("digest: {:032x}", m.digest());
            }
            println!(
                "migrated: {} rounds, {:.1} ms downtime, {:.1} ms total, {} B, throttled to {} %",
                stats.rounds,
                stats.downtime_ms,
                stats.total_ms,
                stats.bytes_transferred,
                stats.throttle_percent
            );
            json(None)?;
            Ok(Exit::Done)
        }
        Err(e @ MigrationError::PostcopyInterrupted(_)) => {
            // The destination runs the guest; these pages are its only copy.
            eprintln!("migration failed: {e}");
            json(Some(&e.to_string()))?;
            Ok(Exit::PostcopyInterrupted)
        }
        Err(e @ MigrationError::CommitUnknown(_)) => {
            // Not resumed here: the destination may be running it.
            eprintln!("migration failed: {e}");
            json(Some(&e.to_string()))?;
            Ok(Exit::CommitUnknown)
        }
        Err(e) => {
            eprintln!("migration failed: {e}; the guest runs on here");
            json(Some(&e.to_string()))?;
            if a.guest.boot_sector.is_some() {
                run_for(&vcpu, a.guest.run_for_s, None)?;
            } else {
                finish(&vcpu)?;
            }
            Ok(Exit::Failed)
        }
    }
}

/// Accept one source over the chosen transport.
fn accept(a: &DestArgs) -> Result<Box<dyn DestinationTransport>> {
    let tls = a.net.tls(&a.listen, false)?;
    Ok(match a.net.rdma(tls)? {
        (tcp, None) => {
            let listener = TcpMigrationListener::bind(&a.listen, tcp)?;
            println!("listening on {}", listener.local_addr()?);
            std::io::stdout().flush().ok();
            Box::new(listener.accept()?)
        }
        (_, Some(cfg)) => {
            let listener = RdmaMigrationListener::bind(&a.listen, cfg)?;
            println!("listening on {}", listener.local_addr()?);
            std::io::stdout().flush().ok();
            // Dropped after the migration: the memory keys die with it.
            Box::new(listener.accept()?)
        }
    })
}

fn dest(a: DestArgs) -> Result<bool> {
    let mut t = accept(&a)?;
    let cpu_at_accept = cpu_ms();
    let incoming = IncomingMigration::accept(t.as_mut())?;
    let mut m = match Machine::for_layout_in(incoming.layout(), a.memory_file.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            // Tell the source why, so it resumes its guest with a clear error.
            let msg = format!("destination cannot build the VM: {e}");
            incoming.refuse(t.as_mut(), RefusalCode::Setup, &msg);
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
    let received = incoming.receive(t.as_mut(), &mem, &mut vm);
    let cpu = cpu_ms() - cpu_at_accept;
    drop(t);
    if let Some(p) = &a.json {
        let error = received.as_ref().err().map(ToString::to_string);
        let mut v = report::destination_json(received.as_ref().ok(), None, error.as_deref());
        v["resources"] = serde_json::json!({ "process_cpu_ms": cpu });
        if let Some(d) = vm.digest_at_resume {
            v["digest"] = serde_json::json!(format!("{d:032x}"));
        }
        std::fs::write(p, v.to_string() + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Err(e) = received {
        bail!("incoming migration failed: {e}; nothing was started");
    }
    if let Some(d) = vm.digest_at_resume {
        println!("digest: {d:032x}");
    }
    let vcpu = vm.running.take().context("the guest was not started")?;
    if vcpu.device().boot_sector {
        run_for(&vcpu, a.run_for_s, a.run_until_serial)
    } else {
        finish(&vcpu)
    }
}
