//! What to measure where: sites (a network path and its transports) and the
//! matrix of guests run over each.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// A network path between the two `migrate-cli` processes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Site {
    /// `host-loopback`, `host-veth`, `vm-loopback`.
    pub name: String,
    /// Network namespace of the source (none: the current one).
    pub src_ns: Option<String>,
    /// Network namespace of the destination.
    pub dst_ns: Option<String>,
    /// Address the destination listens on.
    pub dst_ip: String,
    /// Transports to measure.
    pub transports: Vec<String>,
    /// RDMA device for the perftest ceilings (and its GID index).
    pub rdma_device: Option<(String, u32)>,
    /// Guest sizes, MiB.
    pub sizes_mib: Vec<u64>,
    /// Larger sizes measured idle with random pages only: a first pass long
    /// enough to compare with the ceilings' multi-second runs, where the
    /// whole matrix at that size would take too long.
    #[serde(default)]
    pub bulk_sizes_mib: Vec<u64>,
    /// Dirty rates of the `moderate` and `high` workloads, pages/s.
    pub moderate_pps: u64,
    /// See `moderate_pps`.
    pub high_pps: u64,
}

/// Data connections / queue pairs of every run (the CLI's default).
pub const STREAMS: u32 = 2;
/// The downtime budget of every run, ms (the CLI's default).
pub const DOWNTIME_MS: u64 = 300;

impl Site {
    pub fn named(name: &str) -> Result<Self> {
        let host = |name: &str, ns: bool, ip: &str| Site {
            name: name.into(),
            src_ns: ns.then(|| "mig-src".into()),
            dst_ns: ns.then(|| "mig-dst".into()),
            dst_ip: ip.into(),
            // `tcp-tls`: the same TCP with mutual TLS 1.3 (idle cells only;
            // this host's kernel has no TLS, so records sealed in userspace).
            transports: vec!["tcp".into(), "tcp-tls".into()],
            rdma_device: None,
            sizes_mib: vec![64, 256, 1024],
            bulk_sizes_mib: Vec::new(),
            // 50 MB/s, hot spot; 1 GB/s uniform: more than two cores
            // running the migration too can sustain, measured per run.
            moderate_pps: 12_800,
            high_pps: 262_144,
        };
        Ok(match name {
            "host-loopback" => host(name, false, "127.0.0.1"),
            "host-veth" => host(name, true, "10.198.0.2"),
            // The emulated VM: rxe moves ~100 MB/s, so `high` (160 MB/s)
            // out-dirties it and needs auto-converge.
            "vm-loopback" => Site {
                name: name.into(),
                src_ns: None,
                dst_ns: None,
                dst_ip: "127.0.0.1".into(),
                // TLS both ways: records sealed by this program
                // (`tcp-tls`) and by the VM kernel's TLS (`tcp-ktls`).
                transports: vec![
                    "rdma".into(),
                    "tcp".into(),
                    "tcp-tls".into(),
                    "tcp-ktls".into(),
                ],
                rdma_device: Some(("rxe0".into(), 1)),
                sizes_mib: vec![32, 64],
                // 64 MiB is a 0.3 s first pass in the VM; 256 MiB about 1.5 s.
                bulk_sizes_mib: vec![256],
                moderate_pps: 2_000,
                high_pps: 40_000,
            },
            other => bail!("unknown site {other:?} (host-loopback, host-veth, vm-loopback)"),
        })
    }
}

/// Whether `transport` is TCP with TLS: `tcp-tls` (records sealed by
/// migrate-cli, `--kernel-tls off`) or `tcp-ktls` (by the kernel,
/// `--kernel-tls on`).
pub fn is_tls(transport: &str) -> bool {
    matches!(transport, "tcp-tls" | "tcp-ktls")
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Case {
    pub site: String,
    pub transport: String,
    pub size_mib: u64,
    /// `random` (incompressible, no zero pages) or `realistic` (40 % zero,
    /// 30 % text, 30 % random).
    pub mix: String,
    /// `idle`, `moderate`, `high`.
    pub load: String,
    /// Whether the destination preallocated its memory (`--prefault`).
    pub prefault: bool,
}

impl Case {
    /// The source's guest arguments.
    pub fn guest_args(&self, site: &Site) -> Vec<String> {
        let mix = match self.mix.as_str() {
            "random" => "0:0:1",
            _ => "40:30:30",
        };
        let mut a: Vec<String> = vec!["--mix".into(), mix.into()];
        match self.load.as_str() {
            "idle" => a.extend(["--guest".into(), "idle".into()]),
            "moderate" => a.extend([
                "--guest".into(),
                "dirty".into(),
                "--dirty-rate".into(),
                site.moderate_pps.to_string(),
                "--pattern".into(),
                "hot:0.1:0.9".into(),
            ]),
            _ => a.extend([
                "--guest".into(),
                "dirty".into(),
                "--dirty-rate".into(),
                site.high_pps.to_string(),
                "--pattern".into(),
                "uniform".into(),
                "--threads".into(),
                "2".into(),
            ]),
        }
        a
    }

    /// Key for grouping repeats.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}M/{}/{}{}",
            self.site,
            self.transport,
            self.size_mib,
            self.mix,
            self.load,
            if self.prefault { "" } else { "/fresh" }
        )
    }
}

/// The matrix for a site. Every cell uses a preallocated destination
/// (`--prefault`, what RDMA's registration does anyway) so the transports
/// are compared on equal terms; one extra cell per TCP site shows the cost
/// of fresh destination memory.
pub fn matrix(site: &Site, quick: bool) -> Vec<Case> {
    let sizes: Vec<u64> = if quick {
        vec![site.sizes_mib[0]]
    } else {
        site.sizes_mib.clone()
    };
    let mixes: &[&str] = if quick {
        &["random"]
    } else {
        &["random", "realistic"]
    };
    let loads: &[&str] = if quick {
        &["idle", "moderate"]
    } else {
        &["idle", "moderate", "high"]
    };
    let mut cases = Vec::new();
    for t in &site.transports {
        let cell = |size_mib, mix: &str, load: &str, prefault| Case {
            site: site.name.clone(),
            transport: t.clone(),
            size_mib,
            mix: mix.into(),
            load: load.into(),
            prefault,
        };
        if is_tls(t) {
            // The cost of encryption: the bulk cells only, beside tcp's.
            cases.extend(sizes.iter().map(|&size| cell(size, "random", "idle", true)));
            continue;
        }
        for &size in &sizes {
            for mix in mixes {
                for load in loads {
                    cases.push(cell(size, mix, load, true));
                }
            }
        }
        if !quick {
            for &size in &site.bulk_sizes_mib {
                cases.push(cell(size, "random", "idle", true));
            }
        }
        if t == "tcp" && !quick {
            cases.push(cell(*sizes.last().unwrap_or(&64), "random", "idle", false));
        }
    }
    cases
}
