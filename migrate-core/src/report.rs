//! The JSON reports of a migration, the scripting contract shared by every
//! front end (`migrate-cli`, `mini-vmm`, a VMM's own API): one object per
//! end, with the same field names and units wherever it is written. The
//! fields are listed in the README's table of report fields; `schema_version`
//! changes when one is renamed or removed.

use serde_json::{Value, json};

use crate::destination::{DestinationReport, IncomingEvent};
use crate::mirror::{ProtectEvent, StandbyEvent};
use crate::serialize::{DestinationJson, SourceReport};
use crate::stats::{MigrationEvent, MigrationStats};

/// `value` as JSON, or an object that says why it could not be (a map
/// with a non-string key; none of these types has one).
fn to_json<T: serde::Serialize>(role: &str, value: T) -> Value {
    serde_json::to_value(value)
        .unwrap_or_else(|e| json!({ "role": role, "error": format!("report: {e}") }))
}

/// The source's JSON report (the scripting contract): the statistics as
/// they serialize (their names are the report's), its role, and why the
/// pages went over TCP or the migration failed, if they did.
pub fn source_json(
    stats: &MigrationStats,
    fallback_reason: Option<&str>,
    error: Option<&str>,
) -> Value {
    to_json(
        "source",
        SourceReport {
            fallback_reason,
            error,
            ..SourceReport::of(stats)
        },
    )
}

/// The destination's JSON report: the engine's report as it serializes
/// (once a migration began; before that only whether this end failed),
/// its role, the built-in guest's own check and the error, if any.
pub fn destination_json(
    report: Option<&DestinationReport>,
    guest_check: Option<&Result<String, String>>,
    error: Option<&str>,
) -> Value {
    let mut v = DestinationJson::of(report, error);
    if let Some(c) = guest_check {
        let (Ok(m) | Err(m)) = c;
        v.guest_check = Some(m);
        v.guest_consistent = Some(c.is_ok());
    }
    to_json("destination", v)
}

/// An event of an event stream, with the time it is written (seconds since
/// the Unix epoch).
#[derive(serde::Serialize)]
struct Stamped<'a, E> {
    #[serde(flatten)]
    event: &'a E,
    time: f64,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A source's event as one JSON object of an event stream (`--events`,
/// the control socket's `watch`): `event` (its [name](MigrationEvent::name)),
/// `time`, its own fields, and the figures as of the event under `stats`,
/// as the source's report writes them.
pub fn event_json(event: &MigrationEvent) -> Value {
    to_json("source", Stamped { event, time: now() })
}

/// A destination's event as one JSON object (`round-received`, `progress`,
/// `connection-lost`, `resumed`, `postcopy`, `committed`, `failed`,
/// `cancelled`), its figures under `stats` as the destination's report
/// writes them.
pub fn incoming_event_json(event: &IncomingEvent) -> Value {
    to_json("destination", Stamped { event, time: now() })
}

/// A protecting primary's event as one JSON object (`protected`,
/// `progress`, `epoch-refused`, `standby-lost`, `released`, `degraded`,
/// `fenced`, `failed`), with `time`; its figures under `stats` as the
/// primary's report writes them.
pub fn protect_event_json(event: &ProtectEvent) -> Value {
    to_json("primary", Stamped { event, time: now() })
}

/// A standby's event as one JSON object (`protected`, `progress`,
/// `epoch-refused`, `primary-lost`, `took-over`, `released`, `fenced`,
/// `failed`), with `time`.
pub fn standby_event_json(event: &StandbyEvent) -> Value {
    to_json("standby", Stamped { event, time: now() })
}

/// What a front end adds to the engine's figures in its report, typed:
/// each field is written only when set ([`with_extras`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Extras {
    /// How the peers authenticated: `mutual-tls`, `psk` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<&'static str>,
    /// Before the migration's `setup_ms`, not in it: the connection, its
    /// TLS handshake and binding the memory (RDMA: the source's
    /// registration), ms (source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<f64>,
    /// What the process spent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// One hash of every page after the commit (16 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_digest: Option<String>,
    /// A VMM's own digest of the guest memory at the switch-over
    /// (mini-vmm: 32 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What a migration cost the process (`resources` in a report); each
/// figure is written only when the front end measured it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Resources {
    /// The engine's CPU time over the migration (a built-in guest's
    /// threads excluded), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<f64>,
    /// A built-in guest's CPU time, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cpu_ms: Option<f64>,
    /// The whole process's CPU time, a running guest's included, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_cpu_ms: Option<f64>,
    /// Peak resident memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory before the guest existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_rss_bytes: Option<u64>,
    /// Resident guest pages at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_resident_bytes: Option<u64>,
    /// Peak RSS beyond the baseline and the resident guest pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_bytes: Option<u64>,
}

/// `report` (an object from [`source_json`] or [`destination_json`]) with
/// the front end's `extras` added.
pub fn with_extras(mut report: Value, extras: &Extras) -> Value {
    if let (Some(obj), Ok(Value::Object(more))) =
        (report.as_object_mut(), serde_json::to_value(extras))
    {
        obj.extend(more);
    }
    report
}
