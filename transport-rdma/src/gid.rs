//! Which GID (and so which port and wire format) a queue pair uses.
//!
//! A RoCE NIC lists each of its addresses twice per port: once as a RoCE v1
//! GID (Ethernet frames, not routable, no DSCP) and once as a RoCE v2 GID
//! (UDP/IP, routable, the traffic class in the IP header), usually v1
//! first. Taking the first GID that matches the control connection's
//! address would pick v1 where `rdma_cm` picks v2 — and a v1 queue pair
//! cannot talk to a v2 one, and carries no DSCP for the fabric to class.
//! So, like `rdma_cm`:
//!
//! 1. the GID equal to the control connection's local address, RoCE v2
//!    before v1 (then InfiniBand), on any port, the lowest port first;
//! 2. without one, the first IPv4-mapped RoCE v2 GID, then any IPv4-mapped
//!    one, then any non-link-local v2 one, then the first GID at all;
//! 3. an index the operator gave (`--gid-index`) on the lowest port that
//!    has a GID there, whatever its type.
//!
//! The choice says why, for `check` and the logs.

use std::net::Ipv6Addr;

/// A GID's wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    /// RoCE v2: UDP/IP (port 4791); the traffic class is the IP header's
    /// TOS byte.
    RoceV2,
    /// RoCE v1: Ethernet frames (ethertype 0x8915), not routable.
    RoceV1,
    /// InfiniBand.
    InfiniBand,
}

impl GidKind {
    /// The name tools print (`show_gids`, sysfs `gid_attrs/types`).
    pub fn name(self) -> &'static str {
        match self {
            GidKind::RoceV2 => "RoCE v2",
            GidKind::RoceV1 => "RoCE v1",
            GidKind::InfiniBand => "IB",
        }
    }

    fn rank(self) -> u8 {
        match self {
            GidKind::RoceV2 => 0,
            GidKind::RoceV1 => 1,
            GidKind::InfiniBand => 2,
        }
    }
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidRow {
    /// Port, 1-based.
    pub port: u8,
    /// Index in the port's table.
    pub index: u32,
    /// The GID (an IPv4-mapped or IPv6 address on RoCE).
    pub gid: Ipv6Addr,
    /// Its type.
    pub kind: GidKind,
}

/// The GID chosen, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidChoice {
    /// The entry.
    pub row: GidRow,
    /// Why it, in words for an operator.
    pub reason: &'static str,
}

/// The GID for a queue pair among `rows` (every port's table, unused
/// entries included or not), given the control connection's local address
/// (`want`, IPv4 as IPv4-mapped) and the operator's `--gid-index`; `None`
/// when the table has no usable entry.
pub fn choose(rows: &[GidRow], want: Option<Ipv6Addr>, index: Option<u32>) -> Option<GidChoice> {
    let used = || rows.iter().filter(|r| !r.gid.is_unspecified());
    // Lowest port first, then the better type, then the lowest index.
    let best = |it: &mut dyn Iterator<Item = &GidRow>| {
        it.min_by_key(|r| (r.port, r.kind.rank(), r.index)).copied()
    };
    if let Some(i) = index {
        return used()
            .filter(|r| r.index == i)
            .min_by_key(|r| r.port)
            .map(|&row| GidChoice {
                row,
                reason: "the index given (--gid-index)",
            });
    }
    if let Some(w) = want {
        if let Some(row) = best(&mut used().filter(|r| r.gid == w)) {
            return Some(GidChoice {
                row,
                reason: match row.kind {
                    GidKind::RoceV2 => "the control connection's address, RoCE v2 (as rdma_cm)",
                    _ => "the control connection's address (no RoCE v2 entry has it)",
                },
            });
        }
    }
    let first = |pred: &dyn Fn(&GidRow) -> bool| used().find(|r| pred(r)).copied();
    let v2 = |r: &GidRow| r.kind == GidKind::RoceV2;
    let mapped = |r: &GidRow| r.gid.to_ipv4_mapped().is_some();
    let link_local = |r: &GidRow| (r.gid.segments()[0] & 0xffc0) == 0xfe80;
    let (row, reason) = if let Some(r) = first(&|r| v2(r) && mapped(r)) {
        (r, "the first IPv4-mapped RoCE v2 GID")
    } else if let Some(r) = first(&|r| mapped(r)) {
        (r, "the first IPv4-mapped GID (no RoCE v2 one)")
    } else if let Some(r) = first(&|r| v2(r) && !link_local(r)) {
        (r, "the first RoCE v2 GID that is not link-local")
    } else {
        (
            used().next().copied()?,
            "the first GID (none is RoCE v2 nor IPv4-mapped)",
        )
    };
    Some(GidChoice {
        row,
        reason: if want.is_some() {
            match reason {
                "the first IPv4-mapped RoCE v2 GID" => {
                    "no GID has the control connection's address: the first IPv4-mapped RoCE v2 GID"
                }
                other => other,
            }
        } else {
            reason
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use GidKind::*;

    fn row(port: u8, index: u32, gid: &str, kind: GidKind) -> GidRow {
        GidRow {
            port,
            index,
            gid: gid.parse().unwrap(),
            kind,
        }
    }

    fn v4(a: &str) -> Option<Ipv6Addr> {
        Some(a.parse::<std::net::Ipv4Addr>().unwrap().to_ipv6_mapped())
    }

    /// A ConnectX-style port: each address as v1, then as v2 (what
    /// `show_gids` prints for mlx5 with an IPv4 and an IPv6 address).
    fn connectx() -> Vec<GidRow> {
        vec![
            row(1, 0, "fe80::1e34:daff:fe5a:1b2c", RoceV1),
            row(1, 1, "fe80::1e34:daff:fe5a:1b2c", RoceV2),
            row(1, 2, "::ffff:192.168.7.10", RoceV1),
            row(1, 3, "::ffff:192.168.7.10", RoceV2),
            row(1, 4, "fd00:7::10", RoceV1),
            row(1, 5, "fd00:7::10", RoceV2),
            row(1, 6, "::", RoceV1),
        ]
    }

    #[test]
    fn the_v2_entry_of_the_control_address_beats_the_v1_before_it() {
        let c = choose(&connectx(), v4("192.168.7.10"), None).unwrap();
        assert_eq!((c.row.port, c.row.index, c.row.kind), (1, 3, RoceV2));
        assert!(c.reason.contains("RoCE v2"), "{}", c.reason);
    }

    #[test]
    fn ipv6_control_address_takes_its_v2_entry() {
        let c = choose(&connectx(), Some("fd00:7::10".parse().unwrap()), None).unwrap();
        assert_eq!((c.row.index, c.row.kind), (5, RoceV2));
    }

    #[test]
    fn only_v1_has_it_then_v1_and_says_so() {
        let rows: Vec<_> = connectx().into_iter().filter(|r| r.index != 3).collect();
        let c = choose(&rows, v4("192.168.7.10"), None).unwrap();
        assert_eq!((c.row.index, c.row.kind), (2, RoceV1));
        assert!(c.reason.contains("no RoCE v2"), "{}", c.reason);
    }

    #[test]
    fn the_address_on_the_second_port() {
        let mut rows = connectx();
        rows.extend([
            row(2, 0, "fe80::1e34:daff:fe5a:1b2d", RoceV1),
            row(2, 1, "fe80::1e34:daff:fe5a:1b2d", RoceV2),
            row(2, 2, "::ffff:10.0.0.5", RoceV1),
            row(2, 3, "::ffff:10.0.0.5", RoceV2),
        ]);
        let c = choose(&rows, v4("10.0.0.5"), None).unwrap();
        assert_eq!((c.row.port, c.row.index, c.row.kind), (2, 3, RoceV2));
    }

    #[test]
    fn without_a_match_the_first_mapped_v2() {
        let c = choose(&connectx(), v4("172.16.0.1"), None).unwrap();
        assert_eq!((c.row.index, c.row.kind), (3, RoceV2));
        assert!(c.reason.starts_with("no GID has"), "{}", c.reason);
        let c = choose(&connectx(), None, None).unwrap();
        assert_eq!(c.row.index, 3);
        assert_eq!(c.reason, "the first IPv4-mapped RoCE v2 GID");
    }

    #[test]
    fn ipv6_only_ports_skip_link_local() {
        let rows: Vec<_> = connectx()
            .into_iter()
            .filter(|r| r.gid.to_ipv4_mapped().is_none())
            .collect();
        let c = choose(&rows, None, None).unwrap();
        assert_eq!((c.row.index, c.row.kind), (5, RoceV2));
    }

    #[test]
    fn rxe_has_only_v2() {
        // What rxe over lo shows in the SoftRoCE VM.
        let rows = vec![
            row(1, 0, "fe80::", RoceV2),
            row(1, 1, "::ffff:127.0.0.1", RoceV2),
            row(1, 2, "::1", RoceV2),
        ];
        assert_eq!(choose(&rows, v4("127.0.0.1"), None).unwrap().row.index, 1);
        assert_eq!(
            choose(&rows, Some("::1".parse().unwrap()), None)
                .unwrap()
                .row
                .index,
            2
        );
    }

    #[test]
    fn an_operator_index_is_taken_as_given() {
        let c = choose(&connectx(), v4("192.168.7.10"), Some(2)).unwrap();
        assert_eq!((c.row.index, c.row.kind), (2, RoceV1));
        assert_eq!(c.reason, "the index given (--gid-index)");
        assert_eq!(choose(&connectx(), None, Some(6)), None, "an empty entry");
        assert_eq!(choose(&connectx(), None, Some(60)), None);
    }

    #[test]
    fn infiniband_port() {
        let rows = vec![row(1, 0, "fe80::248a:703:49:a2b0", InfiniBand)];
        let c = choose(&rows, v4("192.168.7.10"), None).unwrap();
        assert_eq!((c.row.index, c.row.kind), (0, InfiniBand));
        assert_eq!(choose(&[], None, None), None);
        assert_eq!(choose(&[row(1, 0, "::", RoceV2)], None, None), None);
    }
}
