//! Post-copy over RDMA: the destination's fault handler reads the pages its
//! guest touches straight from the source's guest memory with one-sided
//! RDMA READ, on a queue pair of its own; the source's CPU is not in the
//! path. The source registers its memory for remote read only when told
//! to (`RdmaConfig::postcopy_reads`), and sends the keys only at the switch
//! to post-copy, over the (authenticated) control connection. Until then
//! no queue pair of the source takes a READ: its data queue pairs allow
//! their peer nothing, and the one responder queue pair that allows remote
//! read is made at the switch (a second registration there would add its
//! time to the downtime; `ibv_rereg_mr` is not in the binding).

use std::sync::Arc;
use std::time::{Duration, Instant};

use migrate_core::memory::{GuestMemory, GuestRegion};
use migrate_core::protocol::{FrameKind, Message, ProtocolError, RemoteRegion};
use migrate_core::transport::{PageFetcher, TransportError};

use crate::verbs::{Device, QueuePair, RegisteredMemory, Remote};
use crate::{endpoint_to_wire, rdma_err, wire_to_endpoint};

/// Reads in flight on the post-copy queue pair (the handler waits for each).
const READS: u8 = 1;
/// How long a READ's poller spins before it yields the CPU.
const SPIN: Duration = Duration::from_micros(20);

/// The source's side: a queue pair the destination reads through, and the
/// offer naming it and the memory's keys.
pub(crate) fn offer(
    dev: &Device,
    registered: &RegisteredMemory,
) -> Result<(QueuePair, Message), TransportError> {
    let qp = dev.queue_pair(4, 1, Remote::Read).map_err(rdma_err)?;
    let regions = (0..registered.memory().regions().len())
        .map(|i| registered.remote(i))
        .collect();
    let offer = Message::RdmaReadOffer {
        qps: vec![endpoint_to_wire(&qp.local)],
        regions,
    };
    Ok((qp, offer))
}

/// The source's side, once the destination accepted: connect.
pub(crate) fn accepted(qp: &mut QueuePair, answer: &Message) -> Result<(), TransportError> {
    match answer {
        Message::RdmaReadAccept { qps } if qps.len() == 1 => qp
            .connect_with_reads(&wire_to_endpoint(&qps[0]), READS)
            .map_err(rdma_err),
        other => Err(ProtocolError::Malformed {
            kind: FrameKind::RdmaReadAccept,
            detail: format!("expected one queue pair, got {other:?}"),
        }
        .into()),
    }
}

/// The destination's side: a queue pair connected to the source's, a
/// registered page-sized landing buffer, the source's regions.
pub(crate) fn fetcher(
    dev: &Device,
    mem: &Arc<GuestMemory>,
    offer: &Message,
    timeout: Duration,
) -> Result<(Message, Box<dyn PageFetcher>), TransportError> {
    let Message::RdmaReadOffer { qps, regions } = offer else {
        return Err(TransportError::Unavailable {
            reason: format!("not a read offer: {:?}", offer.kind()),
        });
    };
    let bad = |detail: String| -> TransportError {
        ProtocolError::Malformed {
            kind: FrameKind::RdmaReadOffer,
            detail,
        }
        .into()
    };
    if qps.len() != 1 {
        return Err(bad(format!("{} queue pairs offered for reads", qps.len())));
    }
    if regions.len() != mem.regions().len() {
        return Err(bad(format!(
            "the source offers {} regions, guest memory has {}",
            regions.len(),
            mem.regions().len()
        )));
    }
    for (i, (r, ours)) in regions.iter().zip(mem.regions()).enumerate() {
        if r.len != ours.len() as u64 {
            return Err(bad(format!(
                "the source's region {i} has {} bytes, ours {}",
                r.len,
                ours.len()
            )));
        }
    }
    let page = mem
        .regions()
        .iter()
        .map(|r| r.page_size().bytes())
        .max()
        .unwrap_or(4096);
    let landing = Arc::new(
        GuestMemory::new(vec![GuestRegion::anonymous(0, page).map_err(|e| {
            TransportError::Unavailable {
                reason: format!("post-copy landing buffer: {e}"),
            }
        })?])
        .map_err(|e| TransportError::Unavailable {
            reason: format!("post-copy landing buffer: {e}"),
        })?,
    );
    let landing = dev.register(&landing, false).map_err(rdma_err)?;
    let mut qp = dev.queue_pair(4, 1, Remote::None).map_err(rdma_err)?;
    qp.connect_with_reads(&wire_to_endpoint(&qps[0]), READS)
        .map_err(rdma_err)?;
    let answer = Message::RdmaReadAccept {
        qps: vec![endpoint_to_wire(&qp.local)],
    };
    Ok((
        answer,
        Box::new(RdmaFetcher {
            qp,
            landing,
            remote: regions.clone(),
            timeout,
            next_id: 0,
        }),
    ))
}

/// Reads one page at a time from the source's memory.
struct RdmaFetcher {
    // Declared first: the queue pair goes before the buffer it reads into.
    qp: QueuePair,
    landing: RegisteredMemory,
    remote: Vec<RemoteRegion>,
    timeout: Duration,
    next_id: u64,
}

impl PageFetcher for RdmaFetcher {
    fn fetch(&mut self, region: usize, page: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let r = self
            .remote
            .get(region)
            .ok_or_else(|| TransportError::DataPlane {
                detail: format!("no region {region} to read from"),
            })?;
        let len = out.len() as u64;
        let offset = page as u64 * len;
        if offset + len > r.len {
            return Err(TransportError::DataPlane {
                detail: format!("page {page} lies outside the source's region {region}"),
            });
        }
        self.next_id += 1;
        let id = self.next_id;
        self.qp
            .post_read(
                &self.landing,
                (0, 0, len as u32),
                (r.addr + offset, r.rkey),
                id,
            )
            .map_err(rdma_err)?;
        let started = Instant::now();
        let mut done = Vec::new();
        loop {
            self.qp.poll_send(&mut done).map_err(rdma_err)?;
            if done.contains(&id) {
                break;
            }
            if started.elapsed() > self.timeout {
                return Err(TransportError::PeerSilent {
                    secs: self.timeout.as_secs_f64(),
                });
            }
            if started.elapsed() > SPIN {
                std::thread::yield_now();
            }
        }
        self.landing.memory().regions()[0].read_bytes(0, out);
        Ok(())
    }
}
