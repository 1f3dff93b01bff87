//! Skipped tests as visible, counted outcomes (for this crate's conformance
//! suites and the workspace's tests; a VMM does not need it).
//!
//! A test whose prerequisite this machine lacks calls [`skip`]: it prints
//! `SKIP <test>: <reason>`, appends that line to the file named by
//! `MIGRATE_SKIP_LOG` (the test command prints them all at its end, since
//! `cargo test` swallows a passing test's output), and returns so the test
//! can end. Where the test command has checked that this machine *has* the
//! prerequisite, it sets `MIGRATE_REQUIRE_<NEED>=1`, and the skip fails the
//! test instead: on a machine that can run a test, a skip is a failure.
//!
//! A case its subject refuses by design (uffd-sync and a disk file) is
//! neither: [`not_applicable`] logs it as a counted `N/A` line.

use std::io::Write;

/// What a test may need that a machine may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Need {
    /// An RDMA device (`MIGRATE_REQUIRE_RDMA`).
    Rdma,
    /// `/dev/kvm` (`MIGRATE_REQUIRE_KVM`).
    Kvm,
    /// Free 2 MiB huge pages (`MIGRATE_REQUIRE_HUGETLB`).
    HugePages,
    /// userfaultfd write-protect trackers, async with `PAGEMAP_SCAN`
    /// (`MIGRATE_REQUIRE_UFFD`).
    Uffd,
    /// Network namespaces and veth pairs (root; `MIGRATE_REQUIRE_NETNS`).
    NetNs,
    /// Mounting a small tmpfs, to fill a file system for real (root;
    /// `MIGRATE_REQUIRE_MOUNT`).
    Mount,
    /// A guest written elsewhere, fetched at test time (QEMU's migration
    /// test boot sector; `MIGRATE_REQUIRE_FOREIGN_GUEST`).
    ForeignGuest,
    /// The kernel's TLS (`tls.ko`, kTLS; `MIGRATE_REQUIRE_KTLS`).
    KernelTls,
}

impl Need {
    /// The variable that turns a skip for this need into a failure.
    pub fn variable(self) -> &'static str {
        match self {
            Need::Rdma => "MIGRATE_REQUIRE_RDMA",
            Need::Kvm => "MIGRATE_REQUIRE_KVM",
            Need::HugePages => "MIGRATE_REQUIRE_HUGETLB",
            Need::Uffd => "MIGRATE_REQUIRE_UFFD",
            Need::NetNs => "MIGRATE_REQUIRE_NETNS",
            Need::Mount => "MIGRATE_REQUIRE_MOUNT",
            Need::ForeignGuest => "MIGRATE_REQUIRE_FOREIGN_GUEST",
            Need::KernelTls => "MIGRATE_REQUIRE_KTLS",
        }
    }
}

/// Skip `test` for lack of `need` (`reason` says what is missing): a
/// logged, counted `SKIP` line, or a panic where the need is required.
///
/// # Panics
/// When `MIGRATE_REQUIRE_<NEED>` is set: this machine was checked to have
/// what the test needs.
pub fn skip(test: &str, need: Need, reason: &str) {
    if std::env::var_os(need.variable()).is_some() {
        panic!(
            "{test}: skipped for lack of {need:?} ({reason}), but {} is set: this machine has it",
            need.variable()
        );
    }
    log(test, format!("SKIP {test}: {reason}"));
}

/// `test`'s subject refuses this case by design (a tracker that documents
/// it cannot track disk files): neither a pass nor a skip, so a logged,
/// counted `N/A` line beside the skips. The caller has checked that the
/// refusal is the documented one; anything else is a failure, not this.
pub fn not_applicable(test: &str, reason: &str) {
    log(test, format!("N/A {test}: {reason}"));
}

fn log(test: &str, line: String) {
    println!("{line}");
    if let Some(path) = std::env::var_os("MIGRATE_SKIP_LOG") {
        let logged = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = logged {
            panic!("{test}: cannot log {line:?} to MIGRATE_SKIP_LOG: {e}");
        }
    }
}
