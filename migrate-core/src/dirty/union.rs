//! Several trackers as one: the dirty set is the union of theirs.

use super::{DirtyError, DirtyLog, DirtyTracker, TrackerKind};

/// The union of several trackers, e.g. KVM's dirty log (guest writes) and the
/// VMM's own bitmap (its writes). Harvests OR into the same log, so nothing
/// any of them saw is lost. [`kind`](DirtyTracker::kind) is the first's
/// (`Software` for an empty union, which reports nothing).
pub struct DirtyUnion {
    trackers: Vec<Box<dyn DirtyTracker>>,
}

impl DirtyUnion {
    /// The union of `trackers`.
    pub fn new(trackers: Vec<Box<dyn DirtyTracker>>) -> Self {
        Self { trackers }
    }

    /// The trackers, in harvest order.
    pub fn trackers(&self) -> &[Box<dyn DirtyTracker>] {
        &self.trackers
    }
}

impl std::fmt::Debug for DirtyUnion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.trackers.iter().map(|t| t.kind()))
            .finish()
    }
}

impl DirtyTracker for DirtyUnion {
    fn kind(&self) -> TrackerKind {
        self.trackers
            .first()
            .map_or(TrackerKind::Software, |t| t.kind())
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        // Every tracker harvests even if one fails: what the others saw must
        // not stay behind in them.
        let mut first_err = None;
        for t in &self.trackers {
            if let Err(e) = t.harvest(log) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn discarded_pages(&self) -> u64 {
        self.trackers.iter().map(|t| t.discarded_pages()).sum()
    }

    fn discarded(&self, pages: &DirtyLog) -> Result<(), DirtyError> {
        let mut first_err = None;
        for t in &self.trackers {
            if let Err(e) = t.discarded(pages) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
