//! `migrate-cli check`: can this host migrate, and over what? Each item is
//! tried for real where it can be (a dirty tracker started on real memory,
//! `/dev/kvm` opened, the RDMA device opened and its GID chosen as a
//! migration would), and read from the kernel where it cannot, the way
//! `criu check` and `ibv_devinfo` do. What does not work says how to fix
//! it; the exit status says whether the asked transport can work here.

use std::net::Ipv6Addr;
use std::path::Path;

use anyhow::Result;
use migrate_core::dirty::{DirtyTracking, TrackerKind, TrackerPreference};
use migrate_core::memory::{GuestMemory, GuestRegion};

use crate::args::{CheckArgs, TransportChoice};
use crate::report;

/// How one item came out.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Ok,
    /// Works, but not at its best (or only for some uses).
    Warn,
    /// Does not work.
    Fail,
}

#[derive(serde::Serialize)]
struct Item {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    fix: Option<String>,
    /// Whether the asked transport needs this item.
    needed: bool,
}

fn item(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Item {
    Item {
        name,
        verdict,
        detail: detail.into(),
        fix: None,
        needed: false,
    }
}

impl Item {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        if self.verdict != Verdict::Ok {
            self.fix = Some(fix.into());
        }
        self
    }

    fn needed(mut self, needed: bool) -> Self {
        self.needed = needed;
        self
    }
}

fn read(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// `migrate-cli check`: print (and with `--json` write) every item; true
/// when everything the asked transport needs works.
pub fn check(a: &CheckArgs) -> Result<bool> {
    let rdma = matches!(a.transport, TransportChoice::Rdma);
    let mut items = vec![kernel()];
    items.extend(trackers());
    items.push(kvm());
    let (huge, free_huge_pages) = huge_pages();
    items.push(huge);
    if free_huge_pages > 0 {
        items.push(hugetlb_tracker());
    }
    items.push(memlock(a.memory, rdma));
    items.push(kernel_tls());
    items.extend(rdma_items(rdma));
    let ok = items
        .iter()
        .all(|i| !(i.needed && i.verdict == Verdict::Fail));
    for i in &items {
        let tag = match i.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        out!("{tag} {:<14} {}", i.name, i.detail);
        if let Some(f) = &i.fix {
            out!("     {:<14} fix: {f}", "");
        }
    }
    let transport = match a.transport {
        TransportChoice::Tcp => "tcp",
        TransportChoice::Rdma => "rdma",
        TransportChoice::Auto => "auto",
    };
    out!(
        "{transport}: {}",
        if ok {
            "this host can migrate"
        } else {
            "this host cannot migrate (see FAIL above)"
        }
    );
    if let Some(path) = &a.json {
        /// `check --json`: the verdict and every item.
        #[derive(serde::Serialize)]
        struct Findings<'a> {
            transport: &'a str,
            ok: bool,
            items: &'a [Item],
        }
        let v = serde_json::to_value(Findings {
            transport,
            ok,
            items: &items,
        })?;
        report::write_json(path, &v)?;
    }
    Ok(ok)
}

fn kernel() -> Item {
    let release = read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    let (major, minor) = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok())
        .fold((None, None), |acc, n| match acc {
            (None, _) => (Some(n), None),
            (Some(m), None) => (Some(m), Some(n)),
            done => done,
        });
    let modern = (major.unwrap_or(0), minor.unwrap_or(0)) >= (6, 7);
    item(
        "kernel",
        if modern { Verdict::Ok } else { Verdict::Warn },
        format!("Linux {release}"),
    )
    .fix("Linux 6.7 or later has userfaultfd async write-protect with PAGEMAP_SCAN, the fastest tracker")
}

/// Whether the kernel seals TLS records (kTLS), tried on a loopback
/// connection: where it can, `--kernel-tls auto` hands it the records.
fn kernel_tls() -> Item {
    match transport_tcp::kernel_tls_support() {
        Ok(()) => item(
            "kernel-tls",
            Verdict::Ok,
            "the kernel seals and opens TLS records (kTLS)",
        ),
        Err(e) => item(
            "kernel-tls",
            Verdict::Warn,
            format!("no kernel TLS ({e}): this program seals the TLS records itself"),
        )
        .fix("load the tls module (modprobe tls) for kernel TLS"),
    }
}

/// Start each kernel tracker on real memory, as a migration would.
fn trackers() -> Vec<Item> {
    let unprivileged = read("/proc/sys/vm/unprivileged_userfaultfd");
    let root = read("/proc/self/status")
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let mem = GuestRegion::anonymous(0, 2 << 20).and_then(|r| GuestMemory::new(vec![r]));
    let mut out = Vec::new();
    for (name, kind) in [
        ("uffd-async", TrackerKind::UffdAsync),
        ("uffd-sync", TrackerKind::UffdSync),
    ] {
        let verdict = match &mem {
            Ok(m) => DirtyTracking::new(m, TrackerPreference::Only(kind)).map(drop),
            Err(e) => {
                out.push(item(name, Verdict::Fail, format!("no test memory: {e}")));
                continue;
            }
        };
        out.push(match verdict {
            Ok(()) => item(name, Verdict::Ok, "started on 2 MiB of anonymous memory"),
            Err(e) => {
                let why = match (&unprivileged, root) {
                    (Some(v), false) if v == "0" => {
                        " (vm.unprivileged_userfaultfd is 0 and this is not root)"
                    }
                    _ => "",
                };
                item(
                    name,
                    if kind == TrackerKind::UffdAsync {
                        Verdict::Warn
                    } else {
                        Verdict::Fail
                    },
                    format!("{e}{why}"),
                )
                .fix("run as root, or `sysctl vm.unprivileged_userfaultfd=1`; async write-protect needs Linux 6.7")
            }
        });
    }
    // A migration can always fall back to the software bitmap, so only a
    // host without any kernel tracker is a failure, and not one that stops
    // a migration.
    out
}

fn kvm() -> Item {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => item(
            "kvm",
            Verdict::Ok,
            "/dev/kvm opens read-write (mini-vmm, KVM dirty log)",
        ),
        Err(e) => item("kvm", Verdict::Warn, format!("/dev/kvm: {e}")).fix(
            "load kvm_intel or kvm_amd and give this user the kvm group (only mini-vmm needs it)",
        ),
    }
}

/// The huge pages item, and how many are free.
fn huge_pages() -> (Item, u64) {
    let meminfo = read("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (total, free) = (field("HugePages_Total:"), field("HugePages_Free:"));
    let huge = item(
        "huge pages",
        if free > 0 { Verdict::Ok } else { Verdict::Warn },
        format!("{free} of {total} 2 MiB huge pages free (hugetlb-backed guests need them)"),
    )
    .fix("`sysctl vm.nr_hugepages=N` for N 2 MiB pages");
    (huge, free)
}

/// With a free huge page: the async tracker started on a hugetlb-backed
/// 2 MiB region, as a hugetlb guest's migration would start it (its
/// write-protect on huge pages is a kernel feature of its own).
fn hugetlb_tracker() -> Item {
    let name = "uffd-hugetlb";
    let mem = GuestRegion::hugetlb(0, 2 << 20, "migrate-cli-check")
        .and_then(|r| GuestMemory::new(vec![r]));
    let started = match mem {
        Ok(m) => DirtyTracking::new(&m, TrackerPreference::Only(TrackerKind::UffdAsync)).map(drop),
        Err(e) => {
            return item(name, Verdict::Warn, format!("no hugetlb memory: {e}"))
                .fix("`sysctl vm.nr_hugepages=N`; hugetlb guests need free huge pages");
        }
    };
    match started {
        Ok(()) => item(name, Verdict::Ok, "uffd-async started on a 2 MiB hugetlb page"),
        Err(e) => item(name, Verdict::Warn, e.to_string()).fix(
            "hugetlb write-protect in async mode needs Linux 6.7; else the software tracker is used",
        ),
    }
}

fn memlock(memory: Option<u64>, rdma: bool) -> Item {
    let limit = migrate_core::memory::lockable_bytes();
    let limit_text = limit.map_or("unlimited".to_string(), report::human);
    match (memory, limit) {
        (Some(need), Some(l)) if l < need => item(
            "memlock",
            Verdict::Fail,
            format!(
                "RLIMIT_MEMLOCK {limit_text} < {} of guest memory: RDMA cannot register it",
                report::human(need)
            ),
        )
        .fix("`ulimit -l unlimited`, or LimitMEMLOCK=infinity for a systemd unit")
        .needed(rdma),
        (Some(need), _) => item(
            "memlock",
            Verdict::Ok,
            format!(
                "RLIMIT_MEMLOCK {limit_text} covers {} of guest memory",
                report::human(need)
            ),
        ),
        (None, _) => item(
            "memlock",
            Verdict::Ok,
            format!("RLIMIT_MEMLOCK {limit_text} (give --memory SIZE to check it against a guest)"),
        ),
    }
}

/// RDMA devices, their ports and GIDs from sysfs, and the device and GID a
/// migration would choose, by opening it as a migration does.
fn rdma_items(needed: bool) -> Vec<Item> {
    let mut out = Vec::new();
    let names = transport_rdma::verbs::device_names();
    let rxe_loaded = Path::new("/sys/module/rdma_rxe").exists();
    let rxe_available = rxe_loaded
        || read("/proc/sys/kernel/osrelease")
            .and_then(|r| read(format!("/lib/modules/{r}/modules.dep")))
            .is_some_and(|dep| dep.contains("rdma_rxe.ko"));
    if names.is_empty() {
        let fix = if rxe_available {
            "no RDMA NIC: SoftRoCE can stand in: `modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0`"
        } else {
            "no RDMA NIC, and this kernel has no rdma_rxe module for SoftRoCE: use --transport tcp"
        };
        // Only a failure when RDMA is what was asked for.
        let verdict = if needed { Verdict::Fail } else { Verdict::Warn };
        out.push(
            item("rdma devices", verdict, "none")
                .fix(fix)
                .needed(needed),
        );
        return out;
    }
    out.push(item("rdma devices", Verdict::Ok, names.join(", ")));
    let mut any_active = false;
    for name in &names {
        let port = format!("/sys/class/infiniband/{name}/ports/1");
        let state = read(format!("{port}/state")).unwrap_or_else(|| "unknown".into());
        let link = read(format!("{port}/link_layer")).unwrap_or_else(|| "unknown".into());
        let active = state.contains("ACTIVE");
        any_active |= active;
        let mut gids = Vec::new();
        for i in 0..16 {
            let Some(g) = read(format!("{port}/gids/{i}")) else {
                break;
            };
            let Ok(ip) = g.parse::<Ipv6Addr>() else {
                continue;
            };
            if ip.is_unspecified() {
                continue;
            }
            let ty = read(format!("{port}/gid_attrs/types/{i}")).unwrap_or_default();
            let ndev = read(format!("{port}/gid_attrs/ndevs/{i}")).unwrap_or_default();
            let shown = ip
                .to_ipv4_mapped()
                .map_or(ip.to_string(), |v4| v4.to_string());
            gids.push(format!("{i}: {shown} {ty} on {ndev}"));
        }
        out.push(
            item(
                "rdma port",
                if active { Verdict::Ok } else { Verdict::Fail },
                format!(
                    "{name} port 1: {state}, {link}; GIDs [{}]",
                    gids.join("; ")
                ),
            )
            .fix(format!(
                "bring the port's network interface up (`ip link set DEV up`); `rdma link show {name}`"
            )),
        );
        let ndev = read(format!("{port}/gid_attrs/ndevs/0")).unwrap_or_default();
        out.push(item(
            "rdma marking",
            Verdict::Ok,
            marking_state(name, &ndev),
        ));
    }
    if !any_active {
        for i in out.iter_mut().filter(|i| i.name == "rdma port") {
            i.needed = needed;
        }
    }
    // What a migration would pick without --rdma-device/--gid-index (and
    // without a control connection's address to match).
    match transport_rdma::verbs::Device::open(None, None, None) {
        Ok(dev) => out.push(item(
            "rdma choice",
            Verdict::Ok,
            format!(
                "would use {} port {} GID index {} ({}, {}: {}), active MTU {} bytes; a real migration picks the device and GID that hold the address its control connection uses, RoCE v2 before v1",
                dev.name,
                dev.port,
                dev.gid_index,
                Ipv6Addr::from(dev.gid.raw),
                dev.gid_choice.row.kind.name(),
                dev.gid_choice.reason,
                dev.active_mtu()
            ),
        )),
        Err(e) => out.push(
            item("rdma choice", Verdict::Fail, format!("cannot open: {e}"))
                .fix("check permissions on /dev/infiniband/uverbs*")
                .needed(needed),
        ),
    }
    out
}

/// What the device and its network interface say about traffic classes
/// and flow control, where they say it: the driver's default traffic class
/// for every queue pair (mlx5: `tc/1/traffic_class`), `rdma_cm`'s default
/// RoCE TOS (configfs, when set up), and PFC from iproute2's `dcb` tool.
/// What a migration's own packets carry is `--dscp`/`--traffic-class`.
fn marking_state(name: &str, ndev: &str) -> String {
    let mut parts = Vec::new();
    match read(format!("/sys/class/infiniband/{name}/tc/1/traffic_class")) {
        Some(tc) if !tc.is_empty() => parts.push(format!("driver default traffic class: {tc}")),
        _ => parts.push("no driver default traffic class (every queue pair's own)".to_string()),
    }
    if let Some(tos) = read(format!(
        "/sys/kernel/config/rdma_cm/{name}/ports/1/default_roce_tos"
    )) {
        parts.push(format!("rdma_cm default RoCE TOS {tos}"));
    }
    let pfc = if ndev.is_empty() {
        "PFC: no network interface".to_string()
    } else {
        match std::process::Command::new("dcb")
            .args(["pfc", "show", "dev", ndev, "prio-pfc"])
            .output()
        {
            Ok(o) if o.status.success() => {
                format!("{ndev} PFC {}", String::from_utf8_lossy(&o.stdout).trim())
            }
            Ok(_) => format!("PFC: {ndev} has no DCB (no priority flow control)"),
            Err(_) => "PFC: not shown (iproute2's `dcb` is not installed)".to_string(),
        }
    };
    parts.push(pfc);
    parts.push("this migration's packets: --dscp / --traffic-class / --service-level".into());
    parts.join("; ")
}
