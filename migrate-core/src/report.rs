//! The JSON reports of a migration, the scripting contract shared by every
//! front end (`migrate-cli`, `mini-vmm`, a VMM's own API): one object per
//! end, with the same field names and units wherever it is written. The
//! fields are listed in the README's table of report fields; `schema_version`
//! changes when one is renamed or removed.

use serde_json::{Value, json};

use crate::destination::DestinationReport;
use crate::stats::MigrationStats;

/// The source's JSON report (the scripting contract).
pub fn source_json(
    stats: &MigrationStats,
    fallback_reason: Option<&str>,
    error: Option<&str>,
) -> Value {
    let mut v = json!({
        "role": "source",
        "schema_version": stats.schema_version,
        // A string: JSON numbers lose precision past 2^53.
        "migration_id": format!("{:016x}", stats.migration_id),
        "started_at_unix_ms": stats.started_at_unix_ms,
        "transport": stats.transport,
        "verified": stats.verified,
        "status": stats.status.name(),
        "total_ms": stats.total_ms,
        "downtime_ms": stats.downtime_ms,
        "expected_downtime_ms": stats.expected_downtime_ms,
        "setup_ms": stats.setup_ms,
        "bytes_total": stats.bytes_total,
        "bytes_transferred": stats.bytes_transferred,
        "stream_bytes": stats.stream_bytes,
        "bytes_remaining": stats.bytes_remaining,
        "bytes_before_pause": stats.bytes_before_pause,
        "bytes_during_pause": stats.bytes_during_pause,
        "page_size": stats.page_size,
        "pages_per_sec": stats.pages_per_sec,
        "throughput_mbps": stats.avg_throughput_mbps,
        "last_round_throughput_mbps": stats.throughput_mbps,
        "first_pass_mbps": stats.first_pass_mbps,
        "verify_ms": stats.verify_ms,
        "rounds": stats.rounds,
        "normal_pages": stats.normal_pages,
        "sparse_pages": stats.sparse_pages,
        "zero_pages": stats.zero_pages,
        "resent_pages": stats.resent_pages,
        "dirty_rate_pps": stats.dirty_rate_pps,
        "throttle_percent": stats.throttle_percent,
        "tracker": stats.tracker,
        "reconnects": stats.reconnects,
    });
    if stats.postcopy {
        postcopy_json(
            &mut v,
            stats.postcopy_ms,
            stats.postcopy_demand_pages,
            stats.postcopy_pushed_pages,
            stats.fault_latency_us,
        );
    }
    if let Some(r) = fallback_reason {
        v["fallback_reason"] = json!(r);
    }
    if let Some(e) = error {
        v["error"] = json!(e);
    }
    v
}

/// The destination's JSON report.
pub fn destination_json(
    report: Option<&DestinationReport>,
    guest_check: Option<&Result<String, String>>,
    error: Option<&str>,
) -> Value {
    // The engine's status when a migration began; before that, only
    // whether this end failed.
    let status = report.map_or(
        if error.is_none() {
            "completed"
        } else {
            "failed"
        },
        |r| r.status.name(),
    );
    let mut v = json!({
        "role": "destination",
        "status": status,
    });
    v["schema_version"] = json!(crate::STATS_SCHEMA_VERSION);
    if let Some(r) = report {
        v["migration_id"] = json!(format!("{:016x}", r.migration_id));
        v["transport"] = json!(r.transport);
        v["rounds"] = json!(r.rounds);
        v["bytes_received"] = json!(r.received.wire_bytes);
        v["stream_bytes"] = json!(r.received.stream_bytes);
        v["normal_pages"] = json!(r.received.normal_pages);
        v["zero_pages"] = json!(r.received.zero_pages);
        v["suspect_pages"] = json!(r.suspect_pages);
        v["verify_requested"] = json!(r.verify_requested);
        v["device_state_bytes"] = json!(r.device_state_bytes);
        v["total_ms"] = json!(r.total_ms);
        v["commit_ack_sent"] = json!(r.commit_ack_sent);
        if r.postcopy {
            postcopy_json(
                &mut v,
                r.postcopy_ms,
                r.postcopy_demand_pages,
                r.postcopy_pushed_pages,
                r.fault_latency_us,
            );
            v["postcopy_read_pages"] = json!(r.postcopy_read_pages);
        }
    }
    match guest_check {
        Some(Ok(m)) => {
            v["guest_check"] = json!(m);
            v["guest_consistent"] = json!(true);
        }
        Some(Err(m)) => {
            v["guest_check"] = json!(m);
            v["guest_consistent"] = json!(false);
        }
        None => {}
    }
    if let Some(e) = error {
        v["error"] = json!(e);
    }
    v
}

/// The post-copy fields, the same on both sides.
fn postcopy_json(v: &mut Value, ms: f64, demand: u64, pushed: u64, l: crate::FaultLatency) {
    v["postcopy"] = json!(true);
    v["postcopy_ms"] = json!(ms);
    v["postcopy_demand_pages"] = json!(demand);
    v["postcopy_pushed_pages"] = json!(pushed);
    v["fault_latency_us"] = json!({
        "faults": l.faults,
        "p50": l.p50,
        "p99": l.p99,
        "max": l.max,
    });
}

/// What a front end adds to the engine's figures in its report, typed:
/// each field is written only when set ([`with_extras`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct Extras {
    /// How the peers authenticated: `mutual-tls`, `psk` or `none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<&'static str>,
    /// The connection and its handshake, ms (source).
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
