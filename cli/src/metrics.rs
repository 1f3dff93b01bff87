//! `--metrics ADDR`: the live report as Prometheus/OpenMetrics text at
//! `http://ADDR/metrics`, for a fabric's monitoring to see a migration (or
//! a protection) beside the VM and storage traffic it shares the links
//! with.
//!
//! Each scrape reads the same live figures as the control socket's `query`
//! (bytes and pages move as batches land, not only at round ends) and
//! names them `migrate_*`; the README lists them. The RDMA ports' own
//! counters from sysfs come beside ours (`migrate_rdma_port_*`,
//! `migrate_rdma_hw_counter`), so an operator sees the migration's share of
//! the NIC. The exposition is `prometheus-client`'s encoder, the HTTP
//! server `tiny_http`: nothing here parses HTTP or formats the text by hand.
//!
//! The figures carry no guest memory, but they say what runs where; the
//! endpoint has no authentication, so it listens on loopback unless the
//! operator says `--metrics-public`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::control::Steer;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running endpoint; dropping it stops serving.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Where it listens (the port chosen when `:0` was asked for).
    pub addr: SocketAddr,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve `handle`'s figures at `addr` (refused on a non-loopback address
/// unless `public`). Bound before anything is sent: an address in use is a
/// set-up error.
pub fn serve<H: Steer>(addr: &str, public: bool, handle: &H) -> Result<MetricsServer> {
    let sa: SocketAddr = addr.parse().with_context(|| {
        format!("--metrics {addr}: not an address and port (e.g. 127.0.0.1:9464)")
    })?;
    if !sa.ip().is_loopback() && !public {
        bail!(
            "--metrics {addr}: the endpoint has no authentication and would show anyone who reaches it what migrates where: listen on loopback (and scrape through a proxy), or say --metrics-public"
        );
    }
    let server = tiny_http::Server::http(sa)
        .map_err(|e| anyhow::anyhow!("--metrics {addr}: cannot listen: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .context("--metrics: the server has no IP address")?;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = std::sync::Mutex::new(handle.clone());
    let query = Arc::new(move || {
        handle
            .lock()
            .map(|h| h.query())
            .unwrap_or_else(|e| e.into_inner().query())
    });
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match server.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(request)) => answer(request, query.as_ref()),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics endpoint stopped");
                            return;
                        }
                    }
                }
            }
        })
        .context("starting the metrics server")?;
    tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
    Ok(MetricsServer {
        stop,
        thread: Some(thread),
        addr: bound,
    })
}

fn answer(request: tiny_http::Request, query: &(dyn Fn() -> Value + Send + Sync)) {
    use tiny_http::{Header, Method, Response};
    let path = request.url().split('?').next().unwrap_or_default();
    let response = match (request.method(), path) {
        (Method::Get | Method::Head, "/metrics") => match exposition(&query()) {
            Ok(text) => {
                let mut r = Response::from_string(text);
                if let Ok(h) = Header::from_bytes("Content-Type", CONTENT_TYPE) {
                    r.add_header(h);
                }
                r
            }
            Err(e) => {
                Response::from_string(format!("encoding failed: {e}\n")).with_status_code(500)
            }
        },
        (Method::Get | Method::Head, _) => {
            Response::from_string("not found: the figures are at /metrics\n").with_status_code(404)
        }
        _ => Response::from_string("only GET /metrics\n").with_status_code(405),
    };
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "a metrics client went away");
    }
}

/// The OpenMetrics text of one live report (and the RDMA ports'
/// counters).
pub fn exposition(report: &Value) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Figures(samples(report))));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// One value of a family.
#[derive(Debug, Clone)]
struct Sample {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: Vec<(&'static str, String)>,
    value: f64,
}

/// The samples of one scrape, encoded family by family.
#[derive(Debug)]
struct Figures(Vec<Sample>);

impl prometheus_client::collector::Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut names: Vec<&'static str> = Vec::new();
        for s in &self.0 {
            if !names.contains(&s.name) {
                names.push(s.name);
            }
        }
        for name in names {
            let family: Vec<&Sample> = self.0.iter().filter(|s| s.name == name).collect();
            let first = family[0];
            let mut metric = encoder.encode_descriptor(name, first.help, None, first.kind)?;
            for s in family {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                if s.kind == MetricType::Info {
                    // A field this role's report lacks is left out.
                    let known: Vec<(&str, &str)> =
                        labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
                    metric.encode_info(&known)?;
                } else if labels.is_empty() {
                    value(&mut metric, s)?;
                } else {
                    value(&mut metric.encode_family(&labels)?, s)?;
                }
            }
        }
        Ok(())
    }
}

fn value(m: &mut MetricEncoder<'_>, s: &Sample) -> Result<(), std::fmt::Error> {
    if s.kind == MetricType::Counter {
        m.encode_counter::<NoLabelSet, _, f64>(&s.value, None)
    } else {
        m.encode_gauge(&s.value)
    }
}

/// What the report says, as samples. Fields a role does not have are
/// left out; `role` picks sent or received for the byte and page counts.
fn samples(r: &Value) -> Vec<Sample> {
    let mut out = Vec::new();
    let num = |k: &str| r.get(k).and_then(Value::as_f64);
    let text = |k: &str| {
        r.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let role = text("role");
    let mut push = |name, help, kind, labels: Vec<(&'static str, String)>, value: f64| {
        out.push(Sample {
            name,
            help,
            kind,
            labels,
            value,
        })
    };
    let id = r
        .get("migration_id")
        .or_else(|| r.get("session"))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
        .unwrap_or_default();
    push(
        "migrate",
        "What this process is: its role, transport, dirty tracker and migration (or protection session) id.",
        MetricType::Info,
        vec![
            ("role", role.clone()),
            ("transport", text("transport")),
            ("tracker", text("tracker")),
            ("id", id),
            ("authentication", text("authentication")),
        ],
        1.0,
    );
    push(
        "migrate_status",
        "1 for the status this end is in (the report's status).",
        MetricType::Gauge,
        vec![("status", text("status"))],
        1.0,
    );
    let gauge = MetricType::Gauge;
    let counter = MetricType::Counter;
    // (report field, metric, help, kind, scale)
    let plain: [(&str, &'static str, &'static str, MetricType, f64); 21] = [
        (
            "total_ms",
            "migrate_elapsed_seconds",
            "Time since the migration (or protection) began.",
            gauge,
            1e-3,
        ),
        (
            "bytes_transferred",
            "migrate_sent_bytes",
            "Bytes sent on the data path (headers included), growing as batches go out.",
            counter,
            1.0,
        ),
        (
            "bytes_sent",
            "migrate_sent_bytes",
            "Bytes sent on the data path (headers included), growing as batches go out.",
            counter,
            1.0,
        ),
        (
            "bytes_received",
            "migrate_received_bytes",
            "Bytes received on the data path, growing as batches land.",
            counter,
            1.0,
        ),
        (
            "bytes_total",
            "migrate_memory_bytes",
            "Guest memory size.",
            gauge,
            1.0,
        ),
        (
            "bytes_remaining",
            "migrate_remaining_bytes",
            "Dirty bytes left to send at the last count.",
            gauge,
            1.0,
        ),
        (
            "rounds",
            "migrate_rounds",
            "Pre-copy rounds done.",
            counter,
            1.0,
        ),
        (
            "resent_pages",
            "migrate_resent_pages",
            "Pages sent again because the guest dirtied them after they were sent.",
            counter,
            1.0,
        ),
        (
            "dirty_rate_pps",
            "migrate_dirty_rate_pages_per_second",
            "The guest's measured dirty rate.",
            gauge,
            1.0,
        ),
        (
            "expected_downtime_ms",
            "migrate_expected_downtime_seconds",
            "The pause a switch-over now would take, by the last round's rate.",
            gauge,
            1e-3,
        ),
        (
            "downtime_ms",
            "migrate_downtime_seconds",
            "The guest's pause (0 until the switch-over).",
            gauge,
            1e-3,
        ),
        (
            "throttle_percent",
            "migrate_throttle_ratio",
            "How much auto-converge slows the guest (0 to 0.99).",
            gauge,
            1e-2,
        ),
        (
            "reconnects",
            "migrate_reconnects",
            "Connections lost and resumed.",
            counter,
            1.0,
        ),
        (
            "suspect_pages",
            "migrate_suspect_pages",
            "Pages received whose hash did not match (sent again).",
            counter,
            1.0,
        ),
        (
            "device_state_bytes",
            "migrate_device_state_bytes",
            "Device state received.",
            gauge,
            1.0,
        ),
        (
            "postcopy_demand_pages",
            "migrate_postcopy_requests",
            "Post-copy pages the destination's guest faulted on and asked for.",
            counter,
            1.0,
        ),
        (
            "postcopy_pushed_pages",
            "migrate_postcopy_pushed_pages",
            "Post-copy pages pushed without being asked for.",
            counter,
            1.0,
        ),
        (
            "epochs",
            "migrate_protect_epochs",
            "Checkpoints the standby applied (primary).",
            counter,
            1.0,
        ),
        (
            "epochs_applied",
            "migrate_protect_epochs",
            "Checkpoints applied (standby).",
            counter,
            1.0,
        ),
        (
            "epochs_refused",
            "migrate_protect_epochs_refused",
            "Checkpoints refused (corrupt, out of order, incomplete).",
            counter,
            1.0,
        ),
        (
            "released_output_bytes",
            "migrate_protect_released_output_bytes",
            "Guest output released once its checkpoint was mirrored.",
            counter,
            1.0,
        ),
    ];
    for (field, name, help, kind, scale) in plain {
        if let Some(v) = num(field) {
            push(name, help, kind, Vec::new(), v * scale);
        }
    }
    let dir = if role == "destination" || role == "standby" {
        "received"
    } else {
        "sent"
    };
    let (pages_name, stream_name): (&'static str, &'static str) = if dir == "sent" {
        ("migrate_sent_pages", "migrate_stream_sent_bytes")
    } else {
        ("migrate_received_pages", "migrate_stream_received_bytes")
    };
    for kind in ["normal", "sparse", "zero"] {
        if let Some(v) = num(&format!("{kind}_pages")) {
            push(
                pages_name,
                "Pages by how they travelled: whole (normal), as their non-zero words (sparse), as a zero range (zero).",
                counter,
                vec![("kind", kind.to_string())],
                v,
            );
        }
    }
    if let Some(streams) = r.get("stream_bytes").and_then(Value::as_array) {
        for (i, b) in streams.iter().enumerate() {
            push(
                stream_name,
                "Bytes per data stream (TCP connection or RDMA queue pair).",
                counter,
                vec![("stream", i.to_string())],
                b.as_f64().unwrap_or(0.0),
            );
        }
    }
    let quantiles = |field: &str| {
        r.get(field).map(|q| {
            [("0.5", "p50"), ("0.99", "p99"), ("1", "max")]
                .into_iter()
                .filter_map(|(label, k)| q.get(k).and_then(Value::as_f64).map(|v| (label, v)))
                .collect::<Vec<_>>()
        })
    };
    let spreads: [(&str, &'static str, &'static str); 3] = [
        (
            "fault_latency_us",
            "migrate_postcopy_fault_wait_seconds",
            "How long the destination's guest waited on a missing page (quantiles; 1 is the longest).",
        ),
        (
            "epoch_pause_us",
            "migrate_protect_epoch_pause_seconds",
            "The guest's pause per checkpoint (quantiles).",
        ),
        (
            "output_delay_us",
            "migrate_protect_output_delay_seconds",
            "How long guest output waited for its checkpoint (quantiles).",
        ),
    ];
    for (field, name, help) in spreads {
        for (q, v) in quantiles(field).unwrap_or_default() {
            push(
                name,
                help,
                gauge,
                vec![("quantile", q.to_string())],
                v * 1e-6,
            );
        }
    }
    if let Some(f) = r
        .get("fault_latency_us")
        .and_then(|l| l.get("faults"))
        .and_then(Value::as_f64)
    {
        push(
            "migrate_postcopy_faults",
            "Faults on pages of the post-copy set that had not arrived.",
            counter,
            Vec::new(),
            f,
        );
    }
    rdma_ports(&mut out);
    out
}

/// A directory's entries by name (none when it cannot be read).
fn sorted_entries(dir: &Path) -> Vec<std::fs::DirEntry> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    entries
}

/// Every RDMA port's own counters from sysfs: the IB-standard ones
/// (`counters/port_{xmit,rcv}_{data,packets}`, data in 4-byte words,
/// turned into bytes) and the driver's `hw_counters` (rxe's `sent_pkts`,
/// `rcvd_pkts`, retries...).
fn rdma_ports(out: &mut Vec<Sample>) {
    for dev in sorted_entries(Path::new("/sys/class/infiniband")) {
        let name = dev.file_name().to_string_lossy().into_owned();
        for port in sorted_entries(&dev.path().join("ports")) {
            let p = port.file_name().to_string_lossy().into_owned();
            let labels = || vec![("device", name.clone()), ("port", p.clone())];
            let read = |rel: &str| {
                std::fs::read_to_string(port.path().join(rel))
                    .ok()
                    .and_then(|s| s.trim().parse::<f64>().ok())
            };
            let standard: [(&str, &'static str, &'static str, f64); 4] = [
                (
                    "counters/port_xmit_data",
                    "migrate_rdma_port_xmit_bytes",
                    "Bytes the RDMA port sent (all traffic, from sysfs).",
                    4.0,
                ),
                (
                    "counters/port_rcv_data",
                    "migrate_rdma_port_rcv_bytes",
                    "Bytes the RDMA port received (all traffic, from sysfs).",
                    4.0,
                ),
                (
                    "counters/port_xmit_packets",
                    "migrate_rdma_port_xmit_packets",
                    "Packets the RDMA port sent (all traffic, from sysfs).",
                    1.0,
                ),
                (
                    "counters/port_rcv_packets",
                    "migrate_rdma_port_rcv_packets",
                    "Packets the RDMA port received (all traffic, from sysfs).",
                    1.0,
                ),
            ];
            for (rel, metric, help, scale) in standard {
                if let Some(v) = read(rel) {
                    out.push(Sample {
                        name: metric,
                        help,
                        kind: MetricType::Counter,
                        labels: labels(),
                        value: v * scale,
                    });
                }
            }
            for h in sorted_entries(&port.path().join("hw_counters")) {
                let counter = h.file_name().to_string_lossy().into_owned();
                if counter == "lifespan" {
                    continue; // a setting, not a count
                }
                if let Some(v) = read(&format!("hw_counters/{counter}")) {
                    let mut l = labels();
                    l.push(("counter", counter));
                    out.push(Sample {
                        name: "migrate_rdma_hw_counter",
                        help: "The RDMA driver's own per-port counters (hw_counters in sysfs), by name.",
                        kind: MetricType::Gauge,
                        labels: l,
                        value: v,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("valid exposition text")
    }

    #[test]
    fn a_source_report_becomes_named_families() {
        let r = serde_json::json!({
            "role": "source", "status": "active", "transport": "tcp", "tracker": "uffd-async",
            "migration_id": "00ab", "authentication": "psk", "total_ms": 1500.0,
            "bytes_transferred": 123456, "bytes_total": 8388608, "bytes_remaining": 4096,
            "rounds": 2, "normal_pages": 10, "sparse_pages": 2, "zero_pages": 7,
            "stream_bytes": [100, 200], "throttle_percent": 20, "reconnects": 0,
            "fault_latency_us": {"faults": 3, "p50": 40, "p99": 900, "max": 1200}
        });
        let text = exposition(&r).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let s = parse(&text);
        let value = |name: &str, label: Option<(&str, &str)>| {
            s.samples
                .iter()
                .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
                .map(|x| match x.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => f64::NAN,
                })
                .unwrap_or_else(|| panic!("no {name} {label:?} in\n{text}"))
        };
        assert_eq!(value("migrate_sent_bytes_total", None), 123456.0);
        assert_eq!(value("migrate_rounds_total", None), 2.0);
        assert_eq!(
            value("migrate_sent_pages_total", Some(("kind", "zero"))),
            7.0
        );
        assert_eq!(
            value("migrate_stream_sent_bytes_total", Some(("stream", "1"))),
            200.0
        );
        assert_eq!(value("migrate_elapsed_seconds", None), 1.5);
        assert_eq!(value("migrate_throttle_ratio", None), 0.2);
        assert_eq!(value("migrate_status", Some(("status", "active"))), 1.0);
        assert_eq!(
            value(
                "migrate_postcopy_fault_wait_seconds",
                Some(("quantile", "0.99"))
            ),
            0.0009
        );
        assert!(
            text.contains("migrate_info{role=\"source\",transport=\"tcp\""),
            "{text}"
        );
    }

    #[test]
    fn a_destination_counts_what_it_received() {
        let r = serde_json::json!({
            "role": "destination", "status": "active", "bytes_received": 42,
            "normal_pages": 1, "stream_bytes": [42]
        });
        let text = exposition(&r).unwrap();
        assert!(text.contains("migrate_received_bytes_total 42"), "{text}");
        assert!(
            text.contains("migrate_stream_received_bytes_total{stream=\"0\"} 42"),
            "{text}"
        );
        assert!(!text.contains("migrate_sent_bytes"), "{text}");
    }
}
