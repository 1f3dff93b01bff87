//! Choosing the best tracker for this kernel and memory, always unioned with
//! the software bitmap.

use std::sync::Arc;

use super::{
    DirtyError, DirtyLog, DirtyTracker, SoftwareDirtyBitmap, TrackerKind, UffdAsyncTracker,
    UffdSyncTracker,
};
use crate::memory::GuestMemory;

/// Which tracker [`DirtyTracking::new`] may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrackerPreference {
    /// The best that works: uffd async, else uffd sync. Fails if neither does.
    #[default]
    Best,
    /// Exactly this one (the software bitmap alone means the VMM marks every
    /// write itself, or the guest is paused).
    Only(TrackerKind),
}

/// A tracker that was passed over, and why (kernel too old, feature missing,
/// memory type unsupported, no privilege).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The tracker not used.
    pub tracker: TrackerKind,
    /// Why not.
    pub reason: String,
}

/// The dirty set the scheduler sees: the chosen kernel tracker's pages ∪ the
/// software bitmap's. Hand [`software`](Self::software) to device emulation
/// and anything else that writes guest memory behind the kernel tracker's back.
#[derive(Debug)]
pub struct DirtyTracking {
    primary: Option<Box<dyn DirtyTrackerDebug>>,
    kind: TrackerKind,
    software: Arc<SoftwareDirtyBitmap>,
    fallbacks: Vec<Fallback>,
}

/// `DirtyTracker + Debug`, so the chosen tracker can be printed.
trait DirtyTrackerDebug: DirtyTracker + std::fmt::Debug {}
impl<T: DirtyTracker + std::fmt::Debug> DirtyTrackerDebug for T {}

impl DirtyTracking {
    /// Start tracking `mem` with the tracker `pref` allows; every tracker
    /// passed over is logged and listed in [`fallbacks`](Self::fallbacks).
    ///
    /// # Errors
    /// [`DirtyError::NoTracker`] listing each reason when nothing allowed
    /// works; the error of the one tracker asked for with
    /// [`TrackerPreference::Only`].
    pub fn new(mem: &GuestMemory, pref: TrackerPreference) -> Result<Self, DirtyError> {
        let software = Arc::new(SoftwareDirtyBitmap::new(mem));
        let candidates: &[TrackerKind] = match pref {
            TrackerPreference::Best => &[TrackerKind::UffdAsync, TrackerKind::UffdSync],
            TrackerPreference::Only(TrackerKind::UffdAsync) => &[TrackerKind::UffdAsync],
            TrackerPreference::Only(TrackerKind::UffdSync) => &[TrackerKind::UffdSync],
            TrackerPreference::Only(TrackerKind::Software) => &[],
            TrackerPreference::Only(kind) => {
                return Err(DirtyError::Unsupported {
                    tracker: kind,
                    reason: "it tracks the VMM's own objects (VM fd, vm-memory): build it \
                             directly and join it with DirtyUnion"
                        .into(),
                });
            }
        };
        let mut fallbacks = Vec::new();
        for &kind in candidates {
            let made: Result<Box<dyn DirtyTrackerDebug>, DirtyError> = match kind {
                TrackerKind::UffdAsync => UffdAsyncTracker::new(mem).map(|t| Box::new(t) as _),
                TrackerKind::UffdSync => UffdSyncTracker::new(mem).map(|t| Box::new(t) as _),
                _ => unreachable!("only uffd trackers are candidates"),
            };
            match made {
                Ok(tracker) => {
                    tracing::info!(tracker = %kind, "dirty tracking started");
                    return Ok(Self {
                        primary: Some(tracker),
                        kind,
                        software,
                        fallbacks,
                    });
                }
                Err(e) if candidates.len() == 1 => return Err(e),
                Err(e) => {
                    let reason = match e {
                        DirtyError::Unsupported { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    tracing::warn!(tracker = %kind, %reason, "dirty tracker unavailable, falling back");
                    fallbacks.push(Fallback {
                        tracker: kind,
                        reason,
                    });
                }
            }
        }
        if !candidates.is_empty() {
            return Err(DirtyError::NoTracker(fallbacks));
        }
        tracing::info!("dirty tracking with the software bitmap only");
        Ok(Self {
            primary: None,
            kind: TrackerKind::Software,
            software,
            fallbacks,
        })
    }

    /// The software bitmap to mark writes the kernel tracker cannot see.
    pub fn software(&self) -> &Arc<SoftwareDirtyBitmap> {
        &self.software
    }

    /// Trackers passed over, with reasons (empty when the best one works).
    pub fn fallbacks(&self) -> &[Fallback] {
        &self.fallbacks
    }
}

impl DirtyTracker for DirtyTracking {
    /// The kernel tracker in use (`Software` when there is none).
    fn kind(&self) -> TrackerKind {
        self.kind
    }

    fn harvest(&self, log: &mut DirtyLog) -> Result<(), DirtyError> {
        if let Some(primary) = &self.primary {
            primary.harvest(log)?;
        }
        self.software.harvest(log)
    }

    fn discarded_pages(&self) -> u64 {
        self.primary.as_ref().map_or(0, |p| p.discarded_pages())
    }

    fn discarded(&self, pages: &DirtyLog) -> Result<(), DirtyError> {
        self.primary.as_ref().map_or(Ok(()), |p| p.discarded(pages))
    }
}
