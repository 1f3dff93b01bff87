//! Where an exit status comes from: how a command ended, one meaning per
//! code, the same for `migrate-cli` and `mini-vmm` (an orchestrator acts
//! on it).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | migrated (the destination runs the guest), or a command that migrates nothing did what it was asked |
//! | 1 | failed or cancelled: the source guest runs, the destination discarded what it received; `ctl`: refused; `check`: the asked transport cannot work here |
//! | 2 | set-up error ([`SetupError`](crate::SetupError)): nothing was sent |
//! | 3 | commit sent but not acknowledged: the source guest stays paused; find out whether the destination runs it |
//! | 4 | the link broke during post-copy: the destination runs the guest without all of its pages, the source keeps them; discard neither |
//! | 5 | protection degraded: the standby was lost and the witness let the primary run on, unprotected |
//! | 6 | fenced: the other end of a protection holds the run right (or none could be had); the guest does not run here |

use migrate_core::{DestinationReport, IncomingError, MigrationError, MigrationStats};

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 0: migrated; the destination runs the guest.
    Migrated,
    /// 1: failed; the source guest runs again, the destination discarded.
    Failed,
    /// 3: commit sent but not acknowledged; the source guest stays paused
    /// and the operator must find out whether the destination runs it.
    CommitUnknown,
    /// 4: the link broke during post-copy: the destination runs the guest
    /// without all of its pages, the source keeps its paused guest and the
    /// pages; neither may be discarded.
    PostcopyInterrupted,
    /// 0: a command that migrates nothing (`ctl`, `tls-gen`,
    /// `completions`, `man`, `run`) did what it was asked.
    Done,
    /// 1: `ctl`: the migration refused the request (the response says
    /// why); `check`: the asked transport cannot work on this host.
    Refused,
    /// 5: protection degraded: the standby was lost and the witness let
    /// the primary run on, unprotected.
    Degraded,
    /// 6: fenced: the other end of a protection holds the run right (or
    /// none could be had); the guest does not run here.
    Fenced,
}

/// The exit status of a set-up error (nothing was sent).
pub const SETUP_ERROR: i32 = 2;

impl Outcome {
    /// The exit status.
    pub fn code(self) -> i32 {
        match self {
            Outcome::Migrated | Outcome::Done => 0,
            Outcome::Failed | Outcome::Refused => 1,
            Outcome::CommitUnknown => 3,
            Outcome::PostcopyInterrupted => 4,
            Outcome::Degraded => 5,
            Outcome::Fenced => 6,
        }
    }

    /// How a source's migration ended. Cancelled is a failure to migrate:
    /// the guest runs here (1).
    pub fn of_source(result: &Result<MigrationStats, MigrationError>) -> Self {
        match result {
            Ok(_) => Outcome::Migrated,
            Err(MigrationError::CommitUnknown(_)) => Outcome::CommitUnknown,
            Err(MigrationError::PostcopyInterrupted(_)) => Outcome::PostcopyInterrupted,
            Err(_) => Outcome::Failed,
        }
    }

    /// How a destination's migration ended; `consistent` is whether the
    /// guest it received passed the VMM's own check (if it made one).
    pub fn of_destination(
        result: &Result<DestinationReport, IncomingError>,
        consistent: bool,
    ) -> Self {
        match result {
            Ok(_) if consistent => Outcome::Migrated,
            Err(IncomingError::PostcopyInterrupted(_)) => Outcome::PostcopyInterrupted,
            _ => Outcome::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_one_code_and_set_up_errors_their_own() {
        let all = [
            (Outcome::Migrated, 0),
            (Outcome::Done, 0),
            (Outcome::Failed, 1),
            (Outcome::Refused, 1),
            (Outcome::CommitUnknown, 3),
            (Outcome::PostcopyInterrupted, 4),
            (Outcome::Degraded, 5),
            (Outcome::Fenced, 6),
        ];
        for (o, code) in all {
            assert_eq!(o.code(), code, "{o:?}");
            assert_ne!(o.code(), SETUP_ERROR);
        }
        let stats = MigrationStats::default();
        assert_eq!(Outcome::of_source(&Ok(stats)), Outcome::Migrated);
        let lost = || Box::new(MigrationError::Cancelled);
        assert_eq!(
            Outcome::of_source(&Err(MigrationError::CommitUnknown(lost()))),
            Outcome::CommitUnknown
        );
        assert_eq!(
            Outcome::of_source(&Err(MigrationError::PostcopyInterrupted(lost()))),
            Outcome::PostcopyInterrupted
        );
        assert_eq!(
            Outcome::of_source(&Err(MigrationError::Cancelled)),
            Outcome::Failed
        );
        assert_eq!(
            Outcome::of_destination(
                &Err(IncomingError::PostcopyInterrupted(Box::new(
                    IncomingError::Cancelled
                ))),
                true
            ),
            Outcome::PostcopyInterrupted
        );
        assert_eq!(
            Outcome::of_destination(&Err(IncomingError::Cancelled), true),
            Outcome::Failed
        );
    }
}
