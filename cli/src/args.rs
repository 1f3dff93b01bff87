//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
pub use migrate_frontend::args::{
    KernelTlsArg, MigrationArgs, TransportArgs, TransportChoice, WitnessChoice, parse_size,
};

/// Live migration of guest memory over RDMA or TCP.
#[derive(Debug, Parser)]
#[command(name = "migrate-cli", version, about)]
pub struct Cli {
    /// Log filter (tracing syntax, e.g. `info`, `migrate_core=debug`);
    /// `MIGRATE_LOG` overrides it.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Migrate this host's guest to a destination.
    Source(SourceArgs),
    /// Receive a guest from a source.
    Dest(DestArgs),
    /// Source and destination on this machine over loopback, with the
    /// built-in guest dirtying its memory: a live migration in one command.
    Demo(DemoArgs),
    /// Protect this host's guest: mirror it to a standby in epochs, its
    /// output released only once the standby holds the epoch that made it.
    Protect(ProtectArgs),
    /// Stand by for a protected guest: apply its epochs, take it over when
    /// the primary is lost and the witness agrees.
    Standby(StandbyArgs),
    /// Decide which end of a protection may run the guest when the two
    /// lost each other: the first to ask, once per protection.
    Witness(WitnessArgs),
    /// Write a test certificate authority and certificates for both ends
    /// into a directory, for `--tls-dir` (copy it to both hosts).
    TlsGen(TlsGenArgs),
    /// Steer a running migration through its control socket (`source
    /// --control PATH`): `query`, `get`, `set downtime_ms=800 bandwidth_mbs=100
    /// max_rounds=50`, `switchover`, `continue`, `cancel`, `watch`.
    Ctl(CtlArgs),
    /// Diagnose this host: kernel, dirty trackers (tried on real memory),
    /// KVM, huge pages, RLIMIT_MEMLOCK against a guest size, RDMA devices,
    /// ports, GIDs and the one a migration would choose; exit 1 when the
    /// asked transport cannot work here, with the fix.
    Check(CheckArgs),
    /// Print shell completions for migrate-cli (e.g. `migrate-cli
    /// completions bash > /etc/bash_completion.d/migrate-cli`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print migrate-cli's man page (roff; e.g. `migrate-cli man >
    /// /usr/local/share/man/man1/migrate-cli.1`), or with --dir write it
    /// and one page per subcommand (migrate-cli-source.1, ...) there.
    Man {
        /// Write every page into this directory (e.g.
        /// /usr/local/share/man/man1).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `migrate-cli check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The transport to judge the host by (`auto`: either).
    #[arg(long, value_enum, default_value_t = TransportChoice::Tcp)]
    pub transport: TransportChoice,
    /// A guest size to check RLIMIT_MEMLOCK against (RDMA pins the guest).
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Also write the findings as one JSON object here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `migrate-cli ctl`.
#[derive(Debug, Clone, Args)]
pub struct CtlArgs {
    /// The control socket.
    pub socket: PathBuf,
    /// `query`, `get`, `set`, `switchover`, `continue`, `cancel` or `watch`.
    pub command: String,
    /// For `set`: KEY=VALUE (`downtime_ms`, `bandwidth_mbs`, `max_rounds`).
    pub params: Vec<String>,
}

/// Steering a running migration from outside.
#[derive(Debug, Clone, Args)]
pub struct SteeringArgs {
    /// Serve a control socket here while migrating: JSON lines, see
    /// `migrate-cli ctl` and the README.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Write every event as JSON Lines here while migrating.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Serve the live figures as Prometheus/OpenMetrics text at
    /// `http://ADDR/metrics` (e.g. `127.0.0.1:9464`; port 0 picks one, said
    /// on stderr): bytes, pages, rounds, dirty rate, status, and the RDMA
    /// ports' own counters. Loopback only unless `--metrics-public`.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Let `--metrics` listen on a non-loopback address: the endpoint has
    /// no authentication (it shows figures, never guest memory).
    #[arg(long, requires = "metrics")]
    pub metrics_public: bool,
}

/// `migrate-cli tls-gen`.
#[derive(Debug, Clone, Args)]
pub struct TlsGenArgs {
    /// Directory to write `ca-cert.pem`, `server-*.pem`, `client-*.pem`
    /// into (created 0700 if missing; keys are 0600; an existing CA is
    /// replaced only with --force).
    #[arg(long)]
    pub dir: PathBuf,
    /// Names (DNS or IP) of the destination, as sources connect to it
    /// (repeat the option).
    #[arg(long = "server-name", required = true)]
    pub server_names: Vec<String>,
    /// Names of the source, for `dest --tls-allow` (repeat the option).
    #[arg(long = "client-name", default_value = "migration-source")]
    pub client_names: Vec<String>,
    /// Replace an existing CA in the directory (every certificate it signed
    /// stops being trusted).
    #[arg(long)]
    pub force: bool,
}

/// Guest memory.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Guest memory size (anonymous memory), e.g. `256M`, `1G`. With
    /// `--memory-file`, the size of the file to create.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Guest memory backed by this file (e.g. under /dev/shm), created with
    /// `--memory` bytes if it does not exist.
    #[arg(long)]
    pub memory_file: Option<PathBuf>,
}

/// Built-in guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// Memory image only; nothing writes it.
    Idle,
    /// Threads dirtying pages at `--dirty-rate` with `--pattern`.
    Dirty,
    /// A ledger of accounts with transfers (checkable after migration).
    Bank,
}

/// The built-in guest of the source.
#[derive(Debug, Clone, Args)]
pub struct GuestArgs {
    /// What runs in the guest memory while it migrates [default: dirty;
    /// idle on an existing --memory-file, which is used as it is].
    #[arg(long, value_enum)]
    pub guest: Option<GuestKind>,
    /// Pages per second the guest dirties (dirty guest) or transfers per
    /// second (bank guest); 0 = as fast as it can.
    #[arg(long, default_value_t = 5000)]
    pub dirty_rate: u64,
    /// Dirtying pattern: `uniform`, `sequential`, or `hot:FRACTION:PROBABILITY`.
    #[arg(long, default_value = "hot:0.1:0.9", value_parser = parse_pattern)]
    pub pattern: migrate_guests::DirtyPattern,
    /// Guest threads (vCPUs).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Page mix of the initial image, `zero:text:random` weights.
    #[arg(long, default_value = "40:30:30", value_parser = parse_mix)]
    pub mix: migrate_guests::PageMix,
    /// Seed of the image and the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Leave new memory as it is (zeros): no fill. An existing
    /// --memory-file is never filled without --fill.
    #[arg(long, conflicts_with = "fill")]
    pub no_fill: bool,
    /// Overwrite an existing --memory-file with the built-in guest's image
    /// (its bytes are lost); new memory is filled without it.
    #[arg(long)]
    pub fill: bool,
}

impl GuestArgs {
    /// The built-in guest for memory that is new or, with `existing_file`,
    /// an existing memory file: that file is the guest's memory, so it is
    /// not filled without `--fill` and runs the idle guest unless another is
    /// named; the bank guest, which formats its ledger, needs `--fill` there.
    ///
    /// # Errors
    /// `--guest bank` on an existing file without `--fill`.
    pub fn for_memory(&self, existing_file: bool) -> anyhow::Result<Self> {
        let mut g = self.clone();
        if existing_file {
            let kind = *g.guest.get_or_insert(GuestKind::Idle);
            if kind == GuestKind::Bank && !g.fill {
                anyhow::bail!(
                    "the bank guest formats its ledger over the memory, and an existing \
                     --memory-file is used as it is: give --fill to overwrite it"
                );
            }
            g.no_fill = !g.fill;
        } else {
            g.guest.get_or_insert(GuestKind::Dirty);
        }
        Ok(g)
    }

    /// The guest that runs (dirty when not resolved by
    /// [`GuestArgs::for_memory`]).
    pub fn kind(&self) -> GuestKind {
        self.guest.unwrap_or(GuestKind::Dirty)
    }
}

/// Dirty trackers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrackerChoice {
    /// The best this kernel offers.
    Best,
    /// userfaultfd async write-protect + PAGEMAP_SCAN.
    UffdAsync,
    /// userfaultfd write-protect with a handler thread.
    UffdSync,
}

/// Progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressChoice {
    /// A bar when stderr is a terminal.
    Auto,
    /// Always a bar.
    Always,
    /// No bar.
    Never,
}

/// `migrate-cli source`.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Destination address, host:port.
    #[arg(long)]
    pub connect: String,
    /// The name the destination's certificate must carry (default: the
    /// host of `--connect`).
    #[arg(long, requires = "tls_dir")]
    pub tls_hostname: Option<String>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Dirty tracker.
    #[arg(long, value_enum, default_value_t = TrackerChoice::Best)]
    pub tracker: TrackerChoice,
    #[command(flatten)]
    pub steering: SteeringArgs,
    /// Once the guest is paused and its memory sent, wait for `ctl PATH
    /// continue` (or `cancel`) before the device state and the commit.
    #[arg(long, requires = "control")]
    pub pause_before_switchover: bool,
    /// Write the final statistics as one JSON object here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Progress bar.
    #[arg(long, value_enum, default_value_t = ProgressChoice::Auto)]
    pub progress: ProgressChoice,
}

/// `migrate-cli dest`.
#[derive(Debug, Clone, Args)]
pub struct DestArgs {
    /// Address to listen on, host:port. Without `--tls-dir` or
    /// `--psk-file`, only a loopback address (or `--insecure`).
    #[arg(long)]
    pub listen: String,
    /// Accept only sources whose certificate names one of these (repeat
    /// the option; like QEMU's `tls-authz`); default: any the CA signed.
    #[arg(long = "tls-allow", value_name = "NAME", requires = "tls_dir")]
    pub tls_allow: Vec<String>,
    /// Guest memory; without it, the layout the source announces is adopted.
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Allocate every guest page before the first one arrives (like QEMU's
    /// -mem-prealloc): the kernel's zeroing of fresh memory moves from the
    /// rounds to the setup, and zero pages take memory too.
    #[arg(long)]
    pub prefault: bool,
    /// Largest guest memory adopted from a source's layout (default: the
    /// memory this machine has available now); a larger layout is refused
    /// before anything is allocated.
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// The control socket (`query`, `cancel`, `watch`) and the event
    /// stream, once a source has begun.
    #[command(flatten)]
    pub steering: SteeringArgs,
    /// Write the destination's report as one JSON object here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// After the commit, hash every page of the guest memory into
    /// `memory_digest` in `--json` (compare with the source's `--digest`).
    #[arg(long)]
    pub digest: bool,
}

/// `migrate-cli protect`.
#[derive(Debug, Clone, Args)]
pub struct ProtectArgs {
    /// The standby, host:port.
    #[arg(long)]
    pub standby: String,
    #[command(flatten)]
    pub witness: WitnessChoice,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Time from one epoch's pause to the next, ms.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// Silence from the standby (heartbeats included) after which it is
    /// lost, ms (overrides --io-timeout-s).
    #[arg(long, default_value_t = 1000)]
    pub failover_after_ms: u64,
    /// Protect for this many seconds, then end protection cleanly (the
    /// standby is released) and stop; default: until SIGINT or SIGTERM,
    /// which end it the same way.
    #[arg(long)]
    pub run_for_s: Option<u64>,
    /// The guest's output, as released (bank guest: one line per
    /// transfer, its sequence number first).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Dirty tracker.
    #[arg(long, value_enum, default_value_t = TrackerChoice::Best)]
    pub tracker: TrackerChoice,
    /// The control socket (`query`, `watch`; `cancel` ends protection as
    /// SIGINT does) and the event stream.
    #[command(flatten)]
    pub steering: SteeringArgs,
    /// Write the report as one JSON object here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `migrate-cli standby`.
#[derive(Debug, Clone, Args)]
pub struct StandbyArgs {
    /// Address to listen on, host:port. Without `--tls-dir` or
    /// `--psk-file`, only a loopback address (or `--insecure`).
    #[arg(long)]
    pub listen: String,
    #[command(flatten)]
    pub witness: WitnessChoice,
    /// Silence from the primary (heartbeats included) after which it is
    /// lost and the standby asks to take over, ms.
    #[arg(long, default_value_t = 1000)]
    pub failover_after_ms: u64,
    /// After a takeover, run the guest for this many seconds (continuing
    /// --output), check it, and exit.
    #[arg(long, default_value_t = 0)]
    pub run_after_failover_s: u64,
    /// The guest's output after a takeover: the last applied epoch's, then
    /// what the guest sends from then on.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// After a takeover, protect the guest to this new standby (host:port;
    /// initial sync, then epochs) for `--run-after-failover-s`, then
    /// release it: the new primary is protected again.
    #[arg(long)]
    pub reprotect_to: Option<String>,
    /// The epoch of that re-protection, ms.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// The image; without it, the layout the primary announces is adopted.
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Largest guest memory adopted from a primary's layout (default: the
    /// memory this machine has available now).
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// The control socket (`query`, `watch`; `cancel` stops standing by)
    /// and the event stream, from the moment it listens.
    #[command(flatten)]
    pub steering: SteeringArgs,
    /// Write the report as one JSON object here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `migrate-cli witness`.
#[derive(Debug, Clone, Args)]
pub struct WitnessArgs {
    /// Address to listen on, host:port. Without `--tls-dir` or
    /// `--psk-file`, only a loopback address (or `--insecure`).
    #[arg(long)]
    pub listen: String,
    #[command(flatten)]
    pub transport: TransportArgs,
}

/// `migrate-cli demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Dirty tracker.
    #[arg(long, value_enum, default_value_t = TrackerChoice::Best)]
    pub tracker: TrackerChoice,
    /// TCP data connections.
    #[arg(long, default_value_t = transport_tcp::DEFAULT_DATA_STREAMS)]
    pub streams: u16,
    /// Write the final statistics as one JSON object here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Progress bar.
    #[arg(long, value_enum, default_value_t = ProgressChoice::Auto)]
    pub progress: ProgressChoice,
}

fn parse_pattern(s: &str) -> Result<migrate_guests::DirtyPattern, String> {
    migrate_guests::DirtyPattern::parse(s)
        .ok_or_else(|| format!("not a pattern: {s:?} (uniform, sequential, hot:0.1:0.9)"))
}

fn parse_mix(s: &str) -> Result<migrate_guests::PageMix, String> {
    migrate_guests::PageMix::parse(s)
        .ok_or_else(|| format!("not a page mix: {s:?} (e.g. 40:30:30)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
