//! The source side: pre-copy rounds, switch-over, device state, commit.
//!
//! [`SourceMigration::run`] is a blocking call that drives one migration over
//! any [`SourceTransport`]. Round 0 sends every page (zero pages as markers);
//! each later round sends the pages the tracker harvested while the previous
//! round was on the wire. When the dirty bytes left can be sent within the
//! downtime budget at the measured bandwidth (or `max_rounds` is reached, or
//! the timeout policy says so), the guest is paused, the last dirty pages and
//! the device state go out, and the destination commits.
//!
//! Any failure before the commit message leaves the source guest running
//! (resumed if it was paused, unthrottled) and tells the destination to
//! discard. A failure after it is [`MigrationError::CommitUnknown`]: the guest
//! stays paused, because the destination may already be running it.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::MigrationError;
use crate::dirty::{DirtyLog, DirtyTracker};
use crate::memory::GuestMemory;
use crate::protocol::{DEVICE_STATE_CHUNK, MIN_VERSION, Message, ProtocolError, VERSION};
use crate::stats::{MigrationEvent, MigrationStats, MigrationStatus, Monitor};
use crate::transport::{
    CancelToken, ControlChannel, PageSender, RateLimiter, RoundContext, RoundSent, SourceTransport,
    TransportError,
};
use crate::vm::SourceVm;

/// Zero-page ranges per `ZeroPages` frame (16 bytes each, well under the
/// frame limit).
const ZERO_RANGES_PER_FRAME: usize = 256 * 1024;

/// What to do when the overall timeout expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeoutPolicy {
    /// Abort the migration; the guest keeps running on the source.
    #[default]
    Cancel,
    /// Pause the guest and switch over at the next round boundary, whatever
    /// the downtime.
    ForceSwitchover,
}

/// Switch over only when the expected downtime is within this share of the
/// budget. The rest absorbs what the estimate does not see: the paused
/// round's scattered pages move slower than the round the rate was measured
/// on (10–15 % below a full pass over TCP, measured with a guest dirtying
/// 1 GB/s uniformly), plus the final harvest, the device state and the
/// commit. Without it, 1 of 189 benchmark runs overshot a 300 ms budget
/// (308.7 ms).
const SWITCH_OVER_HEADROOM: f64 = 0.85;

/// A round at least this long measures the link's rate on its own.
const MEASURED_ROUND_SECS: f64 = 0.02;

/// The operator's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Largest acceptable downtime (QEMU and Cloud Hypervisor: 300 ms).
    /// The switch-over comes when the rest is expected to take at most 85 %
    /// of it (the margin covers what the estimate cannot see).
    pub downtime_limit: Duration,
    /// Bandwidth cap in bytes per second over all streams (None: no cap).
    pub bandwidth_limit: Option<u64>,
    /// Switch over after this many rounds even if the rest does not fit the
    /// downtime budget.
    pub max_rounds: u32,
    /// Overall time limit, and what to do when it expires.
    pub timeout: Option<(Duration, TimeoutPolicy)>,
    /// Ask the VMM to throttle the guest when it dirties faster than the
    /// link drains: two rounds in a row whose newly dirtied bytes exceed half
    /// of what the round sent (QEMU's `throttle-trigger-threshold` of 50 %).
    /// Each further pair of such rounds adds 10 points (20 % first, 99 % at
    /// most).
    pub auto_converge: bool,
    /// Before commit, compare a hash of every destination page with the
    /// paused source page; any difference aborts.
    pub verify: bool,
    /// Re-sends of pages that fail their check while the guest is paused.
    pub final_retries: u32,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            bandwidth_limit: None,
            max_rounds: 30,
            timeout: None,
            auto_converge: true,
            verify: false,
            final_retries: 3,
        }
    }
}

/// Watch and steer a running migration from another thread.
#[derive(Debug, Clone)]
pub struct MigrationHandle {
    monitor: Monitor,
    cancel: CancelToken,
}

impl MigrationHandle {
    /// Abort the migration at the next batch; the source guest keeps running.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Current figures.
    pub fn stats(&self) -> MigrationStats {
        self.monitor.stats()
    }

    /// A channel of events from now on (dropping it unsubscribes).
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<MigrationEvent> {
        self.monitor.subscribe()
    }
}

/// One outgoing migration.
#[derive(Debug)]
pub struct SourceMigration {
    config: SourceConfig,
    monitor: Monitor,
    cancel: CancelToken,
}

/// Why the switch-over happens now.
fn switch_reason(converged: bool, max_rounds: bool) -> &'static str {
    if converged {
        "converged"
    } else if max_rounds {
        "max rounds"
    } else {
        "timeout"
    }
}

struct Run<'a> {
    cfg: &'a SourceConfig,
    monitor: &'a Monitor,
    cancel: &'a CancelToken,
    mem: &'a Arc<GuestMemory>,
    tracker: &'a dyn DirtyTracker,
    vm: &'a mut dyn SourceVm,
    start: Instant,
    paused_at: Option<Instant>,
    throttle: u8,
    commit_sent: bool,
    deadline: Option<Instant>,
}

impl SourceMigration {
    /// A migration with these knobs.
    pub fn new(config: SourceConfig) -> Self {
        Self {
            config,
            monitor: Monitor::default(),
            cancel: CancelToken::new(),
        }
    }

    /// A handle to cancel, read statistics and subscribe to events.
    pub fn handle(&self) -> MigrationHandle {
        MigrationHandle {
            monitor: self.monitor.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Migrate `mem` over `transport`. `tracker` must have been started
    /// before this call (writes from then on are caught); `vm` pauses and
    /// resumes the guest. Blocks until committed or failed.
    ///
    /// # Errors
    /// [`MigrationError`]; unless it is [`MigrationError::CommitUnknown`], the
    /// source guest is running again when this returns.
    pub fn run(
        self,
        transport: &mut dyn SourceTransport,
        mem: &Arc<GuestMemory>,
        tracker: &dyn DirtyTracker,
        vm: &mut dyn SourceVm,
    ) -> Result<MigrationStats, MigrationError> {
        let start = Instant::now();
        self.monitor.update(|s| {
            s.status = MigrationStatus::Setup;
            s.transport = transport.name().into();
            s.tracker = tracker.kind().name().into();
            s.bytes_total = mem.total_bytes();
        });
        let mut run = Run {
            cfg: &self.config,
            monitor: &self.monitor,
            cancel: &self.cancel,
            mem,
            tracker,
            vm,
            start,
            paused_at: None,
            throttle: 0,
            commit_sent: false,
            deadline: self.config.timeout.map(|(d, _)| start + d),
        };
        let result = run.migrate(transport);
        match result {
            Ok(stats) => {
                tracing::info!(
                    total_ms = stats.total_ms,
                    downtime_ms = stats.downtime_ms,
                    rounds = stats.rounds,
                    "migration completed"
                );
                self.monitor.emit(MigrationEvent::Completed(stats.clone()));
                Ok(stats)
            }
            Err(e) => Err(run.fail(transport, e)),
        }
    }
}

impl Run<'_> {
    fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
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

    fn migrate(
        &mut self,
        transport: &mut dyn SourceTransport,
    ) -> Result<MigrationStats, MigrationError> {
        // The watchdog turns a Cancel-policy timeout into a cancellation, so
        // that it interrupts a long round, not only round boundaries.
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let watchdog = match (self.cfg.timeout, self.deadline) {
            (Some((_, TimeoutPolicy::Cancel)), Some(deadline)) => {
                let cancel = self.cancel.clone();
                Some(std::thread::spawn(move || {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    if let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                        done_rx.recv_timeout(wait)
                    {
                        cancel.cancel();
                    }
                }))
            }
            _ => None,
        };
        let result = self.migrate_inner(transport);
        drop(done_tx);
        if let Some(w) = watchdog {
            let _ = w.join();
        }
        result
    }

    fn migrate_inner(
        &mut self,
        transport: &mut dyn SourceTransport,
    ) -> Result<MigrationStats, MigrationError> {
        let session = RandomState::new().build_hasher().finish();
        let data_streams = transport.data_streams();
        let offered = transport.features();
        let ctl = transport.control();
        ctl.send(&Message::Hello {
            min_version: MIN_VERSION,
            max_version: VERSION,
            session,
            data_streams,
            features: offered,
        })?;
        let features = match recv(ctl)? {
            Message::Welcome { version, features } => {
                tracing::debug!(version, features, "destination welcomed us");
                features
            }
            other => return Err(unexpected(other, "Welcome")),
        };
        ctl.send(&Message::Layout(self.mem.layout()))?;
        match recv(ctl)? {
            Message::LayoutAccepted => {}
            other => return Err(unexpected(other, "LayoutAccepted")),
        }
        let features = features & offered;
        let mut sender = transport.open_data(self.mem, session, features)?;
        // The data plane is chosen now (e.g. RDMA, or TCP when the peer has
        // no RDMA device).
        self.monitor
            .update(|s| s.transport = transport.name().into());
        let setup_ms = self.elapsed_ms();
        self.monitor.update(|s| {
            s.setup_ms = setup_ms;
            s.status = MigrationStatus::Active;
        });
        self.monitor.emit(MigrationEvent::SetupDone { setup_ms });
        tracing::info!(
            setup_ms,
            transport = transport.name(),
            "migration setup done"
        );

        let limiter = RateLimiter::new(self.cfg.bandwidth_limit);
        let mut log = DirtyLog::new(self.mem);
        log.mark_all();
        let mut round: u32 = 0;
        let mut last_harvest = Instant::now();
        let mut strikes = 0;
        let mut retries = 0;
        let mut totals = RoundSent::default();
        let mut first_page_at = Instant::now();
        loop {
            self.check_cancel()?;
            let paused = self.paused_at.is_some();
            let runs: Vec<_> = log.runs().collect();
            let pages = log.count() as u64;
            let round_bytes = log.dirty_bytes();
            self.monitor.update(|s| s.bytes_remaining = round_bytes);
            self.monitor.emit(MigrationEvent::RoundStarted {
                round,
                pages,
                paused,
            });
            if round == 0 {
                first_page_at = Instant::now();
            }
            let round_start = Instant::now();
            let sent = self.send_round(sender.as_mut(), round, &runs, &limiter, totals.clone())?;
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
            let suspect = match recv(ctl)? {
                Message::RoundAck { round: r, suspect } if r == round => suspect,
                other => return Err(unexpected(other, "RoundAck")),
            };
            let secs = round_start.elapsed().as_secs_f64().max(1e-6);
            totals.add(&sent);
            let round_mbps = sent.wire_bytes as f64 * 8.0 / secs / 1e6;
            let avg_mbps = totals.wire_bytes as f64 * 8.0
                / first_page_at.elapsed().as_secs_f64().max(1e-6)
                / 1e6;
            // The last round's rate when it ran long enough to measure the
            // link; else the better of it and the average (a tiny round is
            // all latency and would understate the link).
            let bandwidth = if secs >= MEASURED_ROUND_SECS {
                round_mbps
            } else {
                round_mbps.max(avg_mbps)
            } * 1e6
                / 8.0;
            let suspect_pages: u64 = suspect.iter().map(|r| r.count as u64).sum();
            if suspect_pages > 0 && paused {
                tracing::warn!(
                    round,
                    suspect_pages,
                    "pages failed their check with the guest paused; sending them again"
                );
            } else if suspect_pages > 0 {
                // A guest write raced the send: those pages are dirty anyway.
                tracing::debug!(
                    round,
                    suspect_pages,
                    "pages failed their check; sending them again"
                );
            }
            let mut next = DirtyLog::new(self.mem);
            for r in &suspect {
                if (r.region as usize) < next.regions()
                    && r.first + r.count as u64 <= next.region(r.region as usize).len() as u64
                {
                    next.mark_range(r.region as usize, r.first as usize, r.count as usize);
                }
            }
            round += 1;
            if paused {
                self.monitor.update(|s| {
                    s.rounds = round;
                    s.bytes_transferred = totals.wire_bytes;
                    s.normal_pages = totals.normal_pages;
                    s.zero_pages = totals.zero_pages;
                    s.resent_pages += suspect_pages;
                });
                if suspect_pages == 0 {
                    break;
                }
                retries += 1;
                if retries > self.cfg.final_retries {
                    return Err(MigrationError::Integrity {
                        pages: suspect_pages,
                        retries: self.cfg.final_retries,
                    });
                }
                log = next;
                continue;
            }
            // Live round done: what did the guest dirty meanwhile?
            self.tracker.harvest(&mut next)?;
            let harvested = next.count() as u64;
            let dirty_rate = harvested as f64 / last_harvest.elapsed().as_secs_f64().max(1e-6);
            last_harvest = Instant::now();
            let remaining = next.dirty_bytes();
            let expected_ms = remaining as f64 / bandwidth.max(1.0) * 1e3;
            let stats = self.monitor.update(|s| {
                s.rounds = round;
                s.total_ms = self.elapsed_ms();
                s.bytes_transferred = totals.wire_bytes;
                s.normal_pages = totals.normal_pages;
                s.zero_pages = totals.zero_pages;
                s.resent_pages += suspect_pages;
                s.bytes_remaining = remaining;
                s.dirty_rate_pps = dirty_rate;
                s.throughput_mbps = round_mbps;
                s.avg_throughput_mbps = avg_mbps;
                // `round` already counts the round just done.
                if round == 1 {
                    s.first_pass_mbps = round_mbps;
                }
                s.expected_downtime_ms = expected_ms;
            });
            self.monitor.emit(MigrationEvent::RoundDone(stats));
            tracing::debug!(
                round,
                remaining,
                expected_ms,
                dirty_rate,
                round_mbps,
                "round done"
            );

            let converged =
                expected_ms <= self.cfg.downtime_limit.as_secs_f64() * 1e3 * SWITCH_OVER_HEADROOM;
            let max_rounds = round >= self.cfg.max_rounds;
            let forced = matches!(self.cfg.timeout, Some((_, TimeoutPolicy::ForceSwitchover)))
                && self.deadline.is_some_and(|t| Instant::now() >= t);
            if converged || max_rounds || forced {
                let reason = switch_reason(converged, max_rounds);
                self.check_cancel()?;
                self.vm.pause()?;
                self.paused_at = Some(Instant::now());
                // Everything written up to the pause.
                self.tracker.harvest(&mut next)?;
                let remaining_bytes = next.dirty_bytes();
                self.monitor.update(|s| {
                    s.status = MigrationStatus::Device;
                    s.bytes_remaining = remaining_bytes;
                });
                self.monitor.emit(MigrationEvent::SwitchOver {
                    remaining_bytes,
                    reason,
                });
                tracing::info!(round, remaining_bytes, reason, "switch-over: guest paused");
            } else if self.cfg.auto_converge && round >= 2 {
                // Converging slower than halving per round: the guest keeps
                // up with the link.
                if remaining as f64 > round_bytes as f64 * 0.5 {
                    strikes += 1;
                } else {
                    strikes = 0;
                }
                if strikes >= 2 && self.throttle < 99 {
                    let percent = if self.throttle == 0 {
                        20
                    } else {
                        (self.throttle + 10).min(99)
                    };
                    match self.vm.throttle(percent) {
                        Ok(true) => {
                            self.throttle = percent;
                            self.monitor.update(|s| s.throttle_percent = percent);
                            self.monitor.emit(MigrationEvent::Throttled { percent });
                            tracing::info!(percent, "auto-converge: guest throttled");
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "auto-converge throttle failed"),
                    }
                    strikes = 0;
                }
            }
            log = next;
        }

        let verified = if self.cfg.verify {
            let t = Instant::now();
            self.verify(transport.control())?;
            let verify_ms = t.elapsed().as_secs_f64() * 1e3;
            self.monitor.update(|s| s.verify_ms = verify_ms);
            true
        } else {
            false
        };
        let state = self.vm.save_state()?;
        let ctl = transport.control();
        let mut chunks = state.chunks(DEVICE_STATE_CHUNK).peekable();
        if chunks.peek().is_none() {
            ctl.send(&Message::DeviceState {
                last: true,
                bytes: Vec::new(),
            })?;
        }
        while let Some(c) = chunks.next() {
            ctl.send(&Message::DeviceState {
                last: chunks.peek().is_none(),
                bytes: c.to_vec(),
            })?;
        }
        self.check_cancel()?;
        ctl.send(&Message::Commit)?;
        self.commit_sent = true;
        match recv(ctl)? {
            Message::Committed => {}
            other => return Err(unexpected(other, "Committed")),
        }
        let downtime_ms = self
            .paused_at
            .map(|t| t.elapsed().as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        let total_ms = self.elapsed_ms();
        let avg =
            totals.wire_bytes as f64 * 8.0 / first_page_at.elapsed().as_secs_f64().max(1e-6) / 1e6;
        Ok(self.monitor.update(|s| {
            s.status = MigrationStatus::Completed;
            s.total_ms = total_ms;
            s.downtime_ms = downtime_ms;
            s.bytes_remaining = 0;
            s.avg_throughput_mbps = avg;
            s.verified = verified;
        }))
    }

    fn send_round(
        &self,
        sender: &mut dyn PageSender,
        round: u32,
        runs: &[crate::dirty::PageRun],
        limiter: &RateLimiter,
        before: RoundSent,
    ) -> Result<RoundSent, MigrationError> {
        let pages_done = AtomicU64::new(0);
        let bytes_done = AtomicU64::new(0);
        let last_emit = std::sync::Mutex::new(Instant::now());
        let (monitor, start) = (self.monitor, self.start);
        let round_start = Instant::now();
        let progress = |pages: u64, bytes: u64| {
            pages_done.fetch_add(pages, Ordering::Relaxed);
            let b = bytes_done.fetch_add(bytes, Ordering::Relaxed) + bytes;
            let Ok(mut last) = last_emit.try_lock() else {
                return;
            };
            if last.elapsed() >= Duration::from_millis(100) {
                *last = Instant::now();
                let secs = round_start.elapsed().as_secs_f64().max(1e-6);
                let stats = monitor.update(|s| {
                    s.total_ms = start.elapsed().as_secs_f64() * 1e3;
                    s.bytes_transferred = before.wire_bytes + b;
                    // The current round's rate, live (rounds update it at their end).
                    s.throughput_mbps = b as f64 * 8.0 / secs / 1e6;
                });
                monitor.emit(MigrationEvent::Progress(stats));
            }
        };
        let ctx = RoundContext {
            cancel: self.cancel,
            limiter,
            progress: &progress,
        };
        sender.send_round(round, runs, &ctx).map_err(|e| match e {
            TransportError::Cancelled => self.cancelled(),
            other => other.into(),
        })
    }

    /// Ask the destination for a hash of every page and compare with ours
    /// (the guest is paused, so ours are final).
    fn verify(&self, ctl: &mut dyn ControlChannel) -> Result<(), MigrationError> {
        ctl.send(&Message::VerifyRequest)?;
        let mut checked = vec![0u64; self.mem.regions().len()];
        let mut differ = 0u64;
        let mut first_bad = None;
        while checked
            .iter()
            .zip(self.mem.regions())
            .any(|(&c, r)| c < r.pages() as u64)
        {
            let (region, first, hashes) = match recv(ctl)? {
                Message::PageHashes {
                    region,
                    first,
                    hashes,
                } => (region as usize, first, hashes),
                other => return Err(unexpected(other, "PageHashes")),
            };
            let r = self
                .mem
                .regions()
                .get(region)
                .filter(|r| {
                    first == checked[region] && first + hashes.len() as u64 <= r.pages() as u64
                })
                .ok_or(MigrationError::Protocol(ProtocolError::Unexpected {
                    got: crate::protocol::Kind::PageHashes,
                    expected: "page hashes in order",
                }))?;
            for (i, h) in hashes.iter().enumerate() {
                let page = first as usize + i;
                // SAFETY: `page` is inside the region (checked above).
                let ours = xxh3_64(unsafe { r.page_slice(page, 1) });
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
        Ok(())
    }

    /// Clean up after `error`: tell the destination, resume the guest unless
    /// the commit may have happened, and report.
    fn fail(
        &mut self,
        transport: &mut dyn SourceTransport,
        error: MigrationError,
    ) -> MigrationError {
        let error = if self.commit_sent {
            MigrationError::CommitUnknown(Box::new(error))
        } else {
            let reason = error.to_string();
            if !matches!(
                error,
                MigrationError::Refused { .. } | MigrationError::PeerAborted { .. }
            ) {
                // Best effort: the control channel may be what failed.
                let _ = transport.control().send(&Message::Abort { reason });
            }
            if self.throttle > 0
                && let Err(e) = self.vm.throttle(0)
            {
                tracing::error!(error = %e, "could not lift the throttle after a failed migration");
            }
            if self.paused_at.take().is_some()
                && let Err(e) = self.vm.resume()
            {
                tracing::error!(error = %e, "could not resume the source guest after a failed migration");
            }
            error
        };
        let status = if self.commit_sent {
            MigrationStatus::CommitUnknown
        } else {
            MigrationStatus::Failed
        };
        let total_ms = self.elapsed_ms();
        let stats = self.monitor.update(|s| {
            s.status = status;
            s.total_ms = total_ms;
        });
        tracing::error!(error = %error, "migration failed");
        self.monitor.emit(MigrationEvent::Failed {
            error: error.to_string(),
            stats,
        });
        error
    }
}

fn recv(ctl: &mut dyn ControlChannel) -> Result<Message, MigrationError> {
    match ctl.recv()? {
        Message::Abort { reason } => Err(MigrationError::PeerAborted { reason }),
        Message::Refused { code, message } => Err(MigrationError::Refused { code, message }),
        m => Ok(m),
    }
}

fn unexpected(got: Message, expected: &'static str) -> MigrationError {
    MigrationError::Protocol(ProtocolError::Unexpected {
        got: got.kind(),
        expected,
    })
}
