//! One outgoing migration as named steps: handshake, open the data plane,
//! send a round and collect its ack, decide after a live round (switch over,
//! throttle, go to post-copy, or go on), verify, send the device state,
//! commit; and `fail`, which does what the [`Phase`] says a failure means
//! there. The decisions live in [`policy`](super::policy), the phases and
//! their transitions in [`phase`](super::phase), post-copy's serving in
//! [`postcopy`](super::postcopy).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::holes::{HoleRound, Holes};
use super::phase::{OnFailure, Phase, Session, Step};
use super::policy::{AutoConverge, DowntimeBudget, LinkRate, SwitchReason, mbps, postcopy_now};
use super::{SourceConfig, Steering, TimeoutPolicy};
use crate::cancel::CancelToken;
use crate::control::expect_msg;
use crate::dirty::{DirtyLog, DirtyTracker};
use crate::error::MigrationError;
use crate::memory::GuestMemory;
use crate::postcopy::PostcopyMode;
use crate::protocol::{
    FEATURE_POSTCOPY, FEATURE_ZERO_SKIP, Features, FrameKind, MIN_VERSION, Message, PageRange,
    ProtocolError, VERSION,
};
use crate::stats::{MigrationEvent, MigrationStats, MigrationStatus, Monitor};
use crate::transport::{
    ControlChannel, DestinationPages, PageSender, RateLimiter, RoundContext, RoundSent,
    SourceTransport, TransportError,
};
use crate::vm::SourceVm;

/// Zero-page ranges per `ZeroPages` frame (16 bytes each, well under the
/// frame limit).
const ZERO_RANGES_PER_FRAME: usize = 256 * 1024;

/// A round that went out and was acknowledged.
struct RoundDone {
    /// How long from the first page to the ack, seconds.
    secs: f64,
    /// Pages sent per second in it (with bytes or as zero markers).
    pages_per_sec: f64,
    /// The link's rate, measured at the ack.
    rate: LinkRate,
    /// Pages the destination found torn: they go again.
    resend: DirtyLog,
    /// How many pages that is.
    resend_pages: u64,
}

/// Figures summed over the rounds.
struct Totals {
    rounds: u32,
    sent: RoundSent,
    first_page_at: Instant,
    last_harvest: Instant,
    final_retries: u32,
}

impl Totals {
    fn average_mbps(&self) -> f64 {
        mbps(self.sent.wire_bytes, self.secs())
    }

    fn secs(&self) -> f64 {
        self.first_page_at.elapsed().as_secs_f64()
    }
}

/// The state of one outgoing migration (pre-copy, then maybe post-copy).
pub(super) struct Outgoing<'a> {
    pub cfg: &'a SourceConfig,
    pub monitor: &'a Monitor,
    pub cancel: &'a CancelToken,
    pub steer: &'a Steering,
    pub mem: &'a Arc<GuestMemory>,
    pub tracker: &'a dyn DirtyTracker,
    pub vm: &'a mut dyn SourceVm,
    pub start: Instant,
    pub deadline: Option<Instant>,
    /// Where the migration stands: the one place failure handling asks.
    pub phase: Phase,
    pub converge: AutoConverge,
    /// Both sides offered post-copy and the configuration allows it.
    pub postcopy_ok: bool,
    /// The data plane reads a registered (pinned) copy of the memory
    /// ([`SourceTransport::pins_memory`]): a discard fails the migration.
    pub pinned: bool,
    /// Pages discarded through the memory's own API before the migration.
    pub discards_before: u64,
}

/// What comes after a live round.
pub(super) enum Next {
    /// Another round (live or paused) with these pages.
    Round(DirtyLog),
    /// Post-copy, for this reason: the destination lacks these pages (the
    /// guest still runs: the engine prepares the destination, then pauses
    /// it and adds what it dirtied meanwhile).
    Postcopy(DirtyLog, SwitchReason),
}

impl Outgoing<'_> {
    /// The whole migration, from `Hello` to `Committed`.
    pub fn run(
        &mut self,
        transport: &mut dyn SourceTransport,
    ) -> Result<MigrationStats, MigrationError> {
        let session = self.handshake(transport)?;
        self.monitor.update(|s| s.migration_id = session.id);
        // Tracking runs: the memory files' holes now are zero pages that
        // round 0 need not read (reading would allocate them).
        let holes = Holes::find(self.mem);
        if holes.pages() > 0 {
            tracing::info!(
                mib = holes.bytes() >> 20,
                "holes in the guest's memory files: sent as zero pages, unread"
            );
        }
        // Round 0 reads every other page. The pages of a memory file this
        // process does not map yet are read through a second mapping the
        // tracker is not registered on (16 pages a fault instead of one);
        // a thread maps the rest in bulk, ahead of the senders, while the
        // data connections open and the first batches go. Neither where the
        // transport reads a pinned copy of the memory (its registration
        // maps every page already).
        let mem = self.mem;
        if !self.pinned {
            for r in mem.regions() {
                match r.map_read_view() {
                    Ok(0) => {}
                    Ok(pages) => {
                        tracing::debug!(gpa = r.gpa(), pages, "round 0 reads through a read view")
                    }
                    Err(e) => {
                        tracing::debug!(gpa = r.gpa(), error = %e, "no read view; reading through the guest's mapping")
                    }
                }
            }
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let populate = std::thread::Builder::new()
                .name("populate".into())
                .spawn_scoped(scope, || populate_ahead(mem, &holes, &stop));
            if let Err(e) = &populate {
                tracing::debug!(error = %e, "no populate thread; pages fault one by one");
            }
            // The read views are emptied (by a thread of their own:
            // unmapping a GiB's view takes 10-30 ms of CPU, which the next
            // rounds need not wait for) once the migration goes on past
            // round 1, or when it ends without completing (the guest runs
            // on here). A migration done by then leaves them to the
            // memory's teardown, as it leaves the guest's own mapping: the
            // guest's pages leave this host with it, and its switch-over
            // does not share the CPU with the unmapping. Until then a page
            // counts twice in the resident set only if the guest maps it
            // after the view was made and a round reads it again.
            let mut emptied = false;
            let mut empty_views = || {
                if std::mem::replace(&mut emptied, true) {
                    return;
                }
                let thread = std::thread::Builder::new()
                    .name("drop-views".into())
                    .spawn_scoped(scope, move || drop_read_views(mem));
                if let Err(e) = thread {
                    tracing::debug!(error = %e, "no thread to empty the read views: emptied here");
                    drop_read_views(mem);
                }
            };
            let round_zero_read = || stop.store(true, Ordering::Relaxed);
            let outcome = self.rounds(
                transport,
                session,
                &holes,
                &round_zero_read,
                &mut empty_views,
            );
            round_zero_read();
            if outcome.is_err() {
                empty_views();
            }
            outcome
        })
    }

    /// From the data connections to `Committed`; `round_zero_read` once
    /// round 0's pages are all read, `going_on` once a live round follows
    /// round 1.
    fn rounds(
        &mut self,
        transport: &mut dyn SourceTransport,
        session: Session,
        holes: &Holes,
        round_zero_read: &dyn Fn(),
        going_on: &mut dyn FnMut(),
    ) -> Result<MigrationStats, MigrationError> {
        let dest_pages = DestinationPages::new(self.mem, session.reads_zero);
        // (kept for a resume after a lost connection)
        let mut sender = self.open_data(transport, session)?;
        let mut postcopy = None;
        let mut log = DirtyLog::new(self.mem);
        log.mark_all();
        holes.clear_from(&mut log);
        let mut totals = Totals {
            rounds: 0,
            sent: RoundSent::default(),
            first_page_at: Instant::now(),
            last_harvest: Instant::now(),
            final_retries: 0,
        };
        loop {
            self.check_cancel()?;
            // Round 0 carries the holes: zero markers where needed.
            let hole_round = if totals.rounds == 0 {
                holes.zero_ranges(&dest_pages, &log)
            } else {
                HoleRound::default()
            };
            let done = match self
                .round(
                    transport,
                    sender.as_mut(),
                    &log,
                    &hole_round,
                    &dest_pages,
                    &mut totals,
                )
                .map_err(|e| abort_behind(transport.control(), e))
            {
                Ok(done) => {
                    if totals.rounds == 1 {
                        round_zero_read();
                    }
                    done
                }
                Err(e) if self.may_resume(&e) => {
                    // The old data plane goes first (RDMA: its queue pairs
                    // stop retrying into the destination), then the round's
                    // pages go again, with what was dirtied since.
                    drop(sender);
                    // Some of the round's zero markers may not have landed:
                    // its pages count as holding anything again.
                    for run in log.runs() {
                        dest_pages.sent_data(run.region, run.first, run.count);
                    }
                    hole_round.unsent(&dest_pages);
                    sender = self.resume(transport, session, e)?;
                    self.harvest(&mut log)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            log = if self.phase.paused_since().is_some() {
                match self.after_paused_round(done, &mut totals)? {
                    Some(resend) => resend,
                    None => break,
                }
            } else {
                match self.after_live_round(done, log.dirty_bytes(), &mut totals)? {
                    Next::Round(next) => {
                        if totals.rounds >= 2 && self.phase.paused_since().is_none() {
                            going_on();
                        }
                        next
                    }
                    Next::Postcopy(mut set, why) => {
                        // The destination drops what it already knows to be
                        // stale while the guest still runs here: only the
                        // pages dirtied from now to the pause cost downtime.
                        self.prepare_postcopy(transport, &set)?;
                        self.switch_over(&mut set, why, totals.rounds)?;
                        postcopy = Some(set);
                        break;
                    }
                }
            };
        }
        if let Some(set) = postcopy {
            let avg = totals.average_mbps();
            return self.finish_postcopy(transport, session.id, &set, avg);
        }
        sender.finish();
        self.complete(transport, &totals)
    }

    /// After the last paused round: the pre-switchover wait if asked,
    /// verification, the device state, the commit; the final figures.
    fn complete(
        &mut self,
        transport: &mut dyn SourceTransport,
        totals: &Totals,
    ) -> Result<MigrationStats, MigrationError> {
        if self.cfg.pause_before_switchover {
            self.pre_switchover()?;
        }
        let verified = self.verify_if_asked(transport.control())?;
        self.send_device_state(transport.control())?;
        let paused_since = self.phase.paused_since();
        self.commit(transport.control(), Step::Committed)?;
        let downtime_ms = paused_since.map_or(0.0, ms_since);
        let total_ms = self.elapsed_ms();
        let avg = totals.average_mbps();
        Ok(self.monitor.update(|s| {
            s.status = MigrationStatus::Completed;
            s.total_ms = total_ms;
            s.downtime_ms = downtime_ms;
            s.precopy.bytes_remaining = 0;
            s.avg_throughput_mbps = avg;
            s.verified = verified;
        }))
    }

    /// `Hello` → `Welcome`, `Layout` → `LayoutAccepted` (→
    /// `DestinationMemory`): the session (its id, the features both sides
    /// use, whether the destination's memory reads as zeros).
    fn handshake(
        &mut self,
        transport: &mut dyn SourceTransport,
    ) -> Result<Session, MigrationError> {
        let session = RandomState::new().build_hasher().finish();
        let offered = transport.features().with(FEATURE_ZERO_SKIP).with(
            if self.cfg.postcopy == PostcopyMode::Never {
                0
            } else {
                FEATURE_POSTCOPY
            },
        );
        let data_streams = transport.data_streams();
        let ctl = transport.control();
        ctl.send(&Message::Hello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            session,
            data_streams,
            features: offered.bits(),
        })?;
        let features = expect_msg!(ctl, Welcome { version, features } => {
            tracing::debug!(version, features, "destination welcomed us");
            features
        });
        ctl.send(&Message::Layout {
            layout: self.mem.layout(),
        })?;
        expect_msg!(ctl, LayoutAccepted => ());
        let features = Features::new(features).and(offered);
        self.postcopy_ok = features.postcopy();
        if self.cfg.postcopy != PostcopyMode::Never && !self.postcopy_ok {
            tracing::warn!("the destination cannot take post-copy: pre-copy only");
        }
        let reads_zero = features.zero_skip()
            && expect_msg!(ctl, DestinationMemory { reads_zero } => reads_zero);
        tracing::debug!(reads_zero, "the destination's memory");
        Ok(Session {
            id: session,
            features,
            reads_zero,
        })
    }

    /// Open the data streams (the data plane is chosen now: RDMA, or TCP
    /// when the peer has no RDMA device) and report the setup done.
    fn open_data(
        &mut self,
        transport: &mut dyn SourceTransport,
        session: Session,
    ) -> Result<Box<dyn PageSender>, MigrationError> {
        let sender = transport.open_data(session.id, session.features)?;
        self.pinned = transport.pins_memory();
        let setup_ms = self.elapsed_ms();
        self.monitor.update(|s| {
            s.transport = transport.name().into();
            s.setup_ms = setup_ms;
            s.status = MigrationStatus::Active;
        });
        self.monitor.emit(MigrationEvent::SetupDone { setup_ms });
        tracing::info!(
            setup_ms,
            transport = transport.name(),
            "migration setup done"
        );
        Ok(sender)
    }

    /// Harvest into `log`: the tracker's pages and those the VMM discarded
    /// through [`GuestRegion::discard_pages`](crate::memory::GuestRegion::discard_pages).
    /// Over a pinned data plane, fail on a discard.
    fn harvest(&self, log: &mut DirtyLog) -> Result<(), MigrationError> {
        crate::dirty::harvest_with_discards(self.tracker, self.mem, log)?;
        let pages = self
            .tracker
            .discarded_pages()
            .max(self.mem.discarded_pages() - self.discards_before);
        if self.pinned && pages > 0 {
            tracing::error!(pages, "guest memory discarded while registered for RDMA");
            return Err(MigrationError::DiscardedWhilePinned { pages });
        }
        Ok(())
    }

    /// Whether `e` lost the connection in a way a new one may mend: in a
    /// phase that allows it (before the switch-over), with a grace period
    /// configured.
    fn may_resume(&self, e: &MigrationError) -> bool {
        self.phase.may_resume_rounds()
            && self.cfg.reconnect.is_some()
            && matches!(e, MigrationError::Transport(t) if t.is_disconnect())
    }

    /// Reconnect within the grace period, `Resume` the session and open the
    /// data plane again. The guest runs meanwhile and the tracker records.
    fn resume(
        &mut self,
        transport: &mut dyn SourceTransport,
        session: Session,
        cause: MigrationError,
    ) -> Result<Box<dyn PageSender>, MigrationError> {
        self.reconnect_within(transport, cause, |me, t| {
            me.resume_control(t, session.id)?;
            let sender = t.open_data(session.id, session.features)?;
            me.pinned = t.pins_memory();
            Ok(sender)
        })
    }

    /// After `cause` lost the connection: try `attempt` (a new connection
    /// and what follows on it) until it works or the grace period ends
    /// (then `cause`). Before post-copy a cancel stops the wait.
    pub(super) fn reconnect_within<T>(
        &mut self,
        transport: &mut dyn SourceTransport,
        cause: MigrationError,
        mut attempt: impl FnMut(&mut Self, &mut dyn SourceTransport) -> Result<T, MigrationError>,
    ) -> Result<T, MigrationError> {
        let grace = self.cfg.reconnect.unwrap_or_default();
        let deadline = Instant::now() + grace;
        tracing::warn!(error = %cause, ?grace, "connection to the destination lost; reconnecting");
        self.monitor.emit(MigrationEvent::ConnectionLost {
            error: cause.to_string(),
        });
        loop {
            // In post-copy the destination runs the guest: no cancel then.
            if !matches!(self.phase, Phase::Postcopy { .. }) {
                self.check_cancel()?;
            }
            match attempt(self, transport) {
                Ok(out) => {
                    let stats = self.monitor.update(|s| s.reconnects += 1);
                    self.monitor.emit(MigrationEvent::Resumed(stats));
                    tracing::info!("migration resumed over a new connection");
                    return Ok(out);
                }
                Err(MigrationError::Transport(e)) if e.may_pass() && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "reconnect failed; trying again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not resume");
                    return Err(cause);
                }
            }
        }
    }

    /// One attempt: a new control connection, `Resume` → `Resumed`.
    pub(super) fn resume_control(
        &mut self,
        transport: &mut dyn SourceTransport,
        session: u64,
    ) -> Result<(), MigrationError> {
        transport.reconnect()?;
        let ctl = transport.control();
        ctl.send(&Message::Resume { session })?;
        expect_msg!(ctl, Resumed => ());
        Ok(())
    }

    /// Send the pages of `log` as the next round, its zero ranges (with
    /// the holes' markers and the number of hole pages, in round 0) and
    /// `RoundDone`, and collect the destination's `RoundAck`.
    fn round(
        &mut self,
        transport: &mut dyn SourceTransport,
        sender: &mut dyn PageSender,
        log: &DirtyLog,
        holes: &HoleRound,
        dest_pages: &DestinationPages,
        totals: &mut Totals,
    ) -> Result<RoundDone, MigrationError> {
        // The steering outlives this borrow of the engine.
        let steer = self.steer;
        let limiter = &steer.limiter;
        let round = totals.rounds;
        let paused = self.phase.paused_since().is_some();
        self.monitor
            .update(|s| s.precopy.bytes_remaining = log.dirty_bytes());
        self.monitor.emit(MigrationEvent::RoundStarted {
            round,
            pages: log.count() as u64,
            paused,
        });
        if round == 0 {
            totals.first_page_at = Instant::now();
        }
        let round_start = Instant::now();
        let runs: Vec<_> = log.runs().collect();
        let mut sent = self.send_pages(sender, round, &runs, limiter, dest_pages, &totals.sent)?;
        // The holes are zero pages of this round: their markers go with the
        // round's, their bytes count with the log's.
        sent.zero_ranges.extend_from_slice(&holes.markers);
        sent.zero_pages += holes.pages;
        let round_bytes = log.dirty_bytes() + holes.bytes;
        let ctl = transport.control();
        for ranges in sent.zero_ranges.chunks(ZERO_RANGES_PER_FRAME) {
            ctl.send(&Message::ZeroPages {
                round,
                ranges: ranges.to_vec(),
            })?;
        }
        ctl.send(&Message::RoundDone {
            round,
            last: paused,
        })?;
        let suspect = expect_msg!(ctl, RoundAck { round: r, suspect } if r == round => suspect);
        let secs = round_start.elapsed().as_secs_f64().max(1e-6);
        totals.rounds += 1;
        totals.sent.add(&sent);
        // Guest bytes of the data pages this round carried (page sizes as
        // the log's regions have them; zero pages excluded).
        let pages = sent.normal_pages + sent.zero_pages;
        let page_bytes = if pages == 0 {
            0
        } else {
            (round_bytes as f64 * sent.normal_pages.min(pages) as f64 / pages as f64) as u64
        };
        let rate = LinkRate::measure(sent.wire_bytes, secs, totals.sent.wire_bytes, totals.secs())
            .with_pages(page_bytes, secs);
        let (resend, resend_pages) = self.resend_log(&suspect);
        if resend_pages > 0 && paused {
            tracing::warn!(
                round,
                resend_pages,
                "pages failed their check with the guest paused; sending them again"
            );
        } else if resend_pages > 0 {
            // A guest write raced the send: those pages are dirty anyway.
            tracing::debug!(
                round,
                resend_pages,
                "pages failed their check; sending them again"
            );
        }
        Ok(RoundDone {
            secs,
            pages_per_sec: (sent.normal_pages + sent.zero_pages) as f64 / secs,
            rate,
            resend,
            resend_pages,
        })
    }

    /// The suspect ranges of an ack (those inside guest memory) as a log.
    fn resend_log(&self, suspect: &[PageRange]) -> (DirtyLog, u64) {
        let mut log = DirtyLog::new(self.mem);
        for r in suspect {
            if (r.region as usize) < log.regions()
                && r.first + r.count as u64 <= log.region(r.region as usize).len() as u64
            {
                log.mark_range(r.region as usize, r.first as usize, r.count as usize);
            }
        }
        let pages = suspect.iter().map(|r| r.count as u64).sum();
        (log, pages)
    }

    /// After a round with the guest paused: done (`None`), or the pages to
    /// send again, a bounded number of times.
    fn after_paused_round(
        &mut self,
        done: RoundDone,
        totals: &mut Totals,
    ) -> Result<Option<DirtyLog>, MigrationError> {
        self.monitor.update(|s| {
            s.precopy.rounds = totals.rounds;
            s.bytes_transferred = totals.sent.wire_bytes;
            s.stream_bytes.clone_from(&totals.sent.stream_bytes);
            s.bytes_during_pause = totals.sent.wire_bytes.saturating_sub(s.bytes_before_pause);
            s.normal_pages = totals.sent.normal_pages;
            s.sparse_pages = totals.sent.sparse_pages;
            s.zero_pages = totals.sent.zero_pages;
            s.resent_pages += done.resend_pages;
            s.precopy.pages_per_sec = done.pages_per_sec;
        });
        if done.resend_pages == 0 {
            return Ok(None);
        }
        totals.final_retries += 1;
        if totals.final_retries > self.cfg.final_retries {
            return Err(MigrationError::Integrity {
                pages: done.resend_pages,
                retries: self.cfg.final_retries,
            });
        }
        Ok(Some(done.resend))
    }

    /// After a live round that sent `round_bytes` of pages: harvest what the
    /// guest dirtied meanwhile, report, and switch over, throttle, or go on.
    /// Returns the pages of the next round.
    fn after_live_round(
        &mut self,
        done: RoundDone,
        round_bytes: u64,
        totals: &mut Totals,
    ) -> Result<Next, MigrationError> {
        let mut next = done.resend;
        self.harvest(&mut next)?;
        let dirty_rate =
            next.count() as f64 / totals.last_harvest.elapsed().as_secs_f64().max(1e-6);
        totals.last_harvest = Instant::now();
        let remaining = next.dirty_bytes();
        let rate = done.rate;
        let expected_ms =
            DowntimeBudget::expected_ms(remaining, rate.planning_bytes_per_sec(done.secs));
        let rounds = totals.rounds;
        let stats = self.monitor.update(|s| {
            s.precopy.rounds = rounds;
            s.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
            s.bytes_transferred = totals.sent.wire_bytes;
            s.stream_bytes.clone_from(&totals.sent.stream_bytes);
            s.normal_pages = totals.sent.normal_pages;
            s.sparse_pages = totals.sent.sparse_pages;
            s.zero_pages = totals.sent.zero_pages;
            s.resent_pages += done.resend_pages;
            s.precopy.bytes_remaining = remaining;
            s.precopy.dirty_rate_pps = dirty_rate;
            s.precopy.pages_per_sec = done.pages_per_sec;
            s.bytes_before_pause = totals.sent.wire_bytes;
            s.throughput_mbps = rate.round_mbps;
            s.avg_throughput_mbps = rate.average_mbps;
            if rounds == 1 {
                s.precopy.first_pass_mbps = rate.round_mbps;
            }
            s.precopy.expected_downtime_ms = expected_ms;
        });
        self.monitor.emit(MigrationEvent::RoundDone(stats));
        tracing::debug!(
            round = rounds,
            remaining,
            expected_ms,
            dirty_rate,
            round_mbps = rate.round_mbps,
            "round done"
        );
        let reason = SwitchReason::decide(
            DowntimeBudget::new(self.steer.downtime_limit()).fits(expected_ms),
            rounds >= self.steer.max_rounds(),
            self.timed_out_forcing(),
            self.steer.switchover_asked(),
        );
        let stalled = if reason.is_none() && (self.cfg.auto_converge || self.postcopy_ok) {
            self.converge.after_round(rounds, round_bytes, remaining)
        } else {
            None
        };
        if self.postcopy_ok
            && let Some(why) = postcopy_now(
                self.cfg.postcopy_after_rounds,
                rounds,
                reason,
                stalled.is_some(),
            )
        {
            return Ok(Next::Postcopy(next, why));
        }
        match (reason, stalled) {
            (Some(reason), _) => self.switch_over(&mut next, reason, rounds)?,
            (None, Some(percent)) if self.cfg.auto_converge => self.throttle(percent),
            _ => {}
        }
        Ok(Next::Round(next))
    }

    /// Whether the overall timeout expired under the force policy.
    fn timed_out_forcing(&self) -> bool {
        matches!(self.cfg.timeout, Some((_, TimeoutPolicy::ForceSwitchover)))
            && self.deadline.is_some_and(|t| Instant::now() >= t)
    }

    /// Pause the guest and add everything it wrote up to the pause to `next`.
    fn switch_over(
        &mut self,
        next: &mut DirtyLog,
        reason: SwitchReason,
        round: u32,
    ) -> Result<(), MigrationError> {
        self.check_cancel()?;
        self.vm.pause()?;
        self.step(Step::Pause)?;
        self.harvest(next)?;
        let remaining_bytes = next.dirty_bytes();
        self.monitor.update(|s| {
            s.status = MigrationStatus::Device;
            s.precopy.bytes_remaining = remaining_bytes;
        });
        self.monitor.emit(MigrationEvent::SwitchOver {
            remaining_bytes,
            reason: reason.name(),
        });
        tracing::info!(
            round,
            remaining_bytes,
            reason = reason.name(),
            "switch-over: guest paused"
        );
        Ok(())
    }

    /// Pre-switchover: the guest is paused and its memory acknowledged;
    /// wait for the handle's `continue_switchover` (or a cancel, which
    /// fails the migration and resumes the guest here).
    pub(super) fn pre_switchover(&mut self) -> Result<(), MigrationError> {
        let stats = self.monitor.update(|s| {
            s.status = MigrationStatus::PreSwitchover;
            s.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
        });
        self.monitor.emit(MigrationEvent::PreSwitchover(stats));
        tracing::info!("pre-switchover: guest paused, memory sent; waiting to continue");
        if !self.steer.wait_to_proceed(|| self.cancel.is_cancelled()) {
            return Err(self.cancelled());
        }
        self.monitor.update(|s| s.status = MigrationStatus::Device);
        tracing::info!("pre-switchover: continuing");
        Ok(())
    }

    /// Ask the VMM to throttle the guest to `percent`; a VMM that cannot,
    /// or fails, leaves it running at its pace.
    fn throttle(&mut self, percent: u8) {
        match self.vm.throttle(percent) {
            Ok(true) => {
                self.converge.applied(percent);
                self.monitor
                    .update(|s| s.precopy.throttle_percent = percent);
                self.monitor.emit(MigrationEvent::Throttled { percent });
                tracing::info!(percent, "auto-converge: guest throttled");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "auto-converge throttle failed"),
        }
    }

    /// Hand `runs` to the data plane as `round`, with live progress events.
    fn send_pages(
        &self,
        sender: &mut dyn PageSender,
        round: u32,
        runs: &[crate::dirty::PageRun],
        limiter: &RateLimiter,
        dest_pages: &DestinationPages,
        before: &RoundSent,
    ) -> Result<RoundSent, MigrationError> {
        // This round so far, by stream, as its batches go out.
        let round_sent = std::sync::Mutex::new(RoundSent::default());
        let last_emit = std::sync::Mutex::new(Instant::now());
        let (monitor, start) = (self.monitor, self.start);
        let round_start = Instant::now();
        let progress = |stream: usize, batch: &RoundSent| {
            round_sent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_batch(stream, batch);
            let Ok(mut last) = last_emit.try_lock() else {
                return;
            };
            if last.elapsed() >= Duration::from_millis(100) {
                *last = Instant::now();
                let so_far = round_sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let secs = round_start.elapsed().as_secs_f64().max(1e-6);
                let mut total = before.clone();
                total.add(&so_far);
                let stats = monitor.update(|s| {
                    s.total_ms = start.elapsed().as_secs_f64() * 1e3;
                    s.bytes_transferred = total.wire_bytes;
                    s.stream_bytes.clone_from(&total.stream_bytes);
                    s.normal_pages = total.normal_pages;
                    s.sparse_pages = total.sparse_pages;
                    s.zero_pages = total.zero_pages;
                    // The current round's rate, live (rounds update it at their end).
                    s.throughput_mbps = so_far.wire_bytes as f64 * 8.0 / secs / 1e6;
                });
                monitor.emit(MigrationEvent::Progress(stats));
            }
        };
        let ctx = RoundContext {
            cancel: self.cancel,
            limiter,
            progress: &progress,
            dest_pages,
        };
        sender.send_round(round, runs, &ctx).map_err(|e| match e {
            TransportError::Cancelled => self.cancelled(),
            other => other.into(),
        })
    }

    /// With `verify`: ask the destination for a hash of every page and
    /// compare with ours (the guest is paused, so ours are final).
    fn verify_if_asked(&mut self, ctl: &mut dyn ControlChannel) -> Result<bool, MigrationError> {
        if !self.cfg.verify {
            return Ok(false);
        }
        let t = Instant::now();
        ctl.send(&Message::VerifyRequest)?;
        // The guest is paused: the holes now are final, and hash as zeros
        // without being read (and so allocated).
        let holes = Holes::find(self.mem);
        let zero_hash: Vec<u64> = self
            .mem
            .regions()
            .iter()
            .map(|r| crate::checksum::xxh3_64(&vec![0u8; r.page_size().bytes()]))
            .collect();
        let mut checked = vec![0u64; self.mem.regions().len()];
        let mut differ = 0u64;
        let mut first_bad = None;
        let unfinished = |checked: &[u64]| {
            checked
                .iter()
                .zip(self.mem.regions())
                .any(|(&c, r)| c < r.pages() as u64)
        };
        while unfinished(&checked) {
            let (region, first, hashes) = expect_msg!(ctl,
                PageHashes { region, first, hashes } => (region as usize, first, hashes));
            let r = self
                .mem
                .regions()
                .get(region)
                .filter(|r| {
                    first == checked[region] && first + hashes.len() as u64 <= r.pages() as u64
                })
                .ok_or(MigrationError::Protocol(ProtocolError::Unexpected {
                    got: FrameKind::PageHashes,
                    expected: "page hashes in order",
                }))?;
            for (i, h) in hashes.iter().enumerate() {
                let page = first as usize + i;
                let ours = if holes.contains(region, page) {
                    zero_hash[region]
                } else {
                    r.hash_page(page)
                };
                if ours != *h {
                    differ += 1;
                    first_bad.get_or_insert((region, page));
                }
            }
            checked[region] += hashes.len() as u64;
        }
        if let Some((region, page)) = first_bad {
            return Err(MigrationError::VerifyFailed {
                pages: differ,
                region,
                page,
            });
        }
        tracing::info!("verified: every destination page equals the paused source page");
        let verify_ms = ms_since(t);
        self.monitor.update(|s| s.verify_ms = verify_ms);
        Ok(true)
    }

    /// The VMM's device state, in chunks (one empty chunk when there is none).
    pub(super) fn send_device_state(
        &mut self,
        ctl: &mut dyn ControlChannel,
    ) -> Result<(), MigrationError> {
        let state = self.vm.save_state()?;
        crate::control::send_chunked(ctl, &state, |last, bytes| Message::DeviceState {
            last,
            bytes,
        })?;
        Ok(())
    }

    /// `Commit` → `Committed`, then `then` (the end of pre-copy, or
    /// post-copy's start). From the send on, a failure is
    /// [`MigrationError::CommitUnknown`].
    pub(super) fn commit(
        &mut self,
        ctl: &mut dyn ControlChannel,
        then: Step,
    ) -> Result<(), MigrationError> {
        self.check_cancel()?;
        // A destination already known to be gone (it closed the connection,
        // or fell silent) cannot commit: fail now, with the guest running
        // again, rather than send into the void and stay paused.
        if let Some(e) = ctl.peer_gone() {
            return Err(e.into());
        }
        ctl.send(&Message::Commit)?;
        self.step(Step::SendCommit)?;
        expect_msg!(ctl, Committed => ());
        self.step(then)
    }

    /// Move to the phase after `step`; a step the phase does not allow is
    /// an engine bug, failed as such.
    pub(super) fn step(&mut self, step: Step) -> Result<(), MigrationError> {
        self.phase = self.phase.step(step, Instant::now()).map_err(|e| {
            tracing::error!(error = %e, "engine bug");
            MigrationError::EngineBug(e.to_string())
        })?;
        Ok(())
    }

    /// Clean up after `error`: tell the destination, resume the guest unless
    /// the commit may have happened, and report.
    pub fn fail(
        &mut self,
        transport: &mut dyn SourceTransport,
        error: MigrationError,
    ) -> MigrationError {
        let (error, status) = match self.phase.on_failure() {
            OnFailure::PostcopyInterrupted => (
                MigrationError::PostcopyInterrupted(Box::new(error)),
                MigrationStatus::PostcopyInterrupted,
            ),
            OnFailure::CommitUnknown => (
                MigrationError::CommitUnknown(Box::new(error)),
                MigrationStatus::CommitUnknown,
            ),
            OnFailure::GiveBack { resume } => {
                self.give_back(transport, &error, resume);
                let status = match error {
                    MigrationError::Cancelled => MigrationStatus::Cancelled,
                    _ => MigrationStatus::Failed,
                };
                (error, status)
            }
        };
        let total_ms = self.elapsed_ms();
        let stats = self.monitor.update(|s| {
            s.status = status;
            s.total_ms = total_ms;
        });
        if status == MigrationStatus::Cancelled {
            tracing::warn!("migration cancelled; the source guest runs");
            self.monitor.emit(MigrationEvent::Cancelled(stats));
        } else {
            tracing::error!(error = %error, "migration failed");
            self.monitor.emit(MigrationEvent::Failed {
                error: error.to_string(),
                stats,
            });
        }
        error
    }

    /// Before the commit: abort the destination, lift the throttle, resume
    /// the guest if it was paused (`resume`).
    fn give_back(
        &mut self,
        transport: &mut dyn SourceTransport,
        error: &MigrationError,
        resume: bool,
    ) {
        if !matches!(
            error,
            MigrationError::Refused { .. } | MigrationError::PeerAborted { .. }
        ) {
            // Best effort: the control channel may be what failed.
            let _ = transport.control().send(&Message::Abort {
                reason: error.to_string(),
            });
        }
        if self.converge.throttle() > 0
            && let Err(e) = self.vm.throttle(0)
        {
            tracing::error!(error = %e, "could not lift the throttle after a failed migration");
        }
        if resume {
            // The guest runs here again: whatever comes, it is live.
            self.phase = Phase::Live;
        }
        if resume && let Err(e) = self.vm.resume() {
            tracing::error!(error = %e, "could not resume the source guest after a failed migration");
        }
    }

    fn elapsed_ms(&self) -> f64 {
        ms_since(self.start)
    }

    pub fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.cancel.is_cancelled() {
            return Err(self.cancelled());
        }
        Ok(())
    }

    /// The error for a cancelled token: the watchdog's timeout, or the user.
    fn cancelled(&self) -> MigrationError {
        match self.cfg.timeout {
            Some((d, TimeoutPolicy::Cancel))
                if self.deadline.is_some_and(|t| Instant::now() >= t) =>
            {
                MigrationError::Timeout(d)
            }
            _ => MigrationError::Cancelled,
        }
    }
}

/// A data stream broke: if the destination said why on the control channel
/// (its `Abort` or `Refused` races the broken stream), that is the error —
/// a destination that gave up is not reconnected to.
fn abort_behind(ctl: &mut dyn ControlChannel, e: MigrationError) -> MigrationError {
    if !matches!(&e, MigrationError::Transport(t) if t.is_disconnect()) {
        return e;
    }
    match ctl.recv_timeout(Duration::from_millis(200)) {
        Ok(Some(Message::Abort { reason })) => MigrationError::PeerAborted { reason },
        Ok(Some(Message::Refused { code, message })) => MigrationError::Refused { code, message },
        _ => e,
    }
}

pub(super) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Read every region through its own mapping again (see
/// [`GuestRegion::map_read_view`](crate::memory::GuestRegion::map_read_view)).
fn drop_read_views(mem: &GuestMemory) {
    for r in mem.regions() {
        if let Err(e) = r.drop_read_view() {
            tracing::warn!(gpa = r.gpa(), error = %e, "the read view keeps its pages mapped");
        }
    }
}

/// Map every page of `mem` that reads through the guest's own mapping
/// readable, 16 MiB at a time from the start (the order round 0 reads
/// them), until `stop`: one call per chunk instead of one fault per page (a
/// tracked mapping gets no fault-around), and off the engine's path. Only
/// the pages the mapping does not map yet (`PAGEMAP_SCAN`, where the kernel
/// has it): `MADV_POPULATE_READ` walks every page it is given, mapped or
/// not, which for a guest that already maps its memory was 40-50 ms of CPU
/// per GiB for nothing (2026-12-07). The read views' pages are not mapped
/// ahead (see `GuestRegion::populate_read_pages`).
fn populate_ahead(mem: &GuestMemory, holes: &Holes, stop: &AtomicBool) {
    const CHUNK: usize = 16 << 20;
    let mut scan = crate::uffd::Pagemap::open(512)
        .ok()
        .and_then(|mut s| s.scan_supported().unwrap_or(false).then_some(s));
    'regions: for (i, r) in mem.regions().iter().enumerate() {
        let step = (CHUNK / r.page_size().bytes()).max(1);
        // Never the holes: that would allocate them.
        for data in holes.data_between(i, r.pages()) {
            let mut first = data.start;
            while first < data.end {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let count = step.min(data.end - first);
                for gap in unmapped(r, first..first + count, scan.as_mut()) {
                    if let Err(e) = r.populate_read_pages(gap.start, gap.len()) {
                        tracing::debug!(gpa = r.gpa(), error = %e, "no bulk read-mapping; pages fault one by one");
                        continue 'regions;
                    }
                }
                first += count;
            }
        }
    }
}

/// The runs of `pages` of `r` its mapping does not map now, in order; all
/// of them when `scan` is `None` or fails.
fn unmapped(
    r: &crate::memory::GuestRegion,
    pages: std::ops::Range<usize>,
    scan: Option<&mut crate::uffd::Pagemap>,
) -> Vec<std::ops::Range<usize>> {
    let ps = r.page_size().bytes();
    let base = r.page_ptr(0) as usize;
    let Some(scan) = scan else {
        return vec![pages];
    };
    let mut gaps = Vec::new();
    let mut at = pages.start;
    let scanned = scan.present(base + pages.start * ps, base + pages.end * ps, |s, e| {
        let (first, end) = ((s - base) / ps, (e - base).div_ceil(ps));
        if first > at {
            gaps.push(at..first);
        }
        at = at.max(end);
    });
    if scanned.is_err() {
        return vec![pages];
    }
    if at < pages.end {
        gaps.push(at..pages.end);
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRegion;

    /// `populate_ahead` maps only what the mapping does not map yet: the
    /// gaps between the pages a guest touched, and nothing of a range it
    /// touched whole.
    #[test]
    fn unmapped_runs_are_the_gaps_between_touched_pages() {
        let r = GuestRegion::anonymous(0, 64 * 4096).unwrap();
        for p in [3, 4, 5, 20, 63] {
            r.write_bytes(p * 4096, &[1]);
        }
        let mut scan = crate::uffd::Pagemap::open(512).unwrap();
        if !scan.scan_supported().unwrap() {
            // Linux < 6.7: everything is a gap.
            assert_eq!(unmapped(&r, 0..64, Some(&mut scan)), vec![0..64]);
            return;
        }
        assert_eq!(
            unmapped(&r, 0..64, Some(&mut scan)),
            vec![0..3, 6..20, 21..63]
        );
        assert_eq!(
            unmapped(&r, 4..6, Some(&mut scan)),
            Vec::<std::ops::Range<usize>>::new()
        );
        assert_eq!(unmapped(&r, 5..30, Some(&mut scan)), vec![6..20, 21..30]);
        assert_eq!(unmapped(&r, 0..64, None), vec![0..64]);
        // Mapped ahead, nothing is left.
        for gap in unmapped(&r, 0..64, Some(&mut scan)) {
            r.populate_read_pages(gap.start, gap.len()).unwrap();
        }
        assert!(unmapped(&r, 0..64, Some(&mut scan)).is_empty());
    }
}
