//! Running the matrix: each run is a `migrate-cli dest` and a
//! `migrate-cli source` process (in their network namespaces), both writing
//! JSON reports. Every run's bytes are checked after the fact (`--digest`
//! on both sides: one hash of every page, taken after the commit, must be
//! equal), so the downtime is measured as an operator without `--verify`
//! sees it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ceiling::{self, Ceiling};
use crate::netns::in_ns;
use crate::plan::{self, Case, DOWNTIME_MS, STREAMS, Site};

/// `migrate-bench run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Where to migrate: host-loopback, host-veth (namespaces mig-src and
    /// mig-dst joined by a veth pair, 10.198.0.1/.2), vm-loopback (RDMA on
    /// rxe0 and TCP, inside the SoftRoCE VM).
    #[arg(long = "site", required = true)]
    pub sites: Vec<String>,
    /// The migrate-cli binary.
    #[arg(long, default_value = "target/release/migrate-cli")]
    pub cli: PathBuf,
    /// Runs per matrix cell (medians and min–max are reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Smallest matrix: one size, one mix, idle and moderate, one run each.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per ceiling measurement (iperf3, perftest).
    #[arg(long, default_value_t = 5)]
    pub ceiling_secs: u32,
    /// Write the raw results here (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// The command line to record with the results.
    #[arg(long, default_value = "")]
    pub command_line: String,
    /// Only these transports of each site (e.g. `--transport tcp
    /// --transport tcp-tls` to measure what TLS costs alone); all by
    /// default.
    #[arg(long = "transport")]
    pub transports: Vec<String>,
    /// Only the idle random cells with a preallocated destination (the
    /// bulk first passes that the ceilings and the TLS ratios compare).
    #[arg(long)]
    pub bulk_only: bool,
}

/// Everything one `migrate-bench run` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Raw {
    /// UTC, RFC 3339.
    pub date: String,
    /// The command that produced it.
    pub command: String,
    pub machine: Machine,
    pub sites: Vec<Site>,
    pub ceilings: Vec<Ceiling>,
    pub runs: Vec<RunResult>,
}

/// Where it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
    /// `host`, or how the VM was made.
    pub kind: String,
}

/// One migration's figures (from both sides' JSON reports).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunResult {
    pub case: Option<Case>,
    pub rep: usize,
    /// Why the run did not produce a verified migration.
    pub error: Option<String>,
    pub transport: String,
    /// Dirty tracker the source used.
    pub tracker: String,
    pub verified: bool,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub verify_ms: f64,
    pub setup_ms: f64,
    pub connect_ms: f64,
    pub bytes_total: u64,
    pub bytes_transferred: u64,
    pub rounds: u64,
    pub first_pass_mbps: f64,
    pub avg_mbps: f64,
    pub dirty_rate_pps: f64,
    pub throttle_percent: u64,
    pub src_cpu_ms: f64,
    pub dst_cpu_ms: f64,
    pub src_overhead_bytes: u64,
    pub dst_overhead_bytes: u64,
}

impl RunResult {
    /// Downtime without the `--verify` comparison (what an operator who
    /// does not ask for it sees).
    pub fn downtime_net_ms(&self) -> f64 {
        (self.downtime_ms - self.verify_ms).max(0.0)
    }
}

pub fn run(a: &RunArgs) -> Result<Raw> {
    if !a.cli.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p migrate-cli)",
            a.cli.display()
        );
    }
    let sites = a
        .sites
        .iter()
        .map(|s| {
            let mut site = Site::named(s)?;
            if !a.transports.is_empty() {
                site.transports.retain(|t| a.transports.contains(t));
            }
            Ok(site)
        })
        .collect::<Result<Vec<_>>>()?;
    let tmp = std::env::temp_dir().join(format!("migrate-bench.{}", std::process::id()));
    // An earlier run under the same process id left nothing to read.
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut raw = Raw {
        date: date(),
        command: a.command_line.clone(),
        machine: machine(&sites),
        sites: sites.clone(),
        ceilings: Vec::new(),
        runs: Vec::new(),
    };
    let reps = if a.quick { 1 } else { a.repeat.max(1) };
    raw.ceilings.extend(ceiling::memory(reps));
    for site in &sites {
        raw.ceilings
            .extend(ceiling::network(site, reps, a.ceiling_secs)?);
        let mut cases = plan::matrix(site, a.quick);
        if a.bulk_only {
            cases.retain(|c| c.mix == "random" && c.load == "idle" && c.prefault);
        }
        let n = cases.len() * reps;
        let mut i = 0;
        for case in &cases {
            for rep in 0..reps {
                i += 1;
                let r = migrate(&a.cli, site, case, rep, &tmp);
                match &r.error {
                    None => eprintln!(
                        "[{i}/{n}] {} #{rep}: {:.0} Mbit/s first pass, {:.0} ms total, {:.1} ms downtime ({:.1} verify), {} rounds",
                        case.key(),
                        r.first_pass_mbps,
                        r.total_ms,
                        r.downtime_ms,
                        r.verify_ms,
                        r.rounds
                    ),
                    Some(e) => eprintln!("[{i}/{n}] {} #{rep}: FAILED: {e}", case.key()),
                }
                raw.runs.push(r);
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(raw)
}

fn migrate(cli: &Path, site: &Site, case: &Case, rep: usize, tmp: &Path) -> RunResult {
    let mut r = RunResult {
        case: Some(case.clone()),
        rep,
        ..Default::default()
    };
    if let Err(e) = migrate_into(cli, site, case, tmp, &mut r) {
        r.error = Some(format!("{e:#}"));
    }
    r
}

fn migrate_into(cli: &Path, site: &Site, case: &Case, tmp: &Path, r: &mut RunResult) -> Result<()> {
    let (djson, sjson): (PathBuf, PathBuf) = (tmp.join("d.json"), tmp.join("s.json"));
    let _ = std::fs::remove_file(&djson);
    let _ = std::fs::remove_file(&sjson);
    let streams = STREAMS.to_string();
    // `tcp-tls` is TCP with mutual TLS (a pre-shared key: the same TLS 1.3
    // records as certificates), sealed by migrate-cli; `tcp-ktls` the same
    // sealed by the kernel; plaintext between namespaces has to be asked
    // for.
    let (transport, auth): (&str, Vec<String>) = match case.transport.as_str() {
        t if crate::plan::is_tls(t) => {
            let key = tmp.join("bench.psk");
            // 32 bytes as hex, readable by the bench alone (the CLI refuses
            // a key file others can read).
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let _ = std::fs::remove_file(&key);
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key)?
                    .write_all(
                        b"6d696772617465206265e5c8207072652d736861726564206b65792030313233",
                    )?;
            }
            let kernel = if t == "tcp-ktls" { "on" } else { "off" };
            (
                "tcp",
                vec![
                    "--psk-file".into(),
                    key.display().to_string(),
                    "--kernel-tls".into(),
                    kernel.into(),
                ],
            )
        }
        t if site.dst_ns.is_some() => (t, vec!["--insecure".into()]),
        t => (t, Vec::new()),
    };
    let mut dest = in_ns(&site.dst_ns, cli);
    dest.args(["dest", "--listen", &format!("{}:0", site.dst_ip)])
        .args(["--transport", transport, "--streams", &streams])
        .args(&auth)
        .args(["--digest", "--json"])
        .arg(&djson)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if case.prefault {
        dest.arg("--prefault");
    }
    let mut dest = dest.spawn().context("starting migrate-cli dest")?;
    let mut out = BufReader::new(dest.stdout.take().context("dest stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = dest.kill();
        let err = dest
            .wait_with_output()
            .map(|o| o.stderr)
            .unwrap_or_default();
        bail!(
            "destination did not listen: {line:?} {}",
            String::from_utf8_lossy(&err)
        );
    };
    let src = in_ns(&site.src_ns, cli)
        .args(["source", "--connect", addr])
        .args(["--transport", transport, "--streams", &streams])
        .args(&auth)
        .args(["--memory", &format!("{}M", case.size_mib)])
        .args(["--downtime-ms", &DOWNTIME_MS.to_string()])
        .args(["--digest", "--progress", "never", "--timeout-s", "300"])
        .arg("--json")
        .arg(&sjson)
        .args(case.guest_args(site))
        .output()
        .context("running migrate-cli source")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dstatus = loop {
        if let Some(s) = dest.try_wait()? {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = dest.kill();
            let _ = dest.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !src.status.success() {
        bail!(
            "source exited with {}: {}",
            src.status,
            String::from_utf8_lossy(&src.stderr).trim()
        );
    }
    match dstatus {
        Some(s) if s.success() => {}
        other => bail!("destination ended with {other:?}"),
    }
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&sjson)?)?;
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&djson)?)?;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    r.transport = s["transport"].as_str().unwrap_or("").into();
    r.tracker = s["tracker"].as_str().unwrap_or("").into();
    // The destination's memory after the commit equals the paused source's.
    r.verified = s["memory_digest"].is_string() && s["memory_digest"] == d["memory_digest"];
    r.total_ms = f(&s, "total_ms");
    r.downtime_ms = f(&s, "downtime_ms");
    r.verify_ms = f(&s, "verify_ms");
    r.setup_ms = f(&s, "setup_ms");
    r.connect_ms = f(&s, "connect_ms");
    r.bytes_total = u(&s, "bytes_total");
    r.bytes_transferred = u(&s, "bytes_transferred");
    r.rounds = u(&s, "rounds");
    r.first_pass_mbps = f(&s, "first_pass_mbps");
    r.avg_mbps = f(&s, "throughput_mbps");
    r.dirty_rate_pps = f(&s, "dirty_rate_pps");
    r.throttle_percent = u(&s, "throttle_percent");
    r.src_cpu_ms = f(&s["resources"], "cpu_ms");
    r.dst_cpu_ms = f(&d["resources"], "cpu_ms");
    r.src_overhead_bytes = u(&s["resources"], "overhead_bytes");
    r.dst_overhead_bytes = u(&d["resources"], "overhead_bytes");
    if r.transport != transport {
        bail!("ran over {} instead of {}", r.transport, transport);
    }
    let authenticated = s["authentication"].as_str().unwrap_or("none") != "none";
    if authenticated != crate::plan::is_tls(&case.transport) {
        bail!(
            "authentication {} in a {} run",
            s["authentication"],
            case.transport
        );
    }
    digests_equal(&s, &d)
}

/// Whether the source's and the destination's reports (`--digest`) hold the
/// same memory digest; the error says both when not.
pub(crate) fn digests_equal(s: &Value, d: &Value) -> Result<()> {
    if s["memory_digest"].is_string() && s["memory_digest"] == d["memory_digest"] {
        return Ok(());
    }
    bail!(
        "the destination's memory differs from the source's: digest {} vs {}",
        s["memory_digest"],
        d["memory_digest"]
    )
}

pub fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// This machine's CPU model (`/proc/cpuinfo`), or empty.
pub fn cpu_model() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}

fn machine(sites: &[Site]) -> Machine {
    let cpu = cpu_model();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let vm = sites.iter().any(|s| s.name.starts_with("vm-"));
    Machine {
        kernel,
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_gib: mem_kib / (1024.0 * 1024.0),
        kind: if vm {
            "SoftRoCE VM: vng --disable-kvm (QEMU TCG, emulated CPUs) on the host below".into()
        } else {
            "host".into()
        },
    }
}
