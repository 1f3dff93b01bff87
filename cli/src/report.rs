//! What the operator sees: a progress bar, a summary, and the JSON report.

use std::io::IsTerminal;
use std::path::Path;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use migrate_core::{DestinationReport, MigrationEvent, MigrationHandle, MigrationStats};
use serde_json::{Value, json};

use crate::args::ProgressChoice;

/// Draw a progress bar from the migration's events until it ends.
pub fn progress(handle: &MigrationHandle, choice: ProgressChoice) -> Option<JoinHandle<()>> {
    let show = match choice {
        ProgressChoice::Always => true,
        ProgressChoice::Never => false,
        ProgressChoice::Auto => std::io::stderr().is_terminal(),
    };
    if !show {
        return None;
    }
    let events = handle.subscribe();
    Some(std::thread::spawn(move || {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:>9} [{bar:28}] {bytes:>10}/{total_bytes:<10} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix("setup");
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        let mut base = 0u64;
        let mut last = MigrationStats::default();
        for event in events {
            match event {
                MigrationEvent::RoundStarted {
                    round,
                    pages,
                    paused,
                } => {
                    base = last.bytes_transferred;
                    bar.set_prefix(if paused {
                        format!("last {round}")
                    } else {
                        format!("round {round}")
                    });
                    bar.set_length(pages * 4096);
                    bar.set_position(0);
                }
                MigrationEvent::Progress(s) | MigrationEvent::RoundDone(s) => {
                    bar.set_position(s.bytes_transferred.saturating_sub(base));
                    bar.set_message(format!(
                        "remaining {} · dirty {:.0} pages/s · {:.0} Mbit/s",
                        human(s.bytes_remaining),
                        s.dirty_rate_pps,
                        s.throughput_mbps
                    ));
                    last = s;
                }
                MigrationEvent::Throttled { percent } => {
                    bar.println(format!("auto-converge: guest throttled to {percent} %"));
                }
                MigrationEvent::SwitchOver {
                    remaining_bytes,
                    reason,
                } => {
                    bar.println(format!(
                        "switch-over ({reason}): guest paused with {} left",
                        human(remaining_bytes)
                    ));
                }
                MigrationEvent::ConnectionLost { error } => {
                    bar.println(format!(
                        "connection lost ({error}); reconnecting, the guest runs on"
                    ));
                }
                MigrationEvent::Resumed(_) => {
                    bar.println("resumed over a new connection");
                }
                MigrationEvent::PreSwitchover(_) => {
                    bar.println(
                        "pre-switchover: guest paused, memory sent; waiting for `continue`",
                    );
                }
                MigrationEvent::ParameterChanged { name, value } => {
                    bar.println(format!("{name} set to {value}"));
                }
                e if e.is_final() => {
                    bar.finish_and_clear();
                    return;
                }
                _ => {}
            }
        }
        bar.finish_and_clear();
    }))
}

/// Bytes as B/KiB/MiB/GiB.
pub fn human(b: u64) -> String {
    let b = b as f64;
    match b {
        _ if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        _ if b >= (1u64 << 20) as f64 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        _ if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        _ => format!("{b} B"),
    }
}

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
        "zero_pages": stats.zero_pages,
        "resent_pages": stats.resent_pages,
        "dirty_rate_pps": stats.dirty_rate_pps,
        "throttle_percent": stats.throttle_percent,
        "tracker": stats.tracker,
        "reconnects": stats.reconnects,
    });
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
    let mut v = json!({
        "role": "destination",
        "status": if error.is_none() { "completed" } else { "failed" },
    });
    v["schema_version"] = json!(migrate_core::STATS_SCHEMA_VERSION);
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

/// Write a JSON report.
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// The human summary of a source run.
pub fn source_summary(s: &MigrationStats) -> String {
    format!(
        "migrated {} over {} in {:.0} ms: downtime {:.1} ms, setup {:.1} ms, {} rounds, \
         {} sent ({} pages, {} zero pages), {:.0} Mbit/s, tracker {}{}",
        human(s.bytes_total),
        s.transport,
        s.total_ms,
        s.downtime_ms,
        s.setup_ms,
        s.rounds,
        human(s.bytes_transferred),
        s.normal_pages,
        s.zero_pages,
        s.avg_throughput_mbps,
        s.tracker,
        if s.verified {
            ", verified: every page equal"
        } else {
            ""
        }
    )
}

/// An error and its causes as one line, each cause once: errors that
/// already print their source are not followed by it again (what `{:#}`
/// does).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(io).context("cannot connect: refused");
        assert_eq!(super::error_text(&e), "cannot connect: refused");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(io).context("cannot connect");
        assert_eq!(super::error_text(&e), "cannot connect: refused");
    }
}
