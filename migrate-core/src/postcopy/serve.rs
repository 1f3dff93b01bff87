//! The source's side of post-copy: answer the destination's requests
//! first, push the rest of the set in between, each page once.

use std::time::Instant;

use super::FaultLatency;
use crate::dirty::DirtyLog;
use crate::memory::GuestMemory;
use crate::protocol::{FrameKind, Message, PageRange, ProtocolError};
use crate::transport::{ControlChannel, RateLimiter};
use crate::{MigrationError, control};

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

/// Send every page of `set` from the (paused) `mem`: requested pages as
/// they are asked for, the others pushed from the last request on; then
/// wait for the destination's `PostcopyDone`. `progress` hears the pages
/// left now and then.
///
/// # Errors
/// The channel's error, or a destination that asks for what is not in the
/// set or ends before it was sent.
pub(crate) fn serve(
    ctl: &mut dyn ControlChannel,
    mem: &GuestMemory,
    set: &DirtyLog,
    limiter: &RateLimiter,
    progress: &mut dyn FnMut(u64),
) -> Result<Served, MigrationError> {
    let started = Instant::now();
    let mut unsent = set.clone();
    let mut left = unsent.count() as u64;
    let mut out = Served::default();
    let mut cursor = (0, 0);
    let mut buf = Vec::new();
    let mut frames = 0u64;
    // Under a bandwidth cap the push waits its turn here, listening for
    // requests (which go out at once) instead of sleeping.
    let mut push_at = Instant::now();
    loop {
        let msg = if left > 0 {
            ctl.recv_timeout(push_at.saturating_duration_since(Instant::now()))?
        } else {
            Some(ctl.recv()?)
        };
        match msg {
            None => {}
            Some(Message::PageRequest { ranges }) => {
                for r in ranges {
                    check_range(mem, &r)?;
                    let region = r.region as usize;
                    for p in r.first as usize..(r.first + u64::from(r.count)) as usize {
                        if unsent.is_dirty(region, p) {
                            let bytes =
                                send_pages(ctl, mem, &mut unsent, (region, p, 1), true, &mut buf)?;
                            // Counted against the cap; never delayed by it.
                            push_at = Instant::now() + limiter.reserve(bytes);
                            out.bytes += bytes;
                            out.demand_pages += 1;
                            left -= 1;
                            cursor = (region, p + 1);
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
            }) => {
                if left > 0 {
                    return Err(MigrationError::Protocol(ProtocolError::Malformed {
                        kind: FrameKind::PostcopyDone,
                        detail: format!("{left} pages of the set were not sent yet"),
                    }));
                }
                out.latency = FaultLatency {
                    faults,
                    p50: p50_us,
                    p99: p99_us,
                    max: max_us,
                };
                out.ms = started.elapsed().as_secs_f64() * 1e3;
                return Ok(out);
            }
            Some(Message::Abort { reason }) => return Err(MigrationError::PeerAborted { reason }),
            Some(Message::Refused { code, message }) => {
                return Err(MigrationError::Refused { code, message });
            }
            Some(other) => return Err(control::unexpected(&other, "PageRequest or PostcopyDone")),
        }
        if left == 0 || Instant::now() < push_at {
            continue;
        }
        let Some(run) = next_run(mem, &unsent, &mut cursor) else {
            continue;
        };
        let bytes = send_pages(ctl, mem, &mut unsent, run, false, &mut buf)?;
        push_at = Instant::now() + limiter.reserve(bytes);
        out.bytes += bytes;
        out.pushed_pages += run.2 as u64;
        left -= run.2 as u64;
        frames += 1;
        if frames % 256 == 0 {
            progress(left);
        }
    }
}

/// A range from the destination must lie in the layout.
fn check_range(mem: &GuestMemory, r: &PageRange) -> Result<(), MigrationError> {
    let fits = mem
        .regions()
        .get(r.region as usize)
        .is_some_and(|reg| r.first.saturating_add(u64::from(r.count)) <= reg.pages() as u64);
    if fits {
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

/// Send `count` pages from `first` of `region` and mark them sent; the
/// bytes sent.
fn send_pages(
    ctl: &mut dyn ControlChannel,
    mem: &GuestMemory,
    unsent: &mut DirtyLog,
    (region, first, count): (usize, usize, usize),
    demand: bool,
    buf: &mut Vec<u8>,
) -> Result<u64, MigrationError> {
    let r = &mem.regions()[region];
    let ps = r.page_size().bytes();
    buf.resize(count * ps, 0);
    r.read_bytes(first * ps, buf);
    unsent.region_mut(region)[first..first + count].fill(false);
    let msg = Message::PostcopyPages {
        region: region as u32,
        first: first as u64,
        demand,
        bytes: std::mem::take(buf),
    };
    ctl.send(&msg)?;
    if let Message::PostcopyPages { bytes, .. } = msg {
        *buf = bytes;
    }
    Ok((count * ps) as u64)
}
