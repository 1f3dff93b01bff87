//! What a migration reports while it runs and when it ends (the figures of
//! QEMU's `query-migrate`), and the events a VMM can subscribe to.

use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub enum MigrationStatus {
    /// Connecting, handshake, layout, data streams, tracker.
    #[default]
    Setup,
    /// Pre-copy rounds with the guest running.
    Active,
    /// Guest paused: last round, device state, commit.
    Device,
    /// Guest paused and its memory sent, waiting for
    /// [`continue_switchover`](crate::MigrationHandle::continue_switchover)
    /// or a cancel (QEMU's `pre-switchover`, with
    /// [`SourceConfig::pause_before_switchover`](crate::SourceConfig::pause_before_switchover)).
    PreSwitchover,
    /// Post-copy: the destination runs the guest and fetches the pages it
    /// still lacks; the source serves them, its guest paused.
    PostcopyActive,
    /// Committed: the destination runs the guest.
    Completed,
    /// Failed before commit: the source guest runs.
    Failed,
    /// Cancelled before commit (a handle's cancel, a signal, the timeout's
    /// cancel policy): the source guest runs.
    Cancelled,
    /// Commit sent but not acknowledged: the source guest stays paused, the
    /// operator must find out whether the destination runs it.
    CommitUnknown,
    /// The connection broke during post-copy: the destination runs the
    /// guest without all of its pages; the source keeps its paused guest
    /// and memory (see [`crate::postcopy`]).
    PostcopyInterrupted,
}

impl MigrationStatus {
    /// Stable lower-case name (`setup`, `active`, ...), as in JSON reports.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Device => "device",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::CommitUnknown => "commit-unknown",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyInterrupted => "postcopy-interrupted",
        }
    }
}

/// Figures of a migration, live or final. Times in milliseconds.
///
/// With the `serde` feature it serializes under the names of the JSON
/// reports (`migrate_core::report`, the README's table): `migration_id` as
/// 16 hex digits, the average throughput as `throughput_mbps` and the last
/// round's as `last_round_throughput_mbps`, post-copy's figures only once
/// the migration switched to it.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MigrationStats {
    /// The layout of these figures ([`STATS_SCHEMA_VERSION`]); a consumer
    /// that stores them can tell which fields to expect.
    pub schema_version: u32,
    /// This migration's id: the session both ends share (the same on the
    /// destination, in its logs and reports).
    #[cfg_attr(feature = "serde", serde(serialize_with = "hex_id"))]
    pub migration_id: u64,
    /// When it started, milliseconds since the Unix epoch.
    pub started_at_unix_ms: u64,
    /// Where it is.
    pub status: MigrationStatus,
    /// Transport in use (`tcp`, `rdma`).
    pub transport: String,
    /// Dirty tracker in use.
    pub tracker: String,
    /// Start to now (or to the destination's commit).
    pub total_ms: f64,
    /// The migration's start ([`BoundMigration::run`](crate::source::BoundMigration::run):
    /// the transport is connected and the memory bound before it) to the
    /// first page: hello and layout, the data streams opened (RDMA: queue
    /// pairs connected, the destination's memory registered).
    pub setup_ms: f64,
    /// Guest paused to destination resumed (0 until then).
    pub downtime_ms: f64,
    /// Bytes written to the wire.
    pub bytes_transferred: u64,
    /// `bytes_transferred` by data stream (index = stream: a TCP connection
    /// or an RDMA queue pair), counted at the end of each round.
    pub stream_bytes: Vec<u64>,
    /// Guest memory size.
    pub bytes_total: u64,
    /// The guest's smallest page size, bytes (the unit of `*_pages`).
    pub page_size: u64,
    /// Bytes written to the wire while the guest ran (pre-copy).
    pub bytes_before_pause: u64,
    /// Bytes written to the wire while it was paused (the last round(s);
    /// 0 until the switch-over).
    pub bytes_during_pause: u64,
    /// Pages sent with their bytes (whole, or as their few non-zero words).
    pub normal_pages: u64,
    /// Of those, pages sent as their non-zero words (TCP, sparse pages).
    pub sparse_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages re-sent because their batch failed its check.
    pub resent_pages: u64,
    /// Wire throughput of the last round, Mbit/s.
    #[cfg_attr(feature = "serde", serde(rename = "last_round_throughput_mbps"))]
    pub throughput_mbps: f64,
    /// Average wire throughput from the first page to the commit, Mbit/s.
    #[cfg_attr(feature = "serde", serde(rename = "throughput_mbps"))]
    pub avg_throughput_mbps: f64,
    /// Time spent comparing page hashes with the destination (`verify`),
    /// ms. It is part of `downtime_ms`: the guest is paused meanwhile.
    pub verify_ms: f64,
    /// Whether the destination's pages were compared with the source's.
    pub verified: bool,
    /// Times the migration went on over a new connection after losing one.
    pub reconnects: u32,
    /// The pre-copy rounds' figures.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub precopy: PrecopyStats,
    /// Post-copy's figures, once the migration switched to it.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub postcopy: Option<PostcopyStats>,
}

/// The source's pre-copy figures: its rounds, what is left, the guest's
/// dirty rate and the throttle. In reports: under these names.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct PrecopyStats {
    /// Rounds (dirty syncs) done, round 0 included.
    pub rounds: u32,
    /// Dirty bytes still to send (at the last harvest).
    pub bytes_remaining: u64,
    /// Remaining dirty bytes / measured bandwidth: what downtime would be if
    /// the switch-over happened now.
    pub expected_downtime_ms: f64,
    /// Pages dirtied per second, measured over the last round.
    pub dirty_rate_pps: f64,
    /// Pages sent per second (with their bytes or as zero markers) in the
    /// last round.
    pub pages_per_sec: f64,
    /// Wire throughput of round 0 (the full pass), Mbit/s: the transport's
    /// bulk rate, the figure to hold against a link's ceiling.
    pub first_pass_mbps: f64,
    /// Current auto-converge throttle, percent.
    pub throttle_percent: u8,
}

/// Post-copy's figures, on either end, once a migration switched to it.
/// In reports: `postcopy: true` and `postcopy_*`, `fault_latency_us`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PostcopyStats {
    /// From the guest resuming on the destination to its last page there.
    pub ms: f64,
    /// Pages sent because the destination's guest touched them.
    pub demand_pages: u64,
    /// Pages pushed in the background.
    pub pushed_pages: u64,
    /// The destination's only: of the demand pages, those read from the
    /// source's memory by RDMA READ (no source CPU in the path).
    pub read_pages: Option<u64>,
    /// How long the destination's guest waited on missing pages.
    pub fault_latency_us: crate::FaultLatency,
}

#[cfg(feature = "serde")]
impl serde::Serialize for PostcopyStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        self.entries(&mut m)?;
        m.end()
    }
}

#[cfg(feature = "serde")]
impl PostcopyStats {
    /// Its report fields, into a map being written.
    pub(crate) fn entries<M: serde::ser::SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        m.serialize_entry("postcopy", &true)?;
        m.serialize_entry("postcopy_ms", &self.ms)?;
        m.serialize_entry("postcopy_demand_pages", &self.demand_pages)?;
        m.serialize_entry("postcopy_pushed_pages", &self.pushed_pages)?;
        if let Some(n) = self.read_pages {
            m.serialize_entry("postcopy_read_pages", &n)?;
        }
        m.serialize_entry("fault_latency_us", &self.fault_latency_us)
    }
}

/// A migration id as 16 hex digits (JSON numbers lose precision past 2^53).
#[cfg(feature = "serde")]
pub(crate) fn hex_id<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{id:016x}"))
}

/// The layout version of [`MigrationStats`] (and of `migrate-cli`'s JSON
/// reports built from it): raised when a field changes meaning or goes.
pub const STATS_SCHEMA_VERSION: u32 = 1;

/// What happens during a migration, in order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MigrationEvent {
    /// Setup done: streams open, tracker running.
    SetupDone {
        /// Setup time, ms.
        setup_ms: f64,
    },
    /// A round starts with this many pages.
    RoundStarted {
        /// Round number.
        round: u32,
        /// Pages to send.
        pages: u64,
        /// Whether the guest is paused (the last round).
        paused: bool,
    },
    /// Progress inside a round (about every 100 ms).
    Progress(MigrationStats),
    /// A round was acknowledged by the destination.
    RoundDone(MigrationStats),
    /// The guest was throttled for auto-converge.
    Throttled {
        /// New throttle, percent.
        percent: u8,
    },
    /// Switch-over: the guest is paused.
    SwitchOver {
        /// Dirty bytes left when paused.
        remaining_bytes: u64,
        /// Why now (`converged`, `max rounds`, `timeout`, `forced`).
        reason: &'static str,
    },
    /// The destination runs the guest; the pages it lacks follow
    /// (post-copy).
    Postcopy(MigrationStats),
    /// The guest is paused and its memory sent; the migration waits for
    /// [`continue_switchover`](crate::MigrationHandle::continue_switchover)
    /// or a cancel.
    PreSwitchover(MigrationStats),
    /// A knob changed while the migration runs (through a
    /// [`MigrationHandle`](crate::MigrationHandle)).
    ParameterChanged {
        /// `downtime_ms`, `bandwidth_mbs` or `max_rounds`.
        name: &'static str,
        /// The new value (bandwidth: 0 means no cap).
        value: u64,
    },
    /// The connection to the destination was lost before the switch-over;
    /// the source reconnects within its grace period, its guest running.
    ConnectionLost {
        /// What broke.
        error: String,
    },
    /// The migration goes on over a new connection.
    Resumed(MigrationStats),
    /// Committed (final statistics).
    Completed(MigrationStats),
    /// Failed before commit; the source guest runs (final statistics).
    Failed {
        /// The error, as text.
        error: String,
        /// Figures at the failure.
        stats: MigrationStats,
    },
    /// Cancelled before commit; the source guest runs (final statistics).
    Cancelled(MigrationStats),
}

impl MigrationEvent {
    /// Stable lower-case name (`round-done`, `switch-over`, ...), as in
    /// JSON event streams.
    pub fn name(&self) -> &'static str {
        match self {
            MigrationEvent::SetupDone { .. } => "setup-done",
            MigrationEvent::RoundStarted { .. } => "round-started",
            MigrationEvent::Progress(_) => "progress",
            MigrationEvent::RoundDone(_) => "round-done",
            MigrationEvent::Throttled { .. } => "throttled",
            MigrationEvent::SwitchOver { .. } => "switch-over",
            MigrationEvent::PreSwitchover(_) => "pre-switchover",
            MigrationEvent::Postcopy(_) => "postcopy",
            MigrationEvent::ParameterChanged { .. } => "parameter-changed",
            MigrationEvent::ConnectionLost { .. } => "connection-lost",
            MigrationEvent::Resumed(_) => "resumed",
            MigrationEvent::Completed(_) => "completed",
            MigrationEvent::Failed { .. } => "failed",
            MigrationEvent::Cancelled(_) => "cancelled",
        }
    }

    /// Whether the migration ends with this event (no more follow).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            MigrationEvent::Completed(_)
                | MigrationEvent::Failed { .. }
                | MigrationEvent::Cancelled(_)
        )
    }
}

/// Live statistics and event subscribers of one migration, shared with a
/// [`MigrationHandle`](crate::source::MigrationHandle) (or, with the
/// destination's types, an [`IncomingHandle`](crate::IncomingHandle)).
#[derive(Debug)]
pub(crate) struct Monitor<S = MigrationStats, E = MigrationEvent> {
    stats: Arc<Mutex<S>>,
    subscribers: Arc<Mutex<Vec<Sender<E>>>>,
}

impl<S, E> Clone for Monitor<S, E> {
    fn clone(&self) -> Self {
        Self {
            stats: Arc::clone(&self.stats),
            subscribers: Arc::clone(&self.subscribers),
        }
    }
}

impl<S: Default, E> Default for Monitor<S, E> {
    fn default() -> Self {
        Self {
            stats: Arc::default(),
            subscribers: Arc::default(),
        }
    }
}

impl<S: Clone, E: Clone> Monitor<S, E> {
    pub(crate) fn stats(&self) -> S {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut S)) -> S {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        s.clone()
    }

    pub(crate) fn subscribe(&self) -> Receiver<E> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    pub(crate) fn emit(&self, event: E) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        // A dropped receiver unsubscribes.
        subs.retain(|s| s.send(event.clone()).is_ok());
    }
}

#[cfg(all(test, feature = "json"))]
mod serde_tests {
    use super::*;

    #[test]
    fn statistics_and_events_serialize_under_their_stable_names() {
        let stats = MigrationStats {
            status: MigrationStatus::PreSwitchover,
            migration_id: 7,
            precopy: PrecopyStats {
                rounds: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&stats).unwrap();
        assert_eq!(v["status"], "pre-switchover");
        assert_eq!(v["rounds"], 3);
        let e = serde_json::to_value(MigrationEvent::SwitchOver {
            remaining_bytes: 4096,
            reason: "forced",
        })
        .unwrap();
        assert_eq!(e["event"], "switch-over");
        assert_eq!(
            e["event"],
            MigrationEvent::SwitchOver {
                remaining_bytes: 0,
                reason: ""
            }
            .name()
        );
        assert_eq!(e["remaining_bytes"], 4096);
        // An event stream's object: the time, and the figures under
        // `stats` as the source's report writes them.
        let e = crate::report::event_json(&MigrationEvent::Cancelled(stats));
        assert_eq!(e["event"], "cancelled");
        assert!(e["time"].as_f64().unwrap() > 1.7e9, "{e}");
        assert_eq!(e["stats"]["status"], "pre-switchover");
        assert_eq!(e["stats"]["role"], "source");
        assert!(e.get("status").is_none(), "{e}");
        let s = serde_json::to_value(MigrationStatus::CommitUnknown).unwrap();
        assert_eq!(s, MigrationStatus::CommitUnknown.name());
    }

    #[test]
    fn statistics_serialize_under_the_reports_names() {
        let mut stats = MigrationStats {
            migration_id: 0xab,
            throughput_mbps: 1.5,
            avg_throughput_mbps: 2.5,
            ..Default::default()
        };
        let v = serde_json::to_value(&stats).unwrap();
        assert_eq!(v["migration_id"], "00000000000000ab");
        assert_eq!(v["throughput_mbps"], 2.5);
        assert_eq!(v["last_round_throughput_mbps"], 1.5);
        assert!(v.get("avg_throughput_mbps").is_none(), "{v}");
        // Post-copy's figures only once it happened, and then all of them.
        for k in ["postcopy", "postcopy_ms", "fault_latency_us"] {
            assert!(v.get(k).is_none(), "{k} without post-copy: {v}");
        }
        stats.postcopy = Some(PostcopyStats {
            demand_pages: 3,
            ..Default::default()
        });
        let v = serde_json::to_value(&stats).unwrap();
        assert_eq!(v["postcopy"], true);
        assert_eq!(v["postcopy_demand_pages"], 3);
        assert_eq!(v["postcopy_ms"], 0.0);
        assert_eq!(v["fault_latency_us"]["p99"], 0);
        // The destination's read pages are the destination's.
        assert!(v.get("postcopy_read_pages").is_none(), "{v}");
        // An event carries the same names.
        let e = serde_json::to_value(MigrationEvent::Postcopy(stats)).unwrap();
        assert_eq!(
            (&e["event"], &e["stats"]["postcopy"]),
            (&"postcopy".into(), &true.into())
        );
    }

    #[test]
    fn the_destinations_report_serializes_under_the_reports_names() {
        let mut r = crate::DestinationReport {
            status: MigrationStatus::PostcopyInterrupted,
            migration_id: 0xab,
            ..Default::default()
        };
        r.received.wire_bytes = 4096;
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "postcopy-interrupted");
        assert_eq!(v["migration_id"], "00000000000000ab");
        assert_eq!(v["bytes_received"], 4096);
        assert!(
            v.get("received").is_none() && v.get("postcopy").is_none(),
            "{v}"
        );
        r.postcopy = Some(PostcopyStats {
            read_pages: Some(2),
            ..Default::default()
        });
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (&v["postcopy"], &v["postcopy_read_pages"]),
            (&true.into(), &2.into())
        );
        let e = crate::report::incoming_event_json(&crate::IncomingEvent::Committed(r));
        assert_eq!(
            (&e["event"], &e["stats"]["bytes_received"]),
            (&"committed".into(), &4096.into())
        );
        assert_eq!(
            (&e["stats"]["role"], &e["stats"]["schema_version"]),
            (&"destination".into(), &STATS_SCHEMA_VERSION.into())
        );
        // Before any migration, a destination's report says only whether
        // this end failed.
        let v = crate::report::destination_json(None, None, Some("cannot listen"));
        assert_eq!(
            (&v["status"], &v["error"], &v["role"]),
            (
                &"failed".into(),
                &"cannot listen".into(),
                &"destination".into()
            )
        );
    }
}
