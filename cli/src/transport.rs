//! Picking the transport: TCP, RDMA, or RDMA-else-TCP with the reason.

use std::path::Path;

use anyhow::{Result, bail};
use migrate_core::transport::SourceTransport;
use transport_tcp::{TcpConfig, TcpSource};

use crate::args::{TransportArgs, TransportChoice};

/// Why RDMA cannot be used from this host, if it cannot.
pub fn rdma_unavailable() -> Option<String> {
    let dir = Path::new("/sys/class/infiniband");
    let devices: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if devices.is_empty() {
        return Some(format!(
            "no RDMA device ({} is empty or missing)",
            dir.display()
        ));
    }
    Some(format!(
        "RDMA devices present ({}), but this build has no RDMA transport yet",
        devices.join(", ")
    ))
}

/// Connect to `addr` with the chosen transport; returns it and, for `auto`
/// falling back to TCP, the reason.
pub fn connect(
    addr: &str,
    t: &TransportArgs,
    compress: bool,
) -> Result<(Box<dyn SourceTransport>, Option<String>)> {
    let fallback = match t.transport {
        TransportChoice::Tcp => None,
        TransportChoice::Rdma => match rdma_unavailable() {
            Some(reason) => bail!("--transport rdma: {reason}; use --transport tcp or auto"),
            None => unreachable!("rdma_unavailable always has a reason in this build"),
        },
        TransportChoice::Auto => {
            let reason = rdma_unavailable().expect("always a reason in this build");
            tracing::warn!(%reason, "falling back to TCP");
            Some(reason)
        }
    };
    let cfg = tcp_config(t, compress);
    Ok((Box::new(TcpSource::connect(addr, cfg)?), fallback))
}

/// TCP settings from the arguments.
pub fn tcp_config(t: &TransportArgs, compress: bool) -> TcpConfig {
    TcpConfig {
        data_streams: t.streams.max(1),
        compress,
        io_timeout: std::time::Duration::from_secs(t.io_timeout_s.max(1)),
        ..TcpConfig::default()
    }
}
