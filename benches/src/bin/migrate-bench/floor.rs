//! The floor of the QEMU comparison: the least work any engine must do to
//! move the image over loopback TCP, measured beside QEMU and ours.
//!
//! Two processes, `migrate-bench floor-recv` and `migrate-bench floor-send`,
//! with N streams between them and nothing a migration engine adds: no
//! handshake, no dirty tracking, no rounds, no page hashes, no device state,
//! no switch-over. The sender maps the image, tests each page for zeros (the
//! one read every engine needs, [`migrate_core::memory::is_zero_page`]) and
//! writes the non-zero ones with vectored writes, 64 pages behind a header
//! of their indices; the receiver reads them straight into its mapping of
//! the destination file. Stream `s` of `n` carries the chunks of 256 pages
//! whose number is `s` modulo `n`. A batch of 0 pages ends a stream.
//!
//! The interval and CPU are measured as for ours (see `crate::qemu`): from
//! starting the sender to the receiver's `done` line; the sender's CPU from
//! just before it connects, the receiver's from the accepted connections.
//! An engine at the floor's time cannot go faster on this machine without
//! sending fewer bytes.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use migrate_core::memory::{GuestMemory, GuestRegion, is_zero_page};

use crate::peer::{Listening, PeerRun, Reaper, Where, cpu_s, sparse};

/// Pages per batch.
const BATCH: usize = 64;
/// Pages per chunk; chunks go round-robin over the streams.
const CHUNK: usize = 256;
/// A batch header: the page count, then `BATCH` page indices (u32 LE).
const HEADER: usize = 4 * (1 + BATCH);

/// `migrate-bench floor-send` and `floor-recv`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// The image (sender) or the destination file (receiver), sized already.
    #[arg(long)]
    pub file: PathBuf,
    /// Streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Sender: the receiver's address.
    #[arg(long)]
    pub connect: Option<String>,
    /// Receiver: allocate the destination's memory before listening.
    #[arg(long)]
    pub prefault: bool,
}

fn map(path: &std::path::Path) -> Result<GuestMemory> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    let region = GuestRegion::file(0, len as usize, path)
        .with_context(|| format!("mapping {}", path.display()))?;
    Ok(GuestMemory::new(vec![region])?)
}

/// The receiver: prints `listening on ADDR`, then `done cpu_ms X` once
/// every stream ended.
pub fn recv(a: &FloorArgs) -> Result<()> {
    let mem = map(&a.file)?;
    if a.prefault {
        mem.prefault()?;
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let streams = (0..a.streams)
        .map(|_| Ok(listener.accept()?.0))
        .collect::<Result<Vec<_>>>()?;
    let cpu0 = cpu_s(std::process::id())?;
    let pages = mem.total_pages();
    std::thread::scope(|s| {
        let workers: Vec<_> = streams
            .into_iter()
            .map(|mut conn| {
                let mem = &mem;
                s.spawn(move || -> Result<()> {
                    let mut header = [0u8; HEADER];
                    let mut runs = Vec::with_capacity(BATCH);
                    loop {
                        conn.read_exact(&mut header)?;
                        let word = |i: usize| {
                            u32::from_le_bytes(header[4 * i..4 * i + 4].try_into().unwrap())
                                as usize
                        };
                        let n = word(0);
                        if n == 0 {
                            return Ok(());
                        }
                        if n > BATCH {
                            bail!("a batch of {n} pages");
                        }
                        runs.clear();
                        for i in 1..=n {
                            let page = word(i);
                            if page >= pages {
                                bail!("page {page} outside the image");
                            }
                            runs.push((0, page, 1));
                        }
                        mem.read_runs_from(&runs, &mut conn)?;
                    }
                })
            })
            .collect();
        join_all(workers)
    })?;
    let cpu = cpu_s(std::process::id())? - cpu0;
    println!("done cpu_ms {:.0}", cpu * 1e3);
    Ok(())
}

/// The sender: prints `cpu_ms X` once every stream was written.
pub fn send(a: &FloorArgs) -> Result<()> {
    let mem = map(&a.file)?;
    let addr = a.connect.as_deref().context("--connect")?;
    let cpu0 = cpu_s(std::process::id())?;
    let conns = (0..a.streams)
        .map(|_| TcpStream::connect(addr).with_context(|| format!("connecting to {addr}")))
        .collect::<Result<Vec<_>>>()?;
    let region = &mem.regions()[0];
    let pages = region.pages();
    let n = conns.len();
    std::thread::scope(|s| {
        let workers: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(id, mut conn)| {
                s.spawn(move || -> Result<()> {
                    let mut batch: Vec<usize> = Vec::with_capacity(BATCH);
                    let mut flush = |batch: &mut Vec<usize>| -> Result<()> {
                        let mut header = [0u8; HEADER];
                        header[..4].copy_from_slice(&(batch.len() as u32).to_le_bytes());
                        for (i, &p) in batch.iter().enumerate() {
                            header[4 * (i + 1)..4 * (i + 2)]
                                .copy_from_slice(&(p as u32).to_le_bytes());
                        }
                        let mut iov = Vec::with_capacity(1 + batch.len());
                        iov.push(IoSlice::new(&header));
                        iov.extend(batch.iter().map(|&p| region.io_slice(p, 1)));
                        let mut bufs = &mut iov[..];
                        while !bufs.is_empty() {
                            let k = conn.write_vectored(bufs)?;
                            if k == 0 {
                                bail!("the receiver closed its stream");
                            }
                            IoSlice::advance_slices(&mut bufs, k);
                        }
                        batch.clear();
                        Ok(())
                    };
                    for chunk in (id * CHUNK..pages).step_by(CHUNK * n) {
                        for p in chunk..(chunk + CHUNK).min(pages) {
                            if !is_zero_page(&region.io_slice(p, 1)) {
                                batch.push(p);
                                if batch.len() == BATCH {
                                    flush(&mut batch)?;
                                }
                            }
                        }
                    }
                    if !batch.is_empty() {
                        flush(&mut batch)?;
                    }
                    flush(&mut batch)
                })
            })
            .collect();
        join_all(workers)
    })?;
    let cpu = cpu_s(std::process::id())? - cpu0;
    println!("cpu_ms {:.0}", cpu * 1e3);
    Ok(())
}

/// Wait for every stream's thread; the first error, or a panic, is the
/// answer.
fn join_all(workers: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    workers
        .into_iter()
        .try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("a stream panicked"))?)
}

/// One floor run of the comparison, into `r` (engine `floor`).
pub fn run(w: &Where<'_>, prealloc: bool, r: &mut PeerRun) -> Result<()> {
    let me = std::env::current_exe()?;
    let streams = w.args.channels.to_string();
    sparse(w.dst, w.args.size_mib << 20)?;
    let mut recv = Command::new(&me);
    recv.arg("floor-recv")
        .arg("--file")
        .arg(w.dst)
        .args(["--streams", &streams])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if prealloc {
        recv.arg("--prefault");
    }
    let mut procs = Reaper(vec![recv.spawn().context("starting floor-recv")?]);
    let receiver = Listening::read(&mut procs.0[0])?;
    let t0 = Instant::now();
    let send = Command::new(&me)
        .arg("floor-send")
        .arg("--file")
        .arg(w.image)
        .args(["--streams", &streams, "--connect", &receiver.addr])
        .stderr(Stdio::inherit())
        .output()
        .context("running floor-send")?;
    r.source_exit_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
    if !send.status.success() {
        bail!("floor-send exited with {}", send.status);
    }
    let (done_at, said) = receiver.done()?;
    r.ms = done_at.duration_since(t0).as_secs_f64() * 1e3;
    let cpu_ms = |text: &str, prefix: &str| -> Result<f64> {
        text.trim()
            .strip_prefix(prefix)
            .and_then(|x| x.parse::<f64>().ok())
            .with_context(|| format!("no CPU in {text:?}"))
    };
    r.dst_cpu_s = cpu_ms(&said, "done cpu_ms ")? / 1e3;
    r.src_cpu_s = cpu_ms(&String::from_utf8_lossy(&send.stdout), "cpu_ms ")? / 1e3;
    let status = procs.0[0].wait()?;
    if !status.success() {
        bail!("floor-recv exited with {status}");
    }
    Ok(())
}
