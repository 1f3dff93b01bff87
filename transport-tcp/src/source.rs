//! Source side: connect, then send page batches from guest memory.

use std::io::{IoSlice, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use migrate_core::checksum::{xxh3_64, xxh3_64_with_seed};
use migrate_core::dirty::PageRun;
use migrate_core::memory::{GuestMemory, PageSize, sparse_words};
use migrate_core::protocol::wire::{
    BatchRun, FLAG_UNHASHED, FLAG_ZSTD, FrameHeader, HEADER_LEN, MAX_BATCH_BYTES, MAX_SPARSE_WORDS,
    RunKind, check_seed, encode_batch_header, encode_sparse_page, write_message,
};
use migrate_core::protocol::{
    FEATURE_SPARSE, FEATURE_UNHASHED, FEATURE_ZSTD, Features, FrameKind, Message,
};
use migrate_core::transport::{
    ControlChannel, DestinationPages, PageSender, RoundContext, RoundSent, SourceTransport,
    TransportError,
};

use crate::TcpConfig;
use crate::conn::Conn;
use crate::control::{KillSwitch, TcpControl, io, prepare};

/// Raw page bytes a batch aims for: large enough to amortize headers and
/// syscalls, small enough to spread a round over all streams.
const BATCH_TARGET: usize = 512 << 10;

/// A source connected to a destination over TCP.
#[derive(Debug)]
pub struct TcpSource {
    addr: SocketAddr,
    cfg: TcpConfig,
    control: TcpControl,
    /// Every connection of this migration; tripped when the peer falls
    /// silent.
    kill: KillSwitch,
}

impl TcpSource {
    /// Connect the control connection to `addr` (host:port).
    ///
    /// # Errors
    /// [`TransportError::Connect`] when the address does not resolve or
    /// nothing answers in time; a protocol error when the peer is not a
    /// migration destination.
    pub fn connect(addr: &str, cfg: TcpConfig) -> Result<Self, TransportError> {
        let connect_err = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sa = addr
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| connect_err(std::io::Error::other("no address")))?;
        let (control, kill) = open_control(&sa, &cfg)?;
        tracing::debug!(%sa, "control connection open");
        Ok(Self {
            addr: sa,
            cfg,
            control,
            kill,
        })
    }

    /// The destination's address.
    pub fn peer(&self) -> SocketAddr {
        self.addr
    }

    /// This end's address of the control connection (the interface that
    /// reaches the destination).
    ///
    /// # Errors
    /// [`TransportError::Io`] from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.control
            .stream()
            .local_addr()
            .map_err(io("local address"))
    }
}

impl SourceTransport for TcpSource {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn data_streams(&self) -> u16 {
        self.cfg.data_streams.max(1)
    }

    fn features(&self) -> Features {
        Features::new(
            (if self.cfg.compress { FEATURE_ZSTD } else { 0 })
                | if self.cfg.sparse { FEATURE_SPARSE } else { 0 }
                | if self.cfg.tls.is_some() {
                    FEATURE_UNHASHED
                } else {
                    0
                },
        )
    }

    fn control(&mut self) -> &mut dyn ControlChannel {
        &mut self.control
    }

    fn open_data(
        &mut self,
        mem: &Arc<GuestMemory>,
        session: u64,
        features: Features,
    ) -> Result<Box<dyn PageSender>, TransportError> {
        let mut streams = Vec::new();
        for index in 0..self.data_streams() {
            let stream = TcpStream::connect_timeout(&self.addr, self.cfg.connect_timeout).map_err(
                |source| TransportError::Connect {
                    addr: self.addr.to_string(),
                    source,
                },
            )?;
            prepare(&stream, &self.cfg)?;
            let mut c = TcpControl::open(stream, &self.cfg)?;
            c.send(&Message::Join { session, index })?;
            self.kill.register(c.stream());
            streams.push(c.conn().clone());
        }
        tracing::debug!(
            streams = streams.len(),
            features = features.bits(),
            "data connections open"
        );
        // The previous data plane, if any, is gone with its kill switch.
        Ok(Box::new(TcpPageSender {
            mem: Arc::clone(mem),
            streams,
            kill: self.kill.clone(),
            enc: Encoding {
                compress: features
                    .has(FEATURE_ZSTD)
                    .then_some(self.cfg.compress_level),
                sparse: features.has(FEATURE_SPARSE),
                unhashed: features.has(FEATURE_UNHASHED),
            },
        }))
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        // Whatever is left of the old connections goes first.
        self.kill.kill();
        let (control, kill) = open_control(&self.addr, &self.cfg)?;
        self.control = control;
        self.kill = kill;
        tracing::info!(addr = %self.addr, "control connection open again");
        Ok(())
    }
}

/// A new control connection to `addr`, with its own kill switch.
fn open_control(
    addr: &SocketAddr,
    cfg: &TcpConfig,
) -> Result<(TcpControl, KillSwitch), TransportError> {
    let stream = TcpStream::connect_timeout(addr, cfg.connect_timeout).map_err(|source| {
        TransportError::Connect {
            addr: addr.to_string(),
            source,
        }
    })?;
    let kill = KillSwitch::default();
    let control = TcpControl::open_control(stream, cfg, &kill)?;
    Ok((control, kill))
}

/// Sends rounds over the data connections, one thread per connection.
struct TcpPageSender {
    mem: Arc<GuestMemory>,
    streams: Vec<Conn>,
    kill: KillSwitch,
    enc: Encoding,
}

/// How page bytes are encoded, as both ends agreed.
#[derive(Debug, Clone, Copy)]
struct Encoding {
    /// zstd at this level.
    compress: Option<i32>,
    /// 4 KiB pages with few non-zero words go as those words.
    sparse: bool,
    /// Batches on sealed connections go without page hashes.
    unhashed: bool,
}

impl PageSender for TcpPageSender {
    fn send_round(
        &mut self,
        round: u32,
        runs: &[PageRun],
        ctx: &RoundContext<'_>,
    ) -> Result<RoundSent, TransportError> {
        let batches = plan_batches(&self.mem, runs);
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let (mem, enc) = (&*self.mem, self.enc);
        let results: Vec<Result<RoundSent, TransportError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .streams
                .iter_mut()
                .enumerate()
                .map(|(i, stream)| {
                    let (batches, next, failed) = (&batches, &next, &failed);
                    std::thread::Builder::new()
                        .name(format!("tcp-send-{i}"))
                        .spawn_scoped(s, move || {
                            let r =
                                send_stream(mem, stream, round, batches, next, failed, enc, ctx);
                            if let Err(e) = &r {
                                failed.store(true, Ordering::SeqCst);
                                tracing::debug!(stream = i, error = %e, "data stream failed");
                            }
                            r
                        })
                        .inspect_err(|_| failed.store(true, Ordering::SeqCst))
                        .map_err(io("spawn a sender thread"))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h?.join().unwrap_or_else(|_| {
                        Err(TransportError::Stream {
                            stream: u16::MAX,
                            detail: "sender thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut total = RoundSent::default();
        let mut first_err = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(s) => total.add(&s.on_stream(i as u16)),
                // Prefer the root cause over the "stopped because another
                // stream failed" of the others.
                Err(TransportError::Cancelled) if ctx.cancel.is_cancelled() => {
                    first_err.get_or_insert(TransportError::Cancelled);
                }
                Err(TransportError::Cancelled) => {}
                Err(e) => {
                    if first_err
                        .as_ref()
                        .is_none_or(|f| matches!(f, TransportError::Cancelled))
                    {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            // A silent peer tripped the kill: that is the cause, not the
            // broken pipe it made.
            Some(e) => Err(self.kill.reason().unwrap_or(e)),
            None => Ok(total),
        }
    }

    fn finish(&mut self) {
        for (i, s) in self.streams.iter().enumerate() {
            if let Err(e) = s.close() {
                tracing::debug!(stream = i, error = %e, "could not end a data stream cleanly");
            }
        }
    }
}

/// Cut the round's runs into batches of about [`BATCH_TARGET`] bytes (at
/// least one page each, so 2 MiB pages travel one per batch).
fn plan_batches(mem: &GuestMemory, runs: &[PageRun]) -> Vec<Vec<PageRun>> {
    let mut batches = Vec::new();
    let mut cur: Vec<PageRun> = Vec::new();
    let mut cur_bytes = 0usize;
    for run in runs {
        let ps = mem.regions()[run.region].page_size().bytes();
        let (mut first, mut left) = (run.first, run.count);
        while left > 0 {
            let room = (BATCH_TARGET.saturating_sub(cur_bytes) / ps).max(1);
            let n = left.min(room);
            cur.push(PageRun {
                region: run.region,
                first,
                count: n,
            });
            cur_bytes += n * ps;
            first += n;
            left -= n;
            if cur_bytes + ps > BATCH_TARGET.max(ps) {
                batches.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
        }
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

#[allow(clippy::too_many_arguments)]
fn send_stream(
    mem: &GuestMemory,
    stream: &mut Conn,
    round: u32,
    batches: &[Vec<PageRun>],
    next: &AtomicUsize,
    failed: &AtomicBool,
    enc: Encoding,
    ctx: &RoundContext<'_>,
) -> Result<RoundSent, TransportError> {
    let mut sent = RoundSent::default();
    let mut count = 0u64;
    let mut scratch = Scratch::default();
    loop {
        if ctx.cancel.is_cancelled() || failed.load(Ordering::Relaxed) {
            return Err(TransportError::Cancelled);
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(batch) = batches.get(i) else { break };
        let b = send_batch(mem, stream, round, batch, enc, ctx.dest_pages, &mut scratch)?;
        // A batch of pages the destination already reads as zeros sends
        // no frame at all.
        if b.wire_bytes > 0 {
            count += 1;
        }
        ctx.limiter.take(b.wire_bytes);
        (ctx.progress)(b.normal_pages + b.zero_pages, b.wire_bytes);
        sent.add(&b);
    }
    let mut w = &*stream;
    write_message(
        &mut w,
        &Message::RoundEnd {
            round,
            batches: count,
        },
    )?;
    sent.wire_bytes += (HEADER_LEN + 12) as u64;
    Ok(sent)
}

#[derive(Default)]
struct Scratch {
    runs: Vec<BatchRun>,
    hashes: Vec<u64>,
    raw: Vec<u8>,
    compressed: Vec<u8>,
    /// The Sparse pages' encodings, in page order, and their hashes.
    sparse: Vec<u8>,
    sparse_hashes: Vec<u64>,
    words: Vec<(u16, u64)>,
}

/// What one page of a batch becomes.
#[derive(Clone, Copy, PartialEq)]
enum Class {
    /// Its bytes.
    Data,
    /// Its few non-zero words.
    Sparse,
    /// A zero marker.
    Zero,
    /// Nothing: a zero page the destination already reads as zeros.
    Skip,
}

/// Send one batch: data pages go out by one vectored write straight from
/// guest memory (or zstd-compressed), pages with few non-zero words as
/// those words (when agreed), zero pages as markers where the destination
/// may hold something else (`dest`), else not at all. No frame when
/// nothing is left to send (0 wire bytes).
fn send_batch(
    mem: &GuestMemory,
    stream: &mut Conn,
    round: u32,
    pieces: &[PageRun],
    enc: Encoding,
    dest: &DestinationPages,
    scratch: &mut Scratch,
) -> Result<RoundSent, TransportError> {
    let mut sent = RoundSent::default();
    // The records' AEAD authenticates every byte: no page hashes.
    let hashed = !(enc.unhashed && stream.sealed());
    scratch.runs.clear();
    scratch.sparse.clear();
    scratch.sparse_hashes.clear();
    let mut data: Vec<IoSlice<'_>> = Vec::new();
    for piece in pieces {
        let region = &mem.regions()[piece.region];
        let end = piece.first + piece.count;
        if piece.count == 0 {
            continue;
        }
        let sparse = enc.sparse && region.page_size() == PageSize::Small;
        // Each page is classified once, in order: a Sparse page's words are
        // taken here, and its hash is of their encoding (a guest write
        // racing the scan dirties the page: it goes again next round).
        let mut class = |p: usize| {
            if region.is_zero_page(p) {
                return match dest.zero_needs_sending(piece.region, p) {
                    true => Class::Zero,
                    false => Class::Skip,
                };
            }
            if !sparse {
                return Class::Data;
            }
            scratch.words.clear();
            if !sparse_words(&region.io_slice(p, 1), MAX_SPARSE_WORDS, &mut scratch.words) {
                return Class::Data;
            }
            let at = scratch.sparse.len();
            encode_sparse_page(&scratch.words, &mut scratch.sparse);
            if hashed {
                scratch.sparse_hashes.push(xxh3_64(&scratch.sparse[at..]));
            }
            Class::Sparse
        };
        let mut p = piece.first;
        let mut next = class(p);
        while p < end {
            let (kind, start) = (next, p);
            p += 1;
            while p < end {
                next = class(p);
                if next != kind {
                    break;
                }
                p += 1;
            }
            let count = p - start;
            let run = |kind| BatchRun {
                region: piece.region as u32,
                first: start as u64,
                count: count as u32,
                kind,
            };
            match kind {
                Class::Data | Class::Sparse => {
                    sent.normal_pages += count as u64;
                    dest.sent_data(piece.region, start, count);
                    if kind == Class::Data {
                        scratch.runs.push(run(RunKind::Data));
                        data.push(region.io_slice(start, count));
                    } else {
                        sent.sparse_pages += count as u64;
                        scratch.runs.push(run(RunKind::Sparse));
                    }
                }
                Class::Zero => {
                    sent.zero_pages += count as u64;
                    scratch.runs.push(run(RunKind::Zero));
                }
                Class::Skip => sent.zero_pages += count as u64,
            }
        }
    }
    if scratch.runs.is_empty() {
        return Ok(sent);
    }
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    let raw_len = data_len + scratch.sparse.len();
    debug_assert!(data_len <= MAX_BATCH_BYTES);
    let mut flags = if hashed { 0 } else { FLAG_UNHASHED };
    let mut wire_len = raw_len;
    if let (Some(level), true) = (enc.compress, raw_len > 0) {
        // Compression copies anyway: copy once, then hash and compress the
        // same stable bytes.
        scratch.raw.clear();
        data.iter().for_each(|d| scratch.raw.extend_from_slice(d));
        scratch.raw.extend_from_slice(&scratch.sparse);
        scratch
            .compressed
            .resize(zstd::zstd_safe::compress_bound(raw_len), 0);
        let n = zstd::bulk::compress_to_buffer(&scratch.raw, &mut scratch.compressed[..], level)
            .map_err(io("zstd compress"))?;
        scratch.compressed.truncate(n);
        if n < raw_len {
            flags |= FLAG_ZSTD;
            wire_len = n;
        }
    }
    // One hash per page, in run order, from the bytes that go out (as close
    // to the send as possible: a write racing it makes only that page
    // suspect).
    scratch.hashes.clear();
    let compressed = flags & FLAG_ZSTD != 0;
    let (mut off, mut datas, mut sparse_hashes) = (0, data.iter(), scratch.sparse_hashes.iter());
    for run in scratch.runs.iter().filter(|_| hashed) {
        match run.kind {
            RunKind::Data => {
                let Some(d) = datas.next() else { break };
                let ps = mem.regions()[run.region as usize].page_size().bytes();
                let bytes: &[u8] = if compressed {
                    &scratch.raw[off..off + d.len()]
                } else {
                    d
                };
                off += d.len();
                scratch.hashes.extend(bytes.chunks(ps).map(xxh3_64));
            }
            RunKind::Sparse => scratch
                .hashes
                .extend(sparse_hashes.by_ref().take(run.count as usize)),
            RunKind::Zero => {}
        }
    }
    let table = encode_batch_header(
        round,
        &scratch.runs,
        wire_len as u32,
        raw_len as u32,
        &scratch.hashes,
    );
    let len = (table.len() + wire_len) as u32;
    let header = FrameHeader {
        kind: FrameKind::Pages,
        flags,
        len,
        check: xxh3_64_with_seed(&table, check_seed(FrameKind::Pages, flags, len)),
    };
    let mut head = Vec::with_capacity(HEADER_LEN + table.len());
    head.extend_from_slice(&header.to_bytes());
    head.extend_from_slice(&table);
    let mut iov = vec![IoSlice::new(&head)];
    if compressed {
        iov.push(IoSlice::new(&scratch.compressed));
    } else {
        iov.extend_from_slice(&data);
        iov.push(IoSlice::new(&scratch.sparse));
    }
    write_all_vectored(stream, &mut iov)?;
    sent.wire_bytes = (head.len() + wire_len) as u64;
    Ok(sent)
}

fn write_all_vectored(
    stream: &mut Conn,
    mut iov: &mut [IoSlice<'_>],
) -> Result<(), TransportError> {
    while !iov.is_empty() {
        match (&*stream).write_vectored(iov) {
            Ok(0) => {
                return Err(io("send pages")(std::io::ErrorKind::WriteZero.into()));
            }
            Ok(n) => IoSlice::advance_slices(&mut iov, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let timeout = stream.write_timeout();
                return Err(io("send pages")(crate::control::timed_out(e, timeout)));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_core::memory::GuestRegion;

    #[test]
    fn batches_cover_every_page_once_within_the_target() {
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(0, 1000 * 4096).unwrap(),
            GuestRegion::anonymous(1 << 30, 3 * 4096).unwrap(),
        ])
        .unwrap();
        let runs = vec![
            PageRun {
                region: 0,
                first: 5,
                count: 300,
            },
            PageRun {
                region: 0,
                first: 400,
                count: 1,
            },
            PageRun {
                region: 1,
                first: 0,
                count: 3,
            },
        ];
        let batches = plan_batches(&mem, &runs);
        let mut covered = Vec::new();
        for b in &batches {
            let bytes: usize = b.iter().map(|r| r.count * 4096).sum();
            assert!(bytes <= BATCH_TARGET, "{bytes}");
            for r in b {
                covered.extend((r.first..r.first + r.count).map(|p| (r.region, p)));
            }
        }
        let mut expected: Vec<_> = (5..305).map(|p| (0, p)).collect();
        expected.push((0, 400));
        expected.extend((0..3).map(|p| (1, p)));
        assert_eq!(covered, expected);
        assert_eq!(batches.len(), 3);
    }
}
