//! The scheduler's decisions, as pure types: the link-rate estimate, the
//! downtime budget and its switch-over test, and auto-converge. No clock, no
//! socket, no guest: each takes the figures of a round and answers, so each
//! has table-driven tests of its own.

use std::time::Duration;

/// Switch over only when the expected downtime is within this share of the
/// budget. The rest absorbs what the estimate does not see: the paused
/// round's scattered pages move slower than the round the rate was measured
/// on (10–15 % below a full pass over TCP, measured with a guest dirtying
/// 1 GB/s uniformly), plus the final harvest, the device state and the
/// commit. Without it, 1 of 189 benchmark runs overshot a 300 ms budget
/// (308.7 ms).
pub(crate) const SWITCH_OVER_HEADROOM: f64 = 0.85;

/// A round at least this long measures the link's rate on its own.
pub(crate) const MEASURED_ROUND_SECS: f64 = 0.02;

/// What the link moves, estimated from the rounds so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkRate {
    /// The last round's wire rate, Mbit/s.
    pub round_mbps: f64,
    /// Every round's wire bytes over the time since the first page, Mbit/s.
    pub average_mbps: f64,
    /// The last round's rate in guest bytes of data pages (zero pages not
    /// counted), Mbit/s: above the wire rate when compression shrinks the
    /// pages.
    pub round_page_mbps: f64,
}

impl LinkRate {
    /// From the last round (`round_bytes` on the wire in `round_secs`) and
    /// all rounds so far (`total_bytes` in `total_secs`).
    pub fn measure(round_bytes: u64, round_secs: f64, total_bytes: u64, total_secs: f64) -> Self {
        Self {
            round_mbps: mbps(round_bytes, round_secs),
            average_mbps: mbps(total_bytes, total_secs),
            round_page_mbps: 0.0,
        }
    }

    /// With the last round's data pages: `page_bytes` of guest memory (as
    /// the guest holds them, before compression) in `round_secs`.
    pub fn with_pages(mut self, page_bytes: u64, round_secs: f64) -> Self {
        self.round_page_mbps = mbps(page_bytes, round_secs);
        self
    }

    /// The rate to plan the switch-over with, in guest bytes/s (what the
    /// remaining dirty bytes are counted in): the last round's own rate when
    /// it ran long enough to measure the link; else the better of it and
    /// the average (a tiny round is all latency and would understate the
    /// link). A round's rate is the better of its wire rate and its
    /// data-page rate: without compression they agree (the wire carries
    /// headers too); with it, the pages cleared per second are what ends a
    /// round, however few bytes they took on the wire. Zero pages are not
    /// credited: they cost little, and the next round's share is unknown.
    pub fn planning_bytes_per_sec(&self, round_secs: f64) -> f64 {
        let round = self.round_mbps.max(self.round_page_mbps);
        let mbps = if round_secs >= MEASURED_ROUND_SECS {
            round
        } else {
            round.max(self.average_mbps)
        };
        mbps * 1e6 / 8.0
    }
}

/// Mbit/s of `bytes` in `secs` (at least a microsecond).
pub(crate) fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs.max(1e-6) / 1e6
}

/// The operator's downtime limit and the test that decides the switch-over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DowntimeBudget {
    limit: Duration,
}

impl DowntimeBudget {
    /// A budget of `limit`.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }

    /// Milliseconds that `remaining` bytes take at `bytes_per_sec`.
    pub fn expected_ms(remaining: u64, bytes_per_sec: f64) -> f64 {
        remaining as f64 / bytes_per_sec.max(1.0) * 1e3
    }

    /// Whether a rest expected to take `expected_ms` fits, with the
    /// [`SWITCH_OVER_HEADROOM`].
    pub fn fits(&self, expected_ms: f64) -> bool {
        expected_ms <= self.limit.as_secs_f64() * 1e3 * SWITCH_OVER_HEADROOM
    }
}

/// Why the switch-over happens now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SwitchReason {
    /// The rest fits the downtime budget.
    Converged,
    /// `max_rounds` rounds were sent.
    MaxRounds,
    /// The overall timeout expired with the force policy.
    Timeout,
    /// The operator asked for it (`MigrationHandle::switchover`).
    Forced,
    /// Rounds stopped shrinking (post-copy instead of a throttle).
    Stalled,
    /// `postcopy_after_rounds` rounds were sent.
    PostcopyAfterRounds,
}

/// After a live round, with post-copy allowed: whether to switch to it now
/// and why. Reaching `after_rounds` always does (the operator asked for
/// post-copy then, as QEMU's `migrate-start-postcopy`); otherwise a rest
/// that fits the budget finishes as pre-copy, and any other reason to
/// switch over (rounds, timeout, operator) goes to post-copy, as do rounds
/// that stopped shrinking (`stalled`).
pub(crate) fn postcopy_now(
    after_rounds: Option<u32>,
    rounds: u32,
    reason: Option<SwitchReason>,
    stalled: bool,
) -> Option<SwitchReason> {
    match reason {
        _ if after_rounds.is_some_and(|n| rounds >= n) => Some(SwitchReason::PostcopyAfterRounds),
        Some(SwitchReason::Converged) => None,
        Some(other) => Some(other),
        None if stalled => Some(SwitchReason::Stalled),
        None => None,
    }
}

impl SwitchReason {
    /// The first reason that holds, in that order; `None`: another round.
    pub fn decide(
        converged: bool,
        max_rounds: bool,
        timed_out: bool,
        forced: bool,
    ) -> Option<Self> {
        if converged {
            Some(SwitchReason::Converged)
        } else if max_rounds {
            Some(SwitchReason::MaxRounds)
        } else if timed_out {
            Some(SwitchReason::Timeout)
        } else if forced {
            Some(SwitchReason::Forced)
        } else {
            None
        }
    }

    /// As in events and logs.
    pub fn name(self) -> &'static str {
        match self {
            SwitchReason::Converged => "converged",
            SwitchReason::MaxRounds => "max rounds",
            SwitchReason::Timeout => "timeout",
            SwitchReason::Forced => "forced",
            SwitchReason::Stalled => "not converging",
            SwitchReason::PostcopyAfterRounds => "post-copy after rounds",
        }
    }
}

/// Auto-converge (QEMU's `throttle-trigger-threshold` of 50 %): after two
/// rounds in a row whose newly dirtied bytes exceed half of what the round
/// sent, throttle the guest to 20 %, then 10 points more per further pair,
/// 99 % at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AutoConverge {
    strikes: u32,
    throttle: u8,
}

impl AutoConverge {
    /// The throttle applied so far, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// After live round `rounds_done` (counting from 1) sent `round_bytes`
    /// of pages while the guest dirtied `dirtied_bytes`: the throttle to ask
    /// the VMM for now, if any. Rounds 1 (the full pass) and the first dirty
    /// round do not count: they say nothing about the guest's pace yet.
    pub fn after_round(
        &mut self,
        rounds_done: u32,
        round_bytes: u64,
        dirtied_bytes: u64,
    ) -> Option<u8> {
        if rounds_done < 2 {
            return None;
        }
        if dirtied_bytes as f64 > round_bytes as f64 * 0.5 {
            self.strikes += 1;
        } else {
            self.strikes = 0;
        }
        if self.strikes < 2 || self.throttle >= 99 {
            return None;
        }
        self.strikes = 0;
        Some(if self.throttle == 0 {
            20
        } else {
            (self.throttle + 10).min(99)
        })
    }

    /// The VMM applied `percent`.
    pub fn applied(&mut self, percent: u8) {
        self.throttle = percent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postcopy_only_when_precopy_does_not_finish() {
        use SwitchReason::*;
        // A rest that fits finishes as pre-copy, whatever else holds...
        assert_eq!(postcopy_now(None, 5, Some(Converged), true), None);
        assert_eq!(postcopy_now(Some(6), 5, Some(Converged), true), None);
        // ... unless the operator's round count is reached.
        assert_eq!(
            postcopy_now(Some(5), 5, Some(Converged), false),
            Some(PostcopyAfterRounds)
        );
        for r in [MaxRounds, Timeout, Forced] {
            assert_eq!(postcopy_now(None, 1, Some(r), false), Some(r));
        }
        assert_eq!(postcopy_now(Some(3), 2, None, false), None);
        assert_eq!(
            postcopy_now(Some(3), 3, None, false),
            Some(PostcopyAfterRounds)
        );
        assert_eq!(postcopy_now(None, 2, None, true), Some(Stalled));
        assert_eq!(postcopy_now(None, 9, None, false), None);
    }

    #[test]
    fn link_rate_prefers_a_measured_round() {
        // (round bytes, round s, total bytes, total s, planning MB/s)
        let cases = [
            // 100 ms round at 100 MB/s, average 50 MB/s: the round decides.
            (10_000_000, 0.1, 50_000_000, 1.0, 100.0),
            // Round exactly at the 20 ms threshold: still its own rate.
            (1_000_000, 0.02, 100_000_000, 1.0, 50.0),
            // 1 ms round (all latency, 4 MB/s): the better average wins.
            (4_000, 0.001, 100_000_000, 1.0, 100.0),
            // Tiny round faster than the average: its own rate.
            (400_000, 0.001, 100_000_000, 1.0, 400.0),
        ];
        for (rb, rs, tb, ts, want_mbs) in cases {
            let rate = LinkRate::measure(rb, rs, tb, ts);
            let got = rate.planning_bytes_per_sec(rs) / 1e6;
            assert!(
                (got - want_mbs).abs() < 1e-6,
                "{rb} B in {rs} s, {tb} B in {ts} s: {got} MB/s, want {want_mbs}"
            );
        }
        let r = LinkRate::measure(1_250_000, 0.1, 0, 0.0);
        assert!((r.round_mbps - 100.0).abs() < 1e-9);
        assert_eq!(r.average_mbps, 0.0);
    }

    #[test]
    fn link_rate_counts_compressed_pages_as_cleared() {
        // (wire bytes, page bytes, round s, planning MB/s)
        let cases = [
            // 1 MB on the wire carried 100 MB of pages in 100 ms: compression
            // cleared 1000 MB/s of dirty memory, not 10.
            (1_000_000, 100_000_000, 0.1, 1000.0),
            // Uncompressed: headers make the wire a little more; it decides.
            (10_100_000, 10_000_000, 0.1, 101.0),
            // Only zero pages (no data pages): the wire rate.
            (50_000, 0, 0.1, 0.5),
        ];
        for (wire, pages, secs, want_mbs) in cases {
            let rate = LinkRate::measure(wire, secs, wire, secs).with_pages(pages, secs);
            let got = rate.planning_bytes_per_sec(secs) / 1e6;
            assert!(
                (got - want_mbs).abs() < 1e-6,
                "{wire} B wire, {pages} B pages in {secs} s: {got} MB/s, want {want_mbs}"
            );
        }
    }

    #[test]
    fn budget_keeps_fifteen_percent_headroom() {
        let b = DowntimeBudget::new(Duration::from_millis(300));
        // (remaining bytes, bytes/s, fits)
        let cases = [
            (0, 1e9, true),
            (25_500_000, 100e6, true),  // 255 ms: exactly 85 %
            (25_600_000, 100e6, false), // 256 ms: over the headroom
            (29_000_000, 100e6, false), // 290 ms: under the limit, over 85 %
            (0, 0.0, true),             // nothing left fits whatever the rate
            (1, 0.0, false),            // no rate measured: a 1 byte/s floor
        ];
        for (remaining, rate, fits) in cases {
            let ms = DowntimeBudget::expected_ms(remaining, rate);
            assert_eq!(b.fits(ms), fits, "{remaining} B at {rate} B/s = {ms} ms");
        }
    }

    #[test]
    fn switch_reason_in_order() {
        use SwitchReason::*;
        let cases = [
            ((false, false, false, false), None),
            ((true, true, true, true), Some(Converged)),
            ((false, true, true, true), Some(MaxRounds)),
            ((false, false, true, true), Some(Timeout)),
            ((false, false, false, true), Some(Forced)),
        ];
        for ((c, m, t, f), want) in cases {
            assert_eq!(SwitchReason::decide(c, m, t, f), want, "{c} {m} {t} {f}");
        }
        assert_eq!(MaxRounds.name(), "max rounds");
    }

    #[test]
    fn auto_converge_throttles_after_two_bad_rounds() {
        // (rounds done, round bytes, dirtied bytes, applied, expected ask)
        let steps = [
            (1, 100, 90, true, None),       // full pass: not counted
            (2, 100, 60, true, None),       // strike 1
            (3, 100, 60, true, Some(20)),   // strike 2: first throttle
            (4, 100, 60, true, None),       // strikes restart
            (5, 100, 40, true, None),       // converging: reset
            (6, 100, 51, true, None),       // strike 1
            (7, 100, 51, true, Some(30)),   // +10 points
            (8, 100, 50, true, None),       // exactly half is not a strike
            (9, 100, 99, false, None),      // strike 1
            (10, 100, 99, false, Some(40)), // VMM cannot: asked, not applied
            (11, 100, 99, false, None),
            (12, 100, 99, false, Some(40)), // asks the same again
        ];
        let mut ac = AutoConverge::default();
        for (round, sent, dirtied, apply, want) in steps {
            let got = ac.after_round(round, sent, dirtied);
            assert_eq!(got, want, "round {round}");
            if let (Some(p), true) = (got, apply) {
                ac.applied(p);
            }
        }
        assert_eq!(ac.throttle(), 30);
    }

    #[test]
    fn auto_converge_stops_at_99() {
        let mut ac = AutoConverge::default();
        let mut asks = Vec::new();
        for round in 2..40 {
            if let Some(p) = ac.after_round(round, 100, 100) {
                asks.push(p);
                ac.applied(p);
            }
        }
        assert_eq!(asks, [20, 30, 40, 50, 60, 70, 80, 90, 99]);
        assert_eq!(ac.after_round(41, 100, 100), None);
        assert_eq!(ac.after_round(42, 100, 100), None);
    }
}
