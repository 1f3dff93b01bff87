//! The source side: pre-copy rounds, switch-over, device state, commit.
//!
//! [`SourceMigration::bind`] then [`BoundMigration::run`]: a blocking call that drives one migration over
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
//!
//! The public knobs and handles are here. The rooms:
//! - `outgoing`: the migration as named steps (handshake, open the data
//!   plane, a round and its ack, after a live round, switch-over, verify,
//!   device state, commit, fail);
//! - `phase`: where it stands (live, paused, commit sent, post-copy, done)
//!   as a type with one transition function, the session the handshake
//!   settled, and what a failure means in each phase, table-tested;
//! - `postcopy`: the switch to post-copy and serving the pages;
//! - `policy`: the decisions as pure, unit-tested types (the link-rate
//!   estimate, the downtime budget with its switch-over test,
//!   auto-converge);
//! - `holes`: the memory files' holes, sent as zero pages unread.

mod holes;
mod outgoing;
mod phase;
mod policy;
mod postcopy;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cancel::CancelToken;
use crate::dirty::DirtyTracker;
use crate::error::MigrationError;
use crate::memory::GuestMemory;
use crate::postcopy::PostcopyMode;
use crate::stats::{
    MigrationEvent, MigrationStats, MigrationStatus, Monitor, STATS_SCHEMA_VERSION,
};
use crate::transport::{RateLimiter, SourceTransport, TransportError};
use crate::vm::SourceVm;
use outgoing::Outgoing;

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
    /// When the connection to the destination is lost before the
    /// switch-over (a cut link, a silent peer), keep migrating: reconnect
    /// within this grace period and go on where it stopped (the transport
    /// must support it; TCP does). `None`: fail at once, as a lost
    /// connection after the switch-over always does.
    pub reconnect: Option<Duration>,
    /// Once the guest is paused and its memory sent, stop before the
    /// device state and wait for
    /// [`MigrationHandle::continue_switchover`] (or a cancel, which resumes
    /// the guest here): the VMM hands over what it must (disks, network)
    /// in between (QEMU's `pause-before-switchover`). The wait counts as
    /// downtime.
    pub pause_before_switchover: bool,
    /// Whether the guest may move in post-copy when pre-copy does not
    /// converge (see [`crate::postcopy`]; the destination must offer it).
    pub postcopy: PostcopyMode,
    /// With post-copy allowed: switch to it after this many rounds at the
    /// latest, even if the rest would fit the downtime budget (as QEMU's
    /// `migrate-start-postcopy`).
    pub postcopy_after_rounds: Option<u32>,
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
            reconnect: None,
            pause_before_switchover: false,
            postcopy: PostcopyMode::Never,
            postcopy_after_rounds: None,
        }
    }
}

/// The knobs a [`MigrationHandle`] changes while the migration runs, and
/// its requests; shared with the engine, which reads the knobs at each
/// round boundary (the bandwidth cap at once).
#[derive(Debug)]
pub(crate) struct Steering {
    downtime_ms: AtomicU64,
    max_rounds: AtomicU32,
    pub(crate) limiter: RateLimiter,
    switchover: AtomicBool,
    /// Set by `continue_switchover`; the engine waits on `wake` for it (or
    /// a cancel) in pre-switchover.
    proceed: Mutex<bool>,
    wake: Condvar,
}

impl Steering {
    fn new(cfg: &SourceConfig) -> Self {
        Self {
            downtime_ms: AtomicU64::new(cfg.downtime_limit.as_millis() as u64),
            max_rounds: AtomicU32::new(cfg.max_rounds),
            limiter: RateLimiter::new(cfg.bandwidth_limit),
            switchover: AtomicBool::new(false),
            proceed: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    pub(crate) fn downtime_limit(&self) -> Duration {
        Duration::from_millis(self.downtime_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn max_rounds(&self) -> u32 {
        self.max_rounds.load(Ordering::Relaxed)
    }

    pub(crate) fn switchover_asked(&self) -> bool {
        self.switchover.load(Ordering::Relaxed)
    }

    /// Wait until `continue_switchover` (true) or `cancelled` says so
    /// (false), checking `cancelled` every 50 ms.
    pub(crate) fn wait_to_proceed(&self, cancelled: impl Fn() -> bool) -> bool {
        let mut go = self.proceed.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *go {
                return true;
            }
            if cancelled() {
                return false;
            }
            go = self
                .wake
                .wait_timeout(go, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Watch and steer a running migration from another thread: figures,
/// events, and the knobs an operator turns while it runs (QEMU's
/// `migrate-set-parameters`, `migrate-continue`, `migrate_cancel`).
#[derive(Debug, Clone)]
pub struct MigrationHandle {
    monitor: Monitor,
    cancel: CancelToken,
    steer: Arc<Steering>,
}

impl MigrationHandle {
    /// Abort the migration at the next batch; the source guest keeps
    /// running (or runs again), and the status is `cancelled`.
    pub fn cancel(&self) {
        self.cancel.cancel();
        self.steer.wake.notify_all();
    }

    /// Current figures: `total_ms` runs with the clock until the
    /// migration ends; bytes move as batches go out, not only at round
    /// ends.
    pub fn stats(&self) -> MigrationStats {
        let mut s = self.monitor.stats();
        let running = !matches!(
            s.status,
            MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
                | MigrationStatus::CommitUnknown
                | MigrationStatus::PostcopyInterrupted
        );
        if running && s.started_at_unix_ms > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            s.total_ms = s
                .total_ms
                .max(now.saturating_sub(s.started_at_unix_ms) as f64);
        }
        s
    }

    /// A channel of events from now on (dropping it unsubscribes).
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<MigrationEvent> {
        self.monitor.subscribe()
    }

    /// The largest acceptable downtime, from the next round boundary on:
    /// raising it lets a migration that does not converge switch over.
    pub fn set_downtime_limit(&self, limit: Duration) {
        let ms = (limit.as_millis() as u64).max(1);
        self.steer.downtime_ms.store(ms, Ordering::Relaxed);
        self.changed("downtime_ms", ms);
    }

    /// The bandwidth cap in bytes per second over all streams (None: no
    /// cap), at once.
    pub fn set_bandwidth_limit(&self, bytes_per_sec: Option<u64>) {
        self.steer.limiter.set(bytes_per_sec);
        let mbs = bytes_per_sec.map_or(0, |b| b / 1_000_000);
        self.changed("bandwidth_mbs", mbs);
    }

    /// Switch over after this many rounds at most, from the next round
    /// boundary on.
    pub fn set_max_rounds(&self, rounds: u32) {
        let rounds = rounds.max(1);
        self.steer.max_rounds.store(rounds, Ordering::Relaxed);
        self.changed("max_rounds", rounds as u64);
    }

    /// The knobs as they are now (QEMU's `query-migrate-parameters`): what
    /// the `set_*` calls last set, or the configuration's.
    pub fn parameters(&self) -> MigrationParameters {
        MigrationParameters {
            downtime_limit: self.steer.downtime_limit(),
            bandwidth_limit: self.steer.limiter.rate(),
            max_rounds: self.steer.max_rounds(),
        }
    }

    /// Switch over at the next round boundary, whatever the downtime (the
    /// switch-over event says `forced`).
    pub fn switchover(&self) {
        self.steer.switchover.store(true, Ordering::Relaxed);
    }

    /// Go on from pre-switchover (see
    /// [`SourceConfig::pause_before_switchover`]): device state, then
    /// commit. Refused in any other state, as QEMU refuses
    /// `migrate-continue` outside `pre-switchover`: an early continue would
    /// let the migration pass the pause the VMM asked for.
    ///
    /// # Errors
    /// [`NotPreSwitchover`] with the state the migration is in.
    pub fn continue_switchover(&self) -> Result<(), NotPreSwitchover> {
        let status = self.stats().status;
        if status != MigrationStatus::PreSwitchover {
            return Err(NotPreSwitchover { status });
        }
        *self.steer.proceed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.steer.wake.notify_all();
        Ok(())
    }

    fn changed(&self, name: &'static str, value: u64) {
        tracing::info!(name, value, "migration parameter changed");
        self.monitor
            .emit(MigrationEvent::ParameterChanged { name, value });
    }
}

/// The knobs of a running migration ([`MigrationHandle::parameters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationParameters {
    /// The largest acceptable downtime.
    pub downtime_limit: Duration,
    /// The bandwidth cap in bytes per second over all streams (None: no
    /// cap).
    pub bandwidth_limit: Option<u64>,
    /// Switch over after this many rounds at most.
    pub max_rounds: u32,
}

/// [`MigrationHandle::continue_switchover`] outside pre-switchover.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the migration is not paused before the switch-over (it is {}): nothing to continue", status.name())]
pub struct NotPreSwitchover {
    /// The state the migration is in.
    pub status: MigrationStatus,
}

/// One outgoing migration.
#[derive(Debug)]
pub struct SourceMigration {
    config: SourceConfig,
    monitor: Monitor,
    cancel: CancelToken,
    steer: Arc<Steering>,
}

impl SourceMigration {
    /// A migration with these knobs.
    pub fn new(config: SourceConfig) -> Self {
        Self {
            steer: Arc::new(Steering::new(&config)),
            config,
            monitor: Monitor::default(),
            cancel: CancelToken::new(),
        }
    }

    /// A handle to cancel, steer, read statistics and subscribe to events.
    pub fn handle(&self) -> MigrationHandle {
        MigrationHandle {
            monitor: self.monitor.clone(),
            cancel: self.cancel.clone(),
            steer: Arc::clone(&self.steer),
        }
    }

    /// The first step of a migration: bind `mem` to `transport` (RDMA
    /// registers, i.e. pins, it for the NIC; TCP keeps it to send from).
    /// Start dirty tracking only after this, then
    /// [`run`](BoundMigration::run): the memory crosses the transport seam
    /// here and nowhere else.
    ///
    /// # Errors
    /// [`MigrationError::TrackedBeforeBind`] while a kernel dirty tracker
    /// already tracks `mem` (registering writes to every page, which it
    /// would report as the guest's: the whole memory would go twice);
    /// the transport's error (RLIMIT_MEMLOCK too small, registration
    /// refused). Nothing was sent to the destination either way.
    pub fn bind<'t>(
        self,
        transport: &'t mut dyn SourceTransport,
        mem: &Arc<GuestMemory>,
    ) -> Result<BoundMigration<'t>, MigrationError> {
        let bound = if mem.is_tracked() {
            Err(MigrationError::TrackedBeforeBind)
        } else {
            transport.bind(mem).map_err(MigrationError::from)
        };
        if let Err(e) = bound {
            let stats = self.monitor.update(|s| {
                s.status = MigrationStatus::Failed;
                s.transport = transport.name().into();
                s.bytes_total = mem.total_bytes();
            });
            tracing::error!(error = %e, "migration failed before it started");
            self.monitor.emit(MigrationEvent::Failed {
                error: e.to_string(),
                stats,
            });
            return Err(e);
        }
        Ok(BoundMigration {
            migration: self,
            transport,
            mem: Arc::clone(mem),
        })
    }
}

/// A migration whose memory is bound to its transport
/// ([`SourceMigration::bind`]): start dirty tracking, then
/// [`run`](Self::run).
pub struct BoundMigration<'t> {
    migration: SourceMigration,
    transport: &'t mut dyn SourceTransport,
    mem: Arc<GuestMemory>,
}

impl std::fmt::Debug for BoundMigration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundMigration")
            .field("transport", &self.transport.name())
            .field("bytes", &self.mem.total_bytes())
            .finish()
    }
}

impl BoundMigration<'_> {
    /// The bound memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// A handle to cancel, steer, read statistics and subscribe to events.
    pub fn handle(&self) -> MigrationHandle {
        self.migration.handle()
    }

    /// Migrate the bound memory. `tracker` must have been started after
    /// [`bind`](SourceMigration::bind) and before this call (writes from
    /// then on are caught); `vm` pauses and resumes the guest. Blocks
    /// until committed or failed.
    ///
    /// # Errors
    /// [`MigrationError`]; unless it is [`MigrationError::CommitUnknown`], the
    /// source guest is running again when this returns.
    pub fn run(
        self,
        tracker: &dyn DirtyTracker,
        vm: &mut dyn SourceVm,
    ) -> Result<MigrationStats, MigrationError> {
        let BoundMigration {
            migration: this,
            transport,
            mem,
        } = self;
        let mem = &mem;
        let start = Instant::now();
        this.monitor.update(|s| {
            s.schema_version = STATS_SCHEMA_VERSION;
            s.started_at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            s.status = MigrationStatus::Setup;
            s.transport = transport.name().into();
            s.tracker = tracker.kind().name().into();
            s.bytes_total = mem.total_bytes();
            s.page_size = mem
                .regions()
                .iter()
                .map(|r| r.page_size().bytes() as u64)
                .min()
                .unwrap_or(4096);
        });
        let mut run = Outgoing {
            cfg: &this.config,
            monitor: &this.monitor,
            cancel: &this.cancel,
            steer: &this.steer,
            mem,
            tracker,
            vm,
            start,
            deadline: this.config.timeout.map(|(d, _)| start + d),
            phase: phase::Phase::Live,
            converge: Default::default(),
            postcopy_ok: false,
            pinned: false,
            discards_before: mem.discarded_pages(),
        };
        let result = with_watchdog(&this.config, run.deadline, &this.cancel, || {
            run.run(transport)
        });
        match result {
            Ok(stats) => {
                tracing::info!(
                    total_ms = stats.total_ms,
                    downtime_ms = stats.downtime_ms,
                    rounds = stats.precopy.rounds,
                    "migration completed"
                );
                this.monitor.emit(MigrationEvent::Completed(stats.clone()));
                Ok(stats)
            }
            Err(e) => Err(run.fail(transport, e)),
        }
    }
}

/// Run `f` with a watchdog that turns a cancel-policy timeout into a
/// cancellation, so that it interrupts a long round, not only round
/// boundaries.
fn with_watchdog<T>(
    cfg: &SourceConfig,
    deadline: Option<Instant>,
    cancel: &CancelToken,
    f: impl FnOnce() -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let watchdog = match (cfg.timeout, deadline) {
        (Some((_, TimeoutPolicy::Cancel)), Some(deadline)) => {
            let cancel = cancel.clone();
            let watch = move || {
                let wait = deadline.saturating_duration_since(Instant::now());
                if let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(wait)
                {
                    cancel.cancel();
                }
            };
            let spawned = std::thread::Builder::new()
                .name("migration-timeout".into())
                .spawn(watch)
                .map_err(|source| TransportError::Io {
                    op: "spawn the timeout watchdog",
                    source,
                })?;
            Some(spawned)
        }
        _ => None,
    };
    let result = f();
    drop(done_tx);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    result
}
