//! The verbs this transport uses, wrapped once over `sideway`: device and
//! GID choice, memory registration, one reliable-connected queue pair with
//! plain completion queues, RDMA WRITE chains with selective signaling.
//!
//! Plain CQs (`ibv_poll_cq`) on purpose: rdma-core 44's rxe provider returns
//! phantom completions from extended CQs.
//!
//! Every `unsafe` block of the transport is in this module, and the API it
//! offers is safe: memory is registered as a whole [`GuestMemory`] that the
//! registration keeps alive, and a WRITE names its local bytes as a region
//! and an offset of that registration, checked before the post. Remote
//! addresses and keys need no such care: a wrong one fails on the peer's
//! device as a completion error, never touches our memory.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use migrate_core::memory::GuestMemory;

use crate::gid::{self, GidChoice, GidKind, GidRow};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, GenericCompletionQueue, PollCompletionQueueError, WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};

/// Why a verbs call failed.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// No RDMA device (or not the one asked for).
    #[error("no RDMA device{}", .0.as_deref().map(|n| format!(" named {n}")).unwrap_or_default())]
    NoDevice(Option<String>),
    /// A verbs call failed.
    #[error("{op}: {detail}")]
    Call {
        /// The verb.
        op: &'static str,
        /// What it said.
        detail: String,
    },
    /// A WRITE whose local bytes are not inside the registered memory.
    #[error(
        "local range of {len} bytes at offset {offset:#x} of region {region} is not registered"
    )]
    OutOfRange {
        /// Region index.
        region: usize,
        /// Offset in the region.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// A work request completed with an error status.
    #[error("work request {wr_id} failed: {status}")]
    Completion {
        /// Its id.
        wr_id: u64,
        /// The status.
        status: String,
        /// Whether the status says the peer stopped answering (the
        /// transport's retries ran out, or the queue pair was flushed after
        /// it broke), rather than that the request was wrong.
        peer_lost: bool,
    },
}

impl VerbsError {
    /// Whether the peer stopped answering (a cut link, a dead or frozen
    /// host), which a new connection may mend, rather than a wrong request.
    pub fn peer_lost(&self) -> bool {
        matches!(
            self,
            VerbsError::Completion {
                peer_lost: true,
                ..
            }
        )
    }
}

fn call<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> VerbsError {
    move |e| VerbsError::Call {
        op,
        detail: e.to_string(),
    }
}

/// An open device, its protection domain and the GID to use.
pub struct Device {
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    /// Device name (e.g. `rxe0`).
    pub name: String,
    /// Port (1-based).
    pub port: u8,
    /// GID table index.
    pub gid_index: u32,
    /// The GID.
    pub gid: Gid,
    /// Its entry and why it was chosen.
    pub gid_choice: GidChoice,
    /// How its queue pairs mark their packets.
    pub marking: Marking,
    mtu: Mtu,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Device({} port {} gid[{}] {} {})",
            self.name,
            self.port,
            self.gid_index,
            self.gid,
            self.gid_choice.row.kind.name()
        )
    }
}

/// Names of the RDMA devices on this host (empty when there are none or
/// libibverbs is missing).
pub fn device_names() -> Vec<String> {
    DeviceList::new()
        .map(|l| l.iter().map(|d| d.name()).collect())
        .unwrap_or_default()
}

/// Every port's GID table of `ctx`, unused entries left out.
fn gid_rows(ctx: &DeviceContext) -> Vec<GidRow> {
    let ports = ctx.query_device().map_or(1, |d| d.phys_port_cnt().max(1));
    let mut rows = Vec::new();
    for port in 1..=ports {
        let Ok(attr) = ctx.query_port(port) else {
            continue;
        };
        let ethernet = attr.link_layer() == LinkLayer::Ethernet;
        for index in 0..attr.gid_tbl_len().max(0) as u32 {
            let Ok(g) = ctx.query_gid(port, index) else {
                continue;
            };
            let gid = Ipv6Addr::from(g);
            if gid.is_unspecified() {
                continue;
            }
            // ibv_query_gid_type: 1 is RoCE v2, 0 IB or RoCE v1 (by the
            // port's link layer).
            let kind = match ctx.query_gid_type(port, index) {
                Ok(1) => GidKind::RoceV2,
                _ if ethernet => GidKind::RoceV1,
                _ => GidKind::InfiniBand,
            };
            rows.push(GidRow {
                port,
                index,
                gid,
                kind,
            });
        }
    }
    rows
}

/// How a device's queue pairs mark their packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marking {
    /// The GRH traffic class: on RoCE v2 the IP header's TOS byte (DSCP in
    /// its six high bits).
    pub traffic_class: u8,
    /// The service level (4 bits; on RoCE the NIC maps it to a priority).
    pub service_level: u8,
}

impl Device {
    /// The port's active MTU, bytes (what one RoCE packet carries).
    pub fn active_mtu(&self) -> u32 {
        match self.mtu {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// Open a device and pick a GID (see [`crate::gid`]).
    ///
    /// The device is `name` if given. Otherwise, on RoCE, it is the device
    /// whose GID tables hold `local_ip` (the address of the interface that
    /// carries the control connection), as `rdma_cm` binds: on a host with a
    /// management NIC and a fabric NIC the pages go where the control
    /// connection goes. Without such a device (or without `local_ip`), the
    /// first device, with a warning when `local_ip` was given.
    ///
    /// The GID (and with it the port) is `gid_index` if given, else the
    /// RoCE v2 entry of `local_ip` on any port, else the first IPv4-mapped
    /// RoCE v2 one: [`crate::gid::choose`].
    ///
    /// # Errors
    /// [`VerbsError::NoDevice`], a device without any GID (or without
    /// `gid_index`), or a failing verb.
    pub fn open(
        name: Option<&str>,
        gid_index: Option<u32>,
        local_ip: Option<IpAddr>,
    ) -> Result<Device, VerbsError> {
        let list = DeviceList::new().map_err(|_| VerbsError::NoDevice(name.map(String::from)))?;
        let want = local_ip.map(|ip| match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        });
        // (name, context, GID table) of the device holding `want`, else of
        // the first one, in the system's order.
        let mut chosen = None;
        let mut first = None;
        for dev in list.iter().filter(|d| name.is_none_or(|n| d.name() == n)) {
            let Ok(ctx) = dev.open() else { continue };
            let rows = gid_rows(&ctx);
            if want.is_some_and(|w| rows.iter().any(|r| r.gid == w)) {
                chosen = Some((dev.name(), ctx, rows));
                break;
            }
            if first.is_none() {
                first = Some((dev.name(), ctx, rows));
            }
        }
        let (dev_name, ctx, rows) = match chosen {
            Some(c) => c,
            None => {
                let f = first.ok_or_else(|| VerbsError::NoDevice(name.map(String::from)))?;
                if let (None, Some(ip)) = (name, local_ip) {
                    tracing::warn!(
                        device = %f.0,
                        address = %ip,
                        "no RDMA device has a GID for the control connection's address: using the first device, whose RoCE traffic may take another path"
                    );
                }
                f
            }
        };
        let choice = gid::choose(&rows, want, gid_index).ok_or_else(|| VerbsError::Call {
            op: "choose a GID",
            detail: match gid_index {
                Some(i) => format!("{dev_name} has no GID at index {i} on any port"),
                None => format!("{dev_name} has no GID on any port"),
            },
        })?;
        let port = choice.row.port;
        let port_attr = ctx.query_port(port).map_err(call("ibv_query_port"))?;
        let gid = ctx
            .query_gid(port, choice.row.index)
            .map_err(call("ibv_query_gid"))?;
        let pd = ctx.alloc_pd().map_err(call("ibv_alloc_pd"))?;
        tracing::debug!(
            device = %dev_name,
            port,
            gid_index = choice.row.index,
            gid_type = choice.row.kind.name(),
            reason = choice.reason,
            "GID chosen"
        );
        Ok(Device {
            mtu: port_attr.active_mtu(),
            ctx,
            pd,
            name: dev_name,
            port,
            gid_index: choice.row.index,
            gid,
            gid_choice: choice,
            marking: Marking::default(),
        })
    }

    /// The same device with its queue pairs marked `marking` (those made
    /// from now on).
    pub fn marked(mut self, marking: Marking) -> Self {
        self.marking = marking;
        self
    }

    /// Register every region of `mem`; `remote_write` lets a peer WRITE
    /// them. The registration keeps `mem` alive.
    ///
    /// # Errors
    /// A failing `ibv_reg_mr` (ENOMEM when RLIMIT_MEMLOCK is too small),
    /// naming the region.
    pub fn register(
        &self,
        mem: &Arc<GuestMemory>,
        remote_write: bool,
    ) -> Result<RegisteredMemory, VerbsError> {
        self.register_for(
            mem,
            if remote_write {
                Remote::Write
            } else {
                Remote::None
            },
        )
    }

    /// As [`register`](Self::register), with the remote access `remote`.
    ///
    /// # Errors
    /// As [`register`](Self::register).
    pub fn register_for(
        &self,
        mem: &Arc<GuestMemory>,
        remote: Remote,
    ) -> Result<RegisteredMemory, VerbsError> {
        let access = match remote {
            Remote::None => AccessFlags::LocalWrite,
            Remote::Write => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
            Remote::Read => AccessFlags::LocalWrite | AccessFlags::RemoteRead,
        };
        let mrs = mem
            .regions()
            .iter()
            .map(|r| {
                // SAFETY: the region's mapping lives as long as `mem`, which
                // the returned registration holds: it outlives the MR.
                unsafe { self.pd.reg_mr(r.as_ptr() as usize, r.len(), access) }.map_err(|e| {
                    VerbsError::Call {
                        op: "ibv_reg_mr",
                        detail: format!(
                            "cannot register {} bytes of guest memory at GPA {:#x}: {e}",
                            r.len(),
                            r.gpa()
                        ),
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(RegisteredMemory {
            mrs,
            mem: Arc::clone(mem),
        })
    }

    /// A reliable-connected queue pair with its own send and receive CQs,
    /// letting its peer do `remote` and nothing more (a source's data queue
    /// pairs only send, a destination's take WRITEs, a post-copy responder
    /// takes READs), starting at a random packet sequence number.
    ///
    /// # Errors
    /// A failing verb.
    pub fn queue_pair(
        &self,
        max_send_wr: u32,
        max_recv_wr: u32,
        remote: Remote,
    ) -> Result<QueuePair, VerbsError> {
        let send_cq = self
            .ctx
            .create_cq_builder()
            .setup_cqe(max_send_wr + 1)
            .build()
            .map_err(call("ibv_create_cq"))?;
        let recv_cq = self
            .ctx
            .create_cq_builder()
            .setup_cqe(max_recv_wr + 1)
            .build()
            .map_err(call("ibv_create_cq"))?;
        let qp = self
            .pd
            .create_qp_builder()
            .setup_max_send_wr(max_send_wr)
            .setup_max_recv_wr(max_recv_wr)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&send_cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&recv_cq)))
            .build()
            .map_err(call("ibv_create_qp"))?;
        // A random first PSN (24 bits): an off-path peer cannot guess the
        // sequence to inject packets into the connection.
        let psn = random_u32().map_err(|e| VerbsError::Call {
            op: "read /dev/urandom",
            detail: e.to_string(),
        })? & 0xff_ffff;
        let mut rc = QueuePair {
            qp,
            send_cq,
            recv_cq,
            port: self.port,
            gid_index: self.gid_index,
            marking: self.marking,
            mtu: self.mtu,
            local: Endpoint {
                qpn: 0,
                psn,
                gid: Ipv6Addr::from(self.gid).octets(),
            },
        };
        rc.local.qpn = rc.qp.qp_number();
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            // Both the queue pair and the registration must allow a remote
            // operation: each queue pair allows only its role's.
            .setup_access_flags(match remote {
                Remote::None => AccessFlags::LocalWrite,
                Remote::Write => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
                Remote::Read => AccessFlags::LocalWrite | AccessFlags::RemoteRead,
            });
        rc.qp.modify(&attr).map_err(call("ibv_modify_qp(INIT)"))?;
        Ok(rc)
    }
}

/// Four random bytes from the kernel.
fn random_u32() -> std::io::Result<u32> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u32::from_ne_bytes(b))
}

/// What a peer may do to registered memory, or through a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// Nothing: the device reads it for our WRITEs.
    None,
    /// RDMA WRITE into it (a destination's guest memory).
    Write,
    /// RDMA READ from it (a source's guest memory, for post-copy).
    Read,
}

/// What a peer needs to connect to a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// GID (16 bytes).
    pub gid: [u8; 16],
}

/// Guest memory registered with a device: one MR per region, and the
/// memory itself, kept mapped as long as the MRs exist. Dropping it
/// deregisters (the rkeys stop working).
pub struct RegisteredMemory {
    // Declared first: the MRs are deregistered before `mem` may unmap.
    mrs: Vec<Arc<MemoryRegion>>,
    mem: Arc<GuestMemory>,
}

impl RegisteredMemory {
    /// The registered memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// What a peer needs to WRITE into region `region`: its address, key
    /// and length.
    ///
    /// # Panics
    /// When `region` is not a region of the memory.
    pub fn remote(&self, region: usize) -> migrate_core::protocol::RemoteRegion {
        let r = &self.mem.regions()[region];
        migrate_core::protocol::RemoteRegion {
            addr: r.as_ptr() as u64,
            rkey: self.mrs[region].rkey(),
            len: r.len() as u64,
        }
    }

    /// The local key and address of `len` bytes at `offset` of `region`,
    /// if they are inside it.
    fn local(&self, region: usize, offset: u64, len: u32) -> Result<(u32, u64), VerbsError> {
        let r = self.mem.regions().get(region);
        match r {
            Some(r)
                if offset
                    .checked_add(len as u64)
                    .is_some_and(|e| e <= r.len() as u64) =>
            {
                Ok((self.mrs[region].lkey(), r.as_ptr() as u64 + offset))
            }
            _ => Err(VerbsError::OutOfRange {
                region,
                offset,
                len,
            }),
        }
    }
}

/// One RDMA WRITE: `len` bytes at `offset` of local region `region` (of a
/// [`RegisteredMemory`]) to `remote_addr` in the peer's region `rkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRequest {
    /// Local region index.
    pub region: usize,
    /// Offset in the local region.
    pub offset: u64,
    /// Length.
    pub len: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
}

/// A reliable-connected queue pair with its send and receive CQs.
pub struct QueuePair {
    qp: BasicQueuePair,
    send_cq: Arc<BasicCompletionQueue>,
    recv_cq: Arc<BasicCompletionQueue>,
    port: u8,
    gid_index: u32,
    marking: Marking,
    mtu: Mtu,
    /// This end.
    pub local: Endpoint,
}

// SAFETY: the queue pair and CQs are used by one thread at a time (`&mut`
// for posting); libibverbs objects may move between threads.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// Move to ready-to-send, connected to `remote`.
    ///
    /// # Errors
    /// A failing `ibv_modify_qp`.
    pub fn connect(&mut self, remote: &Endpoint) -> Result<(), VerbsError> {
        self.connect_with_reads(remote, 0)
    }

    /// As [`connect`](Self::connect), with `reads` RDMA READs in flight
    /// allowed each way (one is enough for a post-copy fault handler; every
    /// device supports it).
    ///
    /// # Errors
    /// A failing `ibv_modify_qp`.
    pub fn connect_with_reads(&mut self, remote: &Endpoint, reads: u8) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(reads)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(1)
            .setup_port(self.port)
            .setup_service_level(self.marking.service_level)
            .setup_grh(
                &Gid::from(Ipv6Addr::from(remote.gid)),
                0,
                self.gid_index as u8,
                64,
                self.marking.traffic_class,
            );
        attr.setup_address_vector(&ah);
        self.qp.modify(&attr).map_err(call("ibv_modify_qp(RTR)"))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.local.psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(reads);
        self.qp.modify(&attr).map_err(call("ibv_modify_qp(RTS)"))
    }

    /// Post WRITEs from `local` as one chain; only the last is signaled
    /// when `signal`. The `wr_id` of the signaled one is `wr_id`. Reap the
    /// completions before dropping `local`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfRange`] for a WRITE outside `local` (nothing is
    /// posted then); a failing `ibv_post_send` (e.g. the send queue is full).
    pub fn post_writes(
        &mut self,
        local: &RegisteredMemory,
        writes: &[WriteRequest],
        signal: bool,
        wr_id: u64,
    ) -> Result<(), VerbsError> {
        self.post(local, &[writes], signal, wr_id)
    }

    /// Post several chains of WRITEs from `local` in one `ibv_post_send`
    /// (one doorbell: on rxe, one entry into the kernel's requester for all
    /// of them); the last WRITE of each chain is signaled, chain `i` with
    /// `wr_id` `first_wr_id + i`. Reap the completions before dropping
    /// `local`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfRange`] for a WRITE outside `local` (nothing is
    /// posted then); a failing `ibv_post_send` (e.g. the send queue is full).
    pub fn post_write_chains(
        &mut self,
        local: &RegisteredMemory,
        chains: &[&[WriteRequest]],
        first_wr_id: u64,
    ) -> Result<(), VerbsError> {
        self.post(local, chains, true, first_wr_id)
    }

    fn post(
        &mut self,
        local: &RegisteredMemory,
        chains: &[&[WriteRequest]],
        signal: bool,
        first_wr_id: u64,
    ) -> Result<(), VerbsError> {
        let sges = chains
            .iter()
            .flat_map(|c| c.iter())
            .map(|w| local.local(w.region, w.offset, w.len))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sges = sges.into_iter();
        let mut guard = self.qp.start_post_send();
        for (c, writes) in chains.iter().enumerate() {
            let wr_id = first_wr_id.wrapping_add(c as u64);
            for (i, (w, (lkey, addr))) in writes.iter().zip(sges.by_ref()).enumerate() {
                let last = i + 1 == writes.len();
                let flags = if last && signal {
                    WorkRequestFlags::Signaled
                } else {
                    WorkRequestFlags::none()
                };
                let h = guard
                    .construct_wr(wr_id, flags)
                    .setup_write(w.rkey, w.remote_addr);
                // SAFETY: the local range lies in the registered region `lkey`
                // (checked above), whose memory the registration keeps mapped.
                unsafe { h.setup_sge(lkey, addr, w.len) };
            }
        }
        guard.post().map_err(call("ibv_post_send"))
    }

    /// Post one signaled RDMA READ of `len` bytes at `remote_addr` (key
    /// `rkey`) into `offset` of region `region` of `local`. Reap its
    /// completion before dropping `local`.
    ///
    /// # Errors
    /// [`VerbsError::OutOfRange`] for a local range outside `local`; a
    /// failing `ibv_post_send`.
    pub fn post_read(
        &mut self,
        local: &RegisteredMemory,
        (region, offset, len): (usize, u64, u32),
        (remote_addr, rkey): (u64, u32),
        wr_id: u64,
    ) -> Result<(), VerbsError> {
        let (lkey, addr) = local.local(region, offset, len)?;
        let mut guard = self.qp.start_post_send();
        let h = guard
            .construct_wr(wr_id, WorkRequestFlags::Signaled)
            .setup_read(rkey, remote_addr);
        // SAFETY: the local range lies in the registered region `lkey`
        // (checked above), whose memory the registration keeps mapped; the
        // device writes the READ's bytes there.
        unsafe { h.setup_sge(lkey, addr, len) };
        guard.post().map_err(call("ibv_post_send"))
    }

    /// Post a zero-length, signaled WRITE_WITH_IMM carrying `imm`: after
    /// every WRITE posted before it on this QP has landed, the peer gets a
    /// receive completion with `imm` (the round fence).
    ///
    /// # Errors
    /// A failing `ibv_post_send`.
    pub fn post_fence(
        &mut self,
        rkey: u32,
        remote_addr: u64,
        imm: u32,
        wr_id: u64,
    ) -> Result<(), VerbsError> {
        let mut guard = self.qp.start_post_send();
        let _ = guard
            .construct_wr(wr_id, WorkRequestFlags::Signaled)
            .setup_write_imm(rkey, remote_addr, imm);
        guard.post().map_err(call("ibv_post_send"))
    }

    /// Post `n` zero-length receives (for WRITE_WITH_IMM fences).
    ///
    /// # Errors
    /// A failing `ibv_post_recv`.
    pub fn post_receives(&mut self, n: u32) -> Result<(), VerbsError> {
        let mut guard = self.qp.start_post_recv();
        for i in 0..n {
            let _ = guard.construct_wr(i as u64);
        }
        guard.post().map_err(call("ibv_post_recv"))
    }

    /// Reap send completions; returns their wr_ids.
    ///
    /// # Errors
    /// [`VerbsError::Completion`] for a failed work request (e.g. the peer
    /// is gone: retry exceeded), or a failing poll.
    pub fn poll_send(&self, out: &mut Vec<u64>) -> Result<(), VerbsError> {
        poll(&self.send_cq, |wr_id, _| out.push(wr_id))
    }

    /// Reap receive completions; returns their immediate data.
    ///
    /// # Errors
    /// As [`poll_send`](Self::poll_send).
    pub fn poll_recv(&self, out: &mut Vec<u32>) -> Result<(), VerbsError> {
        poll(&self.recv_cq, |_, imm| out.push(imm))
    }
}

fn poll(cq: &BasicCompletionQueue, mut f: impl FnMut(u64, u32)) -> Result<(), VerbsError> {
    match cq.start_poll() {
        Ok(poller) => {
            for wc in poller {
                if wc.status() != WorkCompletionStatus::Success as u32 {
                    let status = WorkCompletionStatus::from(wc.status());
                    return Err(VerbsError::Completion {
                        wr_id: wc.wr_id(),
                        status: format!("{status:?}"),
                        peer_lost: matches!(
                            status,
                            WorkCompletionStatus::RetryCounterExceededError
                                | WorkCompletionStatus::ResponderNotReadyRetryCounterExceededError
                                | WorkCompletionStatus::WorkRequestFlushedError
                        ),
                    });
                }
                f(wc.wr_id(), wc.imm_data());
            }
            Ok(())
        }
        Err(PollCompletionQueueError::CompletionQueueEmpty) => Ok(()),
        Err(e) => Err(call("ibv_poll_cq")(e)),
    }
}
