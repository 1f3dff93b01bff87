//! The destination's side of post-copy: drop the set, handle the guest's
//! faults on it, place the pages as they come.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::FaultLatency;
use crate::control;
use crate::error::IncomingError;
use crate::memory::GuestMemory;
use crate::memory::PageBits;
use crate::protocol::{FrameKind, Message, PageRange, ProtocolError, RANGES_PER_FRAME};
use crate::transport::{ControlChannel, ControlSender, DestinationTransport, PageFetcher};
use crate::uffd::{Uffd, UffdMode};

/// How long the fault handler waits before it looks at its stop flag.
const HANDLER_POLL_MS: libc::c_int = 50;

/// What the destination's post-copy phase did.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Fetched {
    pub demand_pages: u64,
    pub pushed_pages: u64,
    pub latency: FaultLatency,
    pub ms: f64,
    pub read_pages: u64,
}

/// Shared by the fault handler thread and the thread placing pages.
struct Shared {
    mem: Arc<GuestMemory>,
    uffd: Uffd,
    /// Pages of the post-copy set.
    needed: PageBits,
    /// Pages of the set placed.
    present: PageBits,
    /// Pages of the set asked for.
    requested: PageBits,
    /// When the guest first waited on a page of the set not yet there.
    waiting: Mutex<HashMap<(usize, usize), Instant>>,
    waits_us: Mutex<Vec<u64>>,
    faults: AtomicU64,
    stop: AtomicBool,
    /// Set once `Committed` went out: requests wait for it, so that the
    /// source reads the commit's answer first.
    may_ask: AtomicBool,
    /// Where requests go: the control connection's sending half; `None`
    /// while the connection is lost (requests wait for the next one).
    requests: Mutex<Option<Box<dyn ControlSender>>>,
    /// Reads pages from the source by itself (RDMA READ), when the
    /// transport offered it; dropped at its first failure.
    fetcher: Mutex<Option<Box<dyn PageFetcher>>>,
    /// Pages of the set not placed yet.
    remaining: AtomicU64,
    /// Pages the fault handler read from the source itself.
    read_pages: AtomicU64,
}

impl Shared {
    /// The region and page holding host address `addr`.
    fn locate(&self, addr: usize) -> Option<(usize, usize)> {
        self.mem.regions().iter().enumerate().find_map(|(i, r)| {
            let start = r.as_ptr() as usize;
            (addr >= start && addr < start + r.len())
                .then(|| (i, (addr - start) / r.page_size().bytes()))
        })
    }

    fn page_addr(&self, region: usize, page: usize) -> usize {
        self.mem.regions()[region].page_ptr(page) as usize
    }

    /// Place page `page` of the set (`bytes`), whoever brought it: whether
    /// it was new (the other path may have placed it first).
    fn place(&self, region: usize, page: usize, bytes: &[u8]) -> io::Result<bool> {
        let new = self.uffd.copy(self.page_addr(region, page), bytes)?;
        if new {
            self.placed(region, page, 1);
        } else {
            self.present.set(region, page);
        }
        Ok(new)
    }

    /// Pages `first..first + count` of `region` were just placed here (new):
    /// mark them, count them off, and record how long the guest waited on
    /// any of them.
    fn placed(&self, region: usize, first: usize, count: usize) {
        for p in first..first + count {
            self.present.set(region, p);
        }
        self.remaining.fetch_sub(count as u64, Ordering::AcqRel);
        let mut waiting = lock(&self.waiting);
        if waiting.is_empty() {
            return;
        }
        let mut waits = lock(&self.waits_us);
        for p in first..first + count {
            if let Some(t) = waiting.remove(&(region, p)) {
                waits.push(t.elapsed().as_micros() as u64);
            }
        }
    }

    /// Place the pages `first..` of `region` (`bytes`, a whole number of
    /// pages, none known to be present) with as few copies as the kernel
    /// allows: one for the run, more only where the other path placed a
    /// page first. How many were new.
    fn place_run(&self, region: usize, first: usize, bytes: &[u8]) -> io::Result<u64> {
        let ps = self.mem.regions()[region].page_size().bytes();
        let (mut at, mut new) = (0, 0);
        while at < bytes.len() {
            let page = first + at / ps;
            let addr = self.page_addr(region, page);
            let done = self.uffd.copy_prefix(addr, &bytes[at..])?;
            if done == 0 {
                // There already: its waiters may not have been woken yet.
                self.uffd.wake(addr, ps)?;
                self.present.set(region, page);
                at += ps;
                continue;
            }
            let pages = done / ps;
            self.placed(region, page, pages);
            new += pages as u64;
            at += pages * ps;
        }
        Ok(new)
    }

    /// Read the page with the fetcher, if there is one, and place it;
    /// whether that worked (else it must be asked for).
    fn read_and_place(&self, region: usize, page: usize, buf: &mut [u8]) -> bool {
        let mut fetcher = lock(&self.fetcher);
        let Some(f) = fetcher.as_mut() else {
            return false;
        };
        if !f.ready() {
            return false;
        }
        let ps = self.mem.regions()[region].page_size().bytes();
        let buf = &mut buf[..ps];
        if let Err(e) = f.fetch(region, page, buf) {
            tracing::warn!(error = %e, "post-copy page read failed; asking over the control connection from now on");
            *fetcher = None;
            return false;
        }
        match self.place(region, page, buf) {
            Ok(new) => {
                if new {
                    self.read_pages.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "placing a page read from the source failed");
                false
            }
        }
    }
}

/// The destination's memory, between `PostcopyStart` and the last page.
pub(crate) struct PostcopyTarget {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PostcopyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostcopyTarget")
            .field("handler_running", &self.handler.is_some())
            .finish_non_exhaustive()
    }
}

impl PostcopyTarget {
    /// Register every region for missing-page faults, then drop the pages
    /// of `set` (validated against the layout by the caller).
    ///
    /// # Errors
    /// Why this memory cannot take post-copy (no userfaultfd, a backing
    /// without missing-mode support such as a file on disk).
    pub(crate) fn prepare(mem: &Arc<GuestMemory>, set: &[PageRange]) -> Result<Self, String> {
        let started = Instant::now();
        // Not user-mode only: a vCPU's access through KVM faults in the
        // kernel, and must wait for its page like a user access.
        let uffd = Uffd::open(UffdMode::All)
            .or_else(|_| Uffd::open(UffdMode::UserOnly))
            .map_err(|e| format!("userfaultfd: {e}"))?;
        uffd.api(0)
            .map_err(|e| format!("userfaultfd handshake: {e}"))?;
        for (i, r) in mem.regions().iter().enumerate() {
            uffd.register_missing(r.as_ptr() as usize, r.len())
                .map_err(|e| {
                    format!(
                        "region {i} ({} memory) cannot take missing-page faults: {e}",
                        r.backing().name()
                    )
                })?;
        }
        let registered = started.elapsed().as_secs_f64() * 1e3;
        let needed = PageBits::new(mem);
        let remaining = drop_new(mem, &needed, set)?;
        tracing::info!(
            pages = remaining,
            register_ms = registered,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "post-copy: pages dropped, memory registered"
        );
        Ok(Self {
            shared: Arc::new(Shared {
                mem: Arc::clone(mem),
                uffd,
                present: PageBits::new(mem),
                requested: PageBits::new(mem),
                needed,
                waiting: Mutex::new(HashMap::new()),
                waits_us: Mutex::new(Vec::new()),
                faults: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                may_ask: AtomicBool::new(false),
                requests: Mutex::new(None),
                fetcher: Mutex::new(None),
                remaining: AtomicU64::new(remaining),
                read_pages: AtomicU64::new(0),
            }),
            handler: None,
        })
    }

    /// Add `set` to the pages to fetch (the last ones, harvested once the
    /// source paused its guest): drop those not dropped before.
    ///
    /// # Errors
    /// Why a page could not be dropped.
    pub(crate) fn add(&mut self, set: &[PageRange]) -> Result<(), String> {
        let started = Instant::now();
        let s = &self.shared;
        let added = drop_new(&s.mem, &s.needed, set)?;
        s.remaining.fetch_add(added, Ordering::AcqRel);
        tracing::info!(
            pages = added,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "post-copy: the last dirty pages dropped"
        );
        Ok(())
    }

    /// Let the fault handler read the pages it needs with `fetcher`
    /// instead of asking.
    pub(crate) fn set_fetcher(&mut self, fetcher: Box<dyn PageFetcher>) {
        *lock(&self.shared.fetcher) = Some(fetcher);
    }

    /// Start the fault handler, which asks for pages through `requests`:
    /// before the guest resumes.
    ///
    /// # Errors
    /// The thread could not start.
    pub(crate) fn start(&mut self, requests: Box<dyn ControlSender>) -> io::Result<()> {
        *lock(&self.shared.requests) = Some(requests);
        let shared = Arc::clone(&self.shared);
        self.handler = Some(
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || {
                    if let Err(e) = handle_faults(&shared) {
                        tracing::error!(error = %e, "post-copy fault handler stopped");
                    }
                })?,
        );
        Ok(())
    }

    /// Place pages as they come until every page of the set is there, then
    /// tell the source. When the connection is lost, `reconnect` waits for
    /// the source to come back (`Resume` answered); the source then hears
    /// which pages are still missing, and which the guest waits on.
    ///
    /// # Errors
    /// The channel's error when `reconnect` gives up (the guest then waits
    /// on its missing pages), or a source that sends what was not asked for.
    pub(crate) fn run(
        mut self,
        transport: &mut dyn DestinationTransport,
        reconnect: &mut dyn FnMut(
            &mut dyn DestinationTransport,
            IncomingError,
        ) -> Result<(), IncomingError>,
    ) -> Result<Fetched, IncomingError> {
        let started = Instant::now();
        self.shared.may_ask.store(true, Ordering::Release);
        let mut out = Fetched::default();
        while self.shared.remaining.load(Ordering::Acquire) > 0 {
            match control::recv(transport.control()) {
                Ok(Message::PostcopyPages {
                    region,
                    first,
                    demand,
                    bytes,
                }) => {
                    let placed = self.place(region, first, &bytes)?;
                    if demand {
                        out.demand_pages += placed;
                    } else {
                        out.pushed_pages += placed;
                    }
                }
                Ok(other) => return Err(control::unexpected(&other, "PostcopyPages")),
                Err(e) => {
                    *lock(&self.shared.requests) = None;
                    reconnect(transport, e)?;
                    self.tell_missing(transport.control())?;
                }
            }
        }
        self.finish()?;
        let s = &self.shared;
        let waits = std::mem::take(&mut *lock(&s.waits_us));
        out.latency = FaultLatency::of(waits, s.faults.load(Ordering::Relaxed));
        out.ms = started.elapsed().as_secs_f64() * 1e3;
        out.read_pages = s.read_pages.load(Ordering::Relaxed);
        out.demand_pages += out.read_pages;
        let l = out.latency;
        transport.control().send(&Message::PostcopyDone {
            faults: l.faults,
            p50_us: l.p50,
            p99_us: l.p99,
            max_us: l.max,
            demand_pages: out.demand_pages,
            pushed_pages: out.pushed_pages,
        })?;
        tracing::info!(
            read = out.read_pages,
            demand = out.demand_pages,
            pushed = out.pushed_pages,
            faults = l.faults,
            p50_us = l.p50,
            p99_us = l.p99,
            "post-copy complete: every page in place"
        );
        Ok(out)
    }

    /// After a reconnection: the pages of the set not placed yet, then
    /// requests for those the guest waits on; requests go over the new
    /// connection from now on.
    fn tell_missing(&self, ctl: &mut dyn ControlChannel) -> Result<(), IncomingError> {
        let s = &self.shared;
        let mut missing: Vec<PageRange> = Vec::new();
        for (ri, r) in s.mem.regions().iter().enumerate() {
            for p in 0..r.pages() {
                if s.needed.get(ri, p) && !s.present.get(ri, p) {
                    push_page(&mut missing, ri, p);
                }
            }
        }
        tracing::info!(
            ranges = missing.len(),
            "post-copy resumed: telling the source what is missing"
        );
        super::send_ranges(ctl, &missing, |last, ranges| Message::PostcopyMissing {
            last,
            ranges,
        })?;
        let mut waited: Vec<(usize, usize)> = lock(&s.waiting).keys().copied().collect();
        waited.sort_unstable();
        let mut ask = Vec::new();
        for (ri, p) in waited {
            push_page(&mut ask, ri, p);
        }
        for chunk in ask.chunks(RANGES_PER_FRAME) {
            ctl.send(&Message::PageRequest {
                ranges: chunk.to_vec(),
            })?;
        }
        *lock(&s.requests) = ctl.sender();
        Ok(())
    }

    /// Place the pages of one `PostcopyPages`; how many were new.
    fn place(&self, region: u32, first: u64, bytes: &[u8]) -> Result<u64, IncomingError> {
        let s = &self.shared;
        let bad = |detail: String| {
            IncomingError::Protocol(ProtocolError::Malformed {
                kind: FrameKind::PostcopyPages,
                detail,
            })
        };
        let r = s
            .mem
            .regions()
            .get(region as usize)
            .ok_or_else(|| bad(format!("region {region} does not exist")))?;
        let ps = r.page_size().bytes();
        let count = bytes.len() / ps;
        if bytes.is_empty() || bytes.len() % ps != 0 {
            return Err(bad(format!("{} bytes for pages of {ps}", bytes.len())));
        }
        if first.saturating_add(count as u64) > r.pages() as u64 {
            return Err(bad(format!(
                "pages {first}+{count} outside region {region}"
            )));
        }
        let (region, first) = (region as usize, first as usize);
        if let Some(p) = (first..first + count).find(|&p| !s.needed.get(region, p)) {
            return Err(bad(format!(
                "page {p} of region {region} is not in the post-copy set"
            )));
        }
        // Runs of pages not placed yet, each in one copy where it can.
        let mut placed = 0;
        let mut i = 0;
        while i < count {
            if s.present.get(region, first + i) {
                i += 1;
                continue;
            }
            let run = (i..count)
                .find(|&j| s.present.get(region, first + j))
                .unwrap_or(count);
            placed += s
                .place_run(region, first + i, &bytes[i * ps..run * ps])
                .map_err(|e| IncomingError::Transport(io_err("place post-copy pages", e)))?;
            i = run;
        }
        Ok(placed)
    }

    /// Stop the handler and hand the memory back to the kernel: every page
    /// of the set is there, and a missing page elsewhere reads as zeros,
    /// as on the source.
    fn finish(&mut self) -> Result<(), IncomingError> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        for r in self.shared.mem.regions() {
            self.shared
                .uffd
                .unregister(r.as_ptr() as usize, r.len())
                .map_err(|e| IncomingError::Transport(io_err("unregister userfaultfd", e)))?;
        }
        Ok(())
    }
}

impl Drop for PostcopyTarget {
    fn drop(&mut self) {
        // On an error the handler stops; the registration goes with the
        // descriptor, once nothing holds it.
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Drop the pages of `set` not marked in `needed` yet, and mark them; how
/// many there were.
fn drop_new(mem: &GuestMemory, needed: &PageBits, set: &[PageRange]) -> Result<u64, String> {
    let mut added = 0;
    for r in set {
        let ri = r.region as usize;
        let region = &mem.regions()[ri];
        let end = r.first as usize + r.count as usize;
        let mut p = r.first as usize;
        while p < end {
            if needed.get(ri, p) {
                p += 1;
                continue;
            }
            let first = p;
            while p < end && !needed.set(ri, p) {
                p += 1;
            }
            added += (p - first) as u64;
            region
                .discard_pages(first, p - first)
                .map_err(|e| format!("drop pages of region {ri}: {e}"))?;
            // `p` was set already (by an earlier range): step past it.
            if p < end {
                p += 1;
            }
        }
    }
    Ok(added)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Add page `p` of region `ri` to `ranges`, extending the last range when
/// it ends right before it.
fn push_page(ranges: &mut Vec<PageRange>, ri: usize, p: usize) {
    match ranges.last_mut() {
        Some(l) if l.region == ri as u32 && l.first + u64::from(l.count) == p as u64 => {
            l.count += 1
        }
        _ => ranges.push(PageRange {
            region: ri as u32,
            first: p as u64,
            count: 1,
        }),
    }
}

fn io_err(op: &'static str, source: io::Error) -> crate::transport::TransportError {
    crate::transport::TransportError::Io { op, source }
}

/// The fault handler: a touched page of the set goes on a request (once),
/// a touched page outside it gets zeros.
fn handle_faults(s: &Shared) -> Result<(), IncomingError> {
    let zeros = vec![
        0u8;
        s.mem
            .regions()
            .iter()
            .map(|r| r.page_size().bytes())
            .max()
            .unwrap_or(4096)
    ];
    let mut buf = zeros.clone();
    let mut ask: Vec<PageRange> = Vec::new();
    while !s.stop.load(Ordering::Acquire) {
        s.uffd
            .wait(if ask.is_empty() { HANDLER_POLL_MS } else { 1 })
            .map_err(|e| IncomingError::Transport(io_err("poll userfaultfd", e)))?;
        while let Some(addr) = s
            .uffd
            .next_missing_fault()
            .map_err(|e| IncomingError::Transport(io_err("read userfaultfd", e)))?
        {
            let Some((region, page)) = s.locate(addr) else {
                continue;
            };
            let ps = s.mem.regions()[region].page_size().bytes();
            let at = s.page_addr(region, page);
            let placed = if s.present.get(region, page) {
                s.uffd.wake(at, ps).map(|()| true)
            } else if !s.needed.get(region, page) {
                s.uffd.copy(at, &zeros[..ps])
            } else {
                s.faults.fetch_add(1, Ordering::Relaxed);
                lock(&s.waiting)
                    .entry((region, page))
                    .or_insert_with(Instant::now);
                if !s.requested.set(region, page) && !s.read_and_place(region, page, &mut buf) {
                    push_page(&mut ask, region, page);
                }
                Ok(true)
            };
            placed.map_err(|e| IncomingError::Transport(io_err("answer a fault", e)))?;
        }
        if !ask.is_empty() && s.may_ask.load(Ordering::Acquire) {
            let mut tx = lock(&s.requests);
            if let Some(requests) = tx.as_ref() {
                let msg = Message::PageRequest {
                    ranges: std::mem::take(&mut ask),
                };
                if let Err(e) = requests.send(&msg) {
                    // The engine hears of it on its side of the connection
                    // and reconnects; the new one carries every waited-on
                    // page again.
                    tracing::debug!(error = %e, "a page request was lost with the connection");
                    *tx = None;
                }
            }
        }
    }
    Ok(())
}
