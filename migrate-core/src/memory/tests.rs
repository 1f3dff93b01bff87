//! Shapes, layouts, sharing and adoption of guest memory.

use super::*;
use std::os::fd::AsRawFd;

/// Two regions, 4 KiB and 2 MiB pages (also the protocol tests' layout).
pub(crate) fn sample_layout() -> MemoryLayout {
    MemoryLayout {
        regions: vec![
            RegionLayout {
                gpa: 0,
                len: 64 * 4096,
                page_size: PageSize::Small,
            },
            RegionLayout {
                gpa: 1 << 32,
                len: 4 << 20,
                page_size: PageSize::Huge2M,
            },
        ],
    }
}

#[test]
fn layout_errors_are_typed() {
    assert!(matches!(
        GuestRegion::anonymous(0, 0),
        Err(MemoryError::ZeroLength { gpa: 0 })
    ));
    assert!(matches!(
        GuestRegion::anonymous(0x800, 4096),
        Err(MemoryError::UnalignedBase { gpa: 0x800, .. })
    ));
    assert!(matches!(
        GuestRegion::anonymous(0, 5000),
        Err(MemoryError::UnalignedLength { len: 5000, .. })
    ));
    assert!(matches!(
        GuestRegion::anonymous(u64::MAX - 4095, 8192),
        Err(MemoryError::AddressOverflow { .. })
    ));
    assert!(matches!(
        GuestMemory::new(vec![]),
        Err(MemoryError::NoRegions)
    ));
    let err = GuestMemory::new(vec![
        GuestRegion::anonymous(0x10_0000, 0x2000).unwrap(),
        GuestRegion::anonymous(0x10_1000, 0x1000).unwrap(),
    ])
    .unwrap_err();
    assert!(matches!(
        err,
        MemoryError::Overlap {
            first_start: 0x10_0000,
            first_end: 0x10_2000,
            second_start: 0x10_1000,
            ..
        }
    ));
    assert!(err.to_string().contains("overlap"));
}

#[test]
fn regions_sorted_and_located() {
    let mem = GuestMemory::new(vec![
        GuestRegion::anonymous(0x10_0000, 0x4000).unwrap(),
        GuestRegion::memfd(0, 0x2000, "low").unwrap(),
    ])
    .unwrap();
    assert_eq!(mem.regions()[0].gpa(), 0);
    assert_eq!(mem.total_bytes(), 0x6000);
    assert_eq!(mem.total_pages(), 6);
    assert_eq!(mem.locate(0x10_1008, 8).unwrap(), (1, 0x1008));
    assert!(matches!(
        mem.locate(0x1ff8, 16),
        Err(MemoryError::OutOfRange { .. })
    ));
    assert!(matches!(
        mem.locate(0x3000, 1),
        Err(MemoryError::OutOfRange { .. })
    ));
    mem.write(0x10_1ffc, b"abcd").unwrap();
    let mut back = [0u8; 4];
    mem.read(0x10_1ffc, &mut back).unwrap();
    assert_eq!(&back, b"abcd");
}

#[test]
fn memfd_is_shared_with_a_second_mapping() {
    let region = GuestRegion::memfd(0, 0x2000, "shared").unwrap();
    let second = memmap2::MmapOptions::new()
        .len(0x2000)
        .map_raw(region.fd().unwrap().as_raw_fd())
        .unwrap();
    // SAFETY: both pointers are inside live 8 KiB mappings.
    unsafe {
        *second.as_mut_ptr().add(0x1000) = 0x5a;
        assert_eq!(*region.as_ptr().add(0x1000), 0x5a);
    }
}

/// The read view reads the whole 64 KiB blocks of a memory file its
/// region's mapping maps none of, sees every write made through the
/// mapping before and after, never maps a page the mapping maps (so no
/// page counts twice in the resident set), and is emptied by
/// `drop_read_view`; memory with no file to map again has none. Wherever
/// the view lands (its blocks are aligned in its own addresses: each of
/// the 16 offsets from a 64 KiB boundary is tried, by mapping 0 to 15
/// pages first).
#[test]
fn the_read_view_reads_only_what_the_mapping_lacks() {
    const T: &str = "memory::tests::the_read_view_reads_only_what_the_mapping_lacks";
    let mut scan = crate::uffd::Pagemap::open(64).unwrap();
    if !scan.scan_supported().unwrap() {
        let region = GuestRegion::memfd(0, 64 * 4096, "view").unwrap();
        assert_eq!(region.map_read_view().unwrap(), 0);
        crate::skip::skip(T, crate::skip::Need::Uffd, "no PAGEMAP_SCAN (Linux < 6.7)");
        return;
    }
    let dir = ScratchDir::new("read-view");
    let mut offsets = std::collections::BTreeSet::new();
    for k in 0..16 {
        for file in [false, true] {
            let _before = (k > 0).then(|| memmap2::MmapMut::map_anon(k * 4096).unwrap());
            let region = if file {
                GuestRegion::file(0, 64 * 4096, dir.0.join("guest.img")).unwrap()
            } else {
                GuestRegion::memfd(0, 64 * 4096, "view").unwrap()
            };
            offsets.insert(read_view_holds(&region, &mut scan));
            drop(region);
            let _ = std::fs::remove_file(dir.0.join("guest.img"));
        }
    }
    assert!(
        offsets.len() >= 8,
        "the views landed at offsets {offsets:?} only"
    );
    let anon = GuestRegion::anonymous(0, 0x2000).unwrap();
    assert_eq!(anon.map_read_view().unwrap(), 0);
    assert_eq!(anon.io_slice(1, 1).as_ptr(), anon.page_ptr(1).cast_const());
}

/// The read view's promises on one 64-page region (page 15 written through
/// its mapping: in the view's second block unless the view is aligned,
/// where a fault in its first would map it; page 34 written through the
/// file); the view's offset in pages from a 64 KiB boundary.
fn read_view_holds(region: &GuestRegion, scan: &mut crate::uffd::Pagemap) -> usize {
    const MAPPED: usize = 15;
    region.write_bytes(MAPPED * 4096, b"mapped");
    let file = std::fs::File::from(region.fd().unwrap().try_clone_to_owned().unwrap());
    std::os::unix::fs::FileExt::write_at(&file, b"in the file", 34 * 4096).unwrap();
    let marked = region.map_read_view().unwrap();
    let at = |page: usize| region.io_slice(page, 1).as_ptr();
    // The view's blocks are its fault-around windows, 64 KiB aligned in
    // its addresses; the partial block at its start never reads there (a
    // fault in it maps the 16 pages from the start). Every page outside
    // page 15's block and that one reads there.
    let view = at(40) as usize - 40 * 4096;
    let shift = (view / 4096) % 16;
    let block = |p: usize| (shift + p) / 16;
    let through: Vec<usize> = (0..64)
        .filter(|&p| block(p) != block(MAPPED) && (shift == 0 || block(p) != 0))
        .collect();
    assert_eq!(marked, through.len(), "offset {shift}");
    for p in 0..64 {
        let there = at(p) != region.page_ptr(p).cast_const();
        assert_eq!(there, through.contains(&p), "page {p}, offset {shift}");
    }
    assert_eq!(&region.io_slice(34, 1)[..11], b"in the file");
    region.write_bytes(34 * 4096 + 11, b", and now");
    assert_eq!(&region.io_slice(34, 1)[..20], b"in the file, and now");
    // A run across the two mappings reads through the region's.
    let edge = (1..64)
        .find(|&p| through.contains(&p) && !through.contains(&(p - 1)))
        .unwrap();
    assert_eq!(
        region.io_slice(edge - 1, 2).as_ptr(),
        region.page_ptr(edge - 1).cast_const()
    );
    assert!(!region.is_zero_page(34) && region.is_zero_page(50));
    let mut page = vec![0u8; 4096];
    region.read_bytes(34 * 4096, &mut page);
    assert_eq!(region.hash_page(34), crate::checksum::xxh3_64(&page));
    for p in 0..64 {
        let _ = region.is_zero_page(p);
    }
    region.populate_read_pages(0, 64).unwrap();
    // What the view maps: only pages that read there, never one the
    // region's mapping maps (fault-around stays inside a block).
    let mapped_in_view = |scan: &mut crate::uffd::Pagemap| {
        let mut pages = vec![];
        scan.present(view, view + 64 * 4096, |s, e| {
            pages.extend((s - view) / 4096..(e - view) / 4096);
        })
        .unwrap();
        pages
    };
    let in_view = mapped_in_view(scan);
    assert!(
        !in_view.is_empty() && in_view.iter().all(|p| through.contains(p)),
        "offset {shift}: {in_view:?}"
    );
    region.drop_read_view().unwrap();
    assert_eq!(mapped_in_view(scan), Vec::<usize>::new(), "emptied");
    assert_eq!(at(34), region.page_ptr(34).cast_const(), "dropped");
    assert_eq!(&region.io_slice(34, 1)[..20], b"in the file, and now");
    // Made again (a later migration), it reads what is unmapped now.
    let now_unmapped = region.map_read_view().unwrap();
    assert!(now_unmapped < marked, "{now_unmapped}");
    region.drop_read_view().unwrap();
    shift
}

#[test]
fn file_backed_region_checks_size() {
    let dir = std::env::temp_dir().join(format!("mc-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("guest.img");
    let region = GuestRegion::file(0, 0x3000, &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0x3000);
    drop(region);
    // Reopening with the same size works; another size is refused.
    GuestRegion::file(0, 0x3000, &path).unwrap();
    assert!(matches!(
        GuestRegion::file(0, 0x4000, &path),
        Err(MemoryError::FileSize {
            expected: 0x4000,
            actual: 0x3000,
            ..
        })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scratch directory of this test's own, removed on drop.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_new_memory_file_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = ScratchDir::new("file-mode");
    let path = dir.0.join("guest.img");
    // SAFETY: umask only changes this process's creation mask; it is put back.
    let old = unsafe { libc::umask(0) };
    let region = GuestRegion::file(0, 0x3000, &path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    drop(region.unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode, 0o600,
        "guest memory must be readable by its owner alone"
    );
    // create_file never adopts what is there.
    let err = GuestRegion::create_file(0, 0x3000, &path).unwrap_err();
    assert!(
        matches!(&err, MemoryError::File { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{err}"
    );
}

#[test]
fn a_memory_file_others_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = ScratchDir::new("file-trust");
    // A planted symbolic link: neither followed to create nor to open.
    let target = dir.0.join("target.img");
    std::fs::write(&target, vec![0u8; 0x3000]).unwrap();
    let link = dir.0.join("link.img");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = GuestRegion::file(0, 0x3000, &link).unwrap_err();
    assert!(matches!(err, MemoryError::FileNotTrusted { .. }), "{err}");
    // Group- or world-writable: refused, its bytes untouched.
    for mode in [0o620, 0o602, 0o666] {
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = GuestRegion::file(0, 0x3000, &target).unwrap_err();
        assert!(
            matches!(&err, MemoryError::FileNotTrusted { reason, .. } if reason.contains("write")),
            "mode {mode:o}: {err}"
        );
    }
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    GuestRegion::file(0, 0x3000, &target).unwrap();
    // Another user's file in a sticky, world-writable directory (as /tmp or
    // /dev/shm): refused. Only root can make a file another user owns.
    if sys::effective_uid() == 0 {
        let sticky = dir.0.join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let planted = sticky.join("guest.img");
        std::fs::write(&planted, vec![0u8; 0x3000]).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        let err = GuestRegion::file(0, 0x3000, &planted).unwrap_err();
        assert!(
            matches!(&err, MemoryError::FileNotTrusted { reason, .. } if reason.contains("owned by uid 65534")),
            "{err}"
        );
    } else {
        println!("not root: the other-owner case needs chown and is left out");
    }
}

#[test]
fn external_mapping_is_never_unmapped() {
    let owner = GuestRegion::anonymous(0, 0x2000).unwrap();
    // SAFETY: `owner` keeps the mapping alive past `adopted`.
    let adopted =
        unsafe { GuestRegion::from_raw(0x1000_0000, owner.as_ptr(), 0x2000, PageSize::Small) }
            .unwrap();
    assert!(!adopted.owns_mapping());
    drop(adopted);
    // SAFETY: still mapped: dropping the adopted region did not unmap.
    unsafe { owner.as_ptr().write(7) };
    // SAFETY: null is refused before any access.
    let null = unsafe { GuestRegion::from_raw(0, std::ptr::null_mut(), 4096, PageSize::Small) };
    assert!(matches!(null, Err(MemoryError::NullHost { .. })));
}

#[test]
fn zero_detection() {
    let mut p = vec![0u8; 4096];
    assert!(is_zero_page(&p));
    p[4095] = 1;
    assert!(!is_zero_page(&p));
    p[4095] = 0;
    p[0] = 1;
    assert!(!is_zero_page(&p));
    assert!(is_zero_page(&[0u8; 100]));
    assert!(!is_zero_page(&[0, 0, 0, 1]));
}

#[test]
fn layout_mismatch_names_the_difference() {
    let layout = sample_layout;
    let a = layout();
    let mut b = layout();
    b.regions[1].len = 2 << 20;
    let e = a.check_matches(&b).unwrap_err();
    assert!(e.to_string().contains("region 1 differs"), "{e}");
    b.regions.pop();
    assert!(matches!(
        a.check_matches(&b),
        Err(LayoutMismatch::RegionCount {
            source_regions: 2,
            destination_regions: 1
        })
    ));
    assert!(a.check_matches(&layout()).is_ok());
}

/// A reader that hands out at most 7 bytes per call, however many buffers
/// it is given: partial vectored reads must resume mid-buffer.
struct Trickle<'a>(&'a [u8]);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out.len().min(7).min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn runs_land_in_order_from_partial_vectored_reads() {
    let mem = GuestMemory::new(vec![
        GuestRegion::anonymous(0, 8 * 4096).unwrap(),
        GuestRegion::memfd(1 << 20, 4 * 4096, "runs").unwrap(),
    ])
    .unwrap();
    let runs = [(1, 2, 2), (0, 0, 1), (0, 5, 3)];
    let bytes: Vec<u8> = (0..6 * 4096).map(|i| (i % 251) as u8 + 1).collect();
    mem.read_runs_from(&runs, &mut Trickle(&bytes)).unwrap();
    let mut at = 0;
    for (region, first, count) in runs {
        let mut got = vec![0u8; count * 4096];
        mem.regions()[region].read_bytes(first * 4096, &mut got);
        assert_eq!(
            got,
            bytes[at..at + count * 4096],
            "run {region}:{first}+{count}"
        );
        at += count * 4096;
    }
    // Pages outside the runs stay as they were (zero).
    assert!(mem.regions()[0].is_zero_page(1));
    assert!(mem.regions()[1].is_zero_page(0));
    // A reader that ends first is an error, not a short landing.
    let e = mem
        .read_runs_from(&runs, &mut Trickle(&bytes[..100]))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn a_file_without_data_reads_zero() {
    let dir = std::env::temp_dir().join(format!("reads-zero-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("f");
    let f = std::fs::File::create(&path).unwrap();
    assert!(file_reads_zero(&f), "empty");
    f.set_len(1 << 20).unwrap();
    assert!(file_reads_zero(&f), "all holes");
    std::fs::write(&path, b"data").unwrap();
    let f = std::fs::File::open(&path).unwrap();
    assert!(!file_reads_zero(&f), "holds data");
    std::fs::remove_dir_all(&dir).unwrap();
}
