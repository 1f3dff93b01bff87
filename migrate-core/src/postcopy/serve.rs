//! The source's side of post-copy: answer the destination's requests
//! first, push the rest of the set in between, each page once.

use std::time::Instant;

use super::FaultLatency;
use crate::control;
use crate::dirty::DirtyLog;
use crate::error::MigrationError;
use crate::memory::GuestMemory;
use crate::protocol::{FrameKind, Message, PageRange, ProtocolError};
use crate::transport::{ControlChannel, RateLimiter};

/// Bytes per pushed frame (at least one page): small, so that a request
/// waits behind little.
const PUSH_BYTES: usize = 64 << 10;

/// What the source's post-copy phase did.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Served {
    pub demand_pages: u64,
    pub pushed_pages: u64,
    pub bytes: u64,
    pub latency: FaultLatency,
    pub ms: f64,
}

/// The source's post-copy: what is left to send, across connections.
pub(crate) struct Serving<'a> {
    mem: &'a GuestMemory,
    set: &'a DirtyLog,
    unsent: DirtyLog,
    left: u64,
    cursor: (usize, usize),
    buf: Vec<u8>,
    started: Instant,
    pub out: Served,
}

impl<'a> Serving<'a> {
    /// Serve `set` from the (paused) `mem`.
    pub(crate) fn new(mem: &'a GuestMemory, set: &'a DirtyLog) -> Self {
        Self {
            mem,
            set,
            unsent: set.clone(),
            left: set.count() as u64,
            cursor: (0, 0),
            buf: Vec::new(),
            started: Instant::now(),
            out: Served::default(),
        }
    }

    /// After a new connection: the destination's `PostcopyMissing` chunks
    /// say what it still lacks; those pages go (again).
    ///
    /// # Errors
    /// The channel's error, or ranges outside the set.
    pub(crate) fn missing(&mut self, ctl: &mut dyn ControlChannel) -> Result<(), MigrationError> {
        let mut unsent = DirtyLog::new(self.mem);
        loop {
            let (last, ranges) =
                control::expect_msg!(ctl, PostcopyMissing { last, ranges } => (last, ranges));
            for r in ranges {
                check_range(self.mem, &r)?;
                let (ri, first) = (r.region as usize, r.first as usize);
                for p in first..first + r.count as usize {
                    if !self.set.is_dirty(ri, p) {
                        return Err(MigrationError::Protocol(ProtocolError::Malformed {
                            kind: FrameKind::PostcopyMissing,
                            detail: format!("page {p} of region {ri} is not in the post-copy set"),
                        }));
                    }
                }
                unsent.mark_range(ri, first, r.count as usize);
            }
            if last {
                break;
            }
        }
        self.left = unsent.count() as u64;
        self.unsent = unsent;
        tracing::info!(
            pages = self.left,
            "post-copy resumed: pages the destination lacks"
        );
        Ok(())
    }

    /// Send every page left: requested pages as they are asked for, the
    /// others pushed from the last request on; then wait for the
    /// destination's `PostcopyDone`. `progress` hears the pages left now
    /// and then.
    ///
    /// # Errors
    /// The channel's error, or a destination that asks for what is not in
    /// the layout or ends before the set was sent.
    pub(crate) fn run(
        &mut self,
        ctl: &mut dyn ControlChannel,
        limiter: &RateLimiter,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), MigrationError> {
        let mut frames = 0u64;
        // Under a bandwidth cap the push waits its turn here, listening
        // for requests (which go out at once) instead of sleeping.
        let mut push_at = Instant::now();
        loop {
            let msg = if self.left > 0 {
                ctl.recv_timeout(push_at.saturating_duration_since(Instant::now()))?
            } else {
                Some(ctl.recv()?)
            };
            match msg {
                None => {}
                Some(Message::PageRequest { ranges }) => {
                    for r in ranges {
                        check_range(self.mem, &r)?;
                        let region = r.region as usize;
                        for p in r.first as usize..(r.first + u64::from(r.count)) as usize {
                            if self.unsent.is_dirty(region, p) {
                                let bytes = self.send(ctl, (region, p, 1), true)?;
                                // Counted against the cap; never delayed by it.
                                push_at = Instant::now() + limiter.reserve(bytes);
                                self.out.demand_pages += 1;
                                self.cursor = (region, p + 1);
                            }
                        }
                    }
                    continue;
                }
                Some(Message::PostcopyDone {
                    faults,
                    p50_us,
                    p99_us,
                    max_us,
                    demand_pages,
                    pushed_pages,
                }) => {
                    // The destination knows what it holds: pages it read
                    // itself (RDMA READ) were never sent from here.
                    tracing::debug!(
                        unsent = self.left,
                        served = self.out.demand_pages,
                        pushed = self.out.pushed_pages,
                        "post-copy done at the destination"
                    );
                    self.out.demand_pages = demand_pages;
                    self.out.pushed_pages = pushed_pages;
                    self.out.latency = FaultLatency {
                        faults,
                        p50: p50_us,
                        p99: p99_us,
                        max: max_us,
                    };
                    self.out.ms = self.started.elapsed().as_secs_f64() * 1e3;
                    return Ok(());
                }
                Some(Message::Abort { reason }) => {
                    return Err(MigrationError::PeerAborted { reason });
                }
                Some(Message::Refused { code, message }) => {
                    return Err(MigrationError::Refused { code, message });
                }
                Some(other) => {
                    return Err(control::unexpected(&other, "PageRequest or PostcopyDone"));
                }
            }
            if self.left == 0 || Instant::now() < push_at {
                continue;
            }
            let Some(run) = next_run(self.mem, &self.unsent, &mut self.cursor) else {
                continue;
            };
            let bytes = self.send(ctl, run, false)?;
            push_at = Instant::now() + limiter.reserve(bytes);
            self.out.pushed_pages += run.2 as u64;
            frames += 1;
            if frames % 256 == 0 {
                progress(self.left);
            }
        }
    }

    /// Send `count` pages from `first` of `region` and mark them sent; the
    /// bytes sent.
    fn send(
        &mut self,
        ctl: &mut dyn ControlChannel,
        (region, first, count): (usize, usize, usize),
        demand: bool,
    ) -> Result<u64, MigrationError> {
        let r = &self.mem.regions()[region];
        let ps = r.page_size().bytes();
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(count * ps, 0);
        r.read_bytes(first * ps, &mut buf);
        let msg = Message::PostcopyPages {
            region: region as u32,
            first: first as u64,
            demand,
            bytes: buf,
        };
        ctl.send(&msg)?;
        if let Message::PostcopyPages { bytes, .. } = msg {
            self.buf = bytes;
        }
        self.unsent.region_mut(region)[first..first + count].fill(false);
        self.left -= count as u64;
        let bytes = (count * ps) as u64;
        self.out.bytes += bytes;
        Ok(bytes)
    }
}

/// A range from the destination must lie in the layout.
fn check_range(mem: &GuestMemory, r: &PageRange) -> Result<(), MigrationError> {
    if super::fits(mem, r) {
        Ok(())
    } else {
        Err(MigrationError::Protocol(ProtocolError::Malformed {
            kind: FrameKind::PageRequest,
            detail: format!(
                "pages {}+{} of region {} are outside the layout",
                r.first, r.count, r.region
            ),
        }))
    }
}

/// The next pages to push: up to [`PUSH_BYTES`] of consecutive unsent
/// pages from `cursor` on (wrapping around), as (region, first, count).
fn next_run(
    mem: &GuestMemory,
    unsent: &DirtyLog,
    cursor: &mut (usize, usize),
) -> Option<(usize, usize, usize)> {
    let regions = unsent.regions();
    for step in 0..=regions {
        let region = (cursor.0 + step) % regions;
        let from = if step == 0 { cursor.1 } else { 0 };
        let bits = unsent.region(region);
        if from >= bits.len() {
            continue;
        }
        let Some(off) = bits[from..].first_one() else {
            continue;
        };
        let first = from + off;
        let max = (PUSH_BYTES / mem.regions()[region].page_size().bytes()).max(1);
        let count = bits[first..]
            .first_zero()
            .unwrap_or(bits.len() - first)
            .min(max);
        *cursor = (region, first + count);
        return Some((region, first, count));
    }
    None
}
