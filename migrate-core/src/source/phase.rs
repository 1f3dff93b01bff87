//! Where an outgoing migration stands, as a type: the phases, the one
//! transition function between them, and what a failure means in each.
//! The engine ([`super::outgoing`]) asks the phase, never a flag, whether
//! the guest is paused here, whether a lost connection may be mended, and
//! what to do when something fails.
//!
//! ```text
//!  Live ──Pause──▶ Paused ──SendCommit──▶ CommitSent ──Committed──▶ Done
//!                                              │
//!                                              └──CommittedPostcopy──▶ Postcopy ──AllServed──▶ Done
//! ```

use std::time::Instant;

use crate::protocol::Features;

/// What the handshake settled for the whole migration (kept across a
/// reconnection: the destination resumes the same session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Session {
    /// The migration's id, both ends'.
    pub(crate) id: u64,
    pub(crate) features: Features,
    /// The destination's memory reads as zeros where nothing was sent.
    pub(crate) reads_zero: bool,
}

/// Where an outgoing migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Rounds while the guest runs here.
    Live,
    /// The guest is paused here since `since`: the last round(s),
    /// verification, the device state.
    Paused { since: Instant },
    /// `Commit` is out: until `Committed` arrives, the destination may or
    /// may not run the guest.
    CommitSent { paused_since: Instant },
    /// The destination runs the guest and fetches what it lacks from here.
    Postcopy { paused_since: Instant },
    /// Committed (pre-copy), or every page served (post-copy).
    Done,
}

/// A change of phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The guest is paused for the switch-over.
    Pause,
    /// `Commit` goes out.
    SendCommit,
    /// `Committed` arrived (pre-copy: the end).
    Committed,
    /// `Committed` arrived and the destination now fetches the rest.
    CommittedPostcopy,
    /// The destination has every page (post-copy's end).
    AllServed,
}

/// A step the phase does not allow: an engine bug, reported as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no step {step:?} from the {phase} phase")]
pub(crate) struct IllegalStep {
    pub(crate) phase: &'static str,
    pub(crate) step: Step,
}

/// What a failure means in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// Nothing was handed over: tell the destination, lift the throttle,
    /// resume the guest here if it was paused (`resume`).
    GiveBack { resume: bool },
    /// The destination may run the guest: keep ours paused, report
    /// commit-unknown.
    CommitUnknown,
    /// The destination runs the guest without all of its pages.
    PostcopyInterrupted,
}

impl Phase {
    /// The phase after `step` at `now`.
    ///
    /// # Errors
    /// [`IllegalStep`] for a step this phase does not allow.
    pub(crate) fn step(self, step: Step, now: Instant) -> Result<Phase, IllegalStep> {
        use Phase::*;
        Ok(match (self, step) {
            (Live, Step::Pause) => Paused { since: now },
            (Paused { since }, Step::SendCommit) => CommitSent {
                paused_since: since,
            },
            (CommitSent { .. }, Step::Committed) => Done,
            (CommitSent { paused_since }, Step::CommittedPostcopy) => Postcopy { paused_since },
            (Postcopy { .. }, Step::AllServed) => Done,
            (phase, step) => {
                return Err(IllegalStep {
                    phase: phase.name(),
                    step,
                });
            }
        })
    }

    /// Lower-case name, for errors and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Live => "live",
            Phase::Paused { .. } => "paused",
            Phase::CommitSent { .. } => "commit-sent",
            Phase::Postcopy { .. } => "post-copy",
            Phase::Done => "done",
        }
    }

    /// Since when the guest has been paused here, if it is.
    pub(crate) fn paused_since(self) -> Option<Instant> {
        match self {
            Phase::Paused { since } => Some(since),
            Phase::CommitSent { paused_since } | Phase::Postcopy { paused_since } => {
                Some(paused_since)
            }
            Phase::Live | Phase::Done => None,
        }
    }

    /// Whether a lost connection may be mended by reconnecting and going
    /// on with the rounds: only while the guest runs here (once it is
    /// paused, the downtime would include the outage; post-copy has its
    /// own recovery).
    pub(crate) fn may_resume_rounds(self) -> bool {
        self == Phase::Live
    }

    /// What a failure in this phase means.
    pub(crate) fn on_failure(self) -> OnFailure {
        match self {
            Phase::Live => OnFailure::GiveBack { resume: false },
            Phase::Paused { .. } => OnFailure::GiveBack { resume: true },
            Phase::CommitSent { .. } | Phase::Done => OnFailure::CommitUnknown,
            Phase::Postcopy { .. } => OnFailure::PostcopyInterrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (phase, step) pair: the phase it leads to, or a refusal.
    #[test]
    fn transitions_table() {
        let t0 = Instant::now();
        let now = t0 + std::time::Duration::from_millis(5);
        let phases = [
            Phase::Live,
            Phase::Paused { since: t0 },
            Phase::CommitSent { paused_since: t0 },
            Phase::Postcopy { paused_since: t0 },
            Phase::Done,
        ];
        let steps = [
            Step::Pause,
            Step::SendCommit,
            Step::Committed,
            Step::CommittedPostcopy,
            Step::AllServed,
        ];
        let expected = |p: Phase, s: Step| -> Option<Phase> {
            match (p.name(), s) {
                ("live", Step::Pause) => Some(Phase::Paused { since: now }),
                ("paused", Step::SendCommit) => Some(Phase::CommitSent { paused_since: t0 }),
                ("commit-sent", Step::Committed) => Some(Phase::Done),
                ("commit-sent", Step::CommittedPostcopy) => {
                    Some(Phase::Postcopy { paused_since: t0 })
                }
                ("post-copy", Step::AllServed) => Some(Phase::Done),
                _ => None,
            }
        };
        let mut allowed = 0;
        for p in phases {
            for s in steps {
                match (p.step(s, now), expected(p, s)) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "{p:?} + {s:?}");
                        allowed += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e.phase, p.name());
                        assert_eq!(e.step, s);
                    }
                    (got, want) => panic!("{p:?} + {s:?}: {got:?}, expected {want:?}"),
                }
            }
        }
        assert_eq!(allowed, 5);
    }

    /// What each phase says about the guest, reconnection and failure.
    #[test]
    fn each_phase_answers_for_failure_and_pause() {
        let t0 = Instant::now();
        let table = [
            (
                Phase::Live,
                None,
                true,
                OnFailure::GiveBack { resume: false },
            ),
            (
                Phase::Paused { since: t0 },
                Some(t0),
                false,
                OnFailure::GiveBack { resume: true },
            ),
            (
                Phase::CommitSent { paused_since: t0 },
                Some(t0),
                false,
                OnFailure::CommitUnknown,
            ),
            (
                Phase::Postcopy { paused_since: t0 },
                Some(t0),
                false,
                OnFailure::PostcopyInterrupted,
            ),
            (Phase::Done, None, false, OnFailure::CommitUnknown),
        ];
        for (phase, paused, resumable, failure) in table {
            assert_eq!(phase.paused_since(), paused, "{phase:?}");
            assert_eq!(phase.may_resume_rounds(), resumable, "{phase:?}");
            assert_eq!(phase.on_failure(), failure, "{phase:?}");
        }
    }
}
