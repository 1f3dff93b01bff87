//! The source's switch to post-copy: the set instead of a last round, the
//! device state and commit, then serving pages until the destination has
//! them all (see [`crate::postcopy`]).

use super::outgoing::{Outgoing, ms_since};
use super::phase::Step;
use crate::control;
use crate::dirty::DirtyLog;
use crate::error::MigrationError;
use crate::postcopy::send_ranges;
use crate::postcopy::serve::{Served, Serving};
use crate::protocol::{Message, PageRange};
use crate::stats::{MigrationEvent, MigrationStats, MigrationStatus, PostcopyStats};
use crate::transport::SourceTransport;

/// The ranges of `set`, as the protocol carries them.
fn ranges_of(set: &DirtyLog) -> Vec<PageRange> {
    set.runs()
        .map(|r| PageRange {
            region: r.region as u32,
            first: r.first as u64,
            count: r.count as u32,
        })
        .collect()
}

impl Outgoing<'_> {
    /// With the guest still running, post-copy chosen: have the destination
    /// register its memory and drop the pages of `set` (dirtied since they
    /// were sent) now, outside the downtime.
    pub(super) fn prepare_postcopy(
        &mut self,
        transport: &mut dyn SourceTransport,
        set: &DirtyLog,
    ) -> Result<(), MigrationError> {
        let started = std::time::Instant::now();
        send_ranges(transport.control(), &ranges_of(set), |last, ranges| {
            Message::PostcopyPrepare { last, ranges }
        })?;
        control::expect_msg!(transport.control(), PostcopyPrepared => ());
        tracing::info!(
            pages = set.count(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "post-copy prepared: the destination dropped the pages known to be stale"
        );
        Ok(())
    }

    /// With the guest paused and `set` its pages the destination lacks:
    /// announce the set, hand over the device state, commit, and serve the
    /// set. `avg_mbps`: the pre-copy rounds' average.
    pub(super) fn finish_postcopy(
        &mut self,
        transport: &mut dyn SourceTransport,
        session: u64,
        set: &DirtyLog,
        avg_mbps: f64,
    ) -> Result<MigrationStats, MigrationError> {
        if self.cfg.pause_before_switchover {
            self.pre_switchover()?;
        }
        if self.cfg.verify {
            tracing::warn!(
                "verification does not apply to post-copy (the destination's guest runs before \
                 its last pages arrive); every post-copy frame is checked on arrival"
            );
        }
        let ranges = ranges_of(set);
        let pages = set.count() as u64;
        send_ranges(transport.control(), &ranges, |last, ranges| {
            Message::PostcopyStart { last, ranges }
        })?;
        // The destination set its memory up (or refused: the guest runs
        // on here, nothing was handed over).
        control::expect_msg!(transport.control(), PostcopyAccepted => ());
        tracing::info!(pages, "post-copy: the destination will fetch these pages");
        offer_reads(transport)?;
        let ctl = transport.control();
        self.send_device_state(ctl)?;
        let paused_since = self.phase.paused_since();
        self.commit(ctl, Step::CommittedPostcopy)?;
        let downtime_ms = paused_since.map_or(0.0, ms_since);
        let remaining = set.dirty_bytes();
        let stats = self.monitor.update(|s| {
            s.status = MigrationStatus::PostcopyActive;
            s.postcopy = Some(PostcopyStats::default());
            s.downtime_ms = downtime_ms;
            s.precopy.bytes_remaining = remaining;
        });
        self.monitor.emit(MigrationEvent::Postcopy(stats));
        tracing::info!(downtime_ms, "post-copy: the destination runs the guest");
        let served = self.serve(
            transport,
            session,
            set,
            remaining.checked_div(pages).unwrap_or(0),
        )?;
        self.step(Step::AllServed)?;
        let total_ms = ms_since(self.start);
        let stats = self.monitor.update(|s| {
            s.status = MigrationStatus::Completed;
            s.total_ms = total_ms;
            s.precopy.bytes_remaining = 0;
            s.bytes_transferred += served.bytes;
            s.avg_throughput_mbps = avg_mbps;
            s.postcopy = Some(PostcopyStats {
                ms: served.ms,
                demand_pages: served.demand_pages,
                pushed_pages: served.pushed_pages,
                read_pages: None,
                fault_latency_us: served.latency,
            });
        });
        tracing::info!(
            postcopy_ms = served.ms,
            demand = served.demand_pages,
            pushed = served.pushed_pages,
            fault_p50_us = served.latency.p50,
            fault_p99_us = served.latency.p99,
            "post-copy complete"
        );
        Ok(stats)
    }

    /// Serve `set` until the destination holds all of it, over new
    /// connections within the grace period when one is lost.
    fn serve(
        &mut self,
        transport: &mut dyn SourceTransport,
        session: u64,
        set: &DirtyLog,
        page_bytes: u64,
    ) -> Result<Served, MigrationError> {
        let monitor = self.monitor;
        let mut serving = Serving::new(self.mem, set);
        loop {
            let served = serving.run(transport.control(), &self.steer.limiter, &mut |left| {
                monitor.update(|s| s.precopy.bytes_remaining = left * page_bytes);
            });
            match served {
                Ok(()) => break,
                Err(e) if self.may_resume_postcopy(&e) => {
                    // Neither side may give up within the grace period:
                    // the destination runs the guest, this side holds the
                    // pages it lacks.
                    self.reconnect_within(transport, e, |me, t| {
                        me.resume_control(t, session)?;
                        serving.missing(t.control())
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(serving.out)
    }

    /// Whether `e` lost the connection during post-copy in a way a new one
    /// may mend (a grace period is configured).
    fn may_resume_postcopy(&self, e: &MigrationError) -> bool {
        self.cfg.reconnect.is_some()
            && matches!(e, MigrationError::Transport(t) if t.is_disconnect())
    }
}

/// Offer the destination to read its faulted pages itself, where the
/// transport can (RDMA READ; over TCP a fetch connection of its own), and
/// take its answer.
fn offer_reads(transport: &mut dyn SourceTransport) -> Result<(), MigrationError> {
    let Some(offer) = transport.postcopy_offer()? else {
        return Ok(());
    };
    transport.control().send(&offer)?;
    match control::recv::<MigrationError>(transport.control())? {
        answer @ Message::RdmaReadAccept { .. } => {
            transport.postcopy_accepted(&answer)?;
            tracing::info!("post-copy: the destination reads faulted pages by RDMA READ");
        }
        answer @ Message::PageFetchAccept => {
            transport.postcopy_accepted(&answer)?;
            tracing::info!(
                "post-copy: the destination fetches faulted pages on a connection of its own"
            );
        }
        Message::RdmaReadDeclined { reason } => tracing::warn!(
            %reason,
            "the destination reads no pages itself; its faults ask over the control connection"
        ),
        other => return Err(control::unexpected(&other, "RdmaReadAccept")),
    }
    Ok(())
}
