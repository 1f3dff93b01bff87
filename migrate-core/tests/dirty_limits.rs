//! What the kernel trackers cannot see, and how selection explains itself.

use std::sync::atomic::{AtomicU64, Ordering};

use migrate_core::dirty::{
    DirtyLog, DirtyTracker, DirtyTracking, TrackerKind, TrackerPreference, UffdSupport,
};
use migrate_core::memory::{GuestMemory, GuestRegion};

/// Writes through a second mapping of the same memfd (another process, a
/// vhost-user backend) are not seen by userfaultfd tracking, which watches
/// one mapping: this documents that limit. Marking the software bitmap, as
/// such a writer must, puts them into the union the scheduler harvests.
#[test]
fn second_mapping_writes_need_the_software_bitmap() {
    let mem = GuestMemory::new(vec![GuestRegion::memfd(0, 64 * 4096, "limit").unwrap()]).unwrap();
    let tracking = match DirtyTracking::new(&mem, TrackerPreference::Best) {
        Ok(t) => t,
        Err(e) => {
            migrate_core::skip::skip(
                "second_mapping_writes_need_the_software_bitmap",
                migrate_core::skip::Need::Uffd,
                &e.to_string(),
            );
            return;
        }
    };
    let fd = mem.regions()[0].fd().unwrap();
    let second = memmap2::MmapOptions::new()
        .len(64 * 4096)
        .map_raw(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .unwrap();
    let write_second = |page: usize, v: u64| {
        // SAFETY: inside the 64-page second mapping, 8-aligned.
        unsafe {
            (*(second.as_mut_ptr().add(page * 4096) as *const AtomicU64)).store(v, Ordering::SeqCst)
        }
    };

    write_second(5, 0xfeed);
    let mut log = DirtyLog::new(&mem);
    tracking.harvest(&mut log).unwrap();
    assert!(
        log.is_empty(),
        "{}: now sees second-mapping writes; update the documented limit",
        tracking.kind()
    );
    // The bytes did land in guest memory: an unmarked write would be lost.
    let mut b = [0u8; 8];
    mem.read(5 * 4096, &mut b).unwrap();
    assert_eq!(u64::from_ne_bytes(b), 0xfeed);

    write_second(9, 0xbeef);
    tracking.software().mark(9 * 4096, 8).unwrap();
    tracking.harvest(&mut log).unwrap();
    assert_eq!(log.pages().collect::<Vec<_>>(), vec![(0, 9)]);
}

#[test]
fn selection_reports_its_choice_and_reasons() {
    let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, 16 * 4096).unwrap()]).unwrap();
    let support = UffdSupport::get();
    println!("uffd support here: {support:?}");
    let best = DirtyTracking::new(&mem, TrackerPreference::Best).unwrap();
    match support.unsupported_reason(TrackerKind::UffdAsync, &mem) {
        None => {
            assert_eq!(best.kind(), TrackerKind::UffdAsync);
            assert!(best.fallbacks().is_empty());
        }
        Some(reason) => {
            assert_eq!(best.kind(), TrackerKind::UffdSync);
            assert_eq!(best.fallbacks()[0].tracker, TrackerKind::UffdAsync);
            assert_eq!(best.fallbacks()[0].reason, reason);
        }
    }
    let soft = DirtyTracking::new(&mem, TrackerPreference::Only(TrackerKind::Software)).unwrap();
    assert_eq!(soft.kind(), TrackerKind::Software);
    // Software-only sees only what is marked.
    mem.write(0x3000, b"x").unwrap();
    let mut log = DirtyLog::new(&mem);
    soft.harvest(&mut log).unwrap();
    assert!(log.is_empty());
    assert!(soft.software().mark(0x3000, 1).is_ok());
    assert!(soft.software().mark(0x10_0000, 1).is_err());
    soft.harvest(&mut log).unwrap();
    assert_eq!(log.pages().collect::<Vec<_>>(), vec![(0, 3)]);
}

/// A write the kernel makes on the process's behalf (read(2) from a pipe
/// into guest memory) is tracked by the async tracker.
#[test]
fn kernel_writes_are_tracked_in_async_mode() {
    let mem = GuestMemory::new(vec![GuestRegion::anonymous(0, 16 * 4096).unwrap()]).unwrap();
    let Ok(tracking) = DirtyTracking::new(&mem, TrackerPreference::Only(TrackerKind::UffdAsync))
    else {
        migrate_core::skip::skip(
            "kernel_writes_are_tracked_in_async_mode",
            migrate_core::skip::Need::Uffd,
            "no async tracker here",
        );
        return;
    };
    let mut fds = [0; 2];
    // SAFETY: pipe into a 2-element array; read into page 7 of guest memory.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        assert_eq!(libc::write(fds[1], b"hello".as_ptr().cast(), 5), 5);
        let dst = mem.regions()[0].page_ptr(7);
        assert_eq!(libc::read(fds[0], dst.cast(), 5), 5);
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let mut log = DirtyLog::new(&mem);
    tracking.harvest(&mut log).unwrap();
    assert_eq!(log.pages().collect::<Vec<_>>(), vec![(0, 7)]);
}
