//! What a side-by-side run of engines (QEMU's, ours, the floor) shares:
//! its arguments, where its files are, one run's figures, and the
//! processes it starts and times. `qemu` and `floor` both build on it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// `migrate-bench qemu`.
#[derive(Debug, Clone, clap::Args)]
pub struct QemuArgs {
    /// The migrate-cli binary.
    #[arg(long, default_value = "target/release/migrate-cli")]
    pub cli: PathBuf,
    /// QEMU's system emulator.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Page mix of the image, `zero:text:random` weights.
    #[arg(long, default_value = "40:30:30")]
    pub mix: String,
    /// Channels: QEMU multifd channels, our data streams.
    #[arg(long, default_value_t = 2)]
    pub channels: u16,
    /// Runs per engine and destination kind, interleaved (QEMU, ours, the
    /// floor, QEMU, ...: drifts of a shared machine hit all alike).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Then runs per engine and destination kind with each engine alone,
    /// back to back (as a user who tries one engine sees it); 0: none.
    #[arg(long, default_value_t = 3)]
    pub alone_repeat: usize,
    /// Where the image and the destination files go (memory-backed).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Write the raw results here (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// The command line to record with the results.
    #[arg(long, default_value = "")]
    pub command_line: String,
}

/// Everything one `migrate-bench qemu` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRaw {
    pub date: String,
    pub command: String,
    pub kernel: String,
    /// The CPU model (empty in runs before 2026-12-07: shared machines
    /// change CPUs between sessions, and figures with them).
    #[serde(default)]
    pub cpu: String,
    pub qemu_version: String,
    pub size_mib: u64,
    pub mix: String,
    pub channels: u16,
    pub runs: Vec<PeerRun>,
}

/// One migration of the image.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerRun {
    /// `qemu`, `ours` or `floor` (see [`crate::floor`]).
    pub engine: String,
    /// Destination memory allocated before the migration.
    pub prealloc: bool,
    pub rep: usize,
    /// In the block where each engine ran alone, back to back (else
    /// interleaved with the others; runs before 2026-12-07 all were).
    pub alone: bool,
    /// End-to-end time, ms (see the module docs for the interval).
    pub ms: f64,
    /// Ours only: from starting the source to its exit (the source's
    /// teardown after the destination completed included), ms.
    pub source_exit_ms: Option<f64>,
    /// CPU seconds of the source and the destination process.
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
    /// The destination file equals the image.
    pub identical: bool,
    pub error: Option<String>,
}

impl PeerRun {
    pub fn cpu_s(&self) -> f64 {
        self.src_cpu_s + self.dst_cpu_s
    }
}

/// What every run uses: the arguments, the image, the destination file and
/// a scratch folder.
pub(crate) struct Where<'a> {
    pub(crate) args: &'a QemuArgs,
    pub(crate) image: &'a Path,
    pub(crate) dst: &'a Path,
    pub(crate) tmp: &'a Path,
}

/// A sparse file of `len` bytes: pages allocated when first written.
pub(crate) fn sparse(path: &Path, len: u64) -> Result<()> {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("creating {}", path.display()))
}

/// CPU seconds a live process has used (user + system).
pub(crate) fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // The kernel's USER_HZ is 100 on every Linux that reports it here.
        (Some(u), Some(s)) => Ok((u + s) / 100.0),
        _ => bail!("cannot read /proc/{pid}/stat"),
    }
}

/// Kills the processes it holds when dropped (a failed run leaves none).
pub(crate) struct Reaper(pub(crate) Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A receiving process that printed `listening on ADDR` once ready, and
/// whose next line (read on a thread, timed as it arrives) says it is done.
pub(crate) struct Listening {
    /// Where it listens.
    pub(crate) addr: String,
    done: std::sync::mpsc::Receiver<(Instant, std::io::Result<String>)>,
}

impl Listening {
    /// Wait for `child`'s `listening on` line (its stdout piped).
    pub(crate) fn read(child: &mut Child) -> Result<Self> {
        let mut out = BufReader::new(child.stdout.take().context("no stdout to read")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            bail!("the receiving process did not get ready: {line:?}");
        };
        let addr = addr.to_string();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = out.read_line(&mut line);
            let _ = done_tx.send((Instant::now(), read.map(|_| line)));
        });
        Ok(Self { addr, done })
    }

    /// When the next line came, and the line (within 30 s).
    pub(crate) fn done(&self) -> Result<(Instant, String)> {
        let (at, line) = self
            .done
            .recv_timeout(Duration::from_secs(30))
            .context("the receiving process did not report its end")?;
        Ok((at, line.context("reading the receiving process's output")?))
    }
}

/// A port nothing listens on now (QEMU's `-incoming` needs one named).
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
