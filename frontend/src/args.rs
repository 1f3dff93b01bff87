//! Options both front ends take, and what they become: the transport's
//! and the engine's configuration.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use migrate_core::{PostcopyMode, SourceConfig, TimeoutPolicy};

/// Transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportChoice {
    /// TCP.
    Tcp,
    /// One-sided RDMA WRITE.
    Rdma,
    /// RDMA when a device and the peer have it, else TCP (with the reason).
    Auto,
}

/// Transport knobs shared by both ends.
#[derive(Debug, Clone, Args)]
pub struct TransportArgs {
    /// Transport.
    #[arg(long, value_enum, default_value_t = TransportChoice::Tcp)]
    pub transport: TransportChoice,
    /// TCP data connections (RDMA: queue pairs).
    #[arg(long, default_value_t = transport_tcp::DEFAULT_DATA_STREAMS)]
    pub streams: u16,
    /// Send (accept) every data page whole over TCP, also those with a few
    /// non-zero words, which by default travel as those words.
    #[arg(long)]
    pub no_sparse: bool,
    /// Seconds the peer may send nothing at all (both ends send heartbeats
    /// every second) before it counts as dead; rounds may last longer.
    #[arg(long, default_value_t = 30)]
    pub io_timeout_s: u64,
    /// The I/O timeout in finer steps than `--io-timeout-s`, when a
    /// command sets it from its own option (`--failover-after-ms`).
    #[arg(skip)]
    pub io_timeout: Option<std::time::Duration>,
    /// When the connection is lost before the switch-over, reconnect (the
    /// source) or wait for the source to (the destination) for this many
    /// seconds and go on where it stopped; 0: fail at once.
    #[arg(long, default_value_t = 60)]
    pub reconnect_s: u64,
    /// Mutual TLS 1.3 on every connection with the certificates in this
    /// directory, under QEMU's file names: `ca-cert.pem`, plus
    /// `client-cert.pem` and `client-key.pem` on the source,
    /// `server-cert.pem` and `server-key.pem` on the destination
    /// (`migrate-cli tls-gen` writes a test set).
    #[arg(long, conflicts_with = "psk_file")]
    pub tls_dir: Option<PathBuf>,
    /// Authenticate both ends with the pre-shared key in this file instead
    /// of certificates: base64 or hex of at least 32 random bytes, in a file
    /// only its owner can read (e.g. `(umask 077; head -c 32 /dev/urandom |
    /// base64 > key)`); the connections are TLS 1.3.
    #[arg(long)]
    pub psk_file: Option<PathBuf>,
    /// Run without authentication or encryption on a non-loopback address:
    /// anyone who reaches the port can write the guest's memory (as
    /// source) or read it (as destination). Isolated test networks only.
    #[arg(long, conflicts_with_all = ["tls_dir", "psk_file"])]
    pub insecure: bool,
    /// Who seals and opens the TLS records: the kernel where it can (its
    /// `tls` module, kTLS), else this program (`auto`); the kernel or
    /// fail (`on`); always this program (`off`). The records are the same
    /// either way, so each end chooses alone.
    #[arg(long, value_enum, default_value_t = KernelTlsArg::Auto)]
    pub kernel_tls: KernelTlsArg,
    /// RDMA device (default: the first one).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// RDMA GID index (default: the IPv4-mapped GID of the control
    /// connection's local address).
    #[arg(long)]
    pub gid_index: Option<u32>,
    /// Mark every packet of this end's TCP connections (control, data,
    /// resumed, post-copy) with this DSCP, 0–63, from the first handshake
    /// packet on, so the fabric can class, shape and count the migration;
    /// over RDMA the queue pairs take it too (traffic class DSCP × 4)
    /// unless `--traffic-class` says otherwise.
    #[arg(long, value_name = "0-63", allow_hyphen_values = true, value_parser = clap::value_parser!(u8).range(0..=63))]
    pub dscp: Option<u8>,
    /// RDMA: the traffic class (0–255) of every queue pair's global route
    /// header, which RoCE v2 carries as the IP header's TOS byte (DSCP in
    /// its six high bits: 104 is DSCP 26). Default: `--dscp` × 4, else 0.
    #[arg(long, value_name = "0-255", allow_hyphen_values = true)]
    pub traffic_class: Option<u8>,
    /// RDMA: the service level (0–15) of every queue pair (on RoCE the NIC
    /// maps it to a VLAN priority where it is set up to). Default 0.
    #[arg(long, value_name = "0-15", allow_hyphen_values = true, value_parser = clap::value_parser!(u8).range(0..=15))]
    pub service_level: Option<u8>,
}

/// `--kernel-tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelTlsArg {
    /// The kernel where it can, else this program.
    Auto,
    /// The kernel, or the connection fails.
    On,
    /// This program.
    Off,
}

impl TransportArgs {
    /// How RDMA queue pairs mark their packets: `--traffic-class`, else
    /// `--dscp` in the traffic class's DSCP bits; `--service-level`.
    pub fn marking(&self) -> transport_rdma::verbs::Marking {
        transport_rdma::verbs::Marking {
            traffic_class: self
                .traffic_class
                .or(self.dscp.map(|d| d << 2))
                .unwrap_or(0),
            service_level: self.service_level.unwrap_or(0),
        }
    }

    /// The grace period for a lost connection, if any.
    pub fn reconnect(&self) -> Option<Duration> {
        (self.reconnect_s > 0).then(|| Duration::from_secs(self.reconnect_s))
    }

    /// How the peers authenticate, for reports: `mutual-tls`, `psk` or
    /// `none`.
    pub fn authentication(&self) -> &'static str {
        if self.tls_dir.is_some() {
            "mutual-tls"
        } else if self.psk_file.is_some() {
            "psk"
        } else {
            "none"
        }
    }
}

/// The operator's knobs.
#[derive(Debug, Clone, Args)]
pub struct MigrationArgs {
    /// Largest acceptable downtime, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Bandwidth cap, MB/s (0 = none).
    #[arg(long, default_value_t = 0)]
    pub bandwidth_mbs: u64,
    /// Switch over after this many rounds even if not converged.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Overall time limit, seconds (0 = none).
    #[arg(long, default_value_t = 0)]
    pub timeout_s: u64,
    /// What the time limit does.
    #[arg(long, value_enum, default_value_t = TimeoutChoice::Cancel)]
    pub timeout_policy: TimeoutChoice,
    /// Do not throttle a guest that dirties faster than the link drains.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// `auto`: when pre-copy does not converge (rounds stop shrinking, max
    /// rounds, a forcing timeout, `ctl switchover`), resume the guest on the
    /// destination at once and let it fetch its missing pages (post-copy;
    /// the destination's memory must be anonymous, memfd, tmpfs or
    /// hugetlbfs). If the link breaks then, neither side holds the whole
    /// guest: exit status 4.
    #[arg(long, value_enum, default_value_t = PostcopyChoice::Never)]
    pub postcopy: PostcopyChoice,
    /// Switch to post-copy after this many rounds at the latest, even if
    /// the rest would fit the downtime budget (implies `--postcopy auto`).
    #[arg(long, value_name = "N")]
    pub postcopy_after_rounds: Option<u32>,
    /// Before commit, compare a hash of every page on both sides; any
    /// difference fails the migration (and the source guest resumes).
    #[arg(long)]
    pub verify: bool,
    /// After a completed migration, hash every page of the paused guest
    /// memory into the report (`--json`; compare it with the destination's
    /// `dest --digest`: the bytes checked without the downtime `--verify`
    /// adds).
    #[arg(long)]
    pub digest: bool,
    /// Offer zstd compression of page batches (for slow links).
    #[arg(long)]
    pub compress: bool,
}

/// Post-copy policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PostcopyChoice {
    /// Pre-copy only.
    Never,
    /// Post-copy when pre-copy does not converge.
    Auto,
}

/// Timeout policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeoutChoice {
    /// Abort; the guest keeps running here.
    Cancel,
    /// Pause and switch over whatever the downtime.
    Force,
}

impl MigrationArgs {
    /// The engine's configuration: these knobs, and the grace period for a
    /// lost connection from `t`.
    pub fn source_config(&self, t: &TransportArgs) -> SourceConfig {
        let postcopy =
            self.postcopy == PostcopyChoice::Auto || self.postcopy_after_rounds.is_some();
        SourceConfig {
            downtime_limit: Duration::from_millis(self.downtime_ms.max(1)),
            bandwidth_limit: (self.bandwidth_mbs > 0).then_some(self.bandwidth_mbs * 1_000_000),
            max_rounds: self.max_rounds.max(1),
            timeout: (self.timeout_s > 0).then(|| {
                (
                    Duration::from_secs(self.timeout_s),
                    match self.timeout_policy {
                        TimeoutChoice::Cancel => TimeoutPolicy::Cancel,
                        TimeoutChoice::Force => TimeoutPolicy::ForceSwitchover,
                    },
                )
            }),
            auto_converge: !self.no_auto_converge,
            verify: self.verify,
            postcopy: if postcopy {
                PostcopyMode::Auto
            } else {
                PostcopyMode::Never
            },
            postcopy_after_rounds: self.postcopy_after_rounds,
            reconnect: t.reconnect(),
            ..SourceConfig::default()
        }
    }

    /// Whether post-copy may happen (the source then registers its memory
    /// for the destination's RDMA reads).
    pub fn postcopy(&self) -> bool {
        self.postcopy == PostcopyChoice::Auto || self.postcopy_after_rounds.is_some()
    }
}

/// `4096`, `64K`, `256M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn post_copy_after_rounds_implies_post_copy() {
        #[derive(clap::Parser)]
        struct Both {
            #[command(flatten)]
            t: TransportArgs,
            #[command(flatten)]
            m: MigrationArgs,
        }
        let parse = |args: &[&str]| {
            let b = <Both as clap::Parser>::try_parse_from(
                std::iter::once("x").chain(args.iter().copied()),
            )
            .unwrap();
            (b.m.source_config(&b.t), b.m.postcopy())
        };
        let (c, p) = parse(&[]);
        assert_eq!((c.postcopy, p), (PostcopyMode::Never, false));
        let (c, p) = parse(&["--postcopy-after-rounds", "2"]);
        assert_eq!(
            (c.postcopy, c.postcopy_after_rounds, p),
            (PostcopyMode::Auto, Some(2), true)
        );
        let (c, _) = parse(&[
            "--postcopy",
            "auto",
            "--reconnect-s",
            "0",
            "--downtime-ms",
            "0",
        ]);
        assert_eq!(c.postcopy, PostcopyMode::Auto);
        assert_eq!(c.reconnect, None);
        assert_eq!(c.downtime_limit, Duration::from_millis(1));
    }
}

/// Who decides which end runs a guest once its primary and standby lost
/// each other.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct WitnessChoice {
    /// The witness (`migrate-cli witness`) on a third host, host:port;
    /// asked with the same credentials as the peer.
    #[arg(long)]
    pub witness: Option<String>,
    /// No witness: each end, losing the other, runs the guest. If the link
    /// between them is cut while both live, both run it (split brain).
    #[arg(long)]
    pub no_witness: bool,
}
