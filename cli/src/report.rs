//! What the operator sees: a progress bar, a summary, and the JSON report.

use std::io::IsTerminal;
use std::path::Path;
use std::thread::JoinHandle;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use migrate_core::{MigrationEvent, MigrationHandle, MigrationStats};
use serde_json::Value;

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
                        human(s.precopy.bytes_remaining),
                        s.precopy.dirty_rate_pps,
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

pub use migrate_core::report::{
    destination_json, event_json, incoming_event_json, protect_event_json, source_json,
    standby_event_json,
};

/// Write a JSON report (through `migrate_frontend::output`'s rules).
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    Ok(migrate_frontend::output::write_json(path, v)?)
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
        s.precopy.rounds,
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
