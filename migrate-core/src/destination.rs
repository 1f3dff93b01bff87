//! The destination side: handshake, layout check, landing rounds, device
//! state, commit. Follows the receiver state machine in [`crate::protocol`],
//! which `ReceiverState` spells out as a type; `Receiver::step` is its one
//! transition function.
//!
//! ```text
//! let incoming = IncomingMigration::accept(&mut transport)?;   // Hello, Layout
//! let mem = my_memory_for(incoming.layout());                   // or adopt it
//! let report = incoming.receive(&mut transport, &mem, &mut vm)?; // rounds .. Commit
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cancel::CancelToken;
use crate::control::{CANCEL_POLL, expect_msg, recv_unless, recv_until, unexpected};
use crate::error::IncomingError;
use crate::memory::{GuestMemory, MemoryLayout};
use crate::postcopy::fetch::PostcopyTarget;
use crate::protocol::{
    FEATURE_POSTCOPY, FEATURE_ZERO_SKIP, Features, FrameKind, HASHES_PER_FRAME, MIN_VERSION,
    Message, PageRange, ProtocolError, RefusalCode, VERSION,
};
use crate::stats::Monitor;
use crate::transport::{
    ControlChannel, DataEvent, DestinationTransport, Landed, RoundSent, TransportError,
};
use crate::vm::DestinationVm;

/// Largest device state accepted (a guard against a hostile source).
pub const MAX_DEVICE_STATE: usize = 1 << 30;

/// What the destination received.
///
/// With the `serde` feature it serializes under the names of the
/// destination's JSON report (`migrate_core::report`, the README's table):
/// `migration_id` as 16 hex digits, what arrived as `bytes_received`,
/// `stream_bytes`, `normal_pages` and `zero_pages`, post-copy's figures only
/// once it happened.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct DestinationReport {
    /// Where this end is: `Active` while it receives, `PostcopyActive`
    /// while its guest runs and fetches its last pages, then `Completed`,
    /// `Failed`, `Cancelled` or `PostcopyInterrupted` (set by the engine:
    /// reports and events carry it as it is, never inferred).
    pub status: crate::MigrationStatus,
    /// The migration's id: the session the source chose (its
    /// [`MigrationStats::migration_id`](crate::MigrationStats::migration_id)).
    pub migration_id: u64,
    /// Transport used.
    pub transport: String,
    /// Rounds received.
    pub rounds: u32,
    /// Bytes, pages and zero pages received.
    pub received: RoundSent,
    /// Pages of batches that failed their check (and were sent again).
    pub suspect_pages: u64,
    /// Whether the source compared page hashes before commit.
    pub verify_requested: bool,
    /// Bytes of device state loaded.
    pub device_state_bytes: u64,
    /// First message to commit, ms.
    pub total_ms: f64,
    /// Whether `Committed` could be sent (handed to the connection; whether
    /// it arrived only the source knows). When it could not (the link broke
    /// after the guest resumed here), the migration is committed all the
    /// same: this side runs the guest, and the source reports commit-unknown
    /// and keeps its copy paused.
    pub commit_ack_sent: bool,
    /// Post-copy's figures, when the guest resumed here before all of its
    /// memory arrived.
    pub postcopy: Option<crate::stats::PostcopyStats>,
}

#[cfg(feature = "serde")]
impl serde::Serialize for DestinationReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("status", &self.status)?;
        m.serialize_entry("migration_id", &format!("{:016x}", self.migration_id))?;
        m.serialize_entry("transport", &self.transport)?;
        m.serialize_entry("rounds", &self.rounds)?;
        m.serialize_entry("bytes_received", &self.received.wire_bytes)?;
        m.serialize_entry("stream_bytes", &self.received.stream_bytes)?;
        m.serialize_entry("normal_pages", &self.received.normal_pages)?;
        m.serialize_entry("zero_pages", &self.received.zero_pages)?;
        m.serialize_entry("suspect_pages", &self.suspect_pages)?;
        m.serialize_entry("verify_requested", &self.verify_requested)?;
        m.serialize_entry("device_state_bytes", &self.device_state_bytes)?;
        m.serialize_entry("total_ms", &self.total_ms)?;
        m.serialize_entry("commit_ack_sent", &self.commit_ack_sent)?;
        if let Some(p) = &self.postcopy {
            p.entries(&mut m)?;
        }
        m.end()
    }
}

/// What happens during an incoming migration, in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum IncomingEvent {
    /// A round landed whole (its pages checked) and was acknowledged.
    RoundReceived {
        /// Round number.
        round: u32,
        /// Whether the source's guest was paused for it (the last round).
        last: bool,
        /// Figures so far.
        report: DestinationReport,
    },
    /// The connection to the source was lost before the switch-over; this
    /// side keeps what it received and waits for the source.
    ConnectionLost {
        /// What broke.
        error: String,
    },
    /// The source came back over a new connection.
    Resumed,
    /// The guest runs here; the pages it still lacks follow (post-copy).
    Postcopy,
    /// Figures so far, every [`PROGRESS_EVERY`] while the migration runs
    /// (bytes counted as batches land, where the transport sees them: TCP).
    Progress(DestinationReport),
    /// Committed: the guest runs here (final figures).
    Committed(DestinationReport),
    /// Failed: nothing resumed here, the received memory is to be
    /// discarded.
    Failed {
        /// The error, as text.
        error: String,
        /// Figures at the failure.
        report: DestinationReport,
    },
    /// Cancelled through the handle: the source was told, nothing resumed
    /// here.
    Cancelled(DestinationReport),
}

impl IncomingEvent {
    /// Stable lower-case name, as in JSON event streams.
    pub fn name(&self) -> &'static str {
        match self {
            IncomingEvent::RoundReceived { .. } => "round-received",
            IncomingEvent::ConnectionLost { .. } => "connection-lost",
            IncomingEvent::Resumed => "resumed",
            IncomingEvent::Postcopy => "postcopy",
            IncomingEvent::Progress(_) => "progress",
            IncomingEvent::Committed(_) => "committed",
            IncomingEvent::Failed { .. } => "failed",
            IncomingEvent::Cancelled(_) => "cancelled",
        }
    }

    /// Whether the migration ends with this event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            IncomingEvent::Committed(_)
                | IncomingEvent::Failed { .. }
                | IncomingEvent::Cancelled(_)
        )
    }
}

/// How often a running incoming migration emits [`IncomingEvent::Progress`].
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Figures that move between the engine's own updates: the clock, and what
/// the data plane has landed (counted per batch).
#[derive(Debug)]
struct Live {
    started: Instant,
    landed: std::sync::OnceLock<Arc<Landed>>,
    /// The migration ended: the report's `total_ms` is final.
    ended: std::sync::atomic::AtomicBool,
}

impl Live {
    fn new(started: Instant) -> Arc<Self> {
        Arc::new(Self {
            started,
            landed: std::sync::OnceLock::new(),
            ended: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `report` as of now: the clock while running, and what landed.
    fn overlay(&self, report: &mut DestinationReport) {
        if !self.ended.load(std::sync::atomic::Ordering::Relaxed) {
            report.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        self.merge(report);
    }

    /// What the data plane landed, where it is ahead of the rounds the
    /// engine counted.
    fn merge(&self, report: &mut DestinationReport) {
        if let Some(landed) = self.landed.get() {
            let (bytes, normal, zero) = landed.get();
            let r = &mut report.received;
            r.wire_bytes = r.wire_bytes.max(bytes);
            r.normal_pages = r.normal_pages.max(normal);
            r.zero_pages = r.zero_pages.max(zero);
        }
    }
}

/// Watch and cancel an incoming migration from another thread (the VMM's
/// destination side of [`MigrationHandle`](crate::MigrationHandle)).
#[derive(Debug, Clone)]
pub struct IncomingHandle {
    monitor: Monitor<DestinationReport, IncomingEvent>,
    cancel: CancelToken,
    live: Arc<Live>,
}

impl IncomingHandle {
    /// Figures so far: live while the migration runs (the clock, and the
    /// bytes and pages landed so far where the transport counts them as
    /// they land), final once it ended.
    pub fn stats(&self) -> DestinationReport {
        let mut r = self.monitor.stats();
        self.live.overlay(&mut r);
        r
    }

    /// A channel of events from now on (dropping it unsubscribes).
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<IncomingEvent> {
        self.monitor.subscribe()
    }

    /// Give up this migration within about 100 ms: the source is told (its
    /// guest runs on), nothing is resumed here, and
    /// [`receive`](IncomingMigration::receive) returns
    /// [`IncomingError::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

/// A migration that has said hello and announced its layout; the caller now
/// decides which memory receives it.
#[derive(Debug)]
pub struct IncomingMigration {
    layout: MemoryLayout,
    pub(crate) session: u64,
    pub(crate) streams: u16,
    pub(crate) features: Features,
    pub(crate) started: Instant,
    reconnect: Option<Duration>,
    memory_reads_zero: bool,
    monitor: Monitor<DestinationReport, IncomingEvent>,
    cancel: CancelToken,
    live: Arc<Live>,
}

impl IncomingMigration {
    /// Run the handshake on a freshly connected transport and read the
    /// source's layout.
    ///
    /// # Errors
    /// [`IncomingError`] for a peer that is not ours, speaks no common
    /// version (refused), or breaks the protocol.
    pub fn accept(transport: &mut dyn DestinationTransport) -> Result<Self, IncomingError> {
        Self::accept_offering(transport, Features::NONE)
    }

    /// As [`accept`](Self::accept), offering `more` features too (a
    /// standby offers [`FEATURE_MIRROR`](crate::protocol::FEATURE_MIRROR)).
    pub(crate) fn accept_offering(
        transport: &mut dyn DestinationTransport,
        more: Features,
    ) -> Result<Self, IncomingError> {
        let result = Self::accept_inner(transport, more);
        if let Err(e) = &result
            && matches!(e, IncomingError::Protocol(ProtocolError::Unexpected { .. }))
        {
            let _ = transport.control().send(&Message::Abort {
                reason: format!("destination: {e}"),
            });
        }
        result
    }

    fn accept_inner(
        transport: &mut dyn DestinationTransport,
        more: Features,
    ) -> Result<Self, IncomingError> {
        let started = Instant::now();
        let postcopy = if transport.control().sender().is_some() {
            FEATURE_POSTCOPY
        } else {
            0
        };
        let ours = transport
            .features()
            .with(FEATURE_ZERO_SKIP)
            .with(postcopy)
            .with(more.bits());
        let ctl = transport.control();
        let (session, streams, features) = expect_msg!(ctl, Hello {
            min_version,
            max_version,
            session,
            data_streams,
            features,
        } => {
            let version = negotiate(ctl, min_version, max_version, data_streams)?;
            ctl.send(&Message::Welcome {
                version,
                features: features & ours.bits(),
            })?;
            (session, data_streams, Features::new(features).and(ours))
        });
        let layout = expect_msg!(ctl, Layout { layout } => layout);
        let monitor = Monitor::<DestinationReport, IncomingEvent>::default();
        monitor.update(|r| {
            r.status = crate::MigrationStatus::Active;
            r.migration_id = session;
            r.transport = transport.name().into();
        });
        Ok(Self {
            layout,
            session,
            streams,
            features,
            started,
            reconnect: None,
            memory_reads_zero: false,
            monitor,
            cancel: CancelToken::new(),
            live: Live::new(started),
        })
    }

    /// A handle to watch and cancel this migration from another thread.
    pub fn handle(&self) -> IncomingHandle {
        IncomingHandle {
            monitor: self.monitor.clone(),
            cancel: self.cancel.clone(),
            live: Arc::clone(&self.live),
        }
    }

    /// When the connection to the source is lost before the switch-over,
    /// keep what was received and wait up to `grace` for the source to
    /// reconnect and `Resume` (see [`SourceConfig::reconnect`](crate::SourceConfig::reconnect)).
    pub fn resume_within(mut self, grace: Duration) -> Self {
        self.reconnect = Some(grace);
        self
    }

    /// Say that the memory [`receive`](Self::receive) will get reads as
    /// zeros everywhere (freshly mapped, nothing written yet): the source
    /// then sends a zero page only where it sent data before, and the pages
    /// that stay zero are never touched here (fresh memory is not even
    /// allocated for them). Only for memory that really is all zeros: a
    /// page that is not, and stays zero on the source, would keep its bytes.
    pub fn memory_reads_zero(mut self, yes: bool) -> Self {
        self.memory_reads_zero = yes;
        self
    }

    /// The source's guest memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Refuse the migration (e.g. no memory for this layout); the source
    /// gets `message` and keeps its guest running.
    pub fn refuse(
        self,
        transport: &mut dyn DestinationTransport,
        code: RefusalCode,
        message: &str,
    ) {
        let _ = transport.control().send(&Message::Refused {
            code,
            message: message.into(),
        });
    }

    /// Receive into `mem` until the commit, then load the device state and
    /// resume through `vm`. `mem`'s layout must equal the source's.
    ///
    /// # Errors
    /// [`IncomingError::Layout`] (and the source is told which region
    /// differs); transport and protocol errors; the source's abort. On any
    /// error the guest was not resumed here and `mem` must be discarded.
    pub fn receive(
        self,
        transport: &mut dyn DestinationTransport,
        mem: &Arc<GuestMemory>,
        vm: &mut dyn DestinationVm,
    ) -> Result<DestinationReport, IncomingError> {
        let (monitor, started, live) = (self.monitor.clone(), self.started, Arc::clone(&self.live));
        let result = std::thread::scope(|s| {
            // Progress events while it runs: the figures move between
            // rounds too.
            let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
            let (m, l) = (monitor.clone(), Arc::clone(&live));
            let ticker = std::thread::Builder::new()
                .name("incoming-progress".into())
                .spawn_scoped(s, move || {
                    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(PROGRESS_EVERY)
                    {
                        let mut r = m.stats();
                        l.overlay(&mut r);
                        m.emit(IncomingEvent::Progress(r));
                    }
                });
            if let Err(e) = &ticker {
                tracing::warn!(error = %e, "no progress events: the thread did not start");
            }
            let result = self.receive_inner(transport, mem, vm);
            drop(stop);
            result
        });
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        // Final figures: what landed counts even where no round ended.
        let status = match &result {
            Ok(_) => crate::MigrationStatus::Completed,
            Err(IncomingError::Cancelled) => crate::MigrationStatus::Cancelled,
            Err(IncomingError::PostcopyInterrupted(_)) => {
                crate::MigrationStatus::PostcopyInterrupted
            }
            Err(_) => crate::MigrationStatus::Failed,
        };
        let end = |m: &mut DestinationReport| {
            m.status = status;
            m.total_ms = total_ms;
            live.merge(m);
        };
        live.ended.store(true, std::sync::atomic::Ordering::Relaxed);
        match &result {
            Ok(r) => {
                monitor.update(|m| *m = r.clone());
                monitor.emit(IncomingEvent::Committed(r.clone()));
            }
            Err(IncomingError::Cancelled) => {
                let report = monitor.update(end);
                monitor.emit(IncomingEvent::Cancelled(report));
            }
            Err(e) => {
                let report = monitor.update(end);
                monitor.emit(IncomingEvent::Failed {
                    error: e.to_string(),
                    report,
                });
            }
        }
        if let Err(e @ IncomingError::PostcopyInterrupted(_)) = &result {
            tracing::error!(error = %e, "post-copy interrupted: the guest runs here without all of its pages");
        } else if let Err(e) = &result {
            tracing::error!(error = %e, "incoming migration failed; received memory is discarded");
            if !matches!(
                e,
                IncomingError::PeerAborted { .. }
                    | IncomingError::Layout(_)
                    | IncomingError::Refused { .. }
                    | IncomingError::Vm(_)
            ) {
                let _ = transport.control().send(&Message::Abort {
                    reason: format!("destination: {e}"),
                });
            }
        }
        result
    }

    fn receive_inner(
        self,
        transport: &mut dyn DestinationTransport,
        mem: &Arc<GuestMemory>,
        vm: &mut dyn DestinationVm,
    ) -> Result<DestinationReport, IncomingError> {
        if let Err(m) = self.layout.check_matches(&mem.layout()) {
            // The difference names this side's layout: only for a source
            // that proved who it is.
            let message = if transport.authenticated() {
                m.to_string()
            } else {
                "the memory layouts differ (the destination's log says how)".into()
            };
            let _ = transport.control().send(&Message::Refused {
                code: RefusalCode::Layout,
                message,
            });
            return Err(IncomingError::Layout(m));
        }
        transport.control().send(&Message::LayoutAccepted)?;
        if self.features.zero_skip() {
            transport.control().send(&Message::DestinationMemory {
                reads_zero: self.memory_reads_zero,
            })?;
        }
        let events = transport.open_data(mem, self.session, self.streams, self.features)?;
        if let Some(landed) = transport.landed() {
            let _ = self.live.landed.set(landed);
        }
        let mut receiver = Receiver {
            mem,
            events: Some(events),
            streams: self.streams,
            report: DestinationReport {
                status: crate::MigrationStatus::Active,
                migration_id: self.session,
                transport: transport.name().into(),
                ..Default::default()
            },
            monitor: &self.monitor,
            cancel: &self.cancel,
            postcopy_allowed: self.features.postcopy(),
        };
        let mut state = ReceiverState::Receiving;
        let handover = loop {
            let live = state.is_live();
            let next = receiver
                .next_message(transport.control())
                .and_then(|msg| receiver.step(state, msg, transport, vm));
            state = match next {
                Ok(ReceiverState::Committed(handover)) => break handover,
                Ok(next) => next,
                Err(e) if live && self.may_resume(&e) => {
                    self.monitor.emit(IncomingEvent::ConnectionLost {
                        error: e.to_string(),
                    });
                    receiver.events = Some(self.resume(transport, mem, e)?);
                    self.monitor.emit(IncomingEvent::Resumed);
                    ReceiverState::Receiving
                }
                Err(e) => return Err(e),
            };
        };
        // Committed: the data plane ended before the guest resumed (above).
        if let Handover::Postcopy(target) = handover {
            self.fetch_the_rest(transport, target, &mut receiver.report)?;
        }
        receiver.report.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        receiver.report.status = crate::MigrationStatus::Completed;
        tracing::info!(
            rounds = receiver.report.rounds,
            "incoming migration committed; guest resumed"
        );
        Ok(receiver.report)
    }
}

impl IncomingMigration {
    /// Post-copy: the guest runs here; fetch its missing pages until the
    /// last (over new connections within the grace period when one is
    /// lost), into `report`.
    fn fetch_the_rest(
        &self,
        transport: &mut dyn DestinationTransport,
        target: PostcopyTarget,
        report: &mut DestinationReport,
    ) -> Result<(), IncomingError> {
        report.status = crate::MigrationStatus::PostcopyActive;
        self.monitor
            .update(|r| r.status = crate::MigrationStatus::PostcopyActive);
        self.monitor.emit(IncomingEvent::Postcopy);
        let fetched = target
            .run(transport, &mut |t, e| {
                if !self.may_resume(&e) {
                    return Err(e);
                }
                self.monitor.emit(IncomingEvent::ConnectionLost {
                    error: e.to_string(),
                });
                self.await_source(t, e)?;
                self.monitor.emit(IncomingEvent::Resumed);
                Ok(())
            })
            .map_err(|e| IncomingError::PostcopyInterrupted(Box::new(e)))?;
        report.postcopy = Some(crate::stats::PostcopyStats {
            ms: fetched.ms,
            demand_pages: fetched.demand_pages,
            pushed_pages: fetched.pushed_pages,
            read_pages: Some(fetched.read_pages),
            fault_latency_us: fetched.latency,
        });
        Ok(())
    }

    /// Whether `e` lost the connection in a way a new one may mend.
    fn may_resume(&self, e: &IncomingError) -> bool {
        self.reconnect.is_some() && matches!(e, IncomingError::Transport(t) if t.is_disconnect())
    }

    /// Wait for the source to come back with `Resume` for this session, then
    /// open the data plane again. Another client is refused and waited past;
    /// a cancel (the handle's) ends the wait within [`CANCEL_POLL`].
    fn resume(
        &self,
        transport: &mut dyn DestinationTransport,
        mem: &Arc<GuestMemory>,
        cause: IncomingError,
    ) -> Result<crossbeam_channel::Receiver<DataEvent>, IncomingError> {
        self.await_source(transport, cause)?;
        Ok(transport.open_data(mem, self.session, self.streams, self.features)?)
    }

    /// Wait within the grace period for the source to come back with
    /// `Resume` for this session, and answer `Resumed`; `cause` if it does
    /// not.
    fn await_source(
        &self,
        transport: &mut dyn DestinationTransport,
        cause: IncomingError,
    ) -> Result<(), IncomingError> {
        let grace = self.reconnect.unwrap_or_default();
        let deadline = Instant::now() + grace;
        tracing::warn!(error = %cause, ?grace, "connection to the source lost; waiting for it");
        loop {
            // The grace ends whatever keeps arriving.
            if Instant::now() >= deadline {
                tracing::warn!("the source did not come back within the grace period");
                return Err(cause);
            }
            // Wait in slices, so that a cancel is seen meanwhile.
            let slice = deadline.min(Instant::now() + CANCEL_POLL);
            if let Err(e) = transport.reaccept(slice) {
                if self.cancel.is_cancelled() {
                    return Err(IncomingError::Cancelled);
                }
                if slice < deadline && e.is_timeout() {
                    continue;
                }
                tracing::warn!(error = %e, "the source did not come back");
                return Err(cause);
            }
            // A source that came back says `Resume` at once: a connection
            // that says nothing is dropped (the next `reaccept` closes it)
            // before it can hold up the grace.
            let say_resume = deadline.min(Instant::now() + RESUME_WAIT);
            let ctl = transport.control();
            match recv_until(ctl, &self.cancel, Some(say_resume)) {
                Ok(Message::Resume { session }) if session == self.session => break,
                Ok(other) => {
                    let _ = ctl.send(&Message::Refused {
                        code: RefusalCode::Protocol,
                        message: format!(
                            "this destination is waiting for migration {:#x} to resume (got {:?})",
                            self.session,
                            other.kind()
                        ),
                    });
                }
                Err(IncomingError::Cancelled) => return Err(IncomingError::Cancelled),
                Err(e) => tracing::debug!(error = %e, "a reconnection failed"),
            }
        }
        transport.control().send(&Message::Resumed)?;
        tracing::info!("migration resumed over a new connection");
        Ok(())
    }
}

/// How long a new connection has, once its handshake is done, to say
/// `Resume`.
const RESUME_WAIT: Duration = Duration::from_secs(5);

/// Check the source's versions and stream count: the version both speak,
/// or a refusal.
fn negotiate(
    ctl: &mut dyn ControlChannel,
    min_version: u16,
    max_version: u16,
    data_streams: u16,
) -> Result<u16, IncomingError> {
    if max_version < MIN_VERSION || min_version > VERSION {
        let err = ProtocolError::Version {
            ours_min: MIN_VERSION,
            ours_max: VERSION,
            theirs_min: min_version,
            theirs_max: max_version,
        };
        let _ = ctl.send(&Message::Refused {
            code: RefusalCode::Version,
            message: err.to_string(),
        });
        return Err(IncomingError::Protocol(err));
    }
    if data_streams == 0 {
        return Err(refuse(
            ctl,
            RefusalCode::Protocol,
            "zero data streams".into(),
        ));
    }
    Ok(max_version.min(VERSION))
}

/// Where the receiver is once the layout is accepted and the data streams
/// joined: the `Receiving → Complete → HaveState → Committed` part of the
/// state machine in [`crate::protocol`], with what each state holds (the
/// post-copy set as it arrives, the memory set up for post-copy, the
/// device state). Every transition is in [`Receiver::step`]; a message that
/// has none is [`ProtocolError::Unexpected`], and a `Commit` before the
/// migration is complete is refused.
#[derive(Debug)]
enum ReceiverState {
    /// Live rounds and their zero pages.
    Receiving,
    /// A last (paused) round had pages that failed their check: they come
    /// again in another last round.
    FinalRetry,
    /// Chunks of the post-copy set are arriving (`PostcopyPrepare` or
    /// `PostcopyStart`, as `kind` says); `target` is the memory a prepare
    /// already set up.
    SetArriving {
        kind: FrameKind,
        set: Vec<PageRange>,
        target: Option<PostcopyTarget>,
    },
    /// Post-copy prepared (memory registered, the known set dropped) while
    /// the source's guest still ran: the last pages of the set come next.
    Prepared(PostcopyTarget),
    /// A last round landed whole (or the post-copy set did): verification,
    /// then the device state.
    Complete(Handover),
    /// Some device-state chunks arrived; more follow.
    DeviceState(Vec<u8>, Handover),
    /// The whole device state arrived; waiting for `Commit`.
    HaveState(Vec<u8>, Handover),
    /// Loaded, resumed and acknowledged.
    Committed(Handover),
}

/// How the guest is handed over at the commit.
#[derive(Debug)]
enum Handover {
    /// Every page is here.
    Precopy,
    /// The guest runs before its last pages arrive: this memory fetches
    /// them on its faults.
    Postcopy(PostcopyTarget),
}

impl ReceiverState {
    /// What this state waits for, as errors say it.
    fn expects(&self) -> &'static str {
        match self {
            ReceiverState::Receiving => "a round",
            ReceiverState::FinalRetry => "the pages of the last round again",
            ReceiverState::SetArriving { .. } => "the rest of the post-copy set",
            ReceiverState::Prepared(_) => "the last pages of the post-copy set",
            ReceiverState::Complete(_) => "verification or the device state",
            ReceiverState::DeviceState(..) => "DeviceState",
            ReceiverState::HaveState(..) => "Commit",
            ReceiverState::Committed(_) => "nothing",
        }
    }

    /// Whether the source's guest still runs (a lost connection may then
    /// be resumed, from `Receiving`).
    fn is_live(&self) -> bool {
        matches!(
            self,
            ReceiverState::Receiving | ReceiverState::SetArriving { target: None, .. }
        )
    }
}

/// What the receiving states work on.
struct Receiver<'a> {
    /// The handle's view of `report`, and its subscribers.
    monitor: &'a Monitor<DestinationReport, IncomingEvent>,
    /// The handle's cancel.
    cancel: &'a CancelToken,
    mem: &'a Arc<GuestMemory>,
    /// The data plane's reports; dropped once the last round landed whole,
    /// so that a data stream closing after that (the source exits after its
    /// `Commit`) cannot take the `Commit` with it.
    events: Option<crossbeam_channel::Receiver<DataEvent>>,
    streams: u16,
    report: DestinationReport,
    /// Both sides offered post-copy.
    postcopy_allowed: bool,
}

impl Receiver<'_> {
    /// The next control message. A transport may close the control channel
    /// when a data stream fails: then the stream's error, the root cause.
    fn next_message(&self, ctl: &mut dyn ControlChannel) -> Result<Message, IncomingError> {
        recv_unless(ctl, self.cancel).map_err(|e| {
            self.events
                .iter()
                .flat_map(|events| events.try_iter())
                .find_map(|ev| match ev {
                    DataEvent::Failed { stream, error } => Some(stream_failed(stream, error)),
                    _ => None,
                })
                .unwrap_or(e)
        })
    }

    /// The one transition function of the receiver.
    fn step(
        &mut self,
        state: ReceiverState,
        msg: Message,
        transport: &mut dyn DestinationTransport,
        vm: &mut dyn DestinationVm,
    ) -> Result<ReceiverState, IncomingError> {
        use ReceiverState::*;
        Ok(match (state, msg) {
            (
                Complete(Handover::Postcopy(mut t)),
                offer @ (Message::RdmaReadOffer { .. } | Message::PageFetchOffer),
            ) => {
                self.read_offer(transport, &mut t, &offer)?;
                Complete(Handover::Postcopy(t))
            }
            (Receiving, Message::RoundDone { round, last: false }) => {
                self.land_round(transport.control(), round, false)?;
                Receiving
            }
            (Receiving | FinalRetry, Message::RoundDone { round, last: true }) => {
                if self.land_round(transport.control(), round, true)? {
                    Complete(Handover::Precopy)
                } else {
                    FinalRetry
                }
            }
            (state @ (Receiving | FinalRetry), Message::ZeroPages { round, ranges }) => {
                tracing::debug!(round, ranges = ranges.len(), "zero pages");
                zero_pages(self.mem, &ranges)?;
                self.report.received.zero_pages +=
                    ranges.iter().map(|r| r.count as u64).sum::<u64>();
                state
            }
            (state, msg @ (Message::PostcopyPrepare { .. } | Message::PostcopyStart { .. }))
                if self.postcopy_allowed =>
            {
                self.set_part(transport.control(), state, msg)?
            }
            (Complete(Handover::Postcopy(_)), Message::VerifyRequest) => {
                return Err(refuse(
                    transport.control(),
                    RefusalCode::Protocol,
                    "no verification in post-copy: the guest runs before its last pages arrive"
                        .into(),
                ));
            }
            (Complete(Handover::Precopy), Message::VerifyRequest) => {
                self.report.verify_requested = true;
                send_hashes(transport.control(), self.mem)?;
                Complete(Handover::Precopy)
            }
            (Complete(h), Message::DeviceState { last, bytes }) => {
                device_state(transport.control(), Vec::new(), h, last, &bytes)?
            }
            (DeviceState(state, h), Message::DeviceState { last, bytes }) => {
                device_state(transport.control(), state, h, last, &bytes)?
            }
            (HaveState(..), Message::DeviceState { .. }) => {
                return Err(refuse(
                    transport.control(),
                    RefusalCode::DeviceState,
                    "device state too large or sent twice".into(),
                ));
            }
            (HaveState(state, h), Message::Commit) => self.commit(&state, h, transport, vm)?,
            (state, Message::Commit) => {
                return Err(refuse(
                    transport.control(),
                    RefusalCode::Protocol,
                    format!(
                        "commit refused: the migration is incomplete (waiting for {})",
                        state.expects()
                    ),
                ));
            }
            (state, other) => return Err(unexpected(&other, state.expects())),
        })
    }

    /// `Commit` with the whole device state: end the data plane, start
    /// post-copy's fault handling if the guest runs before its last pages,
    /// load the state, resume the guest, acknowledge.
    fn commit(
        &mut self,
        state: &[u8],
        mut handover: Handover,
        transport: &mut dyn DestinationTransport,
        vm: &mut dyn DestinationVm,
    ) -> Result<ReceiverState, IncomingError> {
        // Every page is in (or comes by post-copy's own path): end the data
        // plane's remote access (RDMA: deregister, the keys stop working)
        // before the guest runs on this memory.
        transport.data_done();
        let ctl = transport.control();
        if let Handover::Postcopy(target) = &mut handover {
            // Before the guest runs: its first touch may fault.
            let started = ctl
                .sender()
                .ok_or_else(|| "the control channel has no sending half".to_string())
                .and_then(|tx| target.start(tx).map_err(|e| e.to_string()));
            if let Err(m) = started {
                return Err(refuse(
                    ctl,
                    RefusalCode::Setup,
                    format!("post-copy fault handler: {m}"),
                ));
            }
            vm.postcopy();
        }
        if let Err(e) = vm.load_state(state).and_then(|()| vm.resume()) {
            let _ = ctl.send(&Message::Refused {
                code: RefusalCode::DeviceState,
                message: e.to_string(),
            });
            return Err(IncomingError::Vm(e));
        }
        // The guest runs here now: whatever happens to the acknowledgement,
        // this migration is committed.
        self.report.commit_ack_sent = match ctl.send(&Message::Committed) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "guest resumed, but the commit acknowledgement could not be sent: \
                     the source reports commit-unknown and keeps its guest paused"
                );
                false
            }
        };
        self.report.device_state_bytes = state.len() as u64;
        Ok(ReceiverState::Committed(handover))
    }

    /// The source offers its memory for RDMA READ, or a fetch connection:
    /// take it (the fault handler then gets pages itself) or decline
    /// (faults ask over the control connection).
    fn read_offer(
        &mut self,
        transport: &mut dyn DestinationTransport,
        target: &mut PostcopyTarget,
        offer: &Message,
    ) -> Result<(), IncomingError> {
        match transport.postcopy_fetcher(self.mem, offer) {
            Ok((answer, fetcher)) => {
                target.set_fetcher(fetcher);
                transport.control().send(&answer)?;
                tracing::info!(
                    offer = ?offer.kind(),
                    "post-copy: the fault handler gets its pages from the source itself"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, offer = ?offer.kind(), "post-copy: offer declined; faults ask over the control connection");
                transport.control().send(&Message::RdmaReadDeclined {
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(())
    }

    /// A chunk of the post-copy set (`PostcopyPrepare` from `Receiving`,
    /// `PostcopyStart` from `Receiving` or `Prepared`, more of the same
    /// kind while it arrives); with the last one, set the memory up for
    /// post-copy (refused if it cannot be) and stop listening to the data
    /// plane, which has no more to say.
    fn set_part(
        &mut self,
        ctl: &mut dyn ControlChannel,
        state: ReceiverState,
        msg: Message,
    ) -> Result<ReceiverState, IncomingError> {
        let (kind, last, ranges) = match msg {
            Message::PostcopyPrepare { last, ranges } => (FrameKind::PostcopyPrepare, last, ranges),
            Message::PostcopyStart { last, ranges } => (FrameKind::PostcopyStart, last, ranges),
            other => return Err(unexpected(&other, state.expects())),
        };
        let (mut set, target) = match (state, kind) {
            (ReceiverState::Receiving, _) => (Vec::new(), None),
            (ReceiverState::Prepared(t), FrameKind::PostcopyStart) => (Vec::new(), Some(t)),
            (
                ReceiverState::SetArriving {
                    kind: k,
                    set,
                    target,
                },
                _,
            ) if k == kind => (set, target),
            (state, _) => {
                let msg = match kind {
                    FrameKind::PostcopyPrepare => Message::PostcopyPrepare { last, ranges },
                    _ => Message::PostcopyStart { last, ranges },
                };
                return Err(unexpected(&msg, state.expects()));
            }
        };
        if let Some(r) = ranges.iter().find(|r| !crate::postcopy::fits(self.mem, r)) {
            return Err(IncomingError::Protocol(ProtocolError::Malformed {
                kind,
                detail: format!(
                    "pages {}+{} of region {} are outside the layout",
                    r.first, r.count, r.region
                ),
            }));
        }
        set.extend(ranges);
        if !last {
            return Ok(ReceiverState::SetArriving { kind, set, target });
        }
        self.events = None;
        let target = match target {
            Some(mut t) => t.add(&set).map(|()| t),
            None => PostcopyTarget::prepare(self.mem, &set),
        };
        let target = match target {
            Ok(t) => t,
            Err(m) => {
                return Err(refuse(
                    ctl,
                    RefusalCode::Setup,
                    format!("post-copy impossible here: {m}"),
                ));
            }
        };
        if kind == FrameKind::PostcopyPrepare {
            ctl.send(&Message::PostcopyPrepared)?;
            return Ok(ReceiverState::Prepared(target));
        }
        ctl.send(&Message::PostcopyAccepted)?;
        Ok(ReceiverState::Complete(Handover::Postcopy(target)))
    }

    /// Wait for every data stream's end of `round`, and acknowledge it with
    /// the pages that failed their check. Whether none did.
    fn land_round(
        &mut self,
        ctl: &mut dyn ControlChannel,
        round: u32,
        last: bool,
    ) -> Result<bool, IncomingError> {
        let suspect = self.collect_round(round)?;
        self.report.rounds = self.report.rounds.max(round + 1);
        tracing::debug!(round, last, suspect = suspect.len(), "round landed");
        let clean = suspect.is_empty();
        let report = self.report.clone();
        self.monitor.update(|r| *r = report.clone());
        self.monitor.emit(IncomingEvent::RoundReceived {
            round,
            last,
            report,
        });
        if last && clean {
            // Every page is final: the data plane has no more to say. Stop
            // listening before the ack, so that its streams closing once the
            // source has it (a source that exits after its Commit) is no
            // failure.
            self.events = None;
        }
        ctl.send(&Message::RoundAck { round, suspect })?;
        Ok(clean)
    }

    /// Wait for every data stream's end marker of `round`.
    fn collect_round(&mut self, round: u32) -> Result<Vec<PageRange>, IncomingError> {
        let events = self.events.as_ref().ok_or(TransportError::DataPlane {
            detail: format!("round {round} after the data plane finished"),
        })?;
        let report = &mut self.report;
        collect_round(
            events,
            self.streams,
            round,
            self.cancel,
            |stream, received, s| {
                report.received.add(&received.on_stream(stream));
                report.suspect_pages += s.iter().map(|r| r.count as u64).sum::<u64>();
            },
        )
    }
}

/// Wait for every data stream's end marker of `round` on `events`, each
/// counted by `ended` (its stream, what it received, its suspect pages);
/// the suspect pages of all of them.
pub(crate) fn collect_round(
    events: &crossbeam_channel::Receiver<DataEvent>,
    streams: u16,
    round: u32,
    cancel: &CancelToken,
    mut ended_on: impl FnMut(u16, RoundSent, &[PageRange]),
) -> Result<Vec<PageRange>, IncomingError> {
    let mut ended = vec![false; streams as usize];
    let mut suspect = Vec::new();
    let waiting = Instant::now();
    while ended.iter().any(|e| !e) {
        // Data streams have their own I/O timeouts; this only guards
        // against a transport that reports nothing at all.
        let event = loop {
            if cancel.is_cancelled() {
                return Err(IncomingError::Cancelled);
            }
            match events.recv_timeout(CANCEL_POLL) {
                Ok(event) => break event,
                Err(crossbeam_channel::RecvTimeoutError::Timeout)
                    if waiting.elapsed() < Duration::from_secs(600) => {}
                Err(_) => {
                    return Err(TransportError::DataPlane {
                        detail: format!("no end of round {round} from the data streams"),
                    }
                    .into());
                }
            }
        };
        match event {
            DataEvent::RoundEnd {
                stream,
                round: r,
                batches_sent,
                batches_received,
                suspect: s,
                received,
            } => {
                let slot = ended.get_mut(stream as usize).filter(|_| r == round);
                let Some(slot) = slot.filter(|e| !**e) else {
                    return Err(TransportError::Stream {
                        stream,
                        detail: format!("end of round {r} while waiting for round {round}"),
                    }
                    .into());
                };
                if batches_sent != batches_received {
                    return Err(TransportError::Stream {
                        stream,
                        detail: format!(
                            "round {round}: source sent {batches_sent} batches, {batches_received} arrived"
                        ),
                    }
                    .into());
                }
                *slot = true;
                ended_on(stream, received, &s);
                suspect.extend(s);
            }
            DataEvent::Failed { stream, error } => return Err(stream_failed(stream, error)),
        }
    }
    Ok(suspect)
}

/// A device-state chunk onto what arrived so far: the next state, or a
/// refusal past [`MAX_DEVICE_STATE`].
fn device_state(
    ctl: &mut dyn ControlChannel,
    mut state: Vec<u8>,
    handover: Handover,
    last: bool,
    bytes: &[u8],
) -> Result<ReceiverState, IncomingError> {
    if state.len() + bytes.len() > MAX_DEVICE_STATE {
        return Err(refuse(
            ctl,
            RefusalCode::DeviceState,
            "device state too large or sent twice".into(),
        ));
    }
    state.extend_from_slice(bytes);
    Ok(if last {
        ReceiverState::HaveState(state, handover)
    } else {
        ReceiverState::DeviceState(state, handover)
    })
}

/// Zero the pages of `ranges` (after checking them against the layout);
/// pages already zero are only read, so fresh memory stays unallocated.
fn zero_pages(mem: &GuestMemory, ranges: &[PageRange]) -> Result<(), IncomingError> {
    for r in ranges {
        let region = mem
            .regions()
            .get(r.region as usize)
            .filter(|reg| {
                r.count > 0 && r.first.saturating_add(r.count as u64) <= reg.pages() as u64
            })
            .ok_or_else(|| ProtocolError::Malformed {
                kind: FrameKind::ZeroPages,
                detail: format!(
                    "{} pages at page {} of region {} are outside guest memory",
                    r.count, r.first, r.region
                ),
            })?;
        for p in r.first as usize..(r.first + r.count as u64) as usize {
            region.zero_page(p);
        }
    }
    Ok(())
}

/// A data stream's failure as the migration's error. A lost peer stays a
/// disconnect (it may resume); anything else names the stream.
fn stream_failed(stream: u16, error: TransportError) -> IncomingError {
    match error {
        e @ TransportError::Stream { .. } => e.into(),
        e if e.is_disconnect() => e.into(),
        e => TransportError::Stream {
            stream,
            detail: e.to_string(),
        }
        .into(),
    }
}

fn send_hashes(ctl: &mut dyn ControlChannel, mem: &GuestMemory) -> Result<(), IncomingError> {
    for (ri, r) in mem.regions().iter().enumerate() {
        let mut first = 0;
        while first < r.pages() {
            let n = (r.pages() - first).min(HASHES_PER_FRAME);
            let hashes = (first..first + n).map(|p| r.hash_page(p)).collect();
            ctl.send(&Message::PageHashes {
                region: ri as u32,
                first: first as u64,
                hashes,
            })?;
            first += n;
        }
    }
    Ok(())
}

fn refuse(ctl: &mut dyn ControlChannel, code: RefusalCode, message: String) -> IncomingError {
    let _ = ctl.send(&Message::Refused {
        code,
        message: message.clone(),
    });
    IncomingError::Refused { code, message }
}
