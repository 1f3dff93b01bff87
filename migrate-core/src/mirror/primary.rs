//! The primary: protects a running guest by shipping it to a standby in
//! epochs (see the module docs of [`crate::mirror`]).

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::CancelToken;
use crate::control::{expect_msg, send_chunked};
use crate::dirty::{DirtyLog, DirtyTracker, PageRun, harvest_with_discards};
use crate::error::MigrationError;
use crate::memory::GuestMemory;
use crate::mirror::events::{PROGRESS_EVERY, ProtectEvent};
use crate::mirror::gate::{OutputGate, SealedOutput};
use crate::mirror::witness::{Claimant, RunRight};
use crate::mirror::{EpochShip, Histogram, ProtectStatus, ProtectionReport, chunks_of};
use crate::protocol::{FEATURE_MIRROR, Features, MIN_VERSION, Message, PageRange, VERSION};
use crate::stats::Monitor;
use crate::transport::{
    DestinationPages, PageSender, RateLimiter, RoundContext, SourceTransport, TransportError,
};
use crate::vm::SourceVm;

/// How a guest is protected.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProtectConfig {
    /// Time from one epoch's pause to the next one's (Remus ran 25 ms).
    /// Every epoch touches every data stream: it must be shorter than the
    /// transport's I/O timeout, or an idle stream counts as dead.
    pub epoch: Duration,
    /// Live rounds after the initial full pass, while many pages are
    /// dirty, before the first checkpoint (which pauses the guest). The
    /// full pass and these rounds go in epochs of at most 64 MiB.
    pub catch_up_rounds: u32,
    /// A catch-up round is skipped once fewer pages than this are dirty.
    pub catch_up_below_pages: u64,
    /// An epoch the standby refused (failed checks) is shipped again this
    /// many times before the standby counts as lost.
    pub epoch_retries: u32,
}

impl Default for ProtectConfig {
    fn default() -> Self {
        Self {
            epoch: Duration::from_millis(25),
            catch_up_rounds: 3,
            catch_up_below_pages: 4096,
            epoch_retries: 3,
        }
    }
}

impl ProtectConfig {
    /// Protection with epochs of `epoch`.
    pub fn with_epoch(epoch: Duration) -> Self {
        Self {
            epoch,
            ..Self::default()
        }
    }
}

/// Watch a protection and end it cleanly from another thread.
#[derive(Debug, Clone)]
pub struct ProtectHandle {
    monitor: Monitor<ProtectionReport, ProtectEvent>,
    end: CancelToken,
}

impl ProtectHandle {
    /// End protection after the next epoch: the standby is released, the
    /// guest runs on here unprotected (its gate open).
    pub fn end(&self) {
        self.end.cancel();
    }

    /// The figures so far.
    pub fn stats(&self) -> ProtectionReport {
        self.monitor.stats()
    }

    /// Events from now on ([`ProtectEvent`]), until one that
    /// [`is_final`](ProtectEvent::is_final).
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<ProtectEvent> {
        self.monitor.subscribe()
    }
}

/// A guest's protection, from its initial sync to its end.
#[derive(Debug)]
pub struct Protection {
    cfg: ProtectConfig,
    monitor: Monitor<ProtectionReport, ProtectEvent>,
    end: CancelToken,
}

/// What the engine works on while protecting.
struct Primary<'a> {
    cfg: &'a ProtectConfig,
    mem: &'a GuestMemory,
    shadow: &'a GuestMemory,
    tracker: &'a dyn DirtyTracker,
    vm: &'a mut dyn SourceVm,
    gate: &'a OutputGate,
    monitor: &'a Monitor<ProtectionReport, ProtectEvent>,
    limiter: RateLimiter,
    dest_pages: DestinationPages,
    cancel: CancelToken,
    pauses_us: Histogram,
    epoch_bytes: Histogram,
    /// When the standby's last acknowledgement arrived.
    last_word: Instant,
    /// The gate's delays were reset after the first checkpoint (what it
    /// released was held through the initial sync: not the steady state).
    delays_reset: bool,
    /// When the last `progress` event went out.
    last_progress: Instant,
}

impl Protection {
    /// A protection with `cfg`.
    pub fn new(cfg: ProtectConfig) -> Self {
        Self {
            cfg,
            monitor: Monitor::default(),
            end: CancelToken::new(),
        }
    }

    /// A handle to watch and end the protection.
    pub fn handle(&self) -> ProtectHandle {
        ProtectHandle {
            monitor: self.monitor.clone(),
            end: self.end.clone(),
        }
    }

    /// Protect the guest in `mem` (running, `tracker` tracking it, `gate`
    /// closed in front of its output) to the standby at the other end of
    /// `transport`, until [`ProtectHandle::end`] or until the standby is
    /// lost. A lost standby is settled with `witness`: with the run right
    /// the guest goes on unprotected (`degraded`, its held output
    /// released), without it the guest is paused for good (`fenced`, its
    /// held output dropped).
    ///
    /// The transport is bound to a shadow of `mem` (same layout, as much
    /// memory again as the guest's, allocated as pages are copied): each
    /// epoch's pages are copied there while the guest is paused, and sent
    /// from there while it runs.
    ///
    /// # Errors
    /// [`MigrationError`] when protection could not start (no shadow, the
    /// standby refused or is no standby); the guest runs on unprotected
    /// (its gate is left as it was). Once protection ran, the outcome is
    /// the report's status.
    pub fn run(
        self,
        transport: &mut dyn SourceTransport,
        mem: &Arc<GuestMemory>,
        tracker: &dyn DirtyTracker,
        vm: &mut dyn SourceVm,
        gate: &OutputGate,
        witness: &mut dyn RunRight,
    ) -> Result<ProtectionReport, MigrationError> {
        let monitor = self.monitor.clone();
        let result = self.protect(transport, mem, tracker, vm, gate, witness);
        monitor.emit(match &result {
            Ok(r) => match r.status {
                ProtectStatus::Degraded => ProtectEvent::Degraded { stats: r.clone() },
                ProtectStatus::Fenced => ProtectEvent::Fenced { stats: r.clone() },
                _ => ProtectEvent::Released { stats: r.clone() },
            },
            Err(e) => ProtectEvent::Failed {
                error: e.to_string(),
            },
        });
        result
    }

    /// [`run`](Self::run) but its last event.
    fn protect(
        self,
        transport: &mut dyn SourceTransport,
        mem: &Arc<GuestMemory>,
        tracker: &dyn DirtyTracker,
        vm: &mut dyn SourceVm,
        gate: &OutputGate,
        witness: &mut dyn RunRight,
    ) -> Result<ProtectionReport, MigrationError> {
        let started = Instant::now();
        let shadow = Arc::new(mem.anonymous_like()?);
        transport.bind(&shadow)?;
        let (session, features) = handshake(transport, mem)?;
        let mut sender = transport.open_data(session, features)?;
        self.monitor.update(|r| {
            r.session = session;
            r.status = ProtectStatus::Syncing;
            r.transport = transport.name().into();
            r.epoch_ms = self.cfg.epoch.as_secs_f64() * 1e3;
            r.witnessed = witness.is_witnessed();
        });
        tracing::info!(
            session = format_args!("{session:016x}"),
            "protecting: initial sync"
        );
        let mut p = Primary {
            cfg: &self.cfg,
            mem,
            shadow: &shadow,
            tracker,
            vm,
            gate,
            monitor: &self.monitor,
            limiter: RateLimiter::new(None),
            dest_pages: DestinationPages::new(&shadow, false),
            cancel: CancelToken::new(),
            pauses_us: Histogram::default(),
            epoch_bytes: Histogram::default(),
            last_word: Instant::now(),
            delays_reset: false,
            last_progress: Instant::now(),
        };
        let outcome = p
            .initial_sync(transport, sender.as_mut(), started)
            .and_then(|sync| p.epochs(transport, sender.as_mut(), sync, &self.end));
        let report = match outcome {
            Ok(()) => {
                p.gate.open();
                self.monitor.update(|r| r.status = ProtectStatus::Released)
            }
            Err(lost) => p.settle(session, lost, witness),
        };
        sender.finish();
        Ok(self.monitor.update(|r| {
            *r = ProtectionReport {
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                ..report
            }
        }))
    }
}

/// Most guest bytes in one epoch of the initial sync.
const SYNC_PART_BYTES: u64 = 64 << 20;

/// The pages of `log` in parts of about `max_bytes` each (by whole runs,
/// split where a run alone is larger).
fn parts(mem: &GuestMemory, log: &DirtyLog, max_bytes: u64) -> Vec<DirtyLog> {
    let mut out = Vec::new();
    let mut part = DirtyLog::new(mem);
    let mut bytes = 0;
    for run in log.runs() {
        let page = mem.regions()[run.region].page_size().bytes() as u64;
        let mut first = run.first;
        let end = run.first + run.count;
        while first < end {
            let room = (max_bytes.saturating_sub(bytes) / page).max(1) as usize;
            let n = room.min(end - first);
            part.mark_range(run.region, first, n);
            bytes += n as u64 * page;
            first += n;
            if bytes >= max_bytes {
                out.push(std::mem::replace(&mut part, DirtyLog::new(mem)));
                bytes = 0;
            }
        }
    }
    if bytes > 0 || out.is_empty() {
        out.push(part);
    }
    out
}

/// `Hello` (offering [`FEATURE_MIRROR`]) → `Welcome`, `Layout` →
/// `LayoutAccepted`: the session and the features both ends use.
fn handshake(
    transport: &mut dyn SourceTransport,
    mem: &GuestMemory,
) -> Result<(u64, Features), MigrationError> {
    let session = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let offered = transport.features().with(FEATURE_MIRROR);
    let data_streams = transport.data_streams();
    let ctl = transport.control();
    ctl.send(&Message::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        session,
        data_streams,
        features: offered.bits(),
    })?;
    let features = expect_msg!(ctl, Welcome { version: _, features } => features);
    let features = Features::new(features).and(offered);
    if !features.has(FEATURE_MIRROR) {
        let reason = "the peer is a migration destination, not a standby".to_string();
        let _ = ctl.send(&Message::Abort {
            reason: reason.clone(),
        });
        return Err(TransportError::Unavailable { reason }.into());
    }
    ctl.send(&Message::Layout {
        layout: mem.layout(),
    })?;
    expect_msg!(ctl, LayoutAccepted => ());
    Ok((session, features))
}

impl Primary<'_> {
    /// The full pass and the catch-up rounds, with the guest running (the
    /// standby applies them but has no state to resume yet). The next
    /// epoch's number, and the pages dirtied since the last round (the
    /// first checkpoint carries them).
    fn initial_sync(
        &mut self,
        transport: &mut dyn SourceTransport,
        sender: &mut dyn PageSender,
        started: Instant,
    ) -> Result<(u32, DirtyLog), MigrationError> {
        // What was dirtied before now is in the full pass.
        let mut log = DirtyLog::new(self.mem);
        harvest_with_discards(self.tracker, self.mem, &mut log)?;
        log.mark_all();
        let mut epoch = 0;
        let mut round = 0;
        loop {
            // In parts: each is copied and shipped (and applied) while the
            // next waits, so neither end's data streams fall silent for a
            // whole copy of the guest.
            for part in parts(self.mem, &log, SYNC_PART_BYTES) {
                self.copy(&part)?;
                self.ship(transport, sender, &part, &EpochShip::pages_only(epoch))?;
                epoch += 1;
            }
            round += 1;
            log.clear();
            harvest_with_discards(self.tracker, self.mem, &mut log)?;
            if round > self.cfg.catch_up_rounds
                || (log.count() as u64) < self.cfg.catch_up_below_pages
            {
                break;
            }
        }
        let sync_ms = started.elapsed().as_secs_f64() * 1e3;
        self.monitor.update(|r| {
            r.initial_sync_ms = sync_ms;
            r.sync_rounds = epoch;
        });
        tracing::info!(sync_ms, rounds = epoch, "initial sync done; epochs begin");
        Ok((epoch, log))
    }

    /// Epochs from `epoch` until `end` (then one last epoch and the
    /// release of the standby); `log` holds the pages dirtied and not sent
    /// yet.
    fn epochs(
        &mut self,
        transport: &mut dyn SourceTransport,
        sender: &mut dyn PageSender,
        (mut epoch, mut log): (u32, DirtyLog),
        end: &CancelToken,
    ) -> Result<(), MigrationError> {
        let mut next = Instant::now();
        loop {
            let ending = end.is_cancelled();
            let wait = next.saturating_duration_since(Instant::now());
            if !ending && !wait.is_zero() {
                std::thread::sleep(wait);
            }
            next = Instant::now() + self.cfg.epoch;
            let (ship, output) = self.capture(&mut log, epoch)?;
            if let Err(e) = self.ship(transport, sender, &log, &ship) {
                // Not applied: the output is held again, for whichever end
                // runs the guest on.
                self.gate.unseal(output);
                return Err(e);
            }
            self.gate.release(&output);
            self.record(epoch, ship.bytes_hint);
            log.clear();
            epoch += 1;
            if ending {
                let ctl = transport.control();
                ctl.send(&Message::ProtectEnd)?;
                expect_msg!(ctl, ProtectEnded => ());
                tracing::info!(epochs = epoch, "protection ended; standby released");
                return Ok(());
            }
        }
    }

    /// With the guest paused: its output so far, its dirty pages (added to
    /// `log`) copied to the shadow, its device state. The guest runs again
    /// on return.
    fn capture(
        &mut self,
        log: &mut DirtyLog,
        epoch: u32,
    ) -> Result<(EpochShip, SealedOutput), MigrationError> {
        let t = Instant::now();
        self.vm.pause()?;
        let captured = self.while_paused(log);
        // The guest runs again whatever happened.
        let resumed = self.vm.resume();
        let (state, output) = captured?;
        resumed?;
        self.pauses_us.record(t.elapsed().as_micros() as u64);
        let ship = EpochShip {
            epoch,
            checkpoint: true,
            state,
            output: output.bytes.clone(),
            bytes_hint: log.dirty_bytes(),
        };
        Ok((ship, output))
    }

    /// What [`capture`](Self::capture) takes from the paused guest.
    fn while_paused(
        &mut self,
        log: &mut DirtyLog,
    ) -> Result<(Vec<u8>, SealedOutput), MigrationError> {
        harvest_with_discards(self.tracker, self.mem, log)?;
        self.copy(log)?;
        let state = self.vm.save_state()?;
        // Last: on an error above the output stays in the gate.
        Ok((state, self.gate.seal()))
    }

    /// Copy the pages of `log` from the guest's memory to the shadow.
    fn copy(&self, log: &DirtyLog) -> Result<(), MigrationError> {
        for run in log.runs() {
            self.shadow
                .copy_pages_from(self.mem, run.region, run.first, run.count)?;
        }
        Ok(())
    }

    /// Send an epoch (its pages from the shadow, their list, the device
    /// state and output) and wait until the standby applied it; an epoch it
    /// refused goes again, up to the retries.
    fn ship(
        &mut self,
        transport: &mut dyn SourceTransport,
        sender: &mut dyn PageSender,
        log: &DirtyLog,
        ship: &EpochShip,
    ) -> Result<(), MigrationError> {
        let runs: Vec<PageRun> = log.runs().collect();
        let ranges: Vec<PageRange> = runs
            .iter()
            .map(|r| PageRange {
                region: r.region as u32,
                first: r.first as u64,
                count: r.count as u32,
            })
            .collect();
        let mut tries = 0;
        loop {
            let t = Instant::now();
            let sent = {
                let progress = |_: usize, _: &crate::transport::RoundSent| {};
                let ctx = RoundContext {
                    cancel: &self.cancel,
                    limiter: &self.limiter,
                    progress: &progress,
                    dest_pages: &self.dest_pages,
                };
                sender.send_round(ship.epoch, &runs, &ctx)?
            };
            self.monitor.update(|r| r.bytes_sent += sent.wire_bytes);
            let ctl = transport.control();
            for zero in chunks_of(&sent.zero_ranges) {
                ctl.send(&Message::ZeroPages {
                    round: ship.epoch,
                    ranges: zero.to_vec(),
                })?;
            }
            ship.send_control(ctl, &ranges)?;
            let sent_at = t.elapsed();
            let answer = crate::control::recv::<MigrationError>(ctl)?;
            tracing::debug!(
                epoch = ship.epoch,
                pages = log.count(),
                send_us = sent_at.as_micros() as u64,
                ack_us = (t.elapsed() - sent_at).as_micros() as u64,
                "epoch shipped"
            );
            match answer {
                Message::EpochApplied { epoch } if epoch == ship.epoch => {
                    self.last_word = Instant::now();
                    return Ok(());
                }
                Message::EpochRefused { epoch, reason }
                    if epoch == ship.epoch && tries < self.cfg.epoch_retries =>
                {
                    tries += 1;
                    tracing::warn!(epoch, %reason, tries, "the standby refused an epoch; sending it again");
                    self.monitor.update(|r| r.epochs_refused += 1);
                    self.monitor
                        .emit(ProtectEvent::EpochRefused { epoch, reason });
                }
                Message::EpochRefused { epoch, reason } => {
                    return Err(MigrationError::PeerAborted {
                        reason: format!(
                            "the standby refused epoch {epoch} {tries} times more: {reason}"
                        ),
                    });
                }
                other => return Err(crate::control::unexpected(&other, "EpochApplied")),
            }
        }
    }

    /// An epoch applied by the standby: its figures.
    fn record(&mut self, epoch: u32, bytes: u64) {
        self.epoch_bytes.record(bytes);
        if !std::mem::replace(&mut self.delays_reset, true) {
            self.gate.reset_delays();
        }
        let (pause, sizes) = (self.pauses_us.spread(), self.epoch_bytes.spread());
        let delay = self.gate.delays_us().1;
        let mut first = false;
        let stats = self.monitor.update(|r| {
            first = r.status == ProtectStatus::Syncing;
            r.status = ProtectStatus::Protected;
            r.epochs += 1;
            r.last_applied_epoch = Some(epoch);
            r.epoch_pause_us = pause;
            r.epoch_bytes = sizes;
            r.output_delay_us = delay;
        });
        if first {
            self.last_progress = Instant::now();
            self.monitor.emit(ProtectEvent::Protected { stats });
        } else if self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.monitor.emit(ProtectEvent::Progress { stats });
        }
    }

    /// The standby is lost (`lost`): ask `witness` whether this end may run
    /// the guest on. Yes: degraded, the held output goes out. No (or no
    /// answer): fenced, the guest stays paused and its held output is
    /// dropped.
    fn settle(
        &mut self,
        session: u64,
        lost: MigrationError,
        witness: &mut dyn RunRight,
    ) -> ProtectionReport {
        let detect_ms = self.last_word.elapsed().as_secs_f64() * 1e3;
        tracing::warn!(error = %lost, detect_ms, "the standby is lost; asking the witness");
        self.monitor.emit(ProtectEvent::StandbyLost {
            error: lost.to_string(),
        });
        let verdict = witness.claim(session, Claimant::Primary);
        let status = match verdict {
            Ok(true) => {
                tracing::warn!("run right granted: the guest runs on unprotected (degraded)");
                self.gate.open();
                ProtectStatus::Degraded
            }
            Ok(false) | Err(_) => {
                if let Err(e) = &verdict {
                    tracing::error!(error = %e, "the witness could not be asked");
                }
                tracing::error!("no run right: the guest stops here (fenced)");
                if let Err(e) = self.vm.pause() {
                    tracing::error!(error = %e, "pausing the fenced guest failed");
                }
                let dropped = self.gate.discard();
                tracing::info!(dropped, "held output dropped");
                ProtectStatus::Fenced
            }
        };
        let witness_error = verdict.err().map(|e| e.to_string());
        self.monitor.update(|r| {
            r.status = status;
            r.detect_ms = detect_ms;
            r.error = Some(match &witness_error {
                Some(w) => format!("{lost}; witness: {w}"),
                None => lost.to_string(),
            });
        })
    }
}

impl EpochShip {
    /// The control messages of this epoch after its pages: their list, the
    /// device state, the output, the end.
    fn send_control(
        &self,
        ctl: &mut dyn crate::transport::ControlChannel,
        ranges: &[PageRange],
    ) -> Result<(), TransportError> {
        let mut chunks = chunks_of(ranges).peekable();
        while let Some(c) = chunks.next() {
            ctl.send(&Message::EpochPages {
                epoch: self.epoch,
                last: chunks.peek().is_none(),
                ranges: c.to_vec(),
            })?;
        }
        if self.checkpoint {
            send_chunked(ctl, &self.state, |last, bytes| Message::DeviceState {
                last,
                bytes,
            })?;
        }
        if !self.output.is_empty() {
            send_chunked(ctl, &self.output, |last, bytes| Message::EpochOutput {
                last,
                bytes,
            })?;
        }
        ctl.send(&Message::EpochEnd {
            epoch: self.epoch,
            checkpoint: self.checkpoint,
        })
    }
}
