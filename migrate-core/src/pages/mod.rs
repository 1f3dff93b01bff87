//! Page batches: where a page is encoded and where it lands.
//!
//! A transport that moves bytes (TCP, or any future byte stream) does not
//! look inside pages. It asks this layer to cut a round into batches
//! ([`plan_batches`], shared by its streams through a [`BatchQueue`]), to
//! encode each one ([`BatchEncoder`]: zero, Sparse or Data per page, zstd,
//! page hashes, the frame) into buffers it writes as they are, and on the
//! other side to land what it reads ([`BatchLander`]: validate, decompress,
//! check each page against its hash, write it into guest memory). The wire
//! format is [`protocol::batch`](crate::protocol::wire); the classification
//! and the landing rules are here, once. RDMA WRITEs pages into registered
//! memory and never frames them.
//!
//! ```text
//!  source                                   destination
//!  PageRun[] ── plan_batches ─► BatchQueue   bytes ─► BatchLander::land
//!  BatchEncoder::encode(batch)                 ├ decode_batch_header (layout)
//!    ├ per page: Skip | Zero | Sparse | Data   ├ allocate fresh pages by run
//!    ├ zstd (when agreed and smaller)          ├ Data straight into memory
//!    ├ xxh3 per page (unless sealed)           ├ Sparse: zero, then words
//!    └ header + table + IoSlices ─► transport  └ hash check ─► suspect pages
//! ```

mod encode;
mod land;

pub use encode::{BatchEncoder, EncodedBatch, Encoding};
pub use land::{BatchLander, LandedBatch};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::dirty::PageRun;
use crate::memory::GuestMemory;

/// Raw page bytes a batch aims for: large enough to amortize headers and
/// syscalls, small enough to spread a round over all streams.
pub const BATCH_TARGET: usize = 512 << 10;

/// Cut a round's runs into batches of about [`BATCH_TARGET`] bytes (at
/// least one page each, so 2 MiB pages travel one per batch).
pub fn plan_batches(mem: &GuestMemory, runs: &[PageRun]) -> Vec<Vec<PageRun>> {
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

/// One round's batches, taken in turn by several streams; any stream can
/// stop the others ([`abort`](Self::abort)).
#[derive(Debug)]
pub struct BatchQueue {
    batches: Vec<Vec<PageRun>>,
    next: AtomicUsize,
    aborted: AtomicBool,
}

impl BatchQueue {
    /// The round's `runs`, planned into batches.
    pub fn new(mem: &GuestMemory, runs: &[PageRun]) -> Self {
        Self {
            batches: plan_batches(mem, runs),
            next: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
        }
    }

    /// The next batch nobody took yet; `None` when all are taken.
    pub fn take(&self) -> Option<&[PageRun]> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.batches.get(i).map(Vec::as_slice)
    }

    /// One stream failed: the others stop at their next batch.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// Whether a stream failed.
    pub fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
