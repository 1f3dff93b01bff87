//! `migrate-bench boot-sector`: QEMU and mini-vmm live-migrating the same
//! running PC boot sector under KVM, in one run, interleaved.
//!
//! The guest is our sweeper (`mini-vmm guest sweeper`): it adds one to a
//! byte of every page from 1 MiB to `--sweep-end-mib`, sweep after sweep,
//! and prints `B` on COM1 after each. Both engines boot it from the same
//! image, let it run `--run-before-ms`, then migrate it live over loopback
//! TCP with the same number of channels and the same 300 ms downtime limit,
//! into a destination whose memory is a fresh (sparse) file in /dev/shm:
//!
//! - QEMU (`accel=kvm`, `memory-backend-file,share=on`, the image as its IDE
//!   disk, booted by SeaBIOS), multifd, no bandwidth cap, driven over QMP.
//!   Time, downtime and rounds (`dirty-sync-count`) are what `query-migrate`
//!   reports; the CPU is both processes' from `migrate` to the
//!   `completed` event.
//! - mini-vmm (`source --boot-sector`, `dest --memory-file`, `--transport
//!   tcp`): time, downtime and rounds from its JSON reports; the CPU is each
//!   process's over the migration (`resources.process_cpu_ms`).
//!
//! Both CPU figures include the guest's own vCPU time, which runs flat out
//! in both. After each migration the destination's guest must print on
//! (it runs there), then it is stopped and its memory file must obey the
//! sweep rule: every page below the sweep's position one ahead of the rest.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::qemu::{Qmp, Reaper, cpu_s, free_port, qemu_version};

/// `migrate-bench boot-sector`.
#[derive(Debug, Clone, clap::Args)]
pub struct BootArgs {
    /// The mini-vmm binary.
    #[arg(long, default_value = "target/release/mini-vmm")]
    pub mini_vmm: PathBuf,
    /// QEMU's system emulator.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 150)]
    pub memory_mib: u64,
    /// The sweep runs from 1 MiB to here.
    #[arg(long, default_value_t = 100)]
    pub sweep_end_mib: u64,
    /// QEMU multifd channels, our data streams.
    #[arg(long, default_value_t = 2)]
    pub channels: u16,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value_t = 1000)]
    pub run_before_ms: u64,
    /// Runs per engine (medians, min–max).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Where the memory files go (memory-backed).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Write the raw results here (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// The command line to record with the results.
    #[arg(long, default_value = "")]
    pub command_line: String,
    /// Post-copy instead: QEMU with `postcopy-ram` (switched by
    /// `migrate-start-postcopy` after its first pass; QEMU 7.2 has no
    /// post-copy with multifd, so one channel), mini-vmm with
    /// `--postcopy-after-rounds 1`.
    #[arg(long)]
    pub postcopy: bool,
}

/// Everything one `migrate-bench boot-sector` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootRaw {
    pub date: String,
    pub command: String,
    pub kernel: String,
    pub qemu_version: String,
    pub memory_mib: u64,
    pub sweep_end_mib: u64,
    pub channels: u16,
    pub run_before_ms: u64,
    /// Post-copy (else pre-copy).
    #[serde(default)]
    pub postcopy: bool,
    pub runs: Vec<BootRun>,
}

/// One live migration of the running guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BootRun {
    /// `qemu` or `ours`.
    pub engine: String,
    pub rep: usize,
    /// The engine's own end-to-end time and downtime, ms.
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// Rounds (QEMU: dirty bitmap syncs).
    pub rounds: u64,
    /// CPU seconds of the source and the destination process.
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
    /// The guest's pace on the source before the migration (sweeps/s):
    /// the same code can run at different speeds under two VMMs, and a
    /// faster guest dirties more.
    pub sweeps_per_s: f64,
    /// Auto-converge's last throttle, percent.
    pub throttle_percent: u64,
    /// Sweeps the guest printed on the destination before it was stopped.
    pub sweeps_after: usize,
    /// The destination's memory obeys the sweep rule.
    pub consistent: bool,
    pub error: Option<String>,
}

impl BootRun {
    pub fn cpu_s(&self) -> f64 {
        self.src_cpu_s + self.dst_cpu_s
    }
}

/// Files of one run.
struct Files {
    image: PathBuf,
    dst_mem: PathBuf,
    src_mem: PathBuf,
    tmp: PathBuf,
}

pub fn run(a: &BootArgs) -> Result<BootRaw> {
    let qemu_version = qemu_version(&a.qemu)?;
    if !a.mini_vmm.exists() {
        bail!("{} not found: build it first", a.mini_vmm.display());
    }
    let tag = std::process::id();
    let tmp = std::env::temp_dir().join(format!("migrate-bench-boot.{tag}"));
    // An earlier run under the same process id left nothing to read.
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let f = Files {
        image: tmp.join("sweeper.img"),
        dst_mem: a.dir.join(format!("migrate-bench-boot-dst.{tag}")),
        src_mem: a.dir.join(format!("migrate-bench-boot-src.{tag}")),
        tmp: tmp.clone(),
    };
    let end = format!("{}M", a.sweep_end_mib);
    let o = Command::new(&a.mini_vmm)
        .args(["guest", "sweeper", "--start", "1M", "--end", &end, "--out"])
        .arg(&f.image)
        .output()
        .context("running mini-vmm guest sweeper")?;
    if !o.status.success() {
        bail!(
            "mini-vmm guest sweeper: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut raw = BootRaw {
        date: crate::run::date(),
        command: a.command_line.clone(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        qemu_version,
        memory_mib: a.memory_mib,
        sweep_end_mib: a.sweep_end_mib,
        channels: a.channels,
        run_before_ms: a.run_before_ms,
        postcopy: a.postcopy,
        runs: Vec::new(),
    };
    for rep in 0..a.repeat.max(1) {
        for engine in ["qemu", "ours"] {
            for p in [&f.dst_mem, &f.src_mem] {
                let _ = std::fs::remove_file(p);
            }
            // Fresh destination memory for both: a sparse file.
            std::fs::File::create(&f.dst_mem)?.set_len(a.memory_mib << 20)?;
            let mut r = BootRun {
                engine: engine.into(),
                rep,
                ..Default::default()
            };
            let outcome = match engine {
                "qemu" => qemu_run(a, &f, &mut r),
                _ => ours_run(a, &f, &mut r),
            }
            .and_then(|()| check_memory(a, &f.dst_mem, &mut r));
            if let Err(e) = outcome {
                r.error = Some(format!("{e:#}"));
            }
            match &r.error {
                None => eprintln!(
                    "boot-sector {engine} #{rep}: guest at {:.1} sweeps/s, {:.0} ms, downtime \
                     {:.1} ms, {} rounds, throttle {} %, CPU {:.2} s; {} sweeps on the \
                     destination, memory consistent",
                    r.sweeps_per_s,
                    r.total_ms,
                    r.downtime_ms,
                    r.rounds,
                    r.throttle_percent,
                    r.cpu_s(),
                    r.sweeps_after
                ),
                Some(e) => eprintln!("boot-sector {engine} #{rep}: FAILED: {e}"),
            }
            raw.runs.push(r);
        }
    }
    for p in [&f.dst_mem, &f.src_mem] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(raw)
}

/// The sweep rule over the destination's memory file.
fn check_memory(a: &BootArgs, mem: &Path, r: &mut BootRun) -> Result<()> {
    let ram = std::fs::read(mem).with_context(|| format!("reading {}", mem.display()))?;
    let end = usize::try_from(a.sweep_end_mib << 20)?.min(ram.len());
    let pages: Vec<u8> = (1 << 20..end).step_by(4096).map(|at| ram[at]).collect();
    match mini_vmm::boot::check_sweep(&pages) {
        Ok(_) => {
            r.consistent = true;
            Ok(())
        }
        Err(e) => bail!("the destination's memory breaks the sweep rule: {e}"),
    }
}

/// Bytes in a file (0 when it is not there yet).
fn file_len(p: &Path) -> usize {
    std::fs::metadata(p).map_or(0, |m| m.len() as usize)
}

/// Wait (`limit` at most) until `cond`.
fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn qemu_run(a: &BootArgs, f: &Files, r: &mut BootRun) -> Result<()> {
    let mib = a.memory_mib;
    // Each QEMU gets its own copy of the disk (QEMU locks its images).
    let (src_img, dst_img) = (f.tmp.join("src.img"), f.tmp.join("dst.img"));
    std::fs::copy(&f.image, &src_img)?;
    std::fs::copy(&f.image, &dst_img)?;
    let (src_serial, dst_serial) = (f.tmp.join("qsrc.txt"), f.tmp.join("qdst.txt"));
    let qemu = |mem: &Path, img: &Path, serial: &Path, qmp: &Path, incoming: bool| {
        let mut c = Command::new(&a.qemu);
        c.args(["-machine", "pc,accel=kvm,memory-backend=mem"])
            .args(["-m", &format!("{mib}M")])
            .args(["-display", "none", "-nodefaults"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={mib}M,mem-path={},share=on",
                mem.display()
            ))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=ide", img.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        c.spawn().context("starting QEMU")
    };
    let (sq, dq) = (f.tmp.join("src.qmp"), f.tmp.join("dst.qmp"));
    for p in [&sq, &dq, &src_serial, &dst_serial] {
        let _ = std::fs::remove_file(p);
    }
    let mut procs = Reaper(vec![qemu(&f.src_mem, &src_img, &src_serial, &sq, false)?]);
    procs
        .0
        .push(qemu(&f.dst_mem, &dst_img, &dst_serial, &dq, true)?);
    let mut s = Qmp::connect(&sq, &mut procs.0[0])?;
    let mut d = Qmp::connect(&dq, &mut procs.0[1])?;
    for q in [&mut s, &mut d] {
        let (mode, params) = if a.postcopy {
            (
                "postcopy-ram",
                json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 300 }),
            )
        } else {
            (
                "multifd",
                json!({ "multifd-channels": a.channels, "max-bandwidth": 1u64 << 40,
                        "downtime-limit": 300 }),
            )
        };
        q.cmd(
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": mode, "state": true },
                { "capability": "events", "state": true },
            ]}),
        )?;
        q.cmd("migrate-set-parameters", params)?;
    }
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    d.cmd("migrate-incoming", json!({ "uri": uri }))?;
    // The guest booted and sweeps: then let it run as long as ours does.
    wait_until("QEMU's guest printing", Duration::from_secs(60), || {
        file_len(&src_serial) > 0
    })?;
    let (first, printed) = (Instant::now(), file_len(&src_serial));
    std::thread::sleep(Duration::from_millis(a.run_before_ms));
    r.sweeps_per_s = (file_len(&src_serial) - printed) as f64 / first.elapsed().as_secs_f64();
    let (spid, dpid) = (procs.0[0].id(), procs.0[1].id());
    let (s0, d0) = (cpu_s(spid)?, cpu_s(dpid)?);
    s.cmd("migrate", json!({ "uri": uri }))?;
    if a.postcopy {
        // After the first pass (its second bitmap sync), as ours switches
        // after its first round.
        let start = Instant::now();
        while s.cmd("query-migrate", json!({}))?["ram"]["dirty-sync-count"]
            .as_u64()
            .unwrap_or(0)
            < 2
        {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("QEMU's first pass: not within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        s.cmd("migrate-start-postcopy", json!({}))?;
    }
    let status = d.migration_end()?;
    r.src_cpu_s = cpu_s(spid)? - s0;
    r.dst_cpu_s = cpu_s(dpid)? - d0;
    if status != "completed" {
        bail!("QEMU's migration ended {status}");
    }
    // In post-copy the destination completes first; the source follows.
    let asked = Instant::now();
    let info = loop {
        let info = s.cmd("query-migrate", json!({}))?;
        if info["status"] == "completed" {
            break info;
        }
        if asked.elapsed() > Duration::from_secs(10) {
            bail!("the source says {}", info["status"]);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    r.total_ms = num(&info["total-time"]);
    r.downtime_ms = num(&info["downtime"]);
    r.rounds = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
    r.throttle_percent = info["cpu-throttle-percentage"].as_u64().unwrap_or(0);
    // It runs on over there: two more sweeps, then stop it and read its RAM.
    let printed = file_len(&dst_serial);
    wait_until(
        "QEMU's guest printing on the destination",
        Duration::from_secs(60),
        || file_len(&dst_serial) >= printed + 2,
    )?;
    d.cmd("stop", json!({}))?;
    r.sweeps_after = file_len(&dst_serial);
    Ok(())
}

fn ours_run(a: &BootArgs, f: &Files, r: &mut BootRun) -> Result<()> {
    let (sj, dj) = (f.tmp.join("s.json"), f.tmp.join("d.json"));
    let (src_serial, dst_serial) = (f.tmp.join("osrc.txt"), f.tmp.join("odst.txt"));
    let streams = a.channels.to_string();
    let mut dest = Command::new(&a.mini_vmm);
    dest.args(["dest", "--listen", "127.0.0.1:0", "--transport", "tcp"])
        .args(["--streams", &streams, "--run-for-s", "1"])
        .arg("--memory-file")
        .arg(&f.dst_mem)
        .arg("--serial")
        .arg(&dst_serial)
        .arg("--json")
        .arg(&dj)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut procs = Reaper(vec![dest.spawn().context("starting mini-vmm dest")?]);
    let mut out = BufReader::new(procs.0[0].stdout.take().context("dest stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        bail!("the destination did not get ready: {line:?}");
    };
    let postcopy: &[&str] = if a.postcopy {
        &["--postcopy-after-rounds", "1"]
    } else {
        &[]
    };
    let src: Child = Command::new(&a.mini_vmm)
        .args(["source", "--connect", addr, "--transport", "tcp"])
        .args(postcopy)
        .args(["--streams", &streams, "--downtime-ms", "300"])
        .args(["--memory", &format!("{}M", a.memory_mib)])
        .args(["--start-after-ms", &a.run_before_ms.to_string()])
        .arg("--boot-sector")
        .arg(&f.image)
        .arg("--serial")
        .arg(&src_serial)
        .arg("--json")
        .arg(&sj)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mini-vmm source")?;
    let src = src.wait_with_output()?;
    // "guest running: … N serial bytes; migrating …" after --start-after-ms.
    let said = String::from_utf8_lossy(&src.stderr);
    let printed = said
        .split(" serial bytes;")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    r.sweeps_per_s = printed.unwrap_or(0.0) / (a.run_before_ms.max(1) as f64 / 1e3);
    if !src.status.success() {
        bail!(
            "source exited with {}: {}",
            src.status,
            String::from_utf8_lossy(&src.stderr).trim()
        );
    }
    let dstatus = procs.0[0].wait()?;
    if !dstatus.success() {
        bail!("destination exited with {dstatus}");
    }
    let report =
        |p: &Path| -> Result<Value> { Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?) };
    let (s, d) = (report(&sj)?, report(&dj)?);
    if s["status"] != "completed" || d["status"] != "completed" {
        bail!("statuses {} / {}", s["status"], d["status"]);
    }
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    r.total_ms = num(&s["total_ms"]);
    r.downtime_ms = num(&s["downtime_ms"]);
    r.rounds = s["rounds"].as_u64().unwrap_or(0);
    r.throttle_percent = s["throttle_percent"].as_u64().unwrap_or(0);
    r.src_cpu_s = num(&s["resources"]["process_cpu_ms"]) / 1e3;
    r.dst_cpu_s = num(&d["resources"]["process_cpu_ms"]) / 1e3;
    r.sweeps_after = file_len(&dst_serial);
    if r.sweeps_after == 0 {
        bail!("the guest printed nothing on the destination");
    }
    Ok(())
}

/// Where `migrate-bench boot-sector` writes inside a results folder.
pub const RAW: &str = "raw/peer/boot-sector.json";

/// The comparison, when one was measured.
pub fn load(results: &Path) -> Result<Option<BootRaw>> {
    crate::load_raw(results, RAW)
}

/// Where `migrate-bench boot-sector --postcopy` writes inside a results
/// folder.
pub const RAW_POSTCOPY: &str = "raw/peer/boot-sector-postcopy.json";

/// The post-copy comparison, when one was measured.
pub fn load_postcopy(results: &Path) -> Result<Option<BootRaw>> {
    crate::load_raw(results, RAW_POSTCOPY)
}

/// The report's section: the figures of both engines, ours / QEMU of the
/// medians, and the targets (time and downtime ≤ 0.7 × QEMU).
pub fn markdown(raw: &BootRaw) -> String {
    use std::fmt::Write as _;

    use crate::cell::Spread;
    let good = |engine: &'static str| {
        raw.runs
            .iter()
            .filter(move |r| r.engine == engine && r.error.is_none() && r.consistent)
    };
    let spread = |engine, f: fn(&BootRun) -> f64| Spread::of(good(engine).map(f));
    let ratio = |f: fn(&BootRun) -> f64| {
        let (q, o) = (spread("qemu", f)?, spread("ours", f)?);
        (q.median > 0.0).then(|| o.median / q.median)
    };
    let failed = raw.runs.iter().filter(|r| r.error.is_some()).count();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## A running boot sector{}, beside QEMU (same guest, same run)\n",
        if raw.postcopy { " in post-copy" } else { "" }
    );
    if raw.postcopy {
        let _ = writeln!(
            s,
            "Post-copy: QEMU with `postcopy-ram` on one channel (7.2 has no post-copy with \
             multifd), switched by `migrate-start-postcopy` once its first pass is done; \
             mini-vmm with `--postcopy-after-rounds 1` (its vCPU's faults on missing pages go \
             through KVM into userfaultfd). The sweeper keeps all of its range dirty, so \
             neither converges by rounds: post-copy's downtime is the pause, the set and the \
             device state; our post-copy pages travel on the control connection.\n"
        );
    }
    let _ = writeln!(
        s,
        "{} — {} with KVM, {}, against mini-vmm with {} TCP streams; our \
         sweeper boot sector (a byte of every page from 1 MiB to {} MiB, sweep after sweep) in \
         {} MiB, running {} ms before the migration and on at the destination afterwards; \
         downtime limit 300 ms for both; destination memory a fresh file in /dev/shm, checked \
         by the sweep rule after the guest ran on: {} of {} runs consistent{}. Linux {}. Medians \
         (min–max), runs interleaved. Time and downtime as each engine reports them; rounds: \
         QEMU's dirty-bitmap syncs, our rounds. CPU: both processes over the migration, the \
         guest's vCPU included.\n",
        raw.date,
        raw.qemu_version,
        if raw.postcopy {
            "postcopy-ram on one channel".to_string()
        } else {
            format!("multifd with {} channels", raw.channels)
        },
        raw.channels,
        raw.sweep_end_mib,
        raw.memory_mib,
        raw.run_before_ms,
        raw.runs.iter().filter(|r| r.consistent).count(),
        raw.runs.len(),
        if failed > 0 {
            format!(", **{failed} failed**")
        } else {
            String::new()
        },
        raw.kernel,
    );
    let _ = writeln!(s, "| | QEMU | mini-vmm | ours / QEMU |\n|---|---|---|---|");
    type Figure = fn(&BootRun) -> f64;
    let rows: [(&str, Figure, usize); 6] = [
        ("guest's sweeps/s before", |r| r.sweeps_per_s, 1),
        ("end-to-end ms", |r| r.total_ms, 0),
        ("downtime ms", |r| r.downtime_ms, 1),
        ("rounds", |r| r.rounds as f64, 0),
        ("throttle %", |r| r.throttle_percent as f64, 0),
        ("CPU s, both processes", BootRun::cpu_s, 2),
    ];
    let cell = |x: Option<Spread>, d: usize| x.map_or("not measured".into(), |x| x.fmt(d));
    let ratio_text = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.2}"));
    for (what, f, d) in rows {
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} |",
            cell(spread("qemu", f), d),
            cell(spread("ours", f), d),
            ratio_text(ratio(f)),
        );
    }
    if raw.postcopy {
        return s;
    }
    let _ = writeln!(s, "\n| target | measured | |\n|---|---|---|");
    for (what, f) in [
        (
            "end-to-end time ≤ 0.7 × QEMU",
            (|r| r.total_ms) as fn(&BootRun) -> f64,
        ),
        ("downtime ≤ 0.7 × QEMU", |r| r.downtime_ms),
    ] {
        let got = ratio(f);
        let verdict = match got {
            None => "not measured",
            Some(x) if x <= 0.7 => "met",
            Some(_) => "**not met**",
        };
        let _ = writeln!(s, "| {what} | {} | {verdict} |", ratio_text(got));
    }
    s
}

/// `results-boot-sector.png`: time and downtime (left), CPU (right), QEMU
/// and mini-vmm side by side.
pub fn draw(path: &Path, raw: &BootRaw) -> Result<()> {
    use crate::cell::Spread;
    use crate::qemu_report::{BarPanel, bars};
    let spread = |engine: &str, f: fn(&BootRun) -> f64| {
        Spread::of(
            raw.runs
                .iter()
                .filter(|r| r.engine == engine && r.error.is_none() && r.consistent)
                .map(f),
        )
    };
    let pair = |f: fn(&BootRun) -> f64| vec![spread("qemu", f), spread("ours", f)];
    let (qemu, mode) = if raw.postcopy {
        ("QEMU (KVM, postcopy-ram)", ", post-copy")
    } else {
        ("QEMU (KVM, multifd)", "")
    };
    bars(
        path,
        &[qemu, "mini-vmm"],
        &[
            BarPanel {
                title: format!("Running boot sector, {} MiB{mode}", raw.memory_mib),
                unit: "ms",
                groups: vec![
                    ("end-to-end".into(), pair(|r| r.total_ms)),
                    ("downtime".into(), pair(|r| r.downtime_ms)),
                ],
            },
            BarPanel {
                title: "CPU, both processes (guest included)".into(),
                unit: "CPU s",
                groups: vec![("CPU".into(), pair(BootRun::cpu_s))],
            },
        ],
    )
}
