//! `migrate-bench fabric`: one link shared by a migration and the traffic
//! beside it, classed by the marks the migration carries (`--dscp`, and
//! over RDMA the queue pairs' traffic class).
//!
//! The link is the sending end's egress, shaped by HTB to `--link-mbit`
//! with three classes: high (DSCP 46, EF: the rest guaranteed, first to
//! borrow what is spare), low (DSCP 10, AF11: `--low-percent`, 5 %, guaranteed)
//! and the default (unmarked: as low). A TCP flow of `iperf3`
//! (the VM's or a storage flow stand-in) runs for `--seconds`; a real
//! `migrate-cli` migration of a dirtying guest starts 2 s in. Cases:
//!
//! - the IP flow alone (its solo rate);
//! - the IP flow high, the migration low: the IP flow should keep ≥ 90 %
//!   of its solo rate while the migration still completes, verified;
//! - the reverse classes, to show the marking is what does it;
//! - both unmarked, the migration capped by `--bandwidth-mbs` (a quarter of
//!   the link): both rates against the cap;
//! - both unmarked, uncapped: what sharing without classes gives.
//!
//! On the host the two ends are network namespaces joined by a veth pair
//! (TCP migration). In the SoftRoCE VM (`--rdma`) the migration is RDMA
//! between rxe-a and rxe-b over the fabric link of `scripts/roce-fabric.sh`
//! (its RoCE v2 packets classed by their traffic class, the same DSCP bits)
//! and the IP flow is bound to the same link; the rxe port's own counters
//! are read beside our byte count.
//!
//! Rates over time come from iperf3's half-second intervals and the
//! migration's progress events, for the plot; the table gives the IP
//! flow's mean rate while the migration ran against its solo rate.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns::in_ns;
use crate::peer::{Listening, Reaper};

/// Where the report finds the raw results of each machine.
const RAW: &str = "raw/peer/fabric-";
/// The classes' marks (TOS bytes: DSCP × 4).
const HIGH_TOS: u8 = 46 << 2;
const LOW_TOS: u8 = 10 << 2;
/// When the migration starts, seconds into the IP flow.
const MIGRATION_AT_S: f64 = 2.0;

/// `migrate-bench fabric`.
#[derive(Debug, clap::Args)]
pub struct FabricArgs {
    /// `host` or `vm` (names the raw file and the report's rows).
    #[arg(long)]
    pub machine: String,
    /// The results folder (writes raw/peer/fabric-MACHINE.json).
    #[arg(long, default_value = "benches/results")]
    pub results: PathBuf,
    /// The shaped link's rate, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub link_mbit: u64,
    /// Guest size, MiB.
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
    /// The IP flow's length, seconds.
    #[arg(long, default_value_t = 12)]
    pub seconds: u64,
    /// The low and default classes' guaranteed share of the link, percent
    /// (the high class has the rest, and first call on what is spare).
    #[arg(long, default_value_t = 5)]
    pub low_percent: u64,
    /// RDMA between rxe-a and rxe-b over the VM's fabric link.
    #[arg(long)]
    pub rdma: bool,
    /// The `migrate-cli` binary.
    #[arg(long, default_value = "target/release/migrate-cli")]
    pub cli: PathBuf,
}

/// One machine's runs.
#[derive(Debug, Serialize, Deserialize)]
pub struct FabricRaw {
    pub date: String,
    pub machine: String,
    pub transport: String,
    pub link_mbit: u64,
    /// The low and default classes' guaranteed share, percent.
    #[serde(default)]
    pub low_percent: u64,
    pub mib: usize,
    pub seconds: u64,
    pub runs: Vec<FabricRun>,
}

/// One case.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FabricRun {
    pub case: String,
    /// The IP flow's TOS byte.
    pub ip_tos: u8,
    /// The migration's DSCP (`None`: unmarked; no migration in the solo
    /// case).
    pub migration_dscp: Option<u8>,
    pub migrated: bool,
    /// `--bandwidth-mbs`, 0 for none.
    pub cap_mbs: u64,
    /// The IP flow's mean rate over its run (solo case), or while both
    /// flows ran (the migration's data path busy and the IP flow on).
    pub ip_mbit: f64,
    /// The migration's mean rate over the same window.
    pub migration_mbit: f64,
    /// The migration's mean rate over its whole run (set-up and
    /// verification included).
    #[serde(default)]
    pub migration_overall_mbit: f64,
    pub migration_total_ms: f64,
    pub verified: bool,
    pub status: String,
    /// (seconds from the IP flow's start, Mbit/s).
    pub ip_series: Vec<(f64, f64)>,
    pub migration_series: Vec<(f64, f64)>,
    /// The migration's data-path bytes, and the sending port's own
    /// counters over the same run (RDMA: rxe's; host: the veth's).
    pub our_bytes: u64,
    pub link_tx_bytes: u64,
    pub rdma_sent_packets: Option<u64>,
    pub error: Option<String>,
}

/// The two ends and the shaped link between them.
struct Link {
    src_ns: Option<String>,
    dst_ns: Option<String>,
    /// The shaped egress (inside `src_ns`).
    dev: String,
    src_ip: &'static str,
    dst_ip: &'static str,
    /// SO_BINDTODEVICE for the IP flow's ends (the VM: both "hosts" share
    /// one namespace).
    bind: Option<(&'static str, &'static str)>,
}

impl Link {
    /// Two namespaces and a veth pair (host).
    fn namespaces() -> Result<Link> {
        let id = std::process::id() % 100_000;
        let (s, d) = (format!("mbfs{id}"), format!("mbfd{id}"));
        let (vs, vd) = (format!("mbvs{id}"), format!("mbvd{id}"));
        let ip = |args: &[&str]| sh("ip", args);
        ip(&["netns", "add", &s])?;
        ip(&["netns", "add", &d])?;
        ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vd])?;
        ip(&["link", "set", &vs, "netns", &s])?;
        ip(&["link", "set", &vd, "netns", &d])?;
        ip(&["-n", &s, "addr", "add", "10.198.0.1/30", "dev", &vs])?;
        ip(&["-n", &d, "addr", "add", "10.198.0.2/30", "dev", &vd])?;
        for (ns, dev) in [(&s, &vs), (&d, &vd)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(Link {
            src_ns: Some(s),
            dst_ns: Some(d),
            dev: vs,
            src_ip: "10.198.0.1",
            dst_ip: "10.198.0.2",
            bind: None,
        })
    }

    /// The SoftRoCE VM's fabric link (fab-a → fab-b, already up).
    fn roce_fabric() -> Result<Link> {
        if !Path::new("/sys/class/infiniband/rxe-a").exists() {
            bail!("no rxe-a: run inside scripts/rdma-vm.sh --netns (scripts/roce-fabric.sh)");
        }
        Ok(Link {
            src_ns: None,
            dst_ns: None,
            dev: "fab-a".into(),
            src_ip: "10.199.0.1",
            dst_ip: "10.199.0.2",
            bind: Some(("fab-a", "fab-b")),
        })
    }

    /// HTB on the egress: high (EF), low (AF11) and default classes.
    fn shape(&self, link_mbit: u64, low_percent: u64) -> Result<()> {
        let tc = |args: &str| {
            let mut c = in_ns(&self.src_ns, "tc");
            c.args(args.split_whitespace());
            run_ok(c, &format!("tc {args}"))
        };
        let _ = in_ns(&self.src_ns, "tc")
            .args(["qdisc", "del", "dev", &self.dev, "root"])
            .stderr(Stdio::null())
            .status();
        let (d, l) = (&self.dev, link_mbit);
        let low_percent = low_percent.clamp(1, 50);
        let (hi, lo) = (
            l * (100 - low_percent) / 100,
            (l * low_percent / 100).max(1),
        );
        let b = "burst 256k cburst 256k quantum 60000";
        tc(&format!("qdisc add dev {d} root handle 1: htb default 30"))?;
        tc(&format!(
            "class add dev {d} parent 1: classid 1:1 htb rate {l}mbit ceil {l}mbit burst 256k cburst 256k"
        ))?;
        tc(&format!(
            "class add dev {d} parent 1:1 classid 1:10 htb rate {hi}mbit ceil {l}mbit prio 0 {b}"
        ))?;
        tc(&format!(
            "class add dev {d} parent 1:1 classid 1:20 htb rate {lo}mbit ceil {l}mbit prio 1 {b}"
        ))?;
        tc(&format!(
            "class add dev {d} parent 1:1 classid 1:30 htb rate {lo}mbit ceil {l}mbit prio 1 {b}"
        ))?;
        tc(&format!(
            "filter add dev {d} parent 1: protocol ip prio 1 u32 match ip dsfield {HIGH_TOS:#x} 0xfc flowid 1:10"
        ))?;
        tc(&format!(
            "filter add dev {d} parent 1: protocol ip prio 2 u32 match ip dsfield {LOW_TOS:#x} 0xfc flowid 1:20"
        ))
    }

    fn tx_bytes(&self) -> u64 {
        let mut c = in_ns(&self.src_ns, "cat");
        c.arg(format!("/sys/class/net/{}/statistics/tx_bytes", self.dev));
        c.output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = in_ns(&self.src_ns, "tc")
            .args(["qdisc", "del", "dev", &self.dev, "root"])
            .stderr(Stdio::null())
            .status();
        for ns in [&self.src_ns, &self.dst_ns].into_iter().flatten() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let mut c = Command::new(program);
    c.args(args);
    run_ok(c, &format!("{program} {}", args.join(" ")))
}

fn run_ok(mut c: Command, what: &str) -> Result<()> {
    let o = c.output().with_context(|| what.to_string())?;
    if !o.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// Every case, in order; the solo rate first.
pub fn run(a: &FabricArgs) -> Result<FabricRaw> {
    let link = if a.rdma {
        Link::roce_fabric()?
    } else {
        Link::namespaces()?
    };
    link.shape(a.link_mbit, a.low_percent)?;
    // A quarter of the link, MB/s.
    let cap = (a.link_mbit / 8 / 4).max(1);
    let cases: [(&str, u8, Option<Option<u8>>, u64); 5] = [
        ("IP flow alone", HIGH_TOS, None, 0),
        ("IP high, migration low", HIGH_TOS, Some(Some(10)), 0),
        ("migration high, IP low", LOW_TOS, Some(Some(46)), 0),
        ("unmarked, migration capped", 0, Some(None), cap),
        ("unmarked", 0, Some(None), 0),
    ];
    let mut runs = Vec::new();
    for (case, tos, migration, cap_mbs) in cases {
        let r = one(a, &link, case, tos, migration, cap_mbs).unwrap_or_else(|e| FabricRun {
            case: case.into(),
            ip_tos: tos,
            error: Some(format!("{e:#}")),
            ..Default::default()
        });
        eprintln!(
            "fabric {}: {case}: IP {:.0} Mbit/s, migration {:.0} Mbit/s{}{}",
            a.machine,
            r.ip_mbit,
            r.migration_mbit,
            if r.migrated {
                format!(" ({}, verified {})", r.status, r.verified)
            } else {
                String::new()
            },
            r.error
                .as_deref()
                .map_or(String::new(), |e| format!(" ERROR {e}"))
        );
        runs.push(r);
    }
    Ok(FabricRaw {
        date: crate::run::date(),
        machine: a.machine.clone(),
        transport: if a.rdma { "rdma" } else { "tcp" }.into(),
        link_mbit: a.link_mbit,
        low_percent: a.low_percent,
        mib: a.mib,
        seconds: a.seconds,
        runs,
    })
}

fn one(
    a: &FabricArgs,
    link: &Link,
    case: &str,
    tos: u8,
    migration: Option<Option<u8>>,
    cap_mbs: u64,
) -> Result<FabricRun> {
    let tmp = tempdir()?;
    // The destination listens before the IP flow starts: its start-up (in
    // the emulated VM, seconds) is not on the flow's clock.
    let dest = match migration {
        Some(dscp) => Some(start_dest(a, link, dscp, &tmp)?),
        None => None,
    };
    let mut server = in_ns(&link.dst_ns, "iperf3");
    server.args(["-s", "-1", "-J", "-i", "0.5", "-B", link.dst_ip]);
    if let Some((_, dev)) = link.bind {
        server.args(["--bind-dev", dev]);
    }
    let mut server = Reaper(vec![
        server.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let mut client = in_ns(&link.src_ns, "iperf3");
    // The receiver's intervals (what the link delivered), not the
    // sender's (what entered its socket buffer).
    client.args([
        "-c",
        link.dst_ip,
        "-J",
        "--get-server-output",
        "-i",
        "0.5",
        "-t",
    ]);
    client.arg(a.seconds.to_string());
    client.args(["-S", &tos.to_string()]);
    if let Some((dev, _)) = link.bind {
        client.args(["-B", link.src_ip, "--bind-dev", dev]);
    }
    // iperf3's own start time is whole seconds: the flow's clock is ours,
    // taken as it starts (it connects within milliseconds).
    let t0 = unix_now();
    let client = client
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let tx_before = link.tx_bytes();
    let rxe_before = rxe_sent();
    let mut run = FabricRun {
        case: case.into(),
        ip_tos: tos,
        cap_mbs,
        ..Default::default()
    };
    let mut window = None;
    let mut points_abs: Vec<(f64, f64)> = Vec::new();
    let mut migration_error = None;
    if let (Some(dscp), Some(dest)) = (migration, dest) {
        std::thread::sleep(Duration::from_secs_f64(MIGRATION_AT_S));
        run.migrated = true;
        run.migration_dscp = dscp;
        // Over RDMA the source counts a chain of WRITEs when it completes,
        // and a chain may be megabytes: the rxe port's packet counter,
        // sampled, gives the rate over time at a finer grain.
        let sampler = a.rdma.then(RxeSampler::start);
        let (report, mut points) = migrate(a, dest, dscp, cap_mbs, &tmp)?;
        if let Some(s) = sampler {
            let packets = s.stop();
            let total = report["bytes_transferred"].as_f64().unwrap_or(0.0);
            if let Some(p) = packets_as_bytes(&packets, total) {
                points = p;
            }
        }
        run.status = report["status"].as_str().unwrap_or_default().into();
        migration_error = report["error"].as_str().map(str::to_string);
        run.verified = report["verified"].as_bool().unwrap_or(false);
        run.migration_total_ms = report["total_ms"].as_f64().unwrap_or(0.0);
        run.our_bytes = report["bytes_transferred"].as_u64().unwrap_or(0);
        run.migration_overall_mbit =
            run.our_bytes as f64 * 8.0 / (run.migration_total_ms / 1e3).max(1e-3) / 1e6;
        // The data path's busy window: from its first progress to its
        // last (set-up and verification are not link time).
        window = points.first().zip(points.last()).map(|(f, l)| (f.0, l.0));
        run.migration_series = series(&points);
        points_abs = points;
    }
    let out = client.wait_with_output()?;
    run.link_tx_bytes = link.tx_bytes().saturating_sub(tx_before);
    run.rdma_sent_packets = rxe_sent().zip(rxe_before).map(|(a, b)| a.saturating_sub(b));
    let _ = server.0[0].wait();
    let ip: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 said no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = ip.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let intervals: Vec<(f64, f64, f64)> = ip["server_output_json"]["intervals"]
        .as_array()
        .context("iperf3's receiver intervals")?
        .iter()
        .filter_map(|i| {
            let s = &i["sum"];
            Some((
                s["start"].as_f64()?,
                s["end"].as_f64()?,
                s["bits_per_second"].as_f64()? / 1e6,
            ))
        })
        // The receiver's last, partial interval (the flow's tail drained
        // in a few milliseconds) says nothing about a rate.
        .filter(|(s, e, _)| e - s >= 0.25)
        .collect();
    run.ip_series = intervals
        .iter()
        .map(|&(s, e, r)| ((s + e) / 2.0, r))
        .collect();
    // The migration's series, from the IP flow's start.
    for p in &mut run.migration_series {
        p.0 -= t0;
    }
    let ip_end = intervals.last().map_or(0.0, |i| i.1);
    match window {
        // Alone: its run after the first second (slow start).
        None => run.ip_mbit = mean_over(&intervals, 1.0, f64::MAX),
        // Both on: the overlap of the migration's data path and the IP
        // flow (a low-class migration may outlast it).
        Some((from, to)) => {
            let (from, to) = ((from - t0).max(1.0), (to - t0).min(ip_end));
            if to - from < 0.5 {
                bail!(
                    "the migration's data path and the IP flow overlapped {:.1} s: too short to compare (give more --seconds)",
                    (to - from).max(0.0)
                );
            }
            run.ip_mbit = mean_over(&intervals, from, to);
            run.migration_mbit = rate_between(&points_abs, from + t0, to + t0);
        }
    }
    if run.migrated && (run.status != "completed" || !run.verified) {
        run.error = Some(format!(
            "the migration ended {} (verified {}){}",
            run.status,
            run.verified,
            migration_error.map_or(String::new(), |e| format!(": {e}"))
        ));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(run)
}

/// The mean rate over [from, to] of intervals (start, end, rate), each
/// weighted by its overlap.
fn mean_over(intervals: &[(f64, f64, f64)], from: f64, to: f64) -> f64 {
    let (mut w, mut sum) = (0.0, 0.0);
    for &(s, e, r) in intervals {
        let overlap = (e.min(to) - s.max(from)).max(0.0);
        w += overlap;
        sum += overlap * r;
    }
    if w > 0.0 { sum / w } else { 0.0 }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Cumulative (time, bytes) points as half-second (time, Mbit/s) steps.
fn series(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut last: Option<(f64, f64)> = None;
    for &(t, b) in points {
        if let Some((t0, b0)) = last {
            if t - t0 < 0.5 {
                continue;
            }
            out.push(((t + t0) / 2.0, (b - b0) * 8.0 / (t - t0) / 1e6));
        }
        last = Some((t, b));
    }
    out
}

/// The mean rate, Mbit/s, between two times of cumulative (time, bytes)
/// points, interpolating between points.
fn rate_between(points: &[(f64, f64)], from: f64, to: f64) -> f64 {
    let at = |t: f64| {
        let i = points.partition_point(|p| p.0 <= t);
        match (i.checked_sub(1).map(|j| points[j]), points.get(i)) {
            (Some(a), Some(b)) if b.0 > a.0 => a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0),
            (Some(a), _) => a.1,
            (None, Some(b)) => b.1,
            (None, None) => 0.0,
        }
    };
    if to <= from {
        return 0.0;
    }
    (at(to) - at(from)) * 8.0 / (to - from) / 1e6
}

/// rxe-a's sent-packet counter sampled every 100 ms: (unix s, packets).
struct RxeSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl RxeSampler {
    fn start() -> RxeSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(p) = rxe_sent() {
                    out.push((unix_now(), p as f64));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            out
        });
        RxeSampler { stop, thread }
    }

    fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Sampled packet counts as cumulative bytes of the migration (`total`
/// bytes over the packets sent between its first and last movement),
/// trimmed to when they moved.
fn packets_as_bytes(samples: &[(f64, f64)], total: f64) -> Option<Vec<(f64, f64)>> {
    let base = samples.first()?.1;
    let last = samples.last()?.1;
    if last <= base {
        return None;
    }
    let per_packet = total / (last - base);
    let first_move = samples.iter().position(|s| s.1 > base)?.saturating_sub(1);
    let last_move = samples.iter().position(|s| s.1 >= last)?;
    Some(
        samples[first_move..=last_move]
            .iter()
            .map(|&(t, p)| (t, (p - base) * per_packet))
            .collect(),
    )
}

/// rxe-a's packets sent, where there is one.
fn rxe_sent() -> Option<u64> {
    std::fs::read_to_string("/sys/class/infiniband/rxe-a/ports/1/hw_counters/sent_pkts")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "migrate-bench-fabric-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A destination listening across the link.
struct Dest<'a> {
    child: Reaper,
    addr: String,
    link: &'a Link,
}

/// Start the destination (marked as its source will be) and wait until it
/// listens.
fn start_dest<'a>(
    a: &FabricArgs,
    link: &'a Link,
    dscp: Option<u8>,
    tmp: &Path,
) -> Result<Dest<'a>> {
    let mut dest = in_ns(&link.dst_ns, &a.cli);
    dest.args([
        "dest",
        "--listen",
        &format!("{}:0", link.dst_ip),
        "--insecure",
    ])
    .arg("--json")
    .arg(tmp.join("d.json"));
    if a.rdma {
        dest.args(["--transport", "rdma", "--rdma-device", "rxe-b"]);
    }
    if let Some(d) = dscp {
        dest.args(["--dscp", &d.to_string()]);
    }
    let mut child = Reaper(vec![
        dest.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the destination")?,
    ]);
    let addr = Listening::read(&mut child.0[0])?.addr;
    Ok(Dest { child, addr, link })
}

/// One migration across the link: the source's report and its data
/// path's bytes over time ((unix seconds, bytes) from its events).
fn migrate(
    a: &FabricArgs,
    dest: Dest<'_>,
    dscp: Option<u8>,
    cap_mbs: u64,
    tmp: &Path,
) -> Result<(serde_json::Value, Vec<(f64, f64)>)> {
    let (sj, ev) = (tmp.join("s.json"), tmp.join("ev.jsonl"));
    let Dest {
        mut child,
        addr,
        link,
    } = dest;
    let mut source = in_ns(&link.src_ns, &a.cli);
    source
        .args(["source", "--insecure", "--progress", "never", "--verify"])
        .args(["--memory", &format!("{}M", a.mib)])
        .args(["--guest", "dirty", "--dirty-rate", "1000"])
        .arg("--json")
        .arg(&sj)
        .arg("--events")
        .arg(&ev);
    if a.rdma {
        source.args(["--transport", "rdma", "--rdma-device", "rxe-a"]);
    }
    if let Some(d) = dscp {
        source.args(["--dscp", &d.to_string()]);
    }
    if cap_mbs > 0 {
        source.args(["--bandwidth-mbs", &cap_mbs.to_string()]);
    }
    let s = source
        .arg("--connect")
        .arg(&addr)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running the source")?;
    let _ = child.0[0].wait();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sj).with_context(|| {
            format!(
                "no source report: {}",
                String::from_utf8_lossy(&s.stderr).trim()
            )
        })?)?;
    let mut points = Vec::new();
    for l in std::fs::read_to_string(&ev).unwrap_or_default().lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if let (Some(t), Some(b)) = (e["time"].as_f64(), e["stats"]["bytes_transferred"].as_f64()) {
            points.push((t, b));
        }
    }
    Ok((report, points))
}

/// The raw results of each machine that was measured.
pub fn load(results: &Path) -> Result<Vec<FabricRaw>> {
    let mut out = Vec::new();
    for machine in ["host", "vm"] {
        if let Some(raw) = crate::load_raw::<FabricRaw>(results, &format!("{RAW}{machine}.json"))? {
            out.push(raw);
        }
    }
    Ok(out)
}

/// Where `run` writes a machine's raw results.
pub fn raw_path(results: &Path, machine: &str) -> PathBuf {
    results.join(format!("{RAW}{machine}.json"))
}

fn class(tos: Option<u8>) -> &'static str {
    match tos {
        Some(HIGH_TOS) => "high (EF)",
        Some(LOW_TOS) => "low (AF11)",
        _ => "default",
    }
}

/// The IP flow's solo rate in a machine's runs.
fn solo(raw: &FabricRaw) -> Option<f64> {
    raw.runs
        .iter()
        .find(|r| !r.migrated && r.error.is_none())
        .map(|r| r.ip_mbit)
}

/// The section of results.md.
pub fn markdown(raws: &[FabricRaw]) -> String {
    let mut md = String::from(
        "\n## Sharing a link: a migration beside an IP flow\n\n\
         An iperf3 TCP flow and a `migrate-cli` migration of a dirtying guest (verified) share one link, \
         shaped by HTB on its sending end into a high class (DSCP 46: the rest guaranteed, first to borrow), \
         a low one (DSCP 10: a small share guaranteed, in each heading) and the default (as low); the migration starts 2 s into the flow and is \
         marked with `--dscp` (over RDMA its queue pairs' traffic class). Both rates are means over the \
         window when both flowed (the migration's data path busy, the IP flow on; a low-class migration \
         may outlast the IP flow and then finishes at the link's rate: its overall rate and time \
         include that, its set-up and its verification), against the IP flow's rate alone. BENCHMARKS.md says how to read it; \
         `results-fabric.png` plots both rates over time.\n",
    );
    for raw in raws {
        md += &format!(
            "\n### {} ({}, {} MiB guest, link {} Mbit/s, low and default classes {} % guaranteed, {})\n\n\
             | case | IP class | migration class | IP Mbit/s | IP / alone | migration Mbit/s | migration overall Mbit/s | migration s | verified |\n\
             |---|---|---|---:|---:|---:|---:|---:|---|\n",
            raw.machine, raw.transport, raw.mib, raw.link_mbit, raw.low_percent, raw.date
        );
        let alone = solo(raw);
        for r in &raw.runs {
            if let Some(e) = &r.error {
                md += &format!(
                    "| {} | failed: {} | | | | | | | |\n",
                    r.case,
                    e.replace('|', "/")
                );
                continue;
            }
            let share = alone.map_or("–".into(), |s| format!("{:.0} %", r.ip_mbit / s * 100.0));
            let mclass = if !r.migrated {
                "–".to_string()
            } else if r.cap_mbs > 0 {
                format!(
                    "{} (capped {} MB/s)",
                    class(r.migration_dscp.map(|d| d << 2)),
                    r.cap_mbs
                )
            } else {
                class(r.migration_dscp.map(|d| d << 2)).to_string()
            };
            md += &format!(
                "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
                r.case,
                class(Some(r.ip_tos)),
                mclass,
                r.ip_mbit,
                if r.migrated { share } else { "100 %".into() },
                if r.migrated {
                    format!("{:.0}", r.migration_mbit)
                } else {
                    "–".into()
                },
                if r.migrated {
                    format!("{:.0}", r.migration_overall_mbit)
                } else {
                    "–".into()
                },
                if r.migrated {
                    format!("{:.1}", r.migration_total_ms / 1e3)
                } else {
                    "–".into()
                },
                if r.migrated {
                    r.verified.to_string()
                } else {
                    "–".into()
                },
            );
        }
        if let (Some(s), Some(r)) = (
            alone,
            raw.runs
                .iter()
                .find(|r| r.case == "IP high, migration low" && r.error.is_none()),
        ) {
            let kept = r.ip_mbit / s;
            md += &if raw.low_percent > 10 {
                format!(
                    "\nTarget: the IP flow in the high class keeps ≥ 90 % of its solo rate while a low-class migration completes verified: not judged here — the low class is guaranteed {} % of the link, so the high one can keep at most about {} % (kept {:.0} %; migration verified: {}).\n",
                    raw.low_percent,
                    100 - raw.low_percent,
                    kept * 100.0,
                    r.verified
                )
            } else {
                format!(
                    "\nTarget: the IP flow in the high class keeps ≥ 90 % of its solo rate while a low-class migration completes verified: **{:.0} % — {}**.\n",
                    kept * 100.0,
                    if kept >= 0.9 && r.verified {
                        "met"
                    } else {
                        "missed"
                    }
                )
            };
        }
        if let Some(r) = raw
            .runs
            .iter()
            .find(|r| r.rdma_sent_packets.is_some() && r.migrated)
        {
            let packets = r.rdma_sent_packets.unwrap_or(0);
            md += &format!(
                "\nThe NIC's own count beside ours, in the `{}` case: rxe-a sent {} packets for the migration's {:.1} MiB of data path ({:.0} bytes of ours a packet: the RoCE MTU's payload, less the acknowledgements and fences rxe-a sends too); fab-a carried {:.1} MiB in all, the IP flow's {} s included.\n",
                r.case,
                packets,
                r.our_bytes as f64 / 1048576.0,
                r.our_bytes as f64 / packets.max(1) as f64,
                r.link_tx_bytes as f64 / 1048576.0,
                raw.seconds,
            );
        }
    }
    md
}

/// `results-fabric.png`: per machine and case, both flows' rates over
/// time.
pub fn draw(path: &Path, raws: &[FabricRaw]) -> Result<()> {
    use plotters::prelude::*;
    let panels: Vec<(&FabricRaw, &FabricRun)> = raws
        .iter()
        .flat_map(|raw| {
            raw.runs
                .iter()
                .filter(|r| r.migrated && r.error.is_none())
                .map(move |r| (raw, r))
        })
        .collect();
    if panels.is_empty() {
        return Ok(());
    }
    crate::plot::load_font()?;
    let cols = 4;
    let rows = panels.len().div_ceil(cols);
    let root = BitMapBackend::new(path, (1800, 420 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, cols));
    for ((raw, r), area) in panels.iter().zip(areas) {
        let x_max = r
            .ip_series
            .iter()
            .chain(&r.migration_series)
            .map(|p| p.0)
            .fold(1.0, f64::max);
        let y_max = r
            .ip_series
            .iter()
            .chain(&r.migration_series)
            .map(|p| p.1)
            .fold(raw.link_mbit as f64, f64::max)
            .min(raw.link_mbit as f64 * 1.5)
            * 1.1;
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{} ({}): {}", raw.machine, raw.transport, r.case),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("s")
            .y_desc("Mbit/s")
            .label_style(("sans-serif", 14))
            .draw()?;
        let link = vec![(0.0, raw.link_mbit as f64), (x_max, raw.link_mbit as f64)];
        for (points, label, style) in [
            (&r.ip_series, "IP flow (iperf3)", BLUE.stroke_width(2)),
            (&r.migration_series, "migration", RED.stroke_width(2)),
            (&link, "link", BLACK.mix(0.4).stroke_width(1)),
        ] {
            chart
                .draw_series(LineSeries::new(points.iter().copied(), style))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        if r.cap_mbs > 0 {
            let c = r.cap_mbs as f64 * 8.0;
            chart.draw_series(LineSeries::new([(0.0, c), (x_max, c)], RED.mix(0.3)))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_weights_each_interval_by_its_overlap() {
        let iv = [(0.0, 0.5, 100.0), (0.5, 1.0, 200.0), (1.0, 1.5, 400.0)];
        assert_eq!(mean_over(&iv, 0.5, 1.0), 200.0);
        assert_eq!(mean_over(&iv, 0.75, 1.25), 300.0);
        assert_eq!(mean_over(&iv, 5.0, 6.0), 0.0);
    }

    #[test]
    fn packet_samples_become_the_moving_part_in_bytes() {
        let s = [
            (0.0, 5.0),
            (1.0, 5.0),
            (2.0, 15.0),
            (3.0, 25.0),
            (4.0, 25.0),
        ];
        let p = packets_as_bytes(&s, 2000.0).unwrap();
        assert_eq!(p, vec![(1.0, 0.0), (2.0, 1000.0), (3.0, 2000.0)]);
        assert_eq!(packets_as_bytes(&[(0.0, 1.0), (1.0, 1.0)], 10.0), None);
    }

    #[test]
    fn a_rate_between_interpolates_cumulative_bytes() {
        let p = [(10.0, 0.0), (11.0, 1e6), (13.0, 1e6)];
        assert!((rate_between(&p, 10.0, 11.0) - 8.0).abs() < 1e-9);
        assert!((rate_between(&p, 10.5, 11.5) - 4.0).abs() < 1e-9);
        assert_eq!(rate_between(&p, 11.0, 13.0), 0.0);
    }
}
