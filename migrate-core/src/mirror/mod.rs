//! Continuous mirroring for fault tolerance: a standby that takes over a
//! running guest and loses nothing anyone outside has seen (Remus-style
//! epochs).
//!
//! A [`Protection`] (the primary) first copies the running guest to the
//! standby (a full pass and a few catch-up rounds, as pre-copy does), then
//! every [`ProtectConfig::epoch`] pauses the guest, copies its dirty pages
//! to a shadow, captures its device state and the output its
//! [`OutputGate`] held, resumes it, and ships that epoch from the shadow
//! while the guest runs on. A [`Standby`] lands each epoch in a staging
//! memory, never in its image, and applies it to its image only once it is
//! whole and checked; then it acknowledges, and only then does the primary
//! release the epoch's output. So whatever the outside saw is in an applied
//! epoch, and a standby that takes over resumes from its last applied epoch
//! and releases that epoch's output itself: output may repeat at the
//! takeover (identically), never skip.
//!
//! # Sequence
//!
//! ```text
//!  primary                                              standby
//!    | control: Hello{features: MIRROR}             ->  |  (a standby offers MIRROR,
//!    |                        <-  Welcome{MIRROR}       |   a destination does not)
//!    | Layout                                       ->  |  compare with its image
//!    |                        <-  LayoutAccepted        |
//!    | data i: Join{session, i}                     ->  |  land in staging
//!    |                                                  |
//!    |  epoch 0 (guest running): every page, from the shadow
//!    | data: Pages{round: 0} ... RoundEnd{0}        ->  |  (staging)
//!    | ZeroPages{0, ranges} (RDMA)                  ->  |
//!    | EpochPages{0, last, ranges} ...              ->  |  the epoch's pages
//!    | EpochEnd{0, checkpoint: false}               ->  |  all RoundEnd(0), no
//!    |                                                  |  suspect page: apply
//!    |                        <-  EpochApplied{0}       |  staging → image
//!    |  epochs 1..k: catch-up rounds, the same          |
//!    |  every epoch after: pause, copy dirty pages to the shadow,
//!    |  save state, seal output, resume; then         |
//!    | Pages ... RoundEnd, EpochPages ...           ->  |
//!    | DeviceState{last, bytes} ...                 ->  |
//!    | EpochOutput{last, bytes} ...                 ->  |
//!    | EpochEnd{n, checkpoint: true}                ->  |  check, apply, keep
//!    |                        <-  EpochApplied{n}       |  state + output of n
//!    |  (release epoch n's output)                      |
//!    |                 or <-  EpochRefused{n, why}      |  stays at n-1; n again
//!    | ProtectEnd                                   ->  |  (clean end)
//!    |                        <-  ProtectEnded          |  released
//! ```
//!
//! Heartbeats run on the control stream all along (both ways): an end that
//! hears nothing for the transport's I/O timeout counts the other as lost.
//!
//! # Standby state machine
//!
//! ```text
//!  Syncing --EpochEnd(checkpoint: false) applied--> Syncing
//!  Syncing / Protected --EpochEnd(checkpoint: true) applied--> Protected(n)
//!  any --EpochEnd incomplete, out of order or with suspect pages-->
//!      same state (EpochRefused; the staging is overwritten by the retry)
//!  any --ProtectEnd--> Released (the image is discarded)
//!  Syncing --primary lost--> Failed (nothing consistent to resume)
//!  Protected(n) --primary lost, witness grants--> TookOver (load n's
//!      state, release n's output, resume)
//!  Protected(n) --primary lost, witness refuses or cannot be asked--> Fenced
//! ```
//!
//! The primary, on losing its standby, asks the witness too: granted, it
//! goes on unprotected (`degraded`, its held output released); refused,
//! it pauses its guest for good (`fenced`, its held output dropped). The
//! witness grants once per session, to the first asker ([`witness`]): a
//! cut link between two live ends leaves exactly one guest running. With
//! [`NoWitness`] both would run: a split brain, the operator's risk.
//!
//! # Costs
//!
//! Both ends keep a second copy of the guest's memory (the primary's
//! shadow, the standby's staging), allocated as pages are written to it:
//! as much memory again as the guest's after the initial sync.

mod events;
mod gate;
mod primary;
mod standby;
pub mod witness;

pub use events::{ProtectEvent, StandbyEvent};
pub use gate::{OutputGate, SealedOutput};
pub use primary::{ProtectConfig, ProtectHandle, Protection};
pub use standby::{Standby, StandbyHandle};
pub use witness::{Claimant, NoWitness, RunRight, WitnessBook};

use crate::protocol::{PageRange, RANGES_PER_FRAME};

/// Where a protection is, or how it ended (primary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub enum ProtectStatus {
    /// Connecting and the initial sync: no checkpoint on the standby yet.
    #[default]
    Syncing,
    /// Epochs are applied on the standby.
    Protected,
    /// Ended cleanly: the standby was released, the guest runs here.
    Released,
    /// The standby was lost and the witness granted the run right: the
    /// guest runs here unprotected.
    Degraded,
    /// The standby was lost and the run right refused (or not to be had):
    /// the guest is paused for good here.
    Fenced,
}

impl ProtectStatus {
    /// Stable lower-case name, as in reports.
    pub fn name(self) -> &'static str {
        match self {
            ProtectStatus::Syncing => "syncing",
            ProtectStatus::Protected => "protected",
            ProtectStatus::Released => "released",
            ProtectStatus::Degraded => "degraded",
            ProtectStatus::Fenced => "fenced",
        }
    }
}

/// Median, 99th percentile and maximum of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Spread {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl Spread {
    /// The spread of `values` (zeros for none).
    pub fn of(values: &[u64]) -> Self {
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |q: f64| {
            if v.is_empty() {
                0
            } else {
                v[((v.len() - 1) as f64 * q).round() as usize]
            }
        };
        Self {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// Counts of values in buckets about 1.5 % wide (exact below 64), so the
/// spread of a protection's every epoch pause or output delay takes the
/// same small memory and time after an hour as after a second.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

/// Buckets per power of two, as a shift.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (64 - SUB_BITS as usize + 1) * SUB],
            n: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn bucket(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros();
        let m = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
        (e - SUB_BITS + 1) as usize * SUB + m
    }

    /// The smallest value of bucket `b`.
    fn low(b: usize) -> u64 {
        if b < SUB {
            return b as u64;
        }
        let e = (b / SUB) as u32 - 1 + SUB_BITS;
        ((SUB + b % SUB) as u64) << (e - SUB_BITS)
    }

    /// Count `v`.
    pub(crate) fn record(&mut self, v: u64) {
        self.counts[Self::bucket(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    /// How many values were counted.
    pub(crate) fn count(&self) -> u64 {
        self.n
    }

    /// Median and 99th percentile (each its bucket's smallest value), and
    /// the exact maximum; zeros for none.
    pub(crate) fn spread(&self) -> Spread {
        let at = |q: f64| {
            let rank = ((self.n.saturating_sub(1)) as f64 * q).round() as u64;
            let mut seen = 0;
            for (b, &c) in self.counts.iter().enumerate() {
                seen += c;
                if seen > rank {
                    return Self::low(b).min(self.max);
                }
            }
            0
        };
        Spread {
            p50: at(0.5),
            p99: at(0.99),
            max: self.max,
        }
    }
}

/// What a primary reports: how its guest was protected and how that ended.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ProtectionReport {
    /// Where it is, or how it ended.
    pub status: ProtectStatus,
    /// The protection session (the witness's key), 16 hex digits.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::stats::hex_id"))]
    pub session: u64,
    /// Transport in use.
    pub transport: String,
    /// The configured epoch, ms.
    pub epoch_ms: f64,
    /// Epochs of the initial sync (the guest running): the first
    /// checkpoint is epoch `sync_rounds`.
    pub sync_rounds: u32,
    /// Checkpoint epochs the standby applied.
    pub epochs: u64,
    /// The last epoch the standby acknowledged.
    pub last_applied_epoch: Option<u32>,
    /// Epochs the standby refused (and got again).
    pub epochs_refused: u64,
    /// How long the guest was stopped per epoch, microseconds.
    pub epoch_pause_us: Spread,
    /// Guest bytes per epoch (its dirty pages).
    pub epoch_bytes: Spread,
    /// From the guest's output to its release, microseconds, from the
    /// second checkpoint on (the first releases what was held through the
    /// initial sync).
    pub output_delay_us: Spread,
    /// Connect to the first checkpoint's start, ms.
    pub initial_sync_ms: f64,
    /// Bytes written to the data streams.
    pub bytes_sent: u64,
    /// Start to end, ms.
    pub total_ms: f64,
    /// Whether a witness decided (false: `--no-witness`, split brain
    /// possible).
    pub witnessed: bool,
    /// From the standby's last acknowledgement to its loss being noticed,
    /// ms (0 while it is not lost).
    pub detect_ms: f64,
    /// Why the standby was lost, if it was.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub error: Option<String>,
}

/// Where a standby is, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub enum StandbyStatus {
    /// Receiving the initial sync: nothing to resume yet.
    #[default]
    Syncing,
    /// Holding an applied checkpoint.
    Protected,
    /// The primary was lost; the guest runs here from the last applied
    /// epoch.
    TookOver,
    /// The primary ended protection cleanly.
    Released,
    /// The primary was lost but the run right was refused (or not to be
    /// had): the guest does not run here.
    Fenced,
    /// The primary was lost before any checkpoint: nothing to resume.
    Failed,
}

impl StandbyStatus {
    /// Stable lower-case name, as in reports.
    pub fn name(self) -> &'static str {
        match self {
            StandbyStatus::Syncing => "syncing",
            StandbyStatus::Protected => "protected",
            StandbyStatus::TookOver => "took-over",
            StandbyStatus::Released => "released",
            StandbyStatus::Fenced => "fenced",
            StandbyStatus::Failed => "failed",
        }
    }
}

/// What a standby reports.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct StandbyReport {
    /// Where it is, or how it ended.
    pub status: StandbyStatus,
    /// The protection session, 16 hex digits.
    #[cfg_attr(feature = "serde", serde(serialize_with = "crate::stats::hex_id"))]
    pub session: u64,
    /// Transport in use.
    pub transport: String,
    /// The last epoch applied to the image (checkpoint or not).
    pub last_epoch: Option<u32>,
    /// The last checkpoint applied: what a takeover resumes.
    pub last_checkpoint: Option<u32>,
    /// Epochs applied.
    pub epochs_applied: u64,
    /// Epochs refused (incomplete, out of order, failed checks).
    pub epochs_refused: u64,
    /// Bytes of output the takeover released (the last checkpoint's).
    pub released_output_bytes: u64,
    /// From the primary's last message to the loss being noticed, ms.
    pub detect_ms: f64,
    /// From the primary's last message to the guest running here, ms.
    pub failover_ms: f64,
    /// Why the primary counts as lost, if it does.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_spread_is_within_its_bucket_of_the_exact_one() {
        let values: Vec<u64> = (0..10_000u64)
            .map(|i| (i * 7919) % 50_000 + i % 3)
            .collect();
        let mut h = Histogram::default();
        for &v in &values {
            h.record(v);
        }
        let exact = Spread::of(&values);
        let approx = h.spread();
        assert_eq!(approx.max, exact.max);
        assert_eq!(h.count(), 10_000);
        for (a, e) in [(approx.p50, exact.p50), (approx.p99, exact.p99)] {
            assert!(a <= e && e - a <= e / 60 + 1, "{a} for {e}");
        }
        // Small values are exact, and every bucket starts where it says.
        for v in [0, 1, 63, 64, 65, 127, 128, 1 << 40, u64::MAX] {
            let b = Histogram::bucket(v);
            assert!(Histogram::low(b) <= v, "{v}");
            assert!(
                b + 1 >= Histogram::default().counts.len() || Histogram::low(b + 1) > v,
                "{v}"
            );
        }
        assert_eq!(Histogram::default().spread(), Spread::default());
    }
}

/// One epoch as the primary ships it.
#[derive(Debug, Clone, PartialEq)]
struct EpochShip {
    epoch: u32,
    /// Captured with the guest paused (device state and output with it).
    checkpoint: bool,
    state: Vec<u8>,
    output: Vec<u8>,
    /// Guest bytes of its pages.
    bytes_hint: u64,
}

impl EpochShip {
    /// An epoch of the initial sync: pages only.
    fn pages_only(epoch: u32) -> Self {
        Self {
            epoch,
            checkpoint: false,
            state: Vec::new(),
            output: Vec::new(),
            bytes_hint: 0,
        }
    }
}

/// `ranges` in chunks of at most one frame's worth.
fn chunks_of(ranges: &[PageRange]) -> std::slice::Chunks<'_, PageRange> {
    ranges.chunks(RANGES_PER_FRAME)
}
