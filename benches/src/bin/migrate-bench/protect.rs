//! `migrate-bench protect`: fault tolerance by continuous mirroring
//! ([`migrate_core::mirror`]), measured: the bank and the dirtying guest
//! at two sizes, epochs of 10 to 100 ms, over TCP (and RDMA where a device
//! is). Per case, in one run: the guest's work rate unprotected for a few
//! seconds, then protected for as long (its rate over the unprotected
//! one), the epoch pause (how long the guest stood still per epoch), the
//! output delay (a bank receipt from its emit to its release), and the
//! failover: the link between primary and standby then goes silent (a proxy
//! swallows every byte, as a dead host would), and the standby's time from
//! the primary's last word to the guest running on it. The standby's ledger
//! (bank guest) is checked after the takeover.
//!
//! Anchors: Remus (NSDI 2008) ran 40 checkpoints/s (25 ms epochs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fixtures::{
    BankConfig, BankGuest, FixtureDestinationVm, FixtureSourceVm, RunningGuest, SyntheticGuest,
    WorkloadConfig,
};
use migrate_core::memory::{GuestMemory, GuestRegion};
use migrate_core::mirror::{
    NoWitness, OutputGate, ProtectConfig, Protection, ProtectionReport, Standby, StandbyReport,
};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use migrate_core::{DirtyTracking, TrackerPreference};
use serde::{Deserialize, Serialize};
use transport_rdma::{RdmaConfig, RdmaMigrationListener, RdmaSource};
use transport_tcp::{TcpConfig, TcpMigrationListener, TcpSource};

use crate::spread::Spread;

/// Where the report finds the raw results of each machine.
const RAW: &str = "raw/peer/protect-";

/// `migrate-bench protect`.
#[derive(Debug, clap::Args)]
pub struct ProtectArgs {
    /// `host` or `vm` (names the raw file and the report's rows).
    #[arg(long)]
    pub machine: String,
    /// The results folder (writes raw/peer/protect-MACHINE.json).
    #[arg(long, default_value = "benches/results")]
    pub results: PathBuf,
    /// Guest sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    pub mib: Vec<usize>,
    /// Epochs, ms.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    pub epoch_ms: Vec<u64>,
    /// The dirtying guest's pages per second, and the bank guest's
    /// transfers per second (two pages each).
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Seconds unprotected, and as many protected, per case.
    #[arg(long, default_value_t = 4)]
    pub seconds: u64,
    /// Silence after which an end counts the other as lost, ms.
    #[arg(long, default_value_t = 500)]
    pub failover_after_ms: u64,
    /// Also over RDMA (a device must be there: the SoftRoCE VM).
    #[arg(long)]
    pub rdma: bool,
    /// The `migrate-cli` binary (the primary's CPU per epoch is measured
    /// on its processes).
    #[arg(long, default_value = "target/release/migrate-cli")]
    pub cli: PathBuf,
    /// Only the primary's CPU per epoch (the in-process cases already in
    /// the raw file are kept).
    #[arg(long)]
    pub cpu_only: bool,
}

/// One machine's runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProtectRaw {
    pub date: String,
    pub machine: String,
    pub rate: u64,
    pub failover_after_ms: u64,
    pub runs: Vec<ProtectRun>,
    /// The primary's CPU per epoch by transport (processes).
    #[serde(default)]
    pub cpu: Vec<crate::protect_cpu::ProtectCpu>,
}

/// One case.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ProtectRun {
    pub guest: String,
    pub mib: usize,
    pub epoch_ms: u64,
    pub transport: String,
    pub epochs: u64,
    pub pause_p50_us: u64,
    pub pause_p99_us: u64,
    pub pause_max_us: u64,
    pub epoch_bytes_p50: u64,
    pub epoch_bytes_max: u64,
    pub output_delay_p50_us: u64,
    pub output_delay_p99_us: u64,
    pub initial_sync_ms: f64,
    /// The guest's work (transfers or pages) per second.
    pub unprotected_ops: f64,
    pub protected_ops: f64,
    pub failover_ms: f64,
    pub detect_ms: f64,
    /// The standby's ledger held after the takeover (always true for the
    /// dirtying guest, which has no rule).
    pub consistent: bool,
    pub error: Option<String>,
}

/// Every case, once each, and the raw results.
pub fn run(a: &ProtectArgs) -> Result<ProtectRaw> {
    let transports: &[&str] = if a.rdma { &["tcp", "rdma"] } else { &["tcp"] };
    if a.cpu_only {
        let rel = format!("{RAW}{}.json", a.machine);
        let mut raw = crate::load_raw::<ProtectRaw>(&a.results, &rel)?
            .with_context(|| format!("--cpu-only: no {rel} to add to"))?;
        raw.cpu = crate::protect_cpu::run(a, transports);
        return Ok(raw);
    }
    let mut runs = Vec::new();
    for &mib in &a.mib {
        for guest in ["bank", "dirty"] {
            for &epoch_ms in &a.epoch_ms {
                for &transport in transports {
                    let r =
                        one(a, guest, mib, epoch_ms, transport).unwrap_or_else(|e| ProtectRun {
                            guest: guest.into(),
                            mib,
                            epoch_ms,
                            transport: transport.into(),
                            error: Some(format!("{e:#}")),
                            ..Default::default()
                        });
                    eprintln!(
                        "protect {guest} {mib} MiB {epoch_ms} ms {transport}: pause p50 {} p99 {} us, \
                         work {:.0}/{:.0} per s, output delay p99 {} us, failover {:.0} ms{}",
                        r.pause_p50_us,
                        r.pause_p99_us,
                        r.protected_ops,
                        r.unprotected_ops,
                        r.output_delay_p99_us,
                        r.failover_ms,
                        r.error
                            .as_deref()
                            .map_or(String::new(), |e| format!(" ERROR {e}"))
                    );
                    runs.push(r);
                }
            }
        }
    }
    let cpu = crate::protect_cpu::run(a, transports);
    Ok(ProtectRaw {
        date: crate::run::date(),
        machine: a.machine.clone(),
        rate: a.rate,
        failover_after_ms: a.failover_after_ms,
        runs,
        cpu,
    })
}

/// Where the raw file of `machine` goes.
pub fn raw_path(results: &Path, machine: &str) -> PathBuf {
    results.join(format!("{RAW}{machine}.json"))
}

fn memory(mib: usize) -> Result<Arc<GuestMemory>> {
    Ok(Arc::new(GuestMemory::new(vec![GuestRegion::anonymous(
        0,
        mib << 20,
    )?])?))
}

/// A proxy that forwards until `cut`, then swallows every byte both ways
/// without closing: the link of a host that died.
fn silent_proxy(to: String, cut: Arc<AtomicBool>) -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(a) = conn else { return };
            let Ok(b) = TcpStream::connect(&to) else {
                return;
            };
            let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
                return;
            };
            for (mut from, mut into) in [(a2, b2), (b, a)] {
                let cut = Arc::clone(&cut);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !cut.load(Ordering::SeqCst) && into.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    Ok(addr)
}

/// The guest of a case, its memory filled and formatted.
fn guest(
    kind: &str,
    mem: &Arc<GuestMemory>,
    rate: u64,
    gate: &Arc<OutputGate>,
) -> Result<RunningGuest> {
    fixtures::fill_memory(mem, fixtures::PageMix::parse("40:30:30").context("mix")?, 5)?;
    Ok(if kind == "bank" {
        let cfg = bank_config(mem, rate);
        BankGuest::format(mem, &cfg)?;
        BankGuest::start_with_receipts(Arc::clone(mem), cfg, Arc::clone(gate))?
    } else {
        SyntheticGuest::start(
            Arc::clone(mem),
            WorkloadConfig {
                threads: 2,
                pages_per_sec: rate,
                pattern: fixtures::DirtyPattern::Uniform,
                seed: 5,
            },
        )?
    })
}

fn bank_config(mem: &GuestMemory, rate: u64) -> BankConfig {
    BankConfig {
        accounts: (mem.regions()[0].len() as u64 / 1024).clamp(64, 1 << 20),
        initial_balance: 1000,
        threads: 2,
        transfers_per_sec: rate,
        seed: 5,
    }
}

/// The guest's work per second over `secs`.
fn rate_over(g: &RunningGuest, secs: u64) -> f64 {
    let (t, before) = (Instant::now(), g.ops());
    std::thread::sleep(Duration::from_secs(secs));
    (g.ops() - before) as f64 / t.elapsed().as_secs_f64()
}

/// What one protection session gave.
struct Session {
    primary: ProtectionReport,
    standby: StandbyReport,
    unprotected_ops: f64,
    protected_ops: f64,
    consistent: bool,
}

/// How a session ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// `ProtectHandle::end`: the steady state is measured, nothing in the
    /// path between the ends.
    Clean,
    /// The link goes silent (a proxy in the path swallows every byte): the
    /// standby takes over.
    HostDies,
}

fn one(
    a: &ProtectArgs,
    kind: &str,
    mib: usize,
    epoch_ms: u64,
    transport: &str,
) -> Result<ProtectRun> {
    let steady = session(a, kind, mib, epoch_ms, transport, End::Clean)?;
    let failover = session(a, kind, mib, epoch_ms, transport, End::HostDies)?;
    let (report, sb) = (&steady.primary, &failover.standby);
    Ok(ProtectRun {
        guest: kind.into(),
        mib,
        epoch_ms,
        transport: report.transport.clone(),
        epochs: report.epochs,
        pause_p50_us: report.epoch_pause_us.p50,
        pause_p99_us: report.epoch_pause_us.p99,
        pause_max_us: report.epoch_pause_us.max,
        epoch_bytes_p50: report.epoch_bytes.p50,
        epoch_bytes_max: report.epoch_bytes.max,
        output_delay_p50_us: report.output_delay_us.p50,
        output_delay_p99_us: report.output_delay_us.p99,
        initial_sync_ms: report.initial_sync_ms,
        unprotected_ops: steady.unprotected_ops,
        protected_ops: steady.protected_ops,
        failover_ms: sb.failover_ms,
        detect_ms: sb.detect_ms,
        consistent: steady.consistent && failover.consistent,
        error: (sb.status != migrate_core::mirror::StandbyStatus::TookOver)
            .then(|| format!("standby {}: {:?}", sb.status.name(), sb.error)),
    })
}

fn session(
    a: &ProtectArgs,
    kind: &str,
    mib: usize,
    epoch_ms: u64,
    transport: &str,
    end: End,
) -> Result<Session> {
    let tcp = TcpConfig {
        io_timeout: Duration::from_millis(a.failover_after_ms),
        ..TcpConfig::default()
    };
    let rdma = RdmaConfig {
        tcp: tcp.clone(),
        require: true,
        ..RdmaConfig::default()
    };
    let (src, image) = (memory(mib)?, memory(mib)?);
    type Accept = Box<dyn FnOnce() -> Result<Box<dyn DestinationTransport>> + Send>;
    let (addr, accept): (String, Accept) = if transport == "rdma" {
        let l = RdmaMigrationListener::bind("127.0.0.1:0", rdma.clone())?;
        let addr = l.local_addr()?.to_string();
        (addr, Box::new(move || Ok(Box::new(l.accept()?) as Box<_>)))
    } else {
        let l = TcpMigrationListener::bind("127.0.0.1:0", tcp.clone())?;
        let addr = l.local_addr()?.to_string();
        (addr, Box::new(move || Ok(Box::new(l.accept()?) as Box<_>)))
    };
    let standby = {
        let image = Arc::clone(&image);
        std::thread::spawn(move || -> Result<StandbyReport> {
            let mut t = accept()?;
            let s = Standby::accept(t.as_mut())?;
            let gate = OutputGate::new(Box::new(std::io::sink()));
            let mut vm = FixtureDestinationVm::default();
            Ok(s.run(t.as_mut(), &image, &mut vm, &gate, &mut NoWitness)?)
        })
    };
    let cut = Arc::new(AtomicBool::new(false));
    // RDMA's queue pairs do not pass through the proxy: its silence is the
    // control connection's (heartbeats), which is what the standby watches.
    let via = if end == End::HostDies {
        silent_proxy(addr, Arc::clone(&cut))?
    } else {
        addr
    };
    let gate = OutputGate::new(Box::new(std::io::sink()));
    // Unprotected, output goes out at once; protected, it waits.
    gate.open();
    let g = guest(kind, &src, a.rate, &gate)?;
    let unprotected_ops = if end == End::Clean {
        rate_over(&g, a.seconds)
    } else {
        0.0
    };
    gate.close();
    let mut t: Box<dyn SourceTransport> = if transport == "rdma" {
        Box::new(RdmaSource::connect(&via, rdma)?)
    } else {
        Box::new(TcpSource::connect(&via, tcp)?)
    };
    let tracking = DirtyTracking::new(&src, TrackerPreference::Best)?;
    let protection = Protection::new(ProtectConfig::with_epoch(Duration::from_millis(epoch_ms)));
    let handle = protection.handle();
    let ops = g.ops_counter();
    let mut vm = FixtureSourceVm::new(g, kind.as_bytes().to_vec());
    let (primary, protected_ops) = std::thread::scope(|s| -> Result<(ProtectionReport, f64)> {
        let run =
            s.spawn(|| protection.run(t.as_mut(), &src, &tracking, &mut vm, &gate, &mut NoWitness));
        // Protected: the guest's rate once epochs run.
        let started = Instant::now();
        while handle.stats().epochs == 0 {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "never protected"
            );
            anyhow::ensure!(
                !run.is_finished(),
                "protection ended before its first epoch"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (t0, ops0) = (Instant::now(), ops.load(Ordering::Relaxed));
        let secs = if end == End::Clean { a.seconds } else { 1 };
        std::thread::sleep(Duration::from_secs(secs));
        let rate = (ops.load(Ordering::Relaxed) - ops0) as f64 / t0.elapsed().as_secs_f64();
        match end {
            End::Clean => handle.end(),
            // The host dies: its link goes silent.
            End::HostDies => cut.store(true, Ordering::SeqCst),
        }
        let report = run
            .join()
            .map_err(|_| anyhow::anyhow!("the primary panicked"))??;
        Ok((report, rate))
    })?;
    vm.stop();
    let standby = standby
        .join()
        .map_err(|_| anyhow::anyhow!("the standby panicked"))??;
    let consistent = kind != "bank" || BankGuest::validate(&image).is_ok();
    Ok(Session {
        primary,
        standby,
        unprotected_ops,
        protected_ops,
        consistent,
    })
}

/// Every machine's raw protection results in the results folder.
pub fn load(results: &Path) -> Result<Vec<ProtectRaw>> {
    let mut out = Vec::new();
    for machine in ["host", "vm"] {
        let rel = format!("{RAW}{machine}.json");
        if let Some(raw) = crate::load_raw::<ProtectRaw>(results, &rel)? {
            out.push(raw);
        }
    }
    Ok(out)
}

fn good(raw: &ProtectRaw) -> impl Iterator<Item = &ProtectRun> {
    raw.runs
        .iter()
        .filter(|r| r.error.is_none() && r.consistent)
}

/// The report's section: per machine, every case in a row, and the targets
/// of the 25 ms, 1 GiB, dirtying case checked.
pub fn markdown(raws: &[ProtectRaw]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Fault tolerance: continuous mirroring\n\n\
         `migrate-bench protect`: a guest protected in epochs (`migrate_core::mirror`), both \
         ends in one process over loopback. Per case: the guest's work per second unprotected, \
         then protected (from the first checkpoint; the guests are paced, so this shows what \
         the pauses cost them), the epoch pause (the guest stopped: harvest, copy to the \
         shadow, device state), the output delay (a bank receipt from emit to release, from \
         the second checkpoint on), and in a second session the failover: the link goes \
         silent (a proxy swallows every byte, as a dead host's link would) and the standby \
         takes over (from the primary's last word to the guest running there). The bank \
         ledger is checked on the standby. Anchor: Remus (NSDI 2008) ran 40 checkpoints/s.\n"
    );
    for raw in raws {
        let _ = writeln!(
            s,
            "**{}** ({}): guests at {} pages/s (bank: transfers/s, two pages each), \
             failover after {} ms of silence.\n",
            raw.machine, raw.date, raw.rate, raw.failover_after_ms
        );
        let _ = writeln!(
            s,
            "| guest | MiB | epoch | transport | epochs | pause p50 | pause p99 | pause max | \
             epoch MiB p50 | work protected/unprotected | output delay p50 | p99 | failover | \
             initial sync |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in &raw.runs {
            if let Some(e) = &r.error {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} ms | {} | failed: {} |||||||||| ",
                    r.guest, r.mib, r.epoch_ms, r.transport, e
                );
                continue;
            }
            let delay = |us: u64| {
                if r.guest == "bank" {
                    format!("{:.1} ms", us as f64 / 1e3)
                } else {
                    "–".into()
                }
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} ms | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} | {:.1} % | {} | {} | {:.0} ms | {:.1} s |",
                r.guest,
                r.mib,
                r.epoch_ms,
                r.transport,
                r.epochs,
                r.pause_p50_us as f64 / 1e3,
                r.pause_p99_us as f64 / 1e3,
                r.pause_max_us as f64 / 1e3,
                r.epoch_bytes_p50 as f64 / f64::from(1 << 20),
                100.0 * r.protected_ops / r.unprotected_ops.max(1e-9),
                delay(r.output_delay_p50_us),
                delay(r.output_delay_p99_us),
                r.failover_ms,
                r.initial_sync_ms / 1e3,
            );
        }
        s += &crate::protect_cpu::markdown(&raw.machine, &raw.cpu);
        let target = good(raw).find(|r| r.mib == 1024 && r.epoch_ms == 25 && r.guest == "dirty");
        let bank = good(raw).find(|r| r.mib == 1024 && r.epoch_ms == 25 && r.guest == "bank");
        if let Some(t) = target {
            let _ = writeln!(
                s,
                "\nTargets (1 GiB, 25 ms epochs, TCP): pause p99 {:.2} ms (≤ 3: {}), work {:.1} % \
                 of unprotected (≥ 85: {}), failover {:.0} ms (≤ {} + 100: {}){}.",
                t.pause_p99_us as f64 / 1e3,
                if t.pause_p99_us <= 3000 {
                    "met"
                } else {
                    "missed"
                },
                100.0 * t.protected_ops / t.unprotected_ops.max(1e-9),
                if t.protected_ops >= 0.85 * t.unprotected_ops {
                    "met"
                } else {
                    "missed"
                },
                t.failover_ms,
                raw.failover_after_ms,
                if t.failover_ms <= raw.failover_after_ms as f64 + 100.0 {
                    "met"
                } else {
                    "missed"
                },
                bank.map_or(String::new(), |b| format!(
                    "; output delay p99 {:.1} ms with the bank guest (≤ epoch + 5: {})",
                    b.output_delay_p99_us as f64 / 1e3,
                    if b.output_delay_p99_us <= 30_000 {
                        "met"
                    } else {
                        "missed"
                    }
                ))
            );
        }
        let _ = writeln!(s);
    }
    s
}

/// Bars per machine and guest size: the pause p99 and the output delay
/// p99 by epoch (ms), for both guests.
pub fn draw(path: &Path, raws: &[ProtectRaw]) -> Result<()> {
    use crate::qemu_report::{BarPanel, bars};
    let mut panels = Vec::new();
    for raw in raws {
        let mut sizes: Vec<usize> = good(raw).map(|r| r.mib).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for mib in sizes {
            let mut epochs: Vec<u64> = good(raw)
                .filter(|r| r.mib == mib)
                .map(|r| r.epoch_ms)
                .collect();
            epochs.sort_unstable();
            epochs.dedup();
            let at = |guest: &str, epoch: u64, f: fn(&ProtectRun) -> f64| {
                Spread::of(
                    good(raw)
                        .filter(|r| {
                            r.mib == mib
                                && r.epoch_ms == epoch
                                && r.guest == guest
                                && r.transport == "tcp"
                        })
                        .map(f),
                )
            };
            panels.push(BarPanel {
                title: format!("{}: {} MiB guest, TCP (ms)", raw.machine, mib),
                unit: "ms",
                groups: epochs
                    .iter()
                    .map(|&e| {
                        (
                            format!("{e} ms epochs"),
                            vec![
                                at("dirty", e, |r| r.pause_p99_us as f64 / 1e3),
                                at("bank", e, |r| r.pause_p99_us as f64 / 1e3),
                                at("bank", e, |r| r.output_delay_p99_us as f64 / 1e3),
                            ],
                        )
                    })
                    .collect(),
            });
        }
    }
    if panels.is_empty() {
        return Ok(());
    }
    bars(
        path,
        &[
            "pause p99, dirty guest",
            "pause p99, bank guest",
            "output delay p99, bank guest",
        ],
        &panels,
    )
}
