//! Destination side: guest memory registered for remote write before the
//! first page, one thread watching the round fences.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use migrate_core::memory::GuestMemory;
use migrate_core::protocol::{FEATURE_RDMA, Features, FrameKind, Message, ProtocolError};
use migrate_core::transport::{
    ControlChannel, DataEvent, DestinationTransport, PageFetcher, RoundSent, TransportError,
};
use transport_tcp::{KillSwitch, TcpDestination, TcpMigrationListener};

use crate::RdmaConfig;
use crate::verbs::{Device, QueuePair, RegisteredMemory, Remote};
use crate::{check_memlock, endpoint_to_wire, rdma_err, register_memory, wire_to_endpoint};

/// Receives posted per queue pair (one per fence in flight; refilled).
const RECEIVES: u32 = 16;

/// Listens for sources; each accepted migration uses RDMA when the source
/// has a device too, TCP otherwise.
#[derive(Debug)]
pub struct RdmaMigrationListener {
    tcp: TcpMigrationListener,
    cfg: RdmaConfig,
}

impl RdmaMigrationListener {
    /// Listen on `addr`.
    ///
    /// # Errors
    /// [`TransportError::Io`] when the address cannot be bound.
    pub fn bind(addr: &str, cfg: RdmaConfig) -> Result<Self, TransportError> {
        Ok(Self {
            tcp: TcpMigrationListener::bind(addr, cfg.tcp.clone())?,
            cfg,
        })
    }

    /// The bound address.
    ///
    /// # Errors
    /// [`TransportError::Io`] from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.tcp.local_addr()
    }

    /// Accept a source's control connection and open the RDMA device (on
    /// the interface that carries it).
    ///
    /// # Errors
    /// As [`TcpMigrationListener::accept`]; [`TransportError::Unavailable`]
    /// when `cfg.require` and there is no device.
    pub fn accept(&self) -> Result<RdmaDestination, TransportError> {
        let tcp = self.tcp.accept()?;
        let local_ip = tcp.local_addr()?.ip();
        let (dev, fallback) = match Device::open(
            self.cfg.device.as_deref(),
            self.cfg.gid_index,
            Some(local_ip),
        ) {
            Ok(d) => (Some(d.marked(self.cfg.marking)), None),
            Err(e) if !self.cfg.require => (
                None,
                Some(format!("no RDMA device on the destination: {e}")),
            ),
            Err(e) => {
                return Err(TransportError::Unavailable {
                    reason: e.to_string(),
                });
            }
        };
        Ok(RdmaDestination {
            tcp,
            dev,
            fallback,
            active: None,
            io_timeout: self.cfg.tcp.io_timeout,
        })
    }
}

struct Active {
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    // Dropped after the watcher stops: deregistration invalidates the rkeys.
    _registered: RegisteredMemory,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// One incoming migration: control over TCP, pages by RDMA WRITE into the
/// registered guest memory (or over TCP when the source has no device).
pub struct RdmaDestination {
    tcp: TcpDestination,
    dev: Option<Device>,
    fallback: Option<String>,
    active: Option<Active>,
    /// How long a post-copy page read may take.
    io_timeout: Duration,
}

impl std::fmt::Debug for RdmaDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaDestination")
            .field("device", &self.dev)
            .field("rdma_active", &self.active.is_some())
            .finish()
    }
}

impl RdmaDestination {
    /// Drops every connection (as a crash would) and ends RDMA access.
    pub fn kill_switch(&self) -> KillSwitch {
        self.tcp.kill_switch()
    }

    /// Why pages go over TCP, if they do.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Deregister the guest memory now (the rkeys stop working) and stop
    /// watching fences: call when the migration committed or failed.
    pub fn finish(&mut self) {
        self.active = None;
    }
}

impl DestinationTransport for RdmaDestination {
    fn name(&self) -> &'static str {
        if self.active.is_some() { "rdma" } else { "tcp" }
    }

    fn authenticated(&self) -> bool {
        self.tcp.authenticated()
    }

    fn features(&self) -> Features {
        self.tcp
            .features()
            .with(if self.dev.is_some() { FEATURE_RDMA } else { 0 })
    }

    fn control(&mut self) -> &mut dyn ControlChannel {
        self.tcp.control()
    }

    fn data_done(&mut self) {
        self.finish();
    }

    fn postcopy_fetcher(
        &mut self,
        mem: &Arc<GuestMemory>,
        offer: &Message,
    ) -> Result<(Message, Box<dyn PageFetcher>), TransportError> {
        if matches!(offer, Message::PageFetchOffer) {
            // The TCP data plane's fetch connection.
            return self.tcp.postcopy_fetcher(mem, offer);
        }
        let dev = self
            .dev
            .as_ref()
            .ok_or_else(|| TransportError::Unavailable {
                reason: "no RDMA device on the destination".into(),
            })?;
        crate::postcopy::fetcher(dev, mem, offer, self.io_timeout)
    }

    fn open_data(
        &mut self,
        mem: &Arc<GuestMemory>,
        session: u64,
        streams: u16,
        features: Features,
    ) -> Result<Receiver<DataEvent>, TransportError> {
        let Some(dev) = &self.dev else {
            return self.tcp.open_data(mem, session, streams, features);
        };
        if !features.has(FEATURE_RDMA) {
            self.fallback = Some("the source has no RDMA device".into());
            return self.tcp.open_data(mem, session, streams, features);
        }
        let remote_qps = match self.tcp.control().recv()? {
            Message::RdmaConnect { qps } if qps.len() == streams as usize => qps,
            Message::RdmaConnect { qps } => {
                return Err(ProtocolError::Malformed {
                    kind: FrameKind::RdmaConnect,
                    detail: format!(
                        "source offered {} queue pairs for {streams} streams",
                        qps.len()
                    ),
                }
                .into());
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    got: other.kind(),
                    expected: "RdmaConnect",
                }
                .into());
            }
        };
        // Pin-all before the first page: registration is setup time.
        check_memlock(mem.total_bytes())?;
        let started = Instant::now();
        let registered = register_memory(dev, mem, true)?;
        tracing::info!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            bytes = mem.total_bytes(),
            "destination memory registered for remote write"
        );
        let mut qps = Vec::new();
        for remote in &remote_qps {
            let mut qp = dev
                .queue_pair(1, RECEIVES, Remote::Write)
                .map_err(rdma_err)?;
            qp.connect(&wire_to_endpoint(remote)).map_err(rdma_err)?;
            qp.post_receives(RECEIVES).map_err(rdma_err)?;
            qps.push(qp);
        }
        let regions = (0..mem.regions().len())
            .map(|i| registered.remote(i))
            .collect();
        self.tcp.control().send(&Message::RdmaAccept {
            qps: qps.iter().map(|q| endpoint_to_wire(&q.local)).collect(),
            regions,
        })?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("rdma-fences".into())
                .spawn(move || watch_fences(qps, &tx, &stop))
                .map_err(|e| TransportError::Io {
                    op: "spawn fence watcher",
                    source: e,
                })?
        };
        self.active = Some(Active {
            stop,
            watcher: Some(watcher),
            _registered: registered,
        });
        Ok(rx)
    }

    /// The source lost its connection: end RDMA access first — the fence
    /// watcher stops, its queue pairs are destroyed and the guest memory is
    /// deregistered, so the old keys and queue pairs write nothing more —
    /// then wait for the source on the control listener.
    /// [`open_data`](DestinationTransport::open_data) registers the memory
    /// again and sends new keys, only to the source that resumed this
    /// session over an authenticated connection.
    fn reaccept(&mut self, deadline: Instant) -> Result<(), TransportError> {
        self.active = None;
        self.tcp.reaccept(deadline)
    }
}

/// Report each queue pair's round fences as the end of that round on that
/// stream, until stopped or nobody listens.
fn watch_fences(
    mut qps: Vec<QueuePair>,
    tx: &crossbeam_channel::Sender<DataEvent>,
    stop: &AtomicBool,
) {
    let mut imms = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let mut idle = true;
        for (i, qp) in qps.iter_mut().enumerate() {
            imms.clear();
            let polled = qp.poll_recv(&mut imms).and_then(|()| {
                if imms.is_empty() {
                    Ok(())
                } else {
                    qp.post_receives(imms.len() as u32)
                }
            });
            if let Err(e) = polled {
                let _ = tx.send(DataEvent::Failed {
                    stream: i as u16,
                    error: TransportError::Stream {
                        stream: i as u16,
                        detail: e.to_string(),
                    },
                });
                return;
            }
            for &round in &imms {
                idle = false;
                let event = DataEvent::RoundEnd {
                    stream: i as u16,
                    round,
                    batches_sent: 1,
                    batches_received: 1,
                    suspect: Vec::new(),
                    received: RoundSent::default(),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
