//! `migrate-bench postcopy`: a guest that out-dirties the link, moved by
//! pre-copy (auto-converge throttles it) and by post-copy, side by side in
//! one run, over real sockets (and RDMA READ where a device is).
//!
//! The guest is the bank ledger (`fixtures::BankGuest`) with one account
//! per page, so every transfer dirties two random pages. On the
//! destination the same ledger goes on once the guest resumes there: in
//! post-copy its transfers fault on pages that have not arrived, and the
//! figures show what the guest got done before, during and after. The
//! bytes are checked by the ledger itself at the end (every account's
//! check word, the total, the transfer count at least the source's at the
//! pause): a page lost, stale or read as zeros breaks it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fixtures::{BankConfig, BankGuest, FixtureSourceVm, RunningGuest};
use migrate_core::memory::{GuestMemory, GuestRegion};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use migrate_core::vm::{DestinationVm, VmError};
use migrate_core::{
    DestinationReport, DirtyTracking, IncomingMigration, MigrationStats, PostcopyMode,
    SourceConfig, SourceMigration, TrackerPreference,
};
use serde::{Deserialize, Serialize};
use transport_rdma::{RdmaConfig, RdmaMigrationListener, RdmaSource};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};

/// Where the report finds the raw results of each machine.
const RAW: &str = "raw/peer/postcopy-";

/// `migrate-bench postcopy`.
#[derive(Debug, clap::Args)]
pub struct PostcopyArgs {
    /// `host` or `vm` (names the raw file and the report's rows).
    #[arg(long)]
    pub machine: String,
    /// The results folder (writes raw/peer/postcopy-MACHINE.json).
    #[arg(long, default_value = "benches/results")]
    pub results: PathBuf,
    /// Guest size, MiB (one account per 4 KiB page).
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// The link: a bandwidth cap, MB/s, well below the guest's dirty rate.
    #[arg(long, default_value_t = 100)]
    pub bandwidth_mbs: u64,
    /// The guest's pace: transfers per second (two pages each).
    #[arg(long, default_value_t = 100_000)]
    pub transfers_per_sec: u64,
    /// Repeats per transport and mode.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also over RDMA (a device must be there: the SoftRoCE VM).
    #[arg(long)]
    pub rdma: bool,
}

/// One machine's runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct PostcopyRaw {
    pub date: String,
    pub machine: String,
    pub mib: usize,
    pub bandwidth_mbs: u64,
    pub transfers_per_sec: u64,
    pub runs: Vec<PostcopyRun>,
}

/// One migration.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PostcopyRun {
    /// `tcp` or `rdma`.
    pub transport: String,
    /// `pre-copy` or `post-copy`.
    pub mode: String,
    pub rep: usize,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub rounds: u32,
    pub throttle_percent: u8,
    pub postcopy_ms: f64,
    pub demand_pages: u64,
    pub pushed_pages: u64,
    pub read_pages: u64,
    pub faults: u64,
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// The guest's transfers per second: on the source in the second
    /// before the migration, on the source while pre-copy ran, on the
    /// destination during post-copy, and there in the second after.
    pub guest_before_tps: f64,
    pub guest_precopy_tps: f64,
    pub guest_postcopy_tps: f64,
    pub guest_after_tps: f64,
    /// The ledger on the destination was valid at the end, with at least
    /// the source's transfers.
    pub consistent: bool,
    pub error: Option<String>,
}

/// Measure both modes on every transport, `repeats` times, and write the
/// raw results.
pub fn run(a: &PostcopyArgs) -> Result<PostcopyRaw> {
    let mut runs = Vec::new();
    let transports: &[&str] = if a.rdma { &["tcp", "rdma"] } else { &["tcp"] };
    for rep in 0..a.repeats {
        for &transport in transports {
            for mode in ["pre-copy", "post-copy"] {
                let r = one(a, transport, mode, rep).unwrap_or_else(|e| PostcopyRun {
                    transport: transport.into(),
                    mode: mode.into(),
                    rep,
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                });
                eprintln!(
                    "postcopy {transport} {mode} #{rep}: {:.0} ms total, {:.1} ms downtime, \
                     {} rounds, throttle {} %, guest {:.0}/{:.0}/{:.0}/{:.0} tps, faults p50 {} us \
                     p99 {} us, {} got by the fault handler, consistent {}{}",
                    r.total_ms,
                    r.downtime_ms,
                    r.rounds,
                    r.throttle_percent,
                    r.guest_before_tps,
                    r.guest_precopy_tps,
                    r.guest_postcopy_tps,
                    r.guest_after_tps,
                    r.fault_p50_us,
                    r.fault_p99_us,
                    r.read_pages,
                    r.consistent,
                    r.error
                        .as_deref()
                        .map(|e| format!(", error: {e}"))
                        .unwrap_or_default()
                );
                runs.push(r);
            }
        }
    }
    Ok(PostcopyRaw {
        date: crate::run::date(),
        machine: a.machine.clone(),
        mib: a.mib,
        bandwidth_mbs: a.bandwidth_mbs,
        transfers_per_sec: a.transfers_per_sec,
        runs,
    })
}

/// Where the raw file of `machine` goes.
pub fn raw_path(results: &Path, machine: &str) -> PathBuf {
    results.join(format!("{RAW}{machine}.json"))
}

/// The destination's VMM: the ledger goes on once the guest resumes.
struct BankDestination {
    mem: Arc<GuestMemory>,
    cfg: BankConfig,
    guest: Option<RunningGuest>,
    resumed: Option<Instant>,
}

impl DestinationVm for BankDestination {
    fn load_state(&mut self, _state: &[u8]) -> Result<(), VmError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        // The guest's threads start: in post-copy their first touches of
        // missing pages wait for them.
        self.guest = Some(
            BankGuest::start(Arc::clone(&self.mem), self.cfg)
                .map_err(|e| VmError::new("resume", e.to_string()))?,
        );
        self.resumed = Some(Instant::now());
        Ok(())
    }
}

fn memory(mib: usize) -> Result<Arc<GuestMemory>> {
    Ok(Arc::new(GuestMemory::new(vec![GuestRegion::anonymous(
        0,
        mib << 20,
    )?])?))
}

/// What the destination thread saw.
struct DestSide {
    report: DestinationReport,
    postcopy_tps: f64,
    after_tps: f64,
    transfers: u64,
}

fn one(a: &PostcopyArgs, transport: &str, mode: &str, rep: usize) -> Result<PostcopyRun> {
    let (src, dst) = (memory(a.mib)?, memory(a.mib)?);
    let cfg = BankConfig {
        accounts: ((a.mib << 20) / 4096 - 1) as u64,
        initial_balance: 1000,
        threads: 2,
        transfers_per_sec: a.transfers_per_sec,
        seed: 7 + rep as u64,
    };
    // Incompressible pages around the accounts: each dirty page costs its
    // 4 KiB on the link (not a few sparse words).
    fixtures::fill_memory(&src, fixtures::PageMix::ALL_RANDOM, 3)?;
    BankGuest::format(&src, &cfg)?;
    let io_timeout = Duration::from_secs(20);
    let tcp = TcpConfig {
        io_timeout,
        ..TcpConfig::default()
    };
    let rdma = |postcopy_reads| RdmaConfig {
        tcp: tcp.clone(),
        postcopy_reads,
        ..RdmaConfig::default()
    };
    let (addr, dest_thread) = {
        let dst = Arc::clone(&dst);
        type Accept = Box<dyn FnOnce() -> Result<Box<dyn DestinationTransport>> + Send>;
        let (addr, accept): (String, Accept) = if transport == "rdma" {
            let l = RdmaMigrationListener::bind("127.0.0.1:0", rdma(false))?;
            let addr = l.local_addr()?.to_string();
            (addr, Box::new(move || Ok(Box::new(l.accept()?) as Box<_>)))
        } else {
            let l = TcpMigrationListener::bind("127.0.0.1:0", tcp.clone())?;
            let addr = l.local_addr()?.to_string();
            (addr, Box::new(move || Ok(Box::new(l.accept()?) as Box<_>)))
        };
        let thread = std::thread::spawn(move || -> Result<DestSide> {
            let mut t = accept()?;
            let mut vm = BankDestination {
                mem: Arc::clone(&dst),
                cfg: BankConfig {
                    seed: cfg.seed + 100,
                    ..cfg
                },
                guest: None,
                resumed: None,
            };
            let incoming = IncomingMigration::accept(t.as_mut())?.memory_reads_zero(true);
            let report = incoming.receive(t.as_mut(), &dst, &mut vm)?;
            let done = Instant::now();
            let guest = vm.guest.take().context("the guest did not resume")?;
            let resumed = vm.resumed.context("no resume time")?;
            let at_done = guest.ops();
            let postcopy_tps = if report.postcopy.is_some() {
                at_done as f64 / done.duration_since(resumed).as_secs_f64().max(1e-6)
            } else {
                0.0
            };
            std::thread::sleep(Duration::from_secs(1));
            let after = guest.stop();
            let after_tps = (after - at_done) as f64 / done.elapsed().as_secs_f64().max(1e-6);
            let summary = BankGuest::validate(&dst)?;
            Ok(DestSide {
                report,
                postcopy_tps,
                after_tps,
                transfers: summary.transfers,
            })
        });
        (addr, thread)
    };
    let mut connected: Box<dyn SourceTransport> = if transport == "rdma" {
        Box::new(RdmaSource::connect(&addr, rdma(mode == "post-copy"))?)
    } else {
        Box::new(TcpSource::connect(&addr, tcp.clone())?)
    };
    let migration = SourceMigration::new(SourceConfig {
        bandwidth_limit: Some(a.bandwidth_mbs * 1_000_000),
        postcopy: if mode == "post-copy" {
            PostcopyMode::Auto
        } else {
            PostcopyMode::Never
        },
        timeout: Some((
            Duration::from_secs(300),
            migrate_core::TimeoutPolicy::ForceSwitchover,
        )),
        ..SourceConfig::default()
    });
    // Bind (RDMA registers the memory), then track.
    let bound = migration.bind(connected.as_mut(), &src)?;
    let tracking = DirtyTracking::new(&src, TrackerPreference::Best)?;
    let guest = BankGuest::start(Arc::clone(&src), cfg)?;
    std::thread::sleep(Duration::from_secs(1));
    let before = guest.ops();
    let mut vm = FixtureSourceVm::new(guest, b"bank".to_vec());
    let result = bound.run(&tracking, &mut vm);
    drop(tracking);
    let at_pause = vm.guest().ops();
    // The paused source's ledger: the destination's must hold at least its
    // transfers, and be whole.
    let at_pause_ledger = BankGuest::validate(&src).map(|s| s.transfers);
    let dest = dest_thread
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
    let stats: MigrationStats = result?;
    let dest = dest?;
    vm.stop();
    // A row says post-copy only when the migration went through it.
    anyhow::ensure!(
        mode != "post-copy" || stats.postcopy.is_some(),
        "asked for post-copy, but the migration never entered it (pre-copy converged): \
         not a post-copy run"
    );
    let pc = stats.postcopy.clone().unwrap_or_default();
    let live_s = (stats.total_ms - stats.downtime_ms - pc.ms).max(1e-3) / 1e3;
    Ok(PostcopyRun {
        transport: stats.transport.clone(),
        mode: mode.into(),
        rep,
        total_ms: stats.total_ms,
        downtime_ms: stats.downtime_ms,
        rounds: stats.precopy.rounds,
        throttle_percent: stats.precopy.throttle_percent,
        postcopy_ms: pc.ms,
        demand_pages: pc.demand_pages,
        pushed_pages: pc.pushed_pages,
        read_pages: dest
            .report
            .postcopy
            .as_ref()
            .and_then(|p| p.read_pages)
            .unwrap_or(0),
        faults: pc.fault_latency_us.faults,
        fault_p50_us: pc.fault_latency_us.p50,
        fault_p99_us: pc.fault_latency_us.p99,
        fault_max_us: pc.fault_latency_us.max,
        guest_before_tps: before as f64,
        guest_precopy_tps: (at_pause - before) as f64 / live_s,
        guest_postcopy_tps: dest.postcopy_tps,
        guest_after_tps: dest.after_tps,
        consistent: at_pause_ledger.is_ok_and(|t| dest.transfers >= t),
        error: None,
    })
}

/// Every machine's raw post-copy results in the results folder.
pub fn load(results: &Path) -> Result<Vec<PostcopyRaw>> {
    let mut out = Vec::new();
    for machine in ["host", "vm"] {
        let rel = format!("{RAW}{machine}.json");
        if let Some(raw) = crate::load_raw::<PostcopyRaw>(results, &rel)? {
            out.push(raw);
        }
    }
    Ok(out)
}

/// The spread of `f` over the good runs of (transport, mode).
fn spread(
    raw: &PostcopyRaw,
    transport: &str,
    mode: &str,
    f: impl Fn(&PostcopyRun) -> f64,
) -> Option<crate::cell::Spread> {
    crate::cell::Spread::of(
        raw.runs
            .iter()
            .filter(|r| {
                r.transport == transport && r.mode == mode && r.error.is_none() && r.consistent
            })
            .map(f),
    )
}

/// The report's section: per machine and transport, pre-copy beside
/// post-copy, and RDMA READ's fault latency beside the TCP request path's.
pub fn markdown(raws: &[PostcopyRaw]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Post-copy: a guest that out-dirties the link\n\n\
         `migrate-bench postcopy`: the bank ledger with one account per page (each transfer \
         dirties two random pages, incompressible pages around them) over a capped link, \
         moved by pre-copy (auto-converge throttles it) and by post-copy (`--postcopy auto`), \
         in one run; on the destination the ledger goes on at once, and its transfers fault \
         on pages that have not arrived. The ledger checks itself at the end (every account's \
         check word, the total, at least the source's transfers). Guest progress is its \
         transfers per second: before the migration, while pre-copy ran (on the source), \
         during post-copy (on the destination) and in the second after. Medians (min–max).\n"
    );
    let fmt = |x: Option<crate::cell::Spread>, unit: &str| {
        x.map_or("–".into(), |x| {
            format!("{:.1} {unit} ({:.1}–{:.1})", x.median, x.min, x.max)
        })
    };
    for raw in raws {
        let _ = writeln!(
            s,
            "**{}** ({}): {} MiB guest, {} MB/s link, {} transfers/s.\n",
            raw.machine, raw.date, raw.mib, raw.bandwidth_mbs, raw.transfers_per_sec
        );
        let _ = writeln!(
            s,
            "| transport | mode | total | downtime | rounds | throttle | guest during (kt/s) | \
             guest after (kt/s) | fault wait p50 | p99 | pages on demand (got by the fault handler: \
             RDMA READ, TCP's fetch connection) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for transport in ["tcp", "rdma"] {
            for mode in ["pre-copy", "post-copy"] {
                let sp = |f: fn(&PostcopyRun) -> f64| spread(raw, transport, mode, f);
                if sp(|r| r.total_ms).is_none() {
                    continue;
                }
                let during: fn(&PostcopyRun) -> f64 = if mode == "post-copy" {
                    |r| r.guest_postcopy_tps / 1e3
                } else {
                    |r| r.guest_precopy_tps / 1e3
                };
                let post = mode == "post-copy";
                let _ = writeln!(
                    s,
                    "| {transport} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    fmt(sp(|r| r.total_ms / 1e3), "s"),
                    fmt(sp(|r| r.downtime_ms), "ms"),
                    fmt(sp(|r| f64::from(r.rounds)), ""),
                    fmt(sp(|r| f64::from(r.throttle_percent)), "%"),
                    fmt(sp(during), ""),
                    fmt(sp(|r| r.guest_after_tps / 1e3), ""),
                    if post {
                        fmt(sp(|r| r.fault_p50_us as f64), "µs")
                    } else {
                        "–".into()
                    },
                    if post {
                        fmt(sp(|r| r.fault_p99_us as f64), "µs")
                    } else {
                        "–".into()
                    },
                    if post {
                        format!(
                            "{} ({})",
                            fmt(sp(|r| r.demand_pages as f64), ""),
                            fmt(sp(|r| r.read_pages as f64), "")
                        )
                    } else {
                        "–".into()
                    },
                );
            }
        }
        let ratio = |f: fn(&PostcopyRun) -> f64| {
            spread(raw, "tcp", "post-copy", f)
                .zip(spread(raw, "tcp", "pre-copy", f))
                .map(|(p, q)| p.median / q.median)
        };
        if let (Some(t), Some(d)) = (ratio(|r| r.total_ms), ratio(|r| r.downtime_ms)) {
            let _ = writeln!(
                s,
                "\nPost-copy / pre-copy over TCP (medians): total time {t:.2}, downtime {d:.3}."
            );
        }
        let rdma = spread(raw, "rdma", "post-copy", |r| r.fault_p50_us as f64);
        let tcp = spread(raw, "tcp", "post-copy", |r| r.fault_p50_us as f64);
        if let (Some(r), Some(t)) = (rdma, tcp) {
            let _ = writeln!(
                s,
                "Fault wait, RDMA READ / TCP request (p50 medians, same boot): {:.2}.",
                r.median / t.median
            );
            let ratio = t.median / r.median;
            let _ = writeln!(
                s,
                "Target: TCP's fault wait p50 ≤ 2 × RDMA READ's (same boot): {ratio:.2} ({}).",
                if ratio <= 2.0 { "met" } else { "**not met**" }
            );
        }
        let _ = writeln!(s);
    }
    s
}

/// Bars: per machine, total time and downtime of both modes, and the
/// guest's progress during the migration.
pub fn draw(path: &Path, raws: &[PostcopyRaw]) -> Result<()> {
    use crate::qemu_report::{BarPanel, bars};
    let mut panels = Vec::new();
    for raw in raws {
        let pair = |f: fn(&PostcopyRun) -> f64| {
            vec![
                spread(raw, "tcp", "pre-copy", f),
                spread(raw, "tcp", "post-copy", f),
            ]
        };
        panels.push(BarPanel {
            title: format!(
                "{}: {} MiB guest, {} MB/s link (TCP)",
                raw.machine, raw.mib, raw.bandwidth_mbs
            ),
            unit: "s / ms / kt/s",
            groups: vec![
                ("total (s)".into(), pair(|r| r.total_ms / 1e3)),
                ("downtime (ms)".into(), pair(|r| r.downtime_ms)),
                (
                    "guest during (kt/s)".into(),
                    pair(|r| {
                        if r.mode == "post-copy" {
                            r.guest_postcopy_tps / 1e3
                        } else {
                            r.guest_precopy_tps / 1e3
                        }
                    }),
                ),
            ],
        });
    }
    if panels.is_empty() {
        return Ok(());
    }
    bars(path, &["pre-copy (auto-converge)", "post-copy"], &panels)
}
