//! `migrate-bench qemu`: QEMU's migration and ours side by side, on the same
//! guest-memory image, in one run.
//!
//! The image (a page mix, default 40 % zero, 30 % text-like, 30 % random) is
//! a file in /dev/shm. Each engine migrates it over loopback TCP with the
//! same number of channels into a destination file in /dev/shm, which is then
//! compared with the image byte for byte:
//!
//! - QEMU: a paused source (`-S`) whose RAM is the image
//!   (`memory-backend-file,share=on`), a destination with `-incoming defer`,
//!   multifd with N channels and no bandwidth cap, driven over QMP. The time
//!   runs from the `migrate` command to the destination's `MIGRATION`
//!   `completed` event; the CPU is both processes' over that interval.
//! - Ours: `migrate-cli dest --memory-file` and `migrate-cli source
//!   --memory-file IMAGE --guest idle --no-fill` (no `--verify`: the file
//!   comparison checks the bytes instead). The time runs from starting the
//!   source process to the destination's completion (the line it prints
//!   once its guest resumed), the same end as QEMU's: process start,
//!   mapping, tracker set-up and connection included; the time to the
//!   source's exit is kept beside it (`source_exit_ms`). The CPU is what each
//!   process reports for the migration (`resources.cpu_ms`: the source's
//!   from just before it connects, the destination's from the connection).
//!
//! - The floor ([`crate::floor`]): the least work any engine must do to
//!   move the image over the same streams, timed and charged like ours. A
//!   target below the floor cannot be met on this machine.
//!
//! Each engine runs `--repeat` times interleaved with the others (drifts of
//! a shared machine hit all alike), then `--alone-repeat` times alone, its
//! runs back to back (as a user trying one engine sees it); the report
//! shows both and holds the targets to each engine at its best.
//!
//! The destination memory is either *fresh* (a sparse file: every page is
//! first touched during the migration) or *preallocated* before the
//! destination says it is ready (QEMU `prealloc=on`, ours `--prefault`), so
//! neither engine's allocation is timed in that row.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use migrate_core::memory::{GuestMemory, GuestRegion};

pub(crate) use crate::peer::{
    Listening, PeerRaw, PeerRun, QemuArgs, Reaper, Where, cpu_s, free_port, sparse,
};

pub fn run(a: &QemuArgs) -> Result<PeerRaw> {
    let qemu_version = qemu_version(&a.qemu)?;
    if !a.cli.exists() {
        bail!("{} not found: build it first", a.cli.display());
    }
    let mix = fixtures::PageMix::parse(&a.mix).context("--mix: e.g. 40:30:30")?;
    let tag = std::process::id();
    let image = a.dir.join(format!("migrate-bench-image.{tag}"));
    let dst = a.dir.join(format!("migrate-bench-dst.{tag}"));
    let tmp = std::env::temp_dir().join(format!("migrate-bench-qemu.{tag}"));
    // An earlier run under the same process id left nothing to read.
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let len = a.size_mib << 20;
    write_image(&image, len, mix)?;
    let mut raw = PeerRaw {
        date: crate::run::date(),
        command: a.command_line.clone(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .into(),
        cpu: crate::run::cpu_model(),
        qemu_version,
        size_mib: a.size_mib,
        mix: a.mix.clone(),
        channels: a.channels,
        runs: Vec::new(),
    };
    // Interleaved (QEMU, ours, the floor, QEMU, ...) so that drifts of this
    // shared machine's speed hit all alike; then each engine alone, its runs
    // back to back, as a user trying one engine would see it (whether the
    // order moves an engine's figures is itself a finding).
    let engines = ["qemu", "ours", "floor"];
    let mut plan = Vec::new();
    for rep in 0..a.repeat.max(1) {
        for prealloc in [false, true] {
            plan.extend(engines.map(|e| (e, prealloc, rep, false)));
        }
    }
    for prealloc in [false, true] {
        for engine in engines {
            plan.extend((0..a.alone_repeat).map(|rep| (engine, prealloc, rep, true)));
        }
    }
    let w = Where {
        args: a,
        image: &image,
        dst: &dst,
        tmp: &tmp,
    };
    for (engine, prealloc, rep, alone) in plan {
        let _ = std::fs::remove_file(&dst);
        let mut r = PeerRun {
            engine: engine.into(),
            prealloc,
            rep,
            alone,
            ..Default::default()
        };
        let outcome = match engine {
            "qemu" => qemu_run(&w, prealloc, &mut r),
            "ours" => ours_run(&w, prealloc, &mut r),
            _ => crate::floor::run(&w, prealloc, &mut r),
        };
        let outcome = outcome.and_then(|()| {
            r.identical = same_bytes(&image, &dst)?;
            if !r.identical {
                bail!("the destination's memory differs from the image");
            }
            Ok(())
        });
        if let Err(e) = outcome {
            r.error = Some(format!("{e:#}"));
        }
        let order = if alone { "alone" } else { "interleaved" };
        match &r.error {
            None => eprintln!(
                "qemu-peer {engine} {} {order} #{rep}: {:.0} ms, CPU {:.2} s (source {:.2}, destination {:.2}), identical",
                if prealloc { "preallocated" } else { "fresh" },
                r.ms,
                r.cpu_s(),
                r.src_cpu_s,
                r.dst_cpu_s
            ),
            Some(e) => eprintln!("qemu-peer {engine} {order} #{rep}: FAILED: {e}"),
        }
        raw.runs.push(r);
    }
    let _ = std::fs::remove_file(&dst);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(raw)
}

/// The first line of `qemu --version`.
pub(crate) fn qemu_version(qemu: &Path) -> Result<String> {
    let version = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} (install qemu-system-x86)", qemu.display()))?;
    Ok(String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The image: `len` bytes of the page mix, in a file.
pub(crate) fn write_image(path: &Path, len: u64, mix: fixtures::PageMix) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let region = GuestRegion::file(0, len as usize, path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mem = GuestMemory::new(vec![region])?;
    fixtures::fill_memory(&mem, mix, 1)?;
    Ok(())
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// A QMP connection: commands and their answers, events kept aside.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connect (QEMU creates the socket as it starts) and leave the
    /// greeting; the greeting comes once QEMU finished starting, memory
    /// preallocation included.
    pub(crate) fn connect(path: &Path, child: &mut Child) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            if let Some(st) = child.try_wait()? {
                bail!("QEMU exited with {st} before its QMP socket opened");
            }
            if Instant::now() > deadline {
                bail!("no QMP socket at {} after 120 s", path.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    pub(crate) fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let msg = json!({ "execute": execute, "arguments": arguments });
        writeln!(self.writer, "{msg}")?;
        loop {
            let m = self.read()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                bail!("QMP {execute}: {e}");
            }
            self.events.push(m);
        }
    }

    /// The next `MIGRATION` event whose status ends a migration.
    pub(crate) fn migration_end(&mut self) -> Result<String> {
        let mut pending = std::mem::take(&mut self.events).into_iter();
        loop {
            let m = match pending.next() {
                Some(m) => m,
                None => self.read()?,
            };
            if m["event"] == "MIGRATION" {
                let status = m["data"]["status"].as_str().unwrap_or_default();
                if matches!(status, "completed" | "failed" | "cancelled") {
                    return Ok(status.to_string());
                }
            }
        }
    }
}

fn qemu_run(w: &Where<'_>, prealloc: bool, r: &mut PeerRun) -> Result<()> {
    let (a, image, dst, tmp) = (w.args, w.image, w.dst, w.tmp);
    let mib = a.size_mib;
    let qemu = |mem_path: &Path, extra: &str, qmp: &Path, incoming: bool| -> Result<Child> {
        let mut c = Command::new(&a.qemu);
        c.args(["-machine", "pc,accel=tcg,memory-backend=mem"])
            .args(["-m", &format!("{mib}M")])
            .args(["-display", "none", "-nodefaults", "-S"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={mib}M,mem-path={},share=on{extra}",
                mem_path.display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        c.spawn().context("starting QEMU")
    };
    let (sq, dq) = (tmp.join("src.qmp"), tmp.join("dst.qmp"));
    let _ = std::fs::remove_file(&sq);
    let _ = std::fs::remove_file(&dq);
    let extra = if prealloc { ",prealloc=on" } else { "" };
    let mut procs = Reaper(vec![qemu(image, "", &sq, false)?]);
    procs.0.push(qemu(dst, extra, &dq, true)?);
    let mut s = Qmp::connect(&sq, &mut procs.0[0])?;
    let mut d = Qmp::connect(&dq, &mut procs.0[1])?;
    for q in [&mut s, &mut d] {
        q.cmd(
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "multifd", "state": true },
                { "capability": "events", "state": true },
            ]}),
        )?;
        // No bandwidth cap (QEMU's default is 128 MiB/s), as ours has none.
        q.cmd(
            "migrate-set-parameters",
            json!({ "multifd-channels": a.channels, "max-bandwidth": 1u64 << 40 }),
        )?;
    }
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    d.cmd("migrate-incoming", json!({ "uri": uri }))?;
    let (spid, dpid) = (procs.0[0].id(), procs.0[1].id());
    let (s0, d0) = (cpu_s(spid)?, cpu_s(dpid)?);
    let t0 = Instant::now();
    s.cmd("migrate", json!({ "uri": uri }))?;
    let status = d.migration_end()?;
    r.ms = t0.elapsed().as_secs_f64() * 1e3;
    r.src_cpu_s = cpu_s(spid)? - s0;
    r.dst_cpu_s = cpu_s(dpid)? - d0;
    if status != "completed" {
        bail!("QEMU's migration ended {status}");
    }
    Ok(())
}

fn ours_run(w: &Where<'_>, prealloc: bool, r: &mut PeerRun) -> Result<()> {
    let (a, image, dst, tmp) = (w.args, w.image, w.dst, w.tmp);
    let size = format!("{}M", a.size_mib);
    let streams = a.channels.to_string();
    sparse(dst, a.size_mib << 20)?;
    let (sj, dj) = (tmp.join("s.json"), tmp.join("d.json"));
    let mut dest = Command::new(&a.cli);
    dest.args(["dest", "--listen", "127.0.0.1:0", "--streams", &streams])
        .arg("--memory-file")
        .arg(dst)
        .args(["--memory", &size, "--json"])
        .arg(&dj)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if prealloc {
        dest.arg("--prefault");
    }
    let mut procs = Reaper(vec![dest.spawn().context("starting migrate-cli dest")?]);
    // The destination's next line says its guest resumed: the end.
    let dest = Listening::read(&mut procs.0[0])?;
    let t0 = Instant::now();
    let src = Command::new(&a.cli)
        .args(["source", "--connect", &dest.addr, "--streams", &streams])
        .arg("--memory-file")
        .arg(image)
        .args(["--memory", &size, "--guest", "idle", "--no-fill"])
        .args(["--progress", "never", "--json"])
        .arg(&sj)
        .stdout(Stdio::null())
        .output()
        .context("running migrate-cli source")?;
    r.source_exit_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
    if !src.status.success() {
        bail!(
            "source exited with {}: {}",
            src.status,
            String::from_utf8_lossy(&src.stderr).trim()
        );
    }
    let (done_at, said) = dest.done()?;
    if !said.contains("guest resumed") {
        bail!("the destination did not complete: {said:?}");
    }
    r.ms = done_at.duration_since(t0).as_secs_f64() * 1e3;
    let dstatus = procs.0[0].wait()?;
    if !dstatus.success() {
        bail!("destination exited with {dstatus}");
    }
    let report =
        |p: &Path| -> Result<Value> { Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?) };
    let (s, d) = (report(&sj)?, report(&dj)?);
    let cpu = |v: &Value| v["resources"]["cpu_ms"].as_f64().unwrap_or(0.0) / 1e3;
    r.src_cpu_s = cpu(&s);
    r.dst_cpu_s = cpu(&d);
    if s["status"] != "completed" || d["status"] != "completed" {
        bail!("statuses {} / {}", s["status"], d["status"]);
    }
    Ok(())
}
