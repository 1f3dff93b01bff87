//! Post-copy: the destination runs the guest before all of its memory is
//! there, and fetches each missing page the moment the guest touches it.
//!
//! Pre-copy cannot move a guest that dirties memory faster than the link
//! drains it. With post-copy allowed (`SourceConfig::postcopy`), the source
//! stops its rounds when they do not converge (or after a set number of
//! rounds), pauses the guest, and instead of a last round sends only the
//! *set* of pages whose latest version the destination lacks. The
//! destination drops those pages, registers its memory with userfaultfd in
//! missing mode, loads the device state and resumes the guest at once: the
//! downtime is the pause, the set and the device state, not the pages.
//! The destination drops the pages it knows to be stale (dirtied since
//! sent) before the source pauses, so that only those dirtied in the last
//! moments are dropped inside the downtime.
//!
//! # Sequence
//!
//! ```text
//!  source                                              destination
//!    |  ... live rounds (pre-copy), each acknowledged             |
//!    |  (post-copy chosen; the guest still runs)                   |
//!    | PostcopyPrepare{last, ranges} ...               ->  |  register userfaultfd
//!    |                       <-  PostcopyPrepared         |  (missing), drop these
//!    |                                                     |  (or Refused: the source
//!    |                                                     |   runs on, nothing moved)
//!    | (pause guest; harvest the last dirty pages: the set)        |
//!    | PostcopyStart{last, ranges} ...                 ->  |  drop the set's pages
//!    |                       <-  PostcopyAccepted         |  not dropped before
//!    | RdmaReadOffer{qp, regions: addr,rkey}           ->  |  (RDMA, memory registered
//!    |            <-  RdmaReadAccept{qp} | RdmaReadDeclined |   for remote read)
//!    | PageFetchOffer                                  ->  |  (TCP, FEATURE_FETCH: a
//!    |            <-  PageFetchAccept | RdmaReadDeclined  |   connection for requests;
//!    | fetch: Join{session, FETCH_STREAM}              ->  |   joins after the commit)
//!    | DeviceState{chunk, last} ...                    ->  |
//!    | Commit                                          ->  |  start the fault handler,
//!    |                       <-  Committed                |  load state, resume guest
//!    |                                                     |
//!    |      guest touches page p of the set: fault          |
//!    |                       <-  PageRequest{p}           |  (fault handler thread)
//!    | PostcopyPages{p, demand}                        ->  |  UFFDIO_COPY p: the
//!    |                                                     |  faulting thread runs on
//!    |   (RDMA: the handler READs p from the source's memory itself
//!    |    and places it; TCP with a fetch connection: the handler asks
//!    |    there and reads the answer itself; a failure falls back to
//!    |    PageRequest on the control connection for good)
//!    | PostcopyPages{next pages, pushed} ...           ->  |  (background push, from
//!    |                                                     |   the last request on)
//!    |      <-  PostcopyDone{latency, demand, pushed}     |  every page of the set
//!    | (source lets its memory go: done)                   |  placed; unregister
//! ```
//!
//! Each page of the set travels once: the source serves a request before
//! the next pushed chunk, skips pages already sent, and moves its push
//! cursor to the requested page (the guest's next touches are likely its
//! neighbours). A page the guest touches that is not in the set and was
//! never written here holds zeros on the source: the handler places a zero
//! page without asking. Every frame is checked (xxh3) like any other.
//!
//! # Receiver states (after the pre-copy states of [`crate::protocol`])
//!
//! ```text
//!  Receiving --PostcopyPrepare(last: false)--> Receiving (set grows)
//!  Receiving --PostcopyPrepare(last)--> Prepared (memory registered, the
//!      pages dropped, PostcopyPrepared sent; Refused{Setup} if this memory
//!      cannot take missing faults)
//!  Prepared --PostcopyStart(last: false)--> Prepared (set grows)
//!  Prepared --PostcopyStart(last)--> Complete (the set's other pages
//!      dropped, PostcopyAccepted sent)
//!  Receiving --PostcopyStart(last)--> Complete (as both at once: a source
//!      that did not prepare)
//!  Complete --VerifyRequest--> Discarded (no verification in post-copy)
//!  Complete --RdmaReadOffer--> Complete (RdmaReadAccept: the handler
//!      reads pages itself; or RdmaReadDeclined)
//!  Complete --PageFetchOffer--> Complete (PageFetchAccept: the handler
//!      asks on the fetch connection once it joined; or RdmaReadDeclined)
//!  HaveState --Commit--> Postcopy (handler started, guest resumed,
//!      Committed sent)
//!  Postcopy --PostcopyPages--> Postcopy (pages placed) --every page of the
//!      set placed--> Done (PostcopyDone sent)
//!  Postcopy --connection lost--> AwaitResume --Resume--> Postcopy
//!      (Resumed, PostcopyMissing and PageRequests sent; see below)
//!  AwaitResume --grace period over--> Broken (the guest waits on its
//!      missing pages)
//! ```
//!
//! # When the link breaks during post-copy
//!
//! From `Commit` on, neither side alone holds the guest: the destination
//! runs it, the source holds the pages it still lacks. Within both sides'
//! grace periods a lost connection is resumed as before the switch-over,
//! and post-copy goes on:
//!
//! ```text
//!  source                                              destination
//!    |  ... post-copy: connection lost (cut, reset, silent peer)  |
//!    |  guest paused, memory kept              guest waits on its missing
//!    |                                         pages; requests wait too
//!    | (new control connection) MAGIC+version          ->  |
//!    | Resume{session}                                 ->  |  same session?
//!    |                       <-  Resumed                  |
//!    |                 <-  PostcopyMissing{last, ranges}  |  set pages not placed
//!    |                       <-  PageRequest{waited on}   |  (sent ones may be lost)
//!    |  serve and push again, from what is missing          |
//! ```
//!
//! Past the grace period the source keeps its guest paused and its memory
//! intact and reports
//! [`MigrationError::PostcopyInterrupted`](crate::MigrationError::PostcopyInterrupted);
//! the destination's guest threads wait on their missing pages. If the
//! source host dies in this phase the guest is lost (as with QEMU's
//! post-copy): post-copy trades that risk for a bounded downtime, which is
//! why it is never the default.

pub(crate) mod fetch;
pub(crate) mod serve;

use crate::memory::GuestMemory;
use crate::protocol::{Message, PageRange, RANGES_PER_FRAME};
use crate::transport::{ControlChannel, TransportError};

/// Whether the pages of `r` lie inside `mem`'s layout (a peer's ranges are
/// checked before anything indexes with them).
pub(crate) fn fits(mem: &GuestMemory, r: &PageRange) -> bool {
    mem.regions()
        .get(r.region as usize)
        .is_some_and(|g| r.first.saturating_add(u64::from(r.count)) <= g.pages() as u64)
}

/// Send `ranges` as messages of at most [`RANGES_PER_FRAME`] each, made by
/// `msg(last, chunk)`; one empty last message when there are none.
pub(crate) fn send_ranges(
    ctl: &mut dyn ControlChannel,
    ranges: &[PageRange],
    msg: impl Fn(bool, Vec<PageRange>) -> Message,
) -> Result<(), TransportError> {
    let mut chunks = ranges.chunks(RANGES_PER_FRAME).peekable();
    if chunks.peek().is_none() {
        return ctl.send(&msg(true, Vec::new()));
    }
    while let Some(chunk) = chunks.next() {
        ctl.send(&msg(chunks.peek().is_none(), chunk.to_vec()))?;
    }
    Ok(())
}

/// Whether (and when) the source may switch to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PostcopyMode {
    /// Pre-copy only: a guest that does not converge is throttled or
    /// switched over with whatever downtime the rest costs.
    #[default]
    Never,
    /// Post-copy when pre-copy does not converge: the rounds stop growing
    /// shorter (two rounds in a row dirty more than half of what they sent,
    /// the auto-converge trigger), `max_rounds` is reached, the timeout
    /// forces a switch-over, or the operator asks for one; a remainder
    /// that fits the downtime budget then still finishes as pre-copy.
    /// After `postcopy_after_rounds` rounds, post-copy in any case.
    Auto,
}

/// How long the destination's guest waited on pages that had not arrived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct FaultLatency {
    /// Faults on pages of the post-copy set that had not arrived.
    pub faults: u64,
    /// Median wait, microseconds.
    pub p50: u64,
    /// 99th percentile wait, microseconds.
    pub p99: u64,
    /// Longest wait, microseconds.
    pub max: u64,
}

impl FaultLatency {
    /// Summarise waits given in microseconds.
    pub(crate) fn of(mut waits: Vec<u64>, faults: u64) -> Self {
        waits.sort_unstable();
        let at = |q: f64| -> u64 {
            if waits.is_empty() {
                0
            } else {
                waits[((waits.len() - 1) as f64 * q).round() as usize]
            }
        };
        Self {
            faults,
            p50: at(0.5),
            p99: at(0.99),
            max: waits.last().copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles() {
        let l = FaultLatency::of((1..=100).rev().collect(), 120);
        assert_eq!((l.faults, l.p50, l.p99, l.max), (120, 51, 99, 100));
        assert_eq!(FaultLatency::of(Vec::new(), 0), FaultLatency::default());
    }
}
