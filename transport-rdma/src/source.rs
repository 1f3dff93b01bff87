//! Source side: guest memory registered once, pages posted as RDMA WRITE
//! chains into the destination's registered memory, a fence per round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use migrate_core::dirty::PageRun;
use migrate_core::memory::GuestMemory;
use migrate_core::protocol::{
    FEATURE_RDMA, Features, FrameKind, Message, PageRange, ProtocolError, QpEndpoint, RemoteRegion,
};
use migrate_core::transport::{
    ControlChannel, DestinationPages, PageSender, RoundContext, RoundSent, SourceTransport,
    TransportError,
};
use transport_tcp::{KillSwitch, TcpConfig, TcpSource};

use crate::RdmaConfig;
use crate::verbs::{Device, QueuePair, RegisteredMemory, Remote, WriteRequest};
use crate::{check_memlock, endpoint_to_wire, rdma_err, wire_to_endpoint};

/// WRITEs per chain, the last one signaled.
const CHAIN: usize = 16;
/// Bytes per chain at most (one WRITE may be larger alone): a queue pair
/// completes something at least every 2 MiB, so on a link as slow as a
/// low-priority class's share (5 Mbit/s: 3.4 s a chain) the I/O timeout,
/// which counts the silence between completions, does not take a slow
/// peer for a dead one, and the live figures, which count completed
/// chains, move in steps of at most this. (A chain of 16 WRITEs of 1 MiB
/// took 27 s there, and failed the migration.) 31 chains in flight per
/// queue pair still hold 62 MiB.
const CHAIN_BYTES: u64 = 2 << 20;
/// Send queue depth per queue pair.
const SQ_DEPTH: u32 = 512;
/// Chains in flight per queue pair (bounded by the send queue).
const MAX_CHAINS: usize = (SQ_DEPTH as usize / CHAIN) - 1;
const FENCE_WR: u64 = u64::MAX;
/// Chains posted at once, one `ibv_post_send` for all (each still completes
/// on its own), when no bandwidth cap slices them: up to 32 MiB a post.
/// rxe runs the requester inside `ibv_post_send`; in the SoftRoCE VM,
/// 256 MiB of random pages over 2 queue pairs went from 438–479 Mbit/s
/// with one chain a post to 789–840 with 16 (8: 780–819), against
/// 790–850 for the best `ib_write_bw` setting in the same boot, which is
/// the same pattern: `ib_write_bw -l 16` (16 WRITEs a post) against
/// `-l 1`, 820 against 400 Mbit/s. The source's system time halved.
const POST_CHAINS: usize = 16;
const _: () = assert!(POST_CHAINS <= MAX_CHAINS);
/// How long a queue pair's poller spins before it yields the CPU.
const SPIN: Duration = Duration::from_micros(20);

struct Local {
    dev: Device,
    /// The guest memory, once bound.
    registered: Option<Arc<RegisteredMemory>>,
}

/// A source connected to a destination: control over TCP, pages over RDMA
/// WRITE when both sides have a device (else, in auto mode, over TCP).
pub struct RdmaSource {
    tcp: TcpSource,
    cfg: RdmaConfig,
    local: Option<Local>,
    fallback: Option<String>,
    rdma_active: bool,
    /// The queue pair the destination reads through in post-copy.
    read_qp: Option<QueuePair>,
}

impl std::fmt::Debug for RdmaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaSource")
            .field("device", &self.local.as_ref().map(|l| &l.dev))
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl RdmaSource {
    /// Connect the control connection to `addr` and open the RDMA device
    /// that reaches it; the guest memory is registered when it is bound
    /// ([`SourceTransport::bind`], before dirty tracking starts:
    /// registration pins, i.e. writes to, every page).
    ///
    /// # Errors
    /// [`TransportError::Connect`]; [`TransportError::Unavailable`] when
    /// `cfg.require` and there is no device.
    pub fn connect(addr: &str, cfg: RdmaConfig) -> Result<Self, TransportError> {
        // On fallback the same number of streams goes over TCP: the count is
        // announced before the data plane is chosen.
        let tcp_cfg = TcpConfig {
            data_streams: cfg.queue_pairs.max(1),
            ..cfg.tcp.clone()
        };
        let tcp = TcpSource::connect(addr, tcp_cfg)?;
        let local_ip = tcp.local_addr()?.ip();
        let (local, fallback) =
            match Device::open(cfg.device.as_deref(), cfg.gid_index, Some(local_ip)) {
                Ok(dev) => (
                    Some(Local {
                        dev: dev.marked(cfg.marking),
                        registered: None,
                    }),
                    None,
                ),
                Err(e) if !cfg.require => {
                    (None, Some(format!("no RDMA device on the source: {e}")))
                }
                Err(e) => {
                    return Err(TransportError::Unavailable {
                        reason: e.to_string(),
                    });
                }
            };
        Ok(Self {
            tcp,
            cfg,
            local,
            fallback,
            rdma_active: false,
            read_qp: None,
        })
    }

    /// Why pages went over TCP instead of RDMA, if they did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }
}

impl SourceTransport for RdmaSource {
    fn name(&self) -> &'static str {
        if self.rdma_active || (self.local.is_some() && self.fallback.is_none()) {
            "rdma"
        } else {
            "tcp"
        }
    }

    fn pins_memory(&self) -> bool {
        // Pages go by RDMA WRITE from the registered memory.
        self.name() == "rdma"
    }

    fn data_streams(&self) -> u16 {
        self.cfg.queue_pairs.max(1)
    }

    fn features(&self) -> Features {
        self.tcp.features().with(if self.local.is_some() {
            FEATURE_RDMA
        } else {
            0
        })
    }

    fn control(&mut self) -> &mut dyn ControlChannel {
        self.tcp.control()
    }

    /// Registers all of `mem` for reading by the device (and, with
    /// `postcopy_reads`, for the destination's remote reads), after
    /// checking RLIMIT_MEMLOCK allows it (the error says how much is
    /// needed and how to raise it).
    fn bind(&mut self, mem: &Arc<GuestMemory>) -> Result<(), TransportError> {
        self.tcp.bind(mem)?;
        let Some(local) = &mut self.local else {
            return Ok(());
        };
        check_memlock(mem.total_bytes())?;
        let started = Instant::now();
        let remote = if self.cfg.postcopy_reads {
            Remote::Read
        } else {
            Remote::None
        };
        let registered = local.dev.register_for(mem, remote).map_err(rdma_err)?;
        tracing::info!(
            device = %local.dev.name,
            gid_index = local.dev.gid_index,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "source memory registered"
        );
        local.registered = Some(Arc::new(registered));
        Ok(())
    }

    fn open_data(
        &mut self,
        session: u64,
        features: Features,
    ) -> Result<Box<dyn PageSender>, TransportError> {
        let Some(local) = &self.local else {
            return self.tcp.open_data(session, features);
        };
        let registered = local
            .registered
            .clone()
            .ok_or_else(|| TransportError::Unavailable {
                reason: "no guest memory bound to the transport (SourceMigration::bind)".into(),
            })?;
        if !features.has(FEATURE_RDMA) {
            let reason = "the destination has no RDMA device".to_string();
            if self.cfg.require {
                return Err(TransportError::Unavailable { reason });
            }
            tracing::warn!(%reason, "pages go over TCP");
            self.fallback = Some(reason);
            return self.tcp.open_data(session, features);
        }
        let streams = self.data_streams() as usize;
        let mut qps = (0..streams)
            .map(|_| local.dev.queue_pair(SQ_DEPTH, 1, Remote::None))
            .collect::<Result<Vec<QueuePair>, _>>()
            .map_err(rdma_err)?;
        let ctl = self.tcp.control();
        ctl.send(&Message::RdmaConnect {
            qps: qps.iter().map(|q| endpoint_to_wire(&q.local)).collect(),
        })?;
        let (remote_qps, regions) = match ctl.recv()? {
            Message::RdmaAccept { qps, regions } => (qps, regions),
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other.kind(),
                    expected: "RdmaAccept",
                }
                .into());
            }
        };
        check_accept(registered.memory(), streams, &remote_qps, &regions)?;
        for (qp, remote) in qps.iter_mut().zip(&remote_qps) {
            qp.connect(&wire_to_endpoint(remote)).map_err(rdma_err)?;
        }
        self.rdma_active = true;
        tracing::info!(qps = streams, "RDMA queue pairs connected");
        Ok(Box::new(RdmaPageSender {
            local: registered,
            qps,
            remote: regions,
            max_write: self.cfg.max_write,
            io_timeout: self.cfg.tcp.io_timeout,
            control: self.tcp.kill_switch(),
        }))
    }

    /// With `postcopy_reads` and the pages over RDMA: a queue pair for the
    /// destination's reads, and the keys of this side's memory.
    fn postcopy_offer(&mut self) -> Result<Option<Message>, TransportError> {
        if !self.rdma_active {
            // The TCP data plane (no RDMA at the destination): its fetch
            // connection, if both ends agreed on one.
            return self.tcp.postcopy_offer();
        }
        let Some(local) = &self.local else {
            return Ok(None);
        };
        if !self.cfg.postcopy_reads {
            return Ok(None);
        }
        let Some(registered) = &local.registered else {
            return Ok(None);
        };
        let (qp, offer) = crate::postcopy::offer(&local.dev, registered)?;
        self.read_qp = Some(qp);
        Ok(Some(offer))
    }

    fn postcopy_accepted(&mut self, answer: &Message) -> Result<(), TransportError> {
        if matches!(answer, Message::PageFetchAccept) {
            return self.tcp.postcopy_accepted(answer);
        }
        let qp = self
            .read_qp
            .as_mut()
            .ok_or_else(|| TransportError::Unavailable {
                reason: "no post-copy queue pair was offered".into(),
            })?;
        crate::postcopy::accepted(qp, answer)
    }

    /// A new control connection; [`open_data`](SourceTransport::open_data)
    /// then connects new queue pairs (the engine dropped the old ones with
    /// their sender) to the keys the destination sends again. The local
    /// registration stays: it is this process's own memory.
    fn reconnect(&mut self) -> Result<(), TransportError> {
        self.tcp.reconnect()
    }
}

fn check_accept(
    mem: &GuestMemory,
    streams: usize,
    qps: &[QpEndpoint],
    regions: &[RemoteRegion],
) -> Result<(), TransportError> {
    let bad = |detail: String| -> TransportError {
        ProtocolError::Malformed {
            kind: FrameKind::RdmaAccept,
            detail,
        }
        .into()
    };
    if qps.len() != streams {
        return Err(bad(format!(
            "destination answered {} queue pairs for {streams}",
            qps.len()
        )));
    }
    if regions.len() != mem.regions().len() {
        return Err(bad(format!(
            "destination registered {} regions, guest memory has {}",
            regions.len(),
            mem.regions().len()
        )));
    }
    for (i, (r, ours)) in regions.iter().zip(mem.regions()).enumerate() {
        if r.len != ours.len() as u64 {
            return Err(bad(format!(
                "destination region {i} is registered with {} bytes, ours has {}",
                r.len,
                ours.len()
            )));
        }
    }
    Ok(())
}

/// Posts rounds as WRITE chains spread over the queue pairs.
struct RdmaPageSender {
    local: Arc<RegisteredMemory>,
    qps: Vec<QueuePair>,
    remote: Vec<RemoteRegion>,
    max_write: u32,
    io_timeout: Duration,
    /// The control connection's: whether it ended while chains wait.
    control: KillSwitch,
}

impl RdmaPageSender {
    /// The round's data pages as WRITEs (contiguous pages coalesced up to
    /// `max_write`), and its zero pages as ranges.
    /// Zero pages the destination already reads as zeros (`dest`) are left
    /// out.
    fn plan(
        &self,
        max_write: u32,
        runs: &[PageRun],
        dest: &DestinationPages,
        sent: &mut RoundSent,
    ) -> Vec<WriteRequest> {
        let mut writes: Vec<WriteRequest> = Vec::new();
        for run in runs {
            let region = &self.local.memory().regions()[run.region];
            let ps = region.page_size().bytes();
            let remote = self.remote[run.region];
            for p in run.first..run.first + run.count {
                // A racing guest write is fine: the page is dirty and goes again.
                let zero = region.is_zero_page(p);
                if zero {
                    sent.zero_pages += 1;
                    if !dest.zero_needs_sending(run.region, p) {
                        continue;
                    }
                    match sent.zero_ranges.last_mut() {
                        Some(l)
                            if l.region as usize == run.region
                                && l.first + l.count as u64 == p as u64 =>
                        {
                            l.count += 1
                        }
                        _ => sent.zero_ranges.push(PageRange {
                            region: run.region as u32,
                            first: p as u64,
                            count: 1,
                        }),
                    }
                    continue;
                }
                sent.normal_pages += 1;
                dest.sent_data(run.region, p, 1);
                let offset = (p * ps) as u64;
                match writes.last_mut() {
                    Some(w)
                        if w.region == run.region
                            && w.offset + w.len as u64 == offset
                            && w.len as u64 + ps as u64 <= max_write as u64 =>
                    {
                        w.len += ps as u32
                    }
                    _ => writes.push(WriteRequest {
                        region: run.region,
                        offset,
                        len: ps as u32,
                        remote_addr: remote.addr + offset,
                        rkey: remote.rkey,
                    }),
                }
            }
        }
        writes
    }

    /// Reap completions of `qp` until at most `keep` chains are in flight
    /// (`keep` = `usize::MAX`: take what has completed, wait for nothing).
    /// A queue pair with work in flight that completes nothing for the I/O
    /// timeout is a lost peer, whether or not the caller must wait for it:
    /// the fabric stopped, though the control connection may live on. So
    /// is a wait whose control connection ended (a destination process
    /// that died closes it at once, while its queue pairs just go quiet).
    fn reap(
        &self,
        qp: usize,
        flight: &mut Flight,
        keep: usize,
        ctx: &RoundContext<'_>,
    ) -> Result<(), TransportError> {
        let mut done = Vec::new();
        loop {
            done.clear();
            self.qps[qp]
                .poll_send(&mut done)
                .map_err(|e| stream_err(qp, e))?;
            if !done.is_empty() {
                flight.since[qp] = Instant::now();
                flight.chains[qp] = flight.chains[qp].saturating_sub(done.len());
                // A queue pair completes its chains in order: these are the
                // oldest ones.
                for _ in 0..done.len() {
                    if let Some(chain) = flight.posted[qp].pop_front() {
                        (ctx.progress)(qp, &chain);
                    }
                }
            }
            if flight.chains[qp] == 0 {
                return Ok(());
            }
            let idle = flight.since[qp].elapsed();
            if idle > self.io_timeout {
                return Err(TransportError::Io {
                    op: "RDMA WRITE",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "queue pair {qp}: no completion for {:.1} s: the peer is dead, frozen or cut off",
                            self.io_timeout.as_secs_f64()
                        ),
                    ),
                });
            }
            if flight.chains[qp] <= keep {
                return Ok(());
            }
            if !done.is_empty() {
                continue;
            }
            if let Some(why) = self.control.control_ended() {
                return Err(TransportError::Io {
                    op: "RDMA WRITE",
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        format!(
                            "queue pair {qp}: chains in flight and the control connection ended ({why}): the destination is gone"
                        ),
                    ),
                });
            }
            // Spin briefly (completions on hardware come within
            // microseconds), then give the CPU away: on rxe the
            // completions are produced by kernel work on these same
            // CPUs, which a spinning poller only delays.
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < SPIN * 10 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Post `group`'s chains on `qp` in one post (chain `i` completes with
    /// `wr_id` `k + i`); a queue pair that was idle starts its silence
    /// clock now.
    fn post(
        &mut self,
        qp: usize,
        group: &[&[WriteRequest]],
        k: u64,
        flight: &mut Flight,
    ) -> Result<(), TransportError> {
        self.qps[qp]
            .post_write_chains(&self.local, group, k)
            .map_err(|e| stream_err(qp, e))?;
        if flight.chains[qp] == 0 {
            flight.since[qp] = Instant::now();
        }
        flight.chains[qp] += group.len();
        for chain in group {
            let bytes: u64 = chain.iter().map(|w| w.len as u64).sum();
            flight.posted[qp].push_back(RoundSent {
                wire_bytes: bytes,
                normal_pages: chain.iter().map(|w| w.len as u64 / 4096).sum(),
                ..RoundSent::default()
            });
        }
        Ok(())
    }
}

/// Signaled chains in flight per queue pair, and since when each has
/// completed nothing; what each carried, until it completes (the engine's
/// live figures count it then: bytes the peer has, not bytes posted, which
/// on a slow link run megabytes ahead).
struct Flight {
    chains: Vec<usize>,
    since: Vec<Instant>,
    posted: Vec<std::collections::VecDeque<RoundSent>>,
}

impl Flight {
    fn new(n: usize) -> Flight {
        Flight {
            chains: vec![0; n],
            since: vec![Instant::now(); n],
            posted: vec![std::collections::VecDeque::new(); n],
        }
    }
}

/// `writes` in chains of at most [`CHAIN`] WRITEs and about `max_bytes`
/// (a chain has at least one WRITE).
fn chains(writes: &[WriteRequest], max_bytes: u64) -> impl Iterator<Item = &[WriteRequest]> {
    let mut rest = writes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0u64;
        let mut n = 0;
        while n < rest.len().min(CHAIN) && (n == 0 || bytes + rest[n].len as u64 <= max_bytes) {
            bytes += rest[n].len as u64;
            n += 1;
        }
        let (chain, tail) = rest.split_at(n);
        rest = tail;
        Some(chain)
    })
}

/// Bytes the bandwidth cap is asked for at a time: between two asks the
/// sender looks at its queue pairs, so a capped round still finds a
/// stopped fabric within the I/O timeout (plus one slice).
const CAP_SLICE: u64 = 256 << 10;

/// A queue pair's failure: a lost peer is a disconnection (the migration
/// may resume over new queue pairs), anything else a broken stream.
fn stream_err(qp: usize, e: crate::verbs::VerbsError) -> TransportError {
    if e.peer_lost() {
        return TransportError::Io {
            op: "RDMA WRITE",
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("queue pair {qp}: {e}"),
            ),
        };
    }
    TransportError::Stream {
        stream: qp as u16,
        detail: e.to_string(),
    }
}

impl PageSender for RdmaPageSender {
    fn send_round(
        &mut self,
        round: u32,
        runs: &[PageRun],
        ctx: &RoundContext<'_>,
    ) -> Result<RoundSent, TransportError> {
        let mut sent = RoundSent::default();
        // Under a bandwidth cap, a chain holds about what the cap's bucket
        // does (50 ms), so the NIC is fed smoothly rather than a burst of
        // 16 MiB and a long wait, and work is in flight whenever the
        // sender runs (a stopped fabric shows as a silent queue pair).
        let cap = ctx.limiter.rate().map(|r| (r / 20).max(64 << 10));
        let max_write = cap.map_or(self.max_write, |c| c.min(self.max_write as u64) as u32);
        let writes = self.plan(max_write, runs, ctx.dest_pages, &mut sent);
        let n = self.qps.len();
        let mut flight = Flight::new(n);
        sent.stream_bytes = vec![0; n];
        let all: Vec<&[WriteRequest]> =
            chains(&writes, cap.unwrap_or(CHAIN_BYTES).min(CHAIN_BYTES)).collect();
        // Under a cap one chain at a time (the cap hands out slices of a
        // chain); else up to [`POST_CHAINS`] chains a post, fewer when the
        // round is small, so that every queue pair gets a share of it.
        let per_post = if cap.is_some() {
            1
        } else {
            all.len().div_ceil(n).clamp(1, POST_CHAINS)
        };
        let mut k = 0u64;
        for (g, group) in all.chunks(per_post).enumerate() {
            if ctx.cancel.is_cancelled() {
                return Err(TransportError::Cancelled);
            }
            let qp = g % n;
            self.reap(qp, &mut flight, MAX_CHAINS - group.len(), ctx)?;
            let bytes: u64 = group
                .iter()
                .flat_map(|c| c.iter())
                .map(|w| w.len as u64)
                .sum();
            let mut asked = 0;
            while asked < bytes {
                let slice = CAP_SLICE.min(bytes - asked);
                ctx.limiter.take(slice);
                asked += slice;
                for other in 0..n {
                    self.reap(other, &mut flight, usize::MAX, ctx)?;
                }
            }
            self.post(qp, group, k, &mut flight)?;
            k += group.len() as u64;
            sent.wire_bytes += bytes;
            sent.stream_bytes[qp] += bytes;
        }
        // The fence: after every WRITE above on its QP, the destination sees
        // a receive completion carrying the round number.
        let r = self.remote[0];
        for qp in 0..n {
            self.qps[qp]
                .post_fence(r.rkey, r.addr, round, FENCE_WR)
                .map_err(|e| stream_err(qp, e))?;
            if flight.chains[qp] == 0 {
                flight.since[qp] = Instant::now();
            }
            flight.chains[qp] += 1;
            flight.posted[qp].push_back(RoundSent::default());
        }
        for qp in 0..n {
            self.reap(qp, &mut flight, 0, ctx)?;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(len: u32) -> WriteRequest {
        WriteRequest {
            region: 0,
            offset: 0,
            len,
            remote_addr: 0,
            rkey: 0,
        }
    }

    fn sizes(writes: &[WriteRequest], max: u64) -> Vec<usize> {
        chains(writes, max).map(|c| c.len()).collect()
    }

    #[test]
    fn chains_hold_at_most_chain_writes_and_about_max_bytes() {
        let writes: Vec<_> = (0..40).map(|_| w(4096)).collect();
        assert_eq!(sizes(&writes, u64::MAX), vec![16, 16, 8]);
        assert_eq!(
            sizes(&writes, 3 * 4096),
            vec![3; 13].into_iter().chain([1]).collect::<Vec<_>>()
        );
        // A WRITE larger than the budget goes alone; nothing is lost.
        let big = [w(1 << 20), w(4096), w(1 << 20)];
        assert_eq!(sizes(&big, 64 << 10), vec![1, 1, 1]);
        let total: usize = chains(&writes, 5000).map(|c| c.len()).sum();
        assert_eq!(total, 40);
        assert_eq!(chains(&[], 1).count(), 0);
    }
}
