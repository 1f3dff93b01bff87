//! Source side: connect, then send page batches from guest memory.

use std::io::{IoSlice, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use migrate_core::dirty::PageRun;
use migrate_core::memory::GuestMemory;
use migrate_core::pages::{BatchEncoder, BatchQueue, Encoding};
use migrate_core::protocol::wire::{HEADER_LEN, write_message};
use migrate_core::protocol::{
    FEATURE_FETCH, FEATURE_SPARSE, FEATURE_UNHASHED, FEATURE_ZSTD, Features, Message,
};
use migrate_core::transport::{
    ControlChannel, PageSender, RoundContext, RoundSent, SourceTransport, TransportError,
};

use crate::TcpConfig;
use crate::conn::Conn;
use crate::control::{KillSwitch, TcpControl, io, prepare};

/// A source connected to a destination over TCP.
#[derive(Debug)]
pub struct TcpSource {
    addr: SocketAddr,
    cfg: TcpConfig,
    control: TcpControl,
    /// Every connection of this migration; tripped when the peer falls
    /// silent.
    kill: KillSwitch,
    /// The guest memory, once bound.
    mem: Option<Arc<GuestMemory>>,
    /// The session and the features both ends agreed on, once the data
    /// plane opened.
    agreed: Option<(u64, Features)>,
    /// The post-copy fetch connection's server thread, once accepted.
    fetch: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TcpSource {
    fn drop(&mut self) {
        // The fetch server blocks on its connection without a timeout:
        // close the migration's connections so that it ends, and with it
        // its hold on the guest memory.
        if let Some(h) = self.fetch.take() {
            self.kill.kill();
            let _ = h.join();
        }
    }
}

impl TcpSource {
    /// Connect the control connection to `addr` (host:port).
    ///
    /// # Errors
    /// [`TransportError::Connect`] when the address does not resolve or
    /// nothing answers in time; a protocol error when the peer is not a
    /// migration destination.
    pub fn connect(addr: &str, cfg: TcpConfig) -> Result<Self, TransportError> {
        let connect_err = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sa = addr
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| connect_err(std::io::Error::other("no address")))?;
        let (control, kill) = open_control(&sa, &cfg)?;
        tracing::debug!(%sa, "control connection open");
        Ok(Self {
            addr: sa,
            cfg,
            control,
            kill,
            mem: None,
            agreed: None,
            fetch: None,
        })
    }

    /// A switch that drops all of this end's connections (the control
    /// connection and every data stream, also those opened later), as the
    /// death of this process would.
    pub fn kill_switch(&self) -> KillSwitch {
        self.kill.clone()
    }

    /// The destination's address.
    pub fn peer(&self) -> SocketAddr {
        self.addr
    }

    /// This end's address of the control connection (the interface that
    /// reaches the destination).
    ///
    /// # Errors
    /// [`TransportError::Io`] from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.control
            .stream()
            .local_addr()
            .map_err(io("local address"))
    }
}

impl SourceTransport for TcpSource {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn data_streams(&self) -> u16 {
        self.cfg.data_streams.max(1)
    }

    fn features(&self) -> Features {
        Features::new(
            FEATURE_FETCH
                | (if self.cfg.compress { FEATURE_ZSTD } else { 0 })
                | if self.cfg.sparse { FEATURE_SPARSE } else { 0 }
                | if self.cfg.tls.is_some() {
                    FEATURE_UNHASHED
                } else {
                    0
                },
        )
    }

    fn control(&mut self) -> &mut dyn ControlChannel {
        &mut self.control
    }

    fn bind(&mut self, mem: &Arc<GuestMemory>) -> Result<(), TransportError> {
        self.mem = Some(Arc::clone(mem));
        Ok(())
    }

    fn open_data(
        &mut self,
        session: u64,
        features: Features,
    ) -> Result<Box<dyn PageSender>, TransportError> {
        let mem = self
            .mem
            .clone()
            .ok_or_else(|| TransportError::Unavailable {
                reason: "no guest memory bound to the transport (SourceMigration::bind)".into(),
            })?;
        self.agreed = Some((session, features));
        let mut streams = Vec::new();
        for index in 0..self.data_streams() {
            let stream = crate::mark::connect(&self.addr, self.cfg.connect_timeout, self.cfg.dscp)
                .map_err(|source| TransportError::Connect {
                    addr: self.addr.to_string(),
                    source,
                })?;
            prepare(&stream, &self.cfg)?;
            let mut c = TcpControl::open(stream, &self.cfg)?;
            c.send(&Message::Join { session, index })?;
            self.kill.register(c.stream());
            streams.push(c.conn().clone());
        }
        tracing::debug!(
            streams = streams.len(),
            features = features.bits(),
            "data connections open"
        );
        // The previous data plane, if any, is gone with its kill switch.
        Ok(Box::new(TcpPageSender {
            mem,
            streams,
            kill: self.kill.clone(),
            features,
            compress_level: self.cfg.compress_level,
        }))
    }

    fn postcopy_offer(&mut self) -> Result<Option<Message>, TransportError> {
        let fetch = self
            .agreed
            .is_some_and(|(_, f)| f.has(FEATURE_FETCH) && f.postcopy());
        Ok(fetch.then_some(Message::PageFetchOffer))
    }

    fn postcopy_accepted(&mut self, answer: &Message) -> Result<(), TransportError> {
        let (Message::PageFetchAccept, Some((session, _)), Some(mem)) =
            (answer, self.agreed, &self.mem)
        else {
            return Err(TransportError::Unavailable {
                reason: format!(
                    "no post-copy fetch connection was offered ({:?})",
                    answer.kind()
                ),
            });
        };
        let server = crate::fetch::serve(
            self.addr,
            self.cfg.clone(),
            self.kill.clone(),
            Arc::clone(mem),
            session,
        )?;
        // One per post-copy: an earlier one ended with its connections.
        if let Some(old) = self.fetch.replace(server) {
            let _ = old.join();
        }
        Ok(())
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        // Whatever is left of the old connections goes first.
        self.kill.kill();
        let (control, kill) = open_control(&self.addr, &self.cfg)?;
        self.control = control;
        self.kill = kill;
        tracing::info!(addr = %self.addr, "control connection open again");
        Ok(())
    }
}

/// A new control connection to `addr`, with its own kill switch.
fn open_control(
    addr: &SocketAddr,
    cfg: &TcpConfig,
) -> Result<(TcpControl, KillSwitch), TransportError> {
    let stream = crate::mark::connect(addr, cfg.connect_timeout, cfg.dscp).map_err(|source| {
        TransportError::Connect {
            addr: addr.to_string(),
            source,
        }
    })?;
    let kill = KillSwitch::default();
    let control = TcpControl::open_control(stream, cfg, &kill)?;
    Ok((control, kill))
}

/// Sends rounds over the data connections, one thread per connection;
/// the pages are encoded by the core's page-batch layer
/// ([`migrate_core::pages`]).
struct TcpPageSender {
    mem: Arc<GuestMemory>,
    streams: Vec<Conn>,
    kill: KillSwitch,
    features: Features,
    compress_level: i32,
}

impl PageSender for TcpPageSender {
    fn send_round(
        &mut self,
        round: u32,
        runs: &[PageRun],
        ctx: &RoundContext<'_>,
    ) -> Result<RoundSent, TransportError> {
        let queue = BatchQueue::new(&self.mem, runs);
        let mem = &*self.mem;
        let (features, level) = (self.features, self.compress_level);
        let results: Vec<Result<RoundSent, TransportError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .streams
                .iter_mut()
                .enumerate()
                .map(|(i, stream)| {
                    let queue = &queue;
                    // The records' AEAD authenticates every byte: no page
                    // hashes where both ends agreed.
                    let enc = Encoding::agreed(features, level, stream.sealed());
                    std::thread::Builder::new()
                        .name(format!("tcp-send-{i}"))
                        .spawn_scoped(s, move || {
                            let r = send_stream(mem, stream, i, round, queue, enc, ctx);
                            if let Err(e) = &r {
                                queue.abort();
                                tracing::debug!(stream = i, error = %e, "data stream failed");
                            }
                            r
                        })
                        .inspect_err(|_| queue.abort())
                        .map_err(io("spawn a sender thread"))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h?.join().unwrap_or_else(|_| {
                        Err(TransportError::Stream {
                            stream: i as u16,
                            detail: "sender thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut total = RoundSent::default();
        let mut first_err = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(s) => total.add(&s.on_stream(i as u16)),
                // Prefer the root cause over the "stopped because another
                // stream failed" of the others.
                Err(TransportError::Cancelled) if ctx.cancel.is_cancelled() => {
                    first_err.get_or_insert(TransportError::Cancelled);
                }
                Err(TransportError::Cancelled) => {}
                Err(e) => {
                    if first_err
                        .as_ref()
                        .is_none_or(|f| matches!(f, TransportError::Cancelled))
                    {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            // A silent peer tripped the kill: that is the cause, not the
            // broken pipe it made.
            Some(e) => Err(self.kill.reason().unwrap_or(e)),
            None => Ok(total),
        }
    }

    fn finish(&mut self) {
        for (i, s) in self.streams.iter().enumerate() {
            if let Err(e) = s.close() {
                tracing::debug!(stream = i, error = %e, "could not end a data stream cleanly");
            }
        }
    }
}

/// Send batches from `queue` until none is left, then this stream's end
/// of the round.
#[allow(clippy::too_many_arguments)]
fn send_stream(
    mem: &GuestMemory,
    stream: &mut Conn,
    index: usize,
    round: u32,
    queue: &BatchQueue,
    enc: Encoding,
    ctx: &RoundContext<'_>,
) -> Result<RoundSent, TransportError> {
    let mut sent = RoundSent::default();
    let mut count = 0u64;
    let mut encoder = BatchEncoder::default();
    loop {
        if ctx.cancel.is_cancelled() || queue.aborted() {
            return Err(TransportError::Cancelled);
        }
        let Some(batch) = queue.take() else { break };
        let mut b = encoder.encode(mem, round, batch, enc, ctx.dest_pages)?;
        // A batch of pages the destination already reads as zeros sends
        // no frame at all.
        if !b.iov.is_empty() {
            write_all_vectored(stream, &mut b.iov)?;
            count += 1;
        }
        ctx.limiter.take(b.sent.wire_bytes);
        (ctx.progress)(index, &b.sent);
        sent.add(&b.sent);
    }
    let mut w = &*stream;
    write_message(
        &mut w,
        &Message::RoundEnd {
            round,
            batches: count,
        },
    )?;
    sent.wire_bytes += (HEADER_LEN + 12) as u64;
    Ok(sent)
}

fn write_all_vectored(
    stream: &mut Conn,
    mut iov: &mut [IoSlice<'_>],
) -> Result<(), TransportError> {
    while !iov.is_empty() {
        match (&*stream).write_vectored(iov) {
            Ok(0) => {
                return Err(io("send pages")(std::io::ErrorKind::WriteZero.into()));
            }
            Ok(n) => IoSlice::advance_slices(&mut iov, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let timeout = stream.write_timeout();
                return Err(io("send pages")(crate::control::timed_out(e, timeout)));
            }
        }
    }
    Ok(())
}
