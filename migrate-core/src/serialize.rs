//! How the statistics, reports and events serialize (the `serde`
//! feature): the report's object of each end, and each event as the object
//! of an event stream, its figures under `stats` as that end's report
//! writes them.

use crate::destination::{DestinationReport, IncomingEvent};
use crate::stats::{MigrationEvent, MigrationStats};

/// The source's report as it is written: the statistics as they serialize
/// (their names are the report's), its role, and why the pages went over
/// TCP or the migration failed, if they did.
#[derive(serde::Serialize)]
pub(crate) struct SourceReport<'a> {
    pub(crate) role: &'static str,
    #[serde(flatten)]
    pub(crate) stats: &'a MigrationStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fallback_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a str>,
}

impl<'a> SourceReport<'a> {
    pub(crate) fn of(stats: &'a MigrationStats) -> Self {
        Self {
            role: "source",
            stats,
            fallback_reason: None,
            error: None,
        }
    }
}

/// The destination's report as it is written: the engine's report (once a
/// migration began; before that only whether this end failed), its role,
/// the built-in guest's own check and the error, if any.
#[derive(serde::Serialize)]
pub(crate) struct DestinationJson<'a> {
    role: &'static str,
    pub(crate) schema_version: u32,
    #[serde(flatten)]
    pub(crate) report: Option<&'a DestinationReport>,
    /// Only without a report (which has its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) guest_check: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) guest_consistent: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<&'a str>,
}

impl<'a> DestinationJson<'a> {
    pub(crate) fn of(report: Option<&'a DestinationReport>, error: Option<&'a str>) -> Self {
        Self {
            role: "destination",
            schema_version: crate::STATS_SCHEMA_VERSION,
            report,
            status: match (report, error) {
                (Some(_), _) => None,
                (None, None) => Some("completed"),
                (None, Some(_)) => Some("failed"),
            },
            guest_check: None,
            guest_consistent: None,
            error,
        }
    }
}

impl serde::Serialize for MigrationEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("event", self.name())?;
        match self {
            MigrationEvent::SetupDone { setup_ms } => m.serialize_entry("setup_ms", setup_ms)?,
            MigrationEvent::RoundStarted {
                round,
                pages,
                paused,
            } => {
                m.serialize_entry("round", round)?;
                m.serialize_entry("pages", pages)?;
                m.serialize_entry("paused", paused)?;
            }
            MigrationEvent::Progress(s)
            | MigrationEvent::RoundDone(s)
            | MigrationEvent::PreSwitchover(s)
            | MigrationEvent::Postcopy(s)
            | MigrationEvent::Resumed(s)
            | MigrationEvent::Completed(s)
            | MigrationEvent::Cancelled(s) => m.serialize_entry("stats", &SourceReport::of(s))?,
            MigrationEvent::Throttled { percent } => m.serialize_entry("percent", percent)?,
            MigrationEvent::SwitchOver {
                remaining_bytes,
                reason,
            } => {
                m.serialize_entry("remaining_bytes", remaining_bytes)?;
                m.serialize_entry("reason", reason)?;
            }
            MigrationEvent::ParameterChanged { name, value } => {
                m.serialize_entry("name", name)?;
                m.serialize_entry("value", value)?;
            }
            MigrationEvent::ConnectionLost { error } => m.serialize_entry("error", error)?,
            MigrationEvent::Failed { error, stats } => {
                m.serialize_entry("error", error)?;
                m.serialize_entry("stats", &SourceReport::of(stats))?;
            }
        }
        m.end()
    }
}

impl serde::Serialize for IncomingEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("event", self.name())?;
        // The figures as of this event, with the engine's status then.
        let stats = |r| DestinationJson::of(Some(r), None);
        match self {
            IncomingEvent::RoundReceived {
                round,
                last,
                report,
            } => {
                m.serialize_entry("round", round)?;
                m.serialize_entry("last", last)?;
                m.serialize_entry("stats", &stats(report))?;
            }
            IncomingEvent::ConnectionLost { error } => m.serialize_entry("error", error)?,
            IncomingEvent::Committed(r)
            | IncomingEvent::Cancelled(r)
            | IncomingEvent::Progress(r) => m.serialize_entry("stats", &stats(r))?,
            IncomingEvent::Failed { error, report } => {
                m.serialize_entry("error", error)?;
                m.serialize_entry("stats", &stats(report))?;
            }
            IncomingEvent::Resumed | IncomingEvent::Postcopy => {}
        }
        m.end()
    }
}
