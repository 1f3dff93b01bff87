//! The standby: stages each epoch, applies it whole, and takes over the
//! guest when the primary is lost and the witness agrees.

use std::sync::Arc;
use std::time::Instant;

use crate::cancel::CancelToken;
use crate::destination::{IncomingMigration, MAX_DEVICE_STATE, collect_round};
use crate::error::IncomingError;
use crate::memory::{GuestMemory, MemoryLayout};
use crate::mirror::events::{PROGRESS_EVERY, StandbyEvent};
use crate::mirror::gate::{OutputGate, SealedOutput};
use crate::mirror::witness::{Claimant, RunRight};
use crate::mirror::{StandbyReport, StandbyStatus};
use crate::protocol::{FEATURE_MIRROR, Features, Message, PageRange, RefusalCode};
use crate::stats::Monitor;
use crate::transport::{DataEvent, DestinationTransport};
use crate::vm::DestinationVm;

/// Most output one epoch may carry (a guest that floods its output is
/// refused rather than let grow without bound).
const MAX_EPOCH_OUTPUT: usize = 256 << 20;

/// Watch a standby and give it up from another thread.
#[derive(Debug, Clone)]
pub struct StandbyHandle {
    monitor: Monitor<StandbyReport, StandbyEvent>,
    cancel: CancelToken,
}

impl StandbyHandle {
    /// Stop standing by (within about 100 ms): the standby never takes
    /// over; the primary finds its standby lost.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// The figures so far.
    pub fn stats(&self) -> StandbyReport {
        self.monitor.stats()
    }

    /// Events from now on ([`StandbyEvent`]), until one that
    /// [`is_final`](StandbyEvent::is_final).
    pub fn subscribe(&self) -> crossbeam_channel::Receiver<StandbyEvent> {
        self.monitor.subscribe()
    }
}

/// A protection's standby end, after the primary's hello.
#[derive(Debug)]
pub struct Standby {
    incoming: IncomingMigration,
    monitor: Monitor<StandbyReport, StandbyEvent>,
    cancel: CancelToken,
}

/// The epoch arriving now.
#[derive(Debug, Default)]
struct Arriving {
    pages: Vec<PageRange>,
    zero: Vec<PageRange>,
    state: Vec<u8>,
    state_done: bool,
    output: Vec<u8>,
    /// Why it cannot be applied, found while it arrived.
    broken: Option<String>,
}

/// The last checkpoint applied: what a takeover resumes.
#[derive(Debug)]
struct Checkpoint {
    epoch: u32,
    state: Vec<u8>,
    output: Vec<u8>,
}

impl Standby {
    /// Take a primary's hello on a freshly connected transport. A source
    /// that migrates instead of protecting is refused.
    ///
    /// # Errors
    /// [`IncomingError`] for a peer that is not ours, or that does not
    /// protect ([`IncomingError::Refused`]).
    pub fn accept(transport: &mut dyn DestinationTransport) -> Result<Self, IncomingError> {
        let incoming =
            IncomingMigration::accept_offering(transport, Features::new(FEATURE_MIRROR))?;
        if !incoming.features.has(FEATURE_MIRROR) {
            let message =
                "this end is a standby: protect a guest to it (migrate-cli protect), do not migrate"
                    .to_string();
            let _ = transport.control().send(&Message::Refused {
                code: RefusalCode::Other,
                message: message.clone(),
            });
            return Err(IncomingError::Refused {
                code: RefusalCode::Other,
                message,
            });
        }
        let monitor = Monitor::<StandbyReport, StandbyEvent>::default();
        monitor.update(|r| {
            r.session = incoming.session;
            r.transport = transport.name().into();
        });
        Ok(Self {
            incoming,
            monitor,
            cancel: CancelToken::new(),
        })
    }

    /// The primary's guest memory layout.
    pub fn layout(&self) -> &MemoryLayout {
        self.incoming.layout()
    }

    /// A handle to watch and cancel this standby.
    pub fn handle(&self) -> StandbyHandle {
        StandbyHandle {
            monitor: self.monitor.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Stand by with `image` (the layout of the primary's memory): apply
    /// every epoch that arrives whole, until the primary ends protection
    /// (`released`) or is lost. Lost after a checkpoint, ask `witness`:
    /// granted, load the checkpoint's device state through `vm`, release
    /// its output through `gate` (then opened) and resume the guest
    /// (`took-over`); refused or unanswered, `fenced`. Lost before any
    /// checkpoint: `failed`, nothing to resume.
    ///
    /// # Errors
    /// [`IncomingError`] when standing by could not start (layouts differ:
    /// the primary is told; no staging memory), the primary aborted, the
    /// standby was cancelled, or the takeover's VMM calls failed.
    pub fn run(
        self,
        transport: &mut dyn DestinationTransport,
        image: &Arc<GuestMemory>,
        vm: &mut dyn DestinationVm,
        gate: &OutputGate,
        witness: &mut dyn RunRight,
    ) -> Result<StandbyReport, IncomingError> {
        let monitor = self.monitor.clone();
        let result = self.stand_by(transport, image, vm, gate, witness);
        monitor.emit(match &result {
            Ok(r) => match r.status {
                StandbyStatus::TookOver => StandbyEvent::TookOver { stats: r.clone() },
                StandbyStatus::Released => StandbyEvent::Released { stats: r.clone() },
                StandbyStatus::Fenced => StandbyEvent::Fenced { stats: r.clone() },
                _ => StandbyEvent::Failed {
                    error: r
                        .error
                        .clone()
                        .unwrap_or_else(|| "the primary is lost before any checkpoint".into()),
                },
            },
            Err(e) => StandbyEvent::Failed {
                error: e.to_string(),
            },
        });
        result
    }

    /// [`run`](Self::run) but its last event.
    fn stand_by(
        self,
        transport: &mut dyn DestinationTransport,
        image: &Arc<GuestMemory>,
        vm: &mut dyn DestinationVm,
        gate: &OutputGate,
        witness: &mut dyn RunRight,
    ) -> Result<StandbyReport, IncomingError> {
        if let Err(m) = self.layout().check_matches(&image.layout()) {
            let _ = transport.control().send(&Message::Refused {
                code: RefusalCode::Layout,
                message: m.to_string(),
            });
            return Err(IncomingError::Layout(m));
        }
        transport.control().send(&Message::LayoutAccepted)?;
        let staging = Arc::new(image.anonymous_like()?);
        let (session, streams) = (self.incoming.session, self.incoming.streams);
        let events = transport.open_data(&staging, session, streams, self.incoming.features)?;
        // The data plane is chosen now (RDMA, or TCP when the primary has
        // no RDMA device).
        self.monitor
            .update(|r| r.transport = transport.name().into());
        let mut line = Line {
            events,
            streams,
            staging: &staging,
            image,
            monitor: &self.monitor,
            cancel: &self.cancel,
            kept: None,
            expected: 0,
            last_word: Instant::now(),
            last_progress: Instant::now(),
        };
        let lost = match line.follow(transport) {
            Ok(()) => {
                tracing::info!("protection ended by the primary: released");
                return Ok(self.monitor.update(|r| r.status = StandbyStatus::Released));
            }
            Err(e @ (IncomingError::PeerAborted { .. } | IncomingError::Cancelled)) => {
                return Err(e);
            }
            Err(lost) => lost,
        };
        let detected = Instant::now();
        let detect_ms = detected.duration_since(line.last_word).as_secs_f64() * 1e3;
        let error = lost.to_string();
        self.monitor.update(|r| {
            r.detect_ms = detect_ms;
            r.error = Some(error.clone());
        });
        tracing::warn!(error = %lost, detect_ms, "the primary is lost");
        self.monitor.emit(StandbyEvent::PrimaryLost { error });
        let Some(kept) = line.kept.take() else {
            tracing::error!("no checkpoint applied yet: nothing to take over");
            return Ok(self.monitor.update(|r| r.status = StandbyStatus::Failed));
        };
        let verdict = witness.claim(session, Claimant::Standby);
        if !matches!(verdict, Ok(true)) {
            if let Err(e) = &verdict {
                tracing::error!(error = %e, "the witness could not be asked");
            }
            tracing::error!("no run right: the guest does not run here (fenced)");
            return Ok(self.monitor.update(|r| r.status = StandbyStatus::Fenced));
        }
        vm.load_state(&kept.state)?;
        gate.release(&SealedOutput::arrived(kept.output.clone()));
        gate.open();
        vm.resume()?;
        let failover_ms = line.last_word.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            epoch = kept.epoch,
            failover_ms,
            "took over: the guest runs here from its last applied epoch"
        );
        Ok(self.monitor.update(|r| {
            r.status = StandbyStatus::TookOver;
            r.failover_ms = failover_ms;
            r.released_output_bytes = kept.output.len() as u64;
        }))
    }
}

/// A standby's end of the line from its primary.
struct Line<'a> {
    events: crossbeam_channel::Receiver<DataEvent>,
    streams: u16,
    staging: &'a GuestMemory,
    image: &'a GuestMemory,
    monitor: &'a Monitor<StandbyReport, StandbyEvent>,
    cancel: &'a CancelToken,
    kept: Option<Checkpoint>,
    expected: u32,
    /// When the primary's last message arrived.
    last_word: Instant,
    /// When the last `progress` event went out.
    last_progress: Instant,
}

impl Line<'_> {
    /// Apply epochs as they arrive whole, until `ProtectEnd` (`Ok`) or an
    /// error (the primary lost, aborted, or this end cancelled).
    fn follow(&mut self, transport: &mut dyn DestinationTransport) -> Result<(), IncomingError> {
        let mut arriving = Arriving::default();
        loop {
            let msg =
                crate::control::recv_unless::<IncomingError>(transport.control(), self.cancel)?;
            self.last_word = Instant::now();
            match msg {
                Message::EpochPages { ranges, .. } => {
                    arriving.check_ranges(self.image, &ranges);
                    arriving.pages.extend(ranges);
                }
                Message::ZeroPages { ranges, .. } => {
                    arriving.check_ranges(self.image, &ranges);
                    arriving.zero.extend(ranges);
                }
                Message::DeviceState { last, bytes } => {
                    if arriving.state.len() + bytes.len() > MAX_DEVICE_STATE {
                        arriving.broken = Some("device state too large".into());
                    } else {
                        arriving.state.extend_from_slice(&bytes);
                    }
                    arriving.state_done |= last;
                }
                Message::EpochOutput { bytes, .. } => {
                    if arriving.output.len() + bytes.len() > MAX_EPOCH_OUTPUT {
                        arriving.broken = Some("epoch output too large".into());
                    } else {
                        arriving.output.extend_from_slice(&bytes);
                    }
                }
                Message::EpochEnd { epoch, checkpoint } => {
                    let whole = std::mem::take(&mut arriving);
                    self.end_of_epoch(transport, epoch, checkpoint, whole)?;
                }
                Message::ProtectEnd => {
                    transport.control().send(&Message::ProtectEnded)?;
                    return Ok(());
                }
                other => return Err(crate::control::unexpected(&other, "an epoch")),
            }
        }
    }

    /// `EpochEnd`: wait for the epoch's pages on every data stream, check
    /// it, apply it (or refuse it) and answer.
    fn end_of_epoch(
        &mut self,
        transport: &mut dyn DestinationTransport,
        epoch: u32,
        checkpoint: bool,
        mut whole: Arriving,
    ) -> Result<(), IncomingError> {
        let suspect = collect_round(&self.events, self.streams, epoch, self.cancel, |_, _, _| {})?;
        if epoch != self.expected {
            whole.broken = Some(format!(
                "epoch {epoch} out of order: epoch {} is next",
                self.expected
            ));
        } else if !suspect.is_empty() {
            let pages: u64 = suspect.iter().map(|r| r.count as u64).sum();
            whole.broken = Some(format!("{pages} pages failed their check"));
        } else if checkpoint && !whole.state_done {
            whole.broken = Some("checkpoint without its whole device state".into());
        }
        let ctl = transport.control();
        if let Some(reason) = whole.broken {
            tracing::warn!(epoch, %reason, "epoch refused; the image stays at the last applied epoch");
            self.monitor.update(|r| r.epochs_refused += 1);
            self.monitor.emit(StandbyEvent::EpochRefused {
                epoch,
                reason: reason.clone(),
            });
            ctl.send(&Message::EpochRefused { epoch, reason })?;
            return Ok(());
        }
        for r in &whole.zero {
            let region = &self.staging.regions()[r.region as usize];
            for p in r.first..r.first + r.count as u64 {
                region.zero_page(p as usize);
            }
        }
        for r in whole.pages.iter().chain(&whole.zero) {
            self.image.copy_pages_from(
                self.staging,
                r.region as usize,
                r.first as usize,
                r.count as usize,
            )?;
        }
        if checkpoint {
            self.kept = Some(Checkpoint {
                epoch,
                state: whole.state,
                output: whole.output,
            });
        }
        self.expected = epoch.wrapping_add(1);
        let last_checkpoint = self.kept.as_ref().map(|k| k.epoch);
        let mut first = false;
        let stats = self.monitor.update(|r| {
            first = checkpoint && r.last_checkpoint.is_none();
            r.status = if last_checkpoint.is_some() {
                StandbyStatus::Protected
            } else {
                StandbyStatus::Syncing
            };
            r.last_epoch = Some(epoch);
            r.last_checkpoint = last_checkpoint;
            r.epochs_applied += 1;
        });
        ctl.send(&Message::EpochApplied { epoch })?;
        if first {
            self.last_progress = Instant::now();
            self.monitor.emit(StandbyEvent::Protected { stats });
        } else if checkpoint && self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.monitor.emit(StandbyEvent::Progress { stats });
        }
        Ok(())
    }
}

impl Arriving {
    /// Note `ranges` that fall outside `mem` (the epoch is then refused).
    fn check_ranges(&mut self, mem: &GuestMemory, ranges: &[PageRange]) {
        let outside = ranges.iter().find(|r| {
            mem.regions()
                .get(r.region as usize)
                .is_none_or(|reg| r.first.saturating_add(r.count as u64) > reg.pages() as u64)
        });
        if let Some(r) = outside {
            self.broken = Some(format!(
                "{} pages at page {} of region {} are outside guest memory",
                r.count, r.first, r.region
            ));
        }
    }
}
