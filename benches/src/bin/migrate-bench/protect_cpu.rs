//! The primary's CPU per epoch by transport, on real processes: `migrate-cli
//! standby` and `migrate-cli protect` (the bank guest, 25 ms epochs), TCP
//! and RDMA interleaved in one run. The primary's report gives
//! `cpu_per_epoch_us`: its process's CPU from the first checkpoint to the
//! end (the built-in guest's threads excluded, the kernel's work in the
//! process's system calls included) over the epochs in between. The in-
//! process cases of [`crate::protect`] cannot tell the two ends apart.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::protect::ProtectArgs;
use crate::spread::Spread;

/// The epoch of these runs, ms (the anchor: Remus's 40/s).
const EPOCH_MS: u64 = 25;
/// Runs per transport, interleaved.
const REPEATS: usize = 3;

/// One primary's figures.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ProtectCpu {
    pub transport: String,
    pub mib: usize,
    pub epoch_ms: u64,
    pub epochs: u64,
    /// The primary's CPU per checkpoint epoch, microseconds.
    pub cpu_per_epoch_us: f64,
    /// Its user and system parts (clock ticks: coarser).
    #[serde(default)]
    pub user_per_epoch_us: f64,
    #[serde(default)]
    pub system_per_epoch_us: f64,
    pub epoch_bytes_p50: u64,
    pub pause_p99_us: u64,
    pub error: Option<String>,
}

/// `REPEATS` runs per transport, interleaved, on the smallest guest.
pub fn run(a: &ProtectArgs, transports: &[&str]) -> Vec<ProtectCpu> {
    let mib = a.mib.iter().copied().min().unwrap_or(16);
    let mut out = Vec::new();
    for i in 0..REPEATS {
        for &t in transports {
            let r = one(a, t, mib, i).unwrap_or_else(|e| ProtectCpu {
                transport: t.into(),
                mib,
                epoch_ms: EPOCH_MS,
                error: Some(format!("{e:#}")),
                ..Default::default()
            });
            eprintln!(
                "protect cpu {t} {mib} MiB: {:.0} us per epoch over {} epochs{}",
                r.cpu_per_epoch_us,
                r.epochs,
                r.error
                    .as_deref()
                    .map_or(String::new(), |e| format!(" ERROR {e}"))
            );
            out.push(r);
        }
    }
    out
}

/// Start `cli ARGS` and return it once its stdout said `prefix`, with the
/// rest of that line.
fn start(cli: &Path, args: &[String], prefix: &str) -> Result<(Child, String)> {
    let mut child = Command::new(cli)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", cli.display()))?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            let _ = child.wait();
            anyhow::bail!(
                "{} {} ended before saying {prefix:?}",
                cli.display(),
                args[0]
            );
        }
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            let rest = rest.to_string();
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return Ok((child, rest));
        }
    }
}

fn one(a: &ProtectArgs, transport: &str, mib: usize, i: usize) -> Result<ProtectCpu> {
    let dir =
        std::env::temp_dir().join(format!("migrate-bench-protect-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (sj, pj) = (
        dir.join(format!("{transport}{i}-s.json")),
        dir.join(format!("{transport}{i}-p.json")),
    );
    let s = |x: &str| x.to_string();
    let common = [
        s("--no-witness"),
        s("--transport"),
        s(transport),
        s("--failover-after-ms"),
        a.failover_after_ms.to_string(),
    ];
    let mut sargs = vec![s("standby"), s("--listen"), s("127.0.0.1:0")];
    sargs.extend(common.iter().cloned());
    sargs.extend([s("--json"), sj.display().to_string()]);
    let (mut standby, addr) = start(&a.cli, &sargs, "listening on ")?;
    let mut pargs = vec![s("protect"), s("--standby"), addr];
    pargs.extend(common.iter().cloned());
    pargs.extend([
        s("--memory"),
        format!("{mib}M"),
        s("--guest"),
        s("bank"),
        s("--dirty-rate"),
        a.rate.to_string(),
        s("--epoch-ms"),
        EPOCH_MS.to_string(),
        s("--run-for-s"),
        a.seconds.to_string(),
        s("--json"),
        pj.display().to_string(),
    ]);
    let primary = Command::new(&a.cli)
        .args(&pargs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running the primary")?;
    let sstatus = standby.wait()?;
    let text = std::fs::read_to_string(&pj).context("the primary's report")?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        primary.status.success() && sstatus.success() && v["status"] == "released",
        "primary {} ({}), standby {sstatus}: {}",
        primary.status,
        v["status"],
        String::from_utf8_lossy(&primary.stderr).trim()
    );
    anyhow::ensure!(
        v["transport"] == transport,
        "the epochs went over {}, not {transport}",
        v["transport"]
    );
    Ok(ProtectCpu {
        transport: transport.into(),
        mib,
        epoch_ms: EPOCH_MS,
        epochs: v["epochs"].as_u64().unwrap_or(0),
        cpu_per_epoch_us: v["cpu_per_epoch_us"]
            .as_f64()
            .context("no cpu_per_epoch_us in the report")?,
        user_per_epoch_us: v["cpu_user_per_epoch_us"].as_f64().unwrap_or(0.0),
        system_per_epoch_us: v["cpu_system_per_epoch_us"].as_f64().unwrap_or(0.0),
        epoch_bytes_p50: v["epoch_bytes"]["p50"].as_u64().unwrap_or(0),
        pause_p99_us: v["epoch_pause_us"]["p99"].as_u64().unwrap_or(0),
        error: None,
    })
}

/// The report's lines for one machine: the median per transport, and RDMA
/// over TCP where both ran.
pub fn markdown(machine: &str, cpu: &[ProtectCpu]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if cpu.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "Primary CPU per epoch ({machine}; `migrate-cli protect` and `standby` as processes, \
         the bank guest, {EPOCH_MS} ms epochs, {REPEATS} runs per transport interleaved; the \
         primary's process CPU from the first checkpoint on, its guest's threads excluded; \
         user and system time from clock ticks, shown where they add up to the total):\n"
    );
    let _ = writeln!(
        s,
        "| transport | MiB | runs | CPU per epoch, median (min–max) | user | system | epoch KiB p50 | pause p99 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for t in ["tcp", "rdma"] {
        let ok: Vec<&ProtectCpu> = cpu
            .iter()
            .filter(|r| r.transport == t && r.error.is_none())
            .collect();
        let failed = cpu
            .iter()
            .filter(|r| r.transport == t && r.error.is_some())
            .count();
        let Some(c) = Spread::of(ok.iter().map(|r| r.cpu_per_epoch_us)) else {
            if failed > 0 {
                let _ = writeln!(s, "| {t} | | {failed} failed | | | | | |");
            }
            continue;
        };
        let kib = Spread::of(ok.iter().map(|r| r.epoch_bytes_p50 as f64 / 1024.0));
        let pause = Spread::of(ok.iter().map(|r| r.pause_p99_us as f64 / 1e3));
        let user = Spread::of(ok.iter().map(|r| r.user_per_epoch_us)).map_or(0.0, |x| x.median);
        let sys = Spread::of(ok.iter().map(|r| r.system_per_epoch_us)).map_or(0.0, |x| x.median);
        // The split comes from clock ticks, the process's less its guest's
        // threads', each scaled by the kernel on its own: where the guest's
        // threads dominate it does not add up, and is not shown.
        let splits = user > 0.0 && ((user + sys) - c.median).abs() <= 0.25 * c.median;
        let (user_s, sys_s) = if splits {
            (format!("{user:.0} µs"), format!("{sys:.0} µs"))
        } else {
            ("–".to_string(), "–".to_string())
        };
        let _ = writeln!(
            s,
            "| {t} | {} | {}{} | {:.0} µs ({:.0}–{:.0}) | {user_s} | {sys_s} | {:.0} | {:.2} ms |",
            ok[0].mib,
            ok.len(),
            if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            },
            c.median,
            c.min,
            c.max,
            kib.map_or(0.0, |k| k.median),
            pause.map_or(0.0, |p| p.median),
        );
        medians.push((t, c.median, if splits { user } else { f64::NAN }));
    }
    if let [("tcp", tcp, tcp_user), ("rdma", rdma, rdma_user)] = medians[..] {
        let _ = writeln!(
            s,
            "\nRDMA / TCP, the primary's CPU per epoch: **{:.2}** in all (target: below 1: {}), \
             **{:.2}** in user space (the engine's own work; {}). Where the system time is \
             rxe's (a software NIC: segmenting and the ICRC inside `ibv_post_send`), a NIC \
             does that part in hardware.",
            rdma / tcp,
            if rdma < tcp { "met" } else { "missed" },
            rdma_user / tcp_user,
            if rdma_user < tcp_user {
                "lower"
            } else if rdma_user.is_nan() || tcp_user.is_nan() {
                "not split"
            } else {
                "not lower"
            }
        );
    }
    let _ = writeln!(s);
    s
}
