//! What a protection tells its subscribers as it goes
//! ([`ProtectHandle::subscribe`](super::ProtectHandle::subscribe),
//! [`StandbyHandle::subscribe`](super::StandbyHandle::subscribe)): the
//! moments an orchestrator acts on (protected, a refused epoch, the peer
//! lost, the end and how), and the figures about once a second in between.
//! Epochs themselves (40 a second at 25 ms) are counted in the figures,
//! not announced one by one.

use super::{ProtectionReport, StandbyReport};

/// How often a `progress` event carries the figures.
pub(crate) const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// An event of a primary's protection. Serialized (feature `serde`) as an
/// object with `event` (its name, kebab-case) and its fields; the figures
/// under `stats`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "event", rename_all = "kebab-case")
)]
#[non_exhaustive]
pub enum ProtectEvent {
    /// The standby applied the first checkpoint: from now on a failure of
    /// this host loses nothing the outside has seen.
    Protected {
        /// The figures then (the initial sync's time among them).
        stats: ProtectionReport,
    },
    /// The figures, about once a second while protected.
    Progress {
        /// The figures now.
        stats: ProtectionReport,
    },
    /// The standby refused an epoch (it stays at the one before); it goes
    /// again.
    EpochRefused {
        /// The epoch refused.
        epoch: u32,
        /// The standby's reason.
        reason: String,
    },
    /// The standby is lost; the witness is asked next.
    StandbyLost {
        /// Why it counts as lost.
        error: String,
    },
    /// Ended cleanly: the standby released, the guest runs here.
    Released {
        /// The final figures.
        stats: ProtectionReport,
    },
    /// The standby lost, the run right granted: the guest runs here
    /// unprotected.
    Degraded {
        /// The final figures.
        stats: ProtectionReport,
    },
    /// The standby lost, the run right refused or not to be had: the guest
    /// is paused for good here.
    Fenced {
        /// The final figures.
        stats: ProtectionReport,
    },
    /// Protection could not start; the guest runs on unprotected.
    Failed {
        /// Why.
        error: String,
    },
}

impl ProtectEvent {
    /// Its stable name (the serialized `event`).
    pub fn name(&self) -> &'static str {
        match self {
            ProtectEvent::Protected { .. } => "protected",
            ProtectEvent::Progress { .. } => "progress",
            ProtectEvent::EpochRefused { .. } => "epoch-refused",
            ProtectEvent::StandbyLost { .. } => "standby-lost",
            ProtectEvent::Released { .. } => "released",
            ProtectEvent::Degraded { .. } => "degraded",
            ProtectEvent::Fenced { .. } => "fenced",
            ProtectEvent::Failed { .. } => "failed",
        }
    }

    /// Whether the protection ends with this event (no more follow).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ProtectEvent::Released { .. }
                | ProtectEvent::Degraded { .. }
                | ProtectEvent::Fenced { .. }
                | ProtectEvent::Failed { .. }
        )
    }
}

/// An event of a standby. Serialized (feature `serde`) like
/// [`ProtectEvent`].
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "event", rename_all = "kebab-case")
)]
#[non_exhaustive]
pub enum StandbyEvent {
    /// The first checkpoint is applied: this end can take the guest over.
    Protected {
        /// The figures then.
        stats: StandbyReport,
    },
    /// The figures, about once a second while protected.
    Progress {
        /// The figures now.
        stats: StandbyReport,
    },
    /// An epoch was refused (incomplete, out of order, a page failed its
    /// check); the image stays at the last applied epoch.
    EpochRefused {
        /// The epoch refused.
        epoch: u32,
        /// Why.
        reason: String,
    },
    /// The primary is lost; the witness is asked next (if a checkpoint is
    /// held).
    PrimaryLost {
        /// Why it counts as lost.
        error: String,
    },
    /// The guest runs here from the last applied checkpoint.
    TookOver {
        /// The final figures.
        stats: StandbyReport,
    },
    /// The primary ended protection cleanly.
    Released {
        /// The final figures.
        stats: StandbyReport,
    },
    /// The primary lost, the run right refused or not to be had: the guest
    /// does not run here.
    Fenced {
        /// The final figures.
        stats: StandbyReport,
    },
    /// Standing by failed (the primary lost before any checkpoint, or
    /// aborted, or this end was cancelled, or the takeover failed).
    Failed {
        /// Why.
        error: String,
    },
}

impl StandbyEvent {
    /// Its stable name (the serialized `event`).
    pub fn name(&self) -> &'static str {
        match self {
            StandbyEvent::Protected { .. } => "protected",
            StandbyEvent::Progress { .. } => "progress",
            StandbyEvent::EpochRefused { .. } => "epoch-refused",
            StandbyEvent::PrimaryLost { .. } => "primary-lost",
            StandbyEvent::TookOver { .. } => "took-over",
            StandbyEvent::Released { .. } => "released",
            StandbyEvent::Fenced { .. } => "fenced",
            StandbyEvent::Failed { .. } => "failed",
        }
    }

    /// Whether standing by ends with this event (no more follow).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            StandbyEvent::TookOver { .. }
                | StandbyEvent::Released { .. }
                | StandbyEvent::Fenced { .. }
                | StandbyEvent::Failed { .. }
        )
    }
}

#[cfg(all(test, feature = "json"))]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_their_names_and_figures_under_stats() {
        let e = ProtectEvent::Degraded {
            stats: ProtectionReport {
                epochs: 7,
                ..Default::default()
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], e.name());
        assert_eq!(v["stats"]["epochs"], 7);
        assert_eq!(v["stats"]["status"], "syncing");
        assert!(e.is_final());
        let e = StandbyEvent::EpochRefused {
            epoch: 3,
            reason: "epoch 3 out of order".into(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "epoch-refused");
        assert_eq!(v["epoch"], 3);
        assert!(!e.is_final());
        let e = StandbyEvent::TookOver {
            stats: StandbyReport::default(),
        };
        assert_eq!(serde_json::to_value(&e).unwrap()["event"], e.name());
    }
}
