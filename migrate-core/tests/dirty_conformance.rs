//! Every dirty tracker passes the one conformance suite, on every memory
//! kind this machine has. Tests print `SKIP <test>: <reason>` for what this
//! kernel or machine cannot run.

use std::sync::Arc;

use migrate_core::conformance_suite;
use migrate_core::dirty::conformance::Tracked;
use migrate_core::dirty::{
    DirtyTracking, SoftwareDirtyBitmap, TrackerPreference, UffdAsyncTracker, UffdSyncTracker,
};

conformance_suite!(uffd_async, |mem| Ok(Tracked {
    tracker: Box::new(UffdAsyncTracker::new(mem)?),
    marker: None,
}));

conformance_suite!(uffd_sync, |mem| Ok(Tracked {
    tracker: Box::new(UffdSyncTracker::new(mem)?),
    marker: None,
}));

conformance_suite!(software_bitmap, |mem| {
    let bitmap = Arc::new(SoftwareDirtyBitmap::new(mem));
    Ok(Tracked {
        tracker: Box::new(Arc::clone(&bitmap)),
        marker: Some(bitmap),
    })
});

// The selected tracker as the scheduler sees it (kernel tracker ∪ software
// bitmap), with writers that never mark: the kernel tracker must carry it.
conformance_suite!(selected_best, |mem| Ok(Tracked {
    tracker: Box::new(DirtyTracking::new(mem, TrackerPreference::Best)?),
    marker: None,
}));
