//! The output gate: what the guest sends to the outside waits here until
//! the standby holds the epoch that produced it.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// What the guest sent to the outside, held until it may be released.
///
/// A VMM (or a built-in guest) hands every byte it would send out (a serial
/// line, a network packet, a receipt) to [`emit`](Self::emit) instead. While
/// a guest is protected, the primary's engine [seals](Self::seal) what was
/// emitted with each epoch, ships it with the epoch, and
/// [releases](Self::release) it to the sink once the standby acknowledged
/// the epoch; a standby that takes over releases the last applied epoch's
/// output itself. Unprotected (never protected, degraded, or after a
/// takeover), the gate is [open](Self::open): output goes out at once.
///
/// Output is released whole and in order: a bundle is written with one
/// `write_all` and flushed.
pub struct OutputGate {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("OutputGate")
            .field("open", &g.open)
            .field(
                "held_bytes",
                &g.held.iter().map(|c| c.1.len()).sum::<usize>(),
            )
            .finish()
    }
}

struct Inner {
    sink: Box<dyn Write + Send>,
    open: bool,
    /// Emitted and not sealed yet: when, and what.
    held: Vec<(Instant, Vec<u8>)>,
    /// Microseconds from emit to release, of every chunk released while
    /// gated.
    delays_us: super::Histogram,
    /// The first error writing to the sink, if any (output stops there).
    failed: Option<std::io::Error>,
}

/// The output of one epoch: sealed at its pause, released once applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealedOutput {
    /// The bytes, in emit order.
    pub bytes: Vec<u8>,
    /// When each chunk was emitted, and its length.
    emitted: Vec<(Instant, usize)>,
}

impl SealedOutput {
    /// Output as it arrived from another end (a standby's epoch): no emit
    /// times known here.
    pub fn arrived(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            emitted: Vec::new(),
        }
    }
}

impl OutputGate {
    /// A gate in front of `sink`, closed (output held until released).
    pub fn new(sink: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                sink,
                open: false,
                held: Vec::new(),
                delays_us: super::Histogram::default(),
                failed: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest sends `bytes` to the outside: held while the gate is
    /// closed, written at once while it is open.
    pub fn emit(&self, bytes: &[u8]) {
        let mut g = self.lock();
        if g.open {
            g.write(bytes);
        } else {
            g.held.push((Instant::now(), bytes.to_vec()));
        }
    }

    /// With the guest paused: everything emitted so far, as this epoch's
    /// output (the gate holds nothing after).
    pub fn seal(&self) -> SealedOutput {
        let mut g = self.lock();
        let mut out = SealedOutput::default();
        for (at, b) in g.held.drain(..) {
            out.emitted.push((at, b.len()));
            out.bytes.extend_from_slice(&b);
        }
        out
    }

    /// Hold `out` again, before anything emitted since it was sealed (its
    /// epoch did not reach the standby).
    pub fn unseal(&self, out: SealedOutput) {
        let mut g = self.lock();
        let mut back = Vec::with_capacity(out.emitted.len() + g.held.len());
        let mut rest = &out.bytes[..];
        for (at, len) in out.emitted {
            let (chunk, tail) = rest.split_at(len.min(rest.len()));
            back.push((at, chunk.to_vec()));
            rest = tail;
        }
        if !rest.is_empty() {
            back.push((Instant::now(), rest.to_vec()));
        }
        back.append(&mut g.held);
        g.held = back;
    }

    /// The epoch that produced `out` is safe with the standby (or this end
    /// took over): write it out.
    pub fn release(&self, out: &SealedOutput) {
        let mut g = self.lock();
        let now = Instant::now();
        for (at, _) in &out.emitted {
            g.delays_us
                .record(now.duration_since(*at).as_micros() as u64);
        }
        g.write(&out.bytes);
    }

    /// From now on output goes out as it is emitted; what is held goes out
    /// first (this end runs the guest unprotected: nothing can contradict
    /// it any more).
    pub fn open(&self) {
        // One lock: nothing emitted in between may stay held.
        let mut g = self.lock();
        let held: Vec<u8> = g.held.drain(..).flat_map(|(_, b)| b).collect();
        g.open = true;
        g.write(&held);
    }

    /// From now on output is held until released (protection starts).
    pub fn close(&self) {
        self.lock().open = false;
    }

    /// Drop what is held, never releasing it (a fenced primary: its guest
    /// stops, and its output since the last acknowledged epoch never
    /// happened).
    pub fn discard(&self) -> usize {
        self.seal().bytes.len()
    }

    /// Microseconds from emit to release of the chunks released while
    /// gated since the last [`reset_delays`](Self::reset_delays): how
    /// many, and their spread.
    pub fn delays_us(&self) -> (u64, super::Spread) {
        let g = self.lock();
        (g.delays_us.count(), g.delays_us.spread())
    }

    /// Count delays from now on only.
    pub fn reset_delays(&self) {
        self.lock().delays_us = super::Histogram::default();
    }

    /// The error that stopped output, if writing to the sink failed.
    pub fn error(&self) -> Option<String> {
        self.lock().failed.as_ref().map(ToString::to_string)
    }
}

impl Inner {
    fn write(&mut self, bytes: &[u8]) {
        if self.failed.is_some() || bytes.is_empty() {
            return;
        }
        if let Err(e) = self.sink.write_all(bytes).and_then(|()| self.sink.flush()) {
            tracing::error!(error = %e, "the guest's output could not be written; no more follows");
            self.failed = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_waits_for_its_epoch_and_goes_out_in_order() {
        let out = Shared::default();
        let gate = OutputGate::new(Box::new(out.clone()));
        gate.emit(b"1\n");
        gate.emit(b"2\n");
        assert!(out.0.lock().unwrap().is_empty(), "released before sealed");
        let epoch = gate.seal();
        gate.emit(b"3\n");
        assert!(out.0.lock().unwrap().is_empty(), "released before applied");
        // Its epoch was lost: held again, before what came since.
        gate.unseal(epoch);
        let epoch = gate.seal();
        assert_eq!(epoch.bytes, b"1\n2\n3\n");
        gate.release(&epoch);
        assert_eq!(&*out.0.lock().unwrap(), b"1\n2\n3\n");
        assert_eq!(gate.delays_us().0, 3);
        // Fenced: what was held never goes out.
        gate.emit(b"x\n");
        assert_eq!(gate.discard(), 2);
        gate.emit(b"4\n");
        gate.open();
        gate.emit(b"5\n");
        assert_eq!(&*out.0.lock().unwrap(), b"1\n2\n3\n4\n5\n");
    }
}
