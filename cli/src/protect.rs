//! `protect`, `standby` and `witness`: continuous mirroring of the built-in
//! guest for fault tolerance ([`migrate_core::mirror`]).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use migrate_core::IncomingError;
use migrate_core::dirty::TrackerPreference;
use migrate_core::memory::GuestMemory;
use migrate_core::mirror::{
    OutputGate, ProtectConfig, ProtectEvent, ProtectStatus, Protection, ProtectionReport, Standby,
    StandbyHandle, StandbyStatus,
};
use migrate_core::vm::{DestinationVm, VmError};
use migrate_frontend::{Outcome, output, security, transport, witness};
use migrate_guests::{BankGuest, RunningGuest};
use serde_json::json;

use crate::args::{ProtectArgs, StandbyArgs, WitnessArgs};
use crate::{control, guest, memory, report, resources, run};

/// Where the guest's released output goes: `--output`, or nowhere.
fn output_sink(path: Option<&std::path::Path>) -> Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(output::create_output(p).context("--output")?),
        None => Box::new(std::io::sink()),
    })
}

/// `migrate-cli protect`.
pub fn protect(mut a: ProtectArgs, baseline_rss: u64) -> Result<Outcome> {
    if a.epoch_ms >= a.failover_after_ms {
        anyhow::bail!(
            "--epoch-ms {} must be shorter than --failover-after-ms {}: every epoch is what keeps \
             the standby from counting this end as lost",
            a.epoch_ms,
            a.failover_after_ms
        );
    }
    output::check_outputs(run::outputs(a.json.as_deref(), Some(&a.steering)))?;
    let (tls, witness_tls) = witness::protection_credentials(
        &mut a.transport,
        a.failover_after_ms,
        &security::Role::Source {
            connect: &a.standby,
            hostname: None,
        },
        &a.witness,
    )?;
    let sink = output_sink(a.output.as_deref())?;
    let g = a.guest.for_memory(memory::existing_file(&a.memory))?;
    let mem = Arc::new(
        memory::from_args(&a.memory)?
            .context("give the guest memory: --memory SIZE and/or --memory-file PATH")?,
    );
    guest::fill(&mem, &g)?;
    let gate = OutputGate::new(sink);
    let mut transport = transport::connect(&a.standby, &a.transport, false, tls, false)?;
    let tracking = migrate_core::dirty::DirtyTracking::new(&mem, run::tracker_pref(a.tracker))?;
    let mut vm = guest::start_gated(&mem, &g, Some(Arc::clone(&gate)))?;
    let protection = Protection::new(ProtectConfig::with_epoch(Duration::from_millis(
        a.epoch_ms.max(1),
    )));
    let handle = protection.handle();
    end_on_signals(handle.clone())?;
    let (control_socket, events) = control::steer(&a.steering, &handle)?;
    let started = std::time::Instant::now();
    let run_for = a.run_for_s.map(Duration::from_secs);
    if let Some(d) = run_for {
        let h = handle.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            h.end();
        });
    }
    say_when_protected(handle.clone());
    let per_epoch = EpochCpu::watch(&handle)?;
    let cpu_start = resources::CpuSample::now();
    let mut right = witness::run_right(&a.witness, &a.transport, witness_tls);
    let result = protection.run(
        transport.as_dyn(),
        &mem,
        &tracking,
        &mut vm,
        &gate,
        right.as_mut(),
    );
    // Before the guest's threads end (their CPU is told apart by name).
    let cpu_per_epoch = match (per_epoch.cpu_us(), &result) {
        (Some((us, split)), Ok(r)) => {
            let n = r.epochs.saturating_sub(per_epoch.first()).max(1) as f64;
            Some(json!({
                "cpu_per_epoch_us": us / n,
                "cpu_user_per_epoch_us": split.user.as_secs_f64() * 1e6 / n,
                "cpu_system_per_epoch_us": split.sys.as_secs_f64() * 1e6 / n,
            }))
        }
        _ => None,
    };
    let outcome = match &result {
        Ok(r) if r.status == ProtectStatus::Degraded => {
            say!(
                "protection degraded: the standby is lost ({}); the guest runs on unprotected",
                r.error.as_deref().unwrap_or("?")
            );
            // Unprotected, for the rest of the time asked.
            if let Some(d) = run_for {
                std::thread::sleep(d.saturating_sub(started.elapsed()));
            }
            Outcome::Degraded
        }
        Ok(r) if r.status == ProtectStatus::Fenced => {
            say!(
                "fenced: the standby is lost ({}) and the witness gave the run right to it \
                 (or could not be asked); the guest stays paused here",
                r.error.as_deref().unwrap_or("?")
            );
            Outcome::Fenced
        }
        Ok(_) => Outcome::Done,
        Err(e) => {
            // Nothing can contradict what it said: its held output goes out.
            gate.open();
            say!("protection failed: {e}; the guest was never protected");
            Outcome::Failed
        }
    };
    let spent = resources::report(cpu_start, baseline_rss, Some(&mem));
    vm.stop();
    // The last event is out: the event stream ends, the socket goes.
    if let Some(t) = events {
        let _ = t.join();
    }
    drop(control_socket);
    let check = (g.kind() == crate::args::GuestKind::Bank).then(|| check_bank(&mem));
    if let Some(path) = &a.json {
        let mut v = match &result {
            Ok(r) => serde_json::to_value(r).unwrap_or_default(),
            Err(e) => json!({ "status": "failed", "error": e.to_string() }),
        };
        v["role"] = json!("primary");
        v["resources"] = serde_json::to_value(&spent).unwrap_or_default();
        if let Some(serde_json::Value::Object(m)) = cpu_per_epoch {
            for (k, x) in m {
                v[k] = x;
            }
        }
        add_check(&mut v, check.as_ref());
        output::write_report("migrate-cli", path, &v);
    }
    Ok(outcome)
}

/// The primary's CPU (the engine's: the built-in guest's threads
/// excluded) from the first checkpoint on, for `cpu_per_epoch_us`: the
/// pause, copy, shipping and heartbeats of the steady state, not the
/// initial sync.
struct EpochCpu(Arc<Mutex<Option<(resources::CpuSample, u64)>>>);

impl EpochCpu {
    /// Start the clock when `handle` says `protected`.
    fn watch(handle: &migrate_core::mirror::ProtectHandle) -> Result<Self> {
        let at = Arc::new(Mutex::new(None));
        let events = handle.subscribe();
        let slot = Arc::clone(&at);
        std::thread::Builder::new()
            .name("epoch-cpu".into())
            .spawn(move || {
                for e in events {
                    if let ProtectEvent::Protected { stats } = &e {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((resources::CpuSample::now(), stats.epochs));
                    }
                    if e.is_final() {
                        return;
                    }
                }
            })
            .context("starting the epoch CPU clock")?;
        Ok(Self(at))
    }

    /// The engine's CPU since the first checkpoint, microseconds, and its
    /// user and system parts (clock ticks: coarser).
    fn cpu_us(&self) -> Option<(f64, resources::UserSys)> {
        let at = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        at.map(|(start, _)| {
            (
                resources::since(start).0.as_secs_f64() * 1e6,
                resources::split_since(start),
            )
        })
    }

    /// The epochs applied when the clock started.
    fn first(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(0, |(_, e)| e)
    }
}

/// Say on stdout once the standby holds a checkpoint (an operator, or a
/// script, knows from then on that a failure of this host loses nothing).
fn say_when_protected(handle: migrate_core::mirror::ProtectHandle) {
    std::thread::spawn(move || {
        loop {
            let s = handle.stats();
            match s.status {
                ProtectStatus::Syncing => std::thread::sleep(Duration::from_millis(5)),
                ProtectStatus::Protected => {
                    out!(
                        "protected: session {:016x}, initial sync {:.0} ms",
                        s.session,
                        s.initial_sync_ms
                    );
                    std::io::stdout().flush().ok();
                    return;
                }
                _ => return,
            }
        }
    });
}

/// SIGINT/SIGTERM end protection cleanly (the standby is released).
fn end_on_signals(handle: migrate_core::mirror::ProtectHandle) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT/SIGTERM handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                handle.end();
                say!("migrate-cli: ending protection (the standby is released)");
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// A standby's SIGINT/SIGTERM: before a primary's hello, exit 1 (nothing
/// to clean up); while standing by, stop (this end never takes over, the
/// primary finds its standby lost); after a takeover, end the guest's run
/// (and a re-protection) early, as if `--run-after-failover-s` were up:
/// the returned channel says so.
fn standby_signals(slot: control::Slot<StandbyHandle>) -> Result<crossbeam_channel::Receiver<()>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT/SIGTERM handlers")?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                let handle = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(h) = handle else {
                    say!("migrate-cli: {name}: no protection had begun; exiting");
                    std::process::exit(1);
                };
                h.cancel();
                let _ = tx.try_send(());
                say!("migrate-cli: {name}: the standby stops (a guest taken over stops now)");
            }
        })
        .context("starting the signal thread")?;
    Ok(rx)
}

fn check_bank(mem: &GuestMemory) -> Result<String, String> {
    BankGuest::validate(mem)
        .map(|s| {
            format!(
                "ledger consistent: {} accounts, {} transfers, total {}",
                s.accounts, s.transfers, s.total
            )
        })
        .map_err(|e| format!("ledger inconsistent: {e}"))
}

fn add_check(v: &mut serde_json::Value, check: Option<&Result<String, String>>) {
    if let Some(c) = check {
        let (Ok(m) | Err(m)) = c;
        v["guest_check"] = json!(if c.is_ok() { "ok" } else { "bad" });
        v["guest_check_detail"] = json!(m);
    }
}

/// The standby's VMM: the device state of the last applied checkpoint is
/// loaded, and at resume the built-in guest it names goes on over the
/// image, its output through the gate.
struct StandbyVm {
    image: Arc<GuestMemory>,
    gate: Arc<OutputGate>,
    state: Option<Vec<u8>>,
    guest: Arc<Mutex<Option<RunningGuest>>>,
}

impl DestinationVm for StandbyVm {
    fn load_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.state = Some(state.to_vec());
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        let state = self
            .state
            .as_deref()
            .ok_or_else(|| VmError::new("resume", "no device state loaded"))?;
        let g = guest::resume(&self.image, state, Arc::clone(&self.gate))
            .map_err(|e| VmError::new("resume the guest", format!("{e:#}")))?;
        *self.guest.lock().unwrap_or_else(|p| p.into_inner()) = g;
        Ok(())
    }
}

/// `migrate-cli standby`.
pub fn standby(mut a: StandbyArgs) -> Result<Outcome> {
    output::check_outputs(run::outputs(a.json.as_deref(), Some(&a.steering)))?;
    let (tls, witness_tls) = witness::protection_credentials(
        &mut a.transport,
        a.failover_after_ms,
        &security::Role::Destination {
            listen: &a.listen,
            allow: &[],
        },
        &a.witness,
    )?;
    let sink = output_sink(a.output.as_deref())?;
    let listener = transport::Listener::bind(&a.listen, &a.transport, tls)
        .with_context(|| format!("--listen {}: cannot listen", a.listen))?;
    let own = memory::from_args(&a.memory)?.map(Arc::new);
    // Steered and watched from the moment it listens (`waiting` until a
    // primary's hello); a signal then ends the wait, later stops standing by.
    let slot: control::Slot<StandbyHandle> = Arc::default();
    let stop = standby_signals(Arc::clone(&slot))?;
    let waiting = control::Waiting::new(Arc::clone(&slot), "standby");
    let (control_socket, events) = control::steer(&a.steering, &waiting)?;
    out!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush().ok();
    let mut t = run::accept_source(&listener)?;
    let standby = Standby::accept(t.as_dyn())?;
    waiting.attach(&standby.handle());
    let image = match own {
        Some(m) => m,
        None => Arc::new(memory::adopt(
            standby.layout(),
            a.max_memory.unwrap_or_else(memory::available),
        )?),
    };
    let gate = OutputGate::new(sink);
    let running = Arc::new(Mutex::new(None));
    let mut vm = StandbyVm {
        image: Arc::clone(&image),
        gate: Arc::clone(&gate),
        state: None,
        guest: Arc::clone(&running),
    };
    let mut right = witness::run_right(&a.witness, &a.transport, witness_tls);
    let result = standby.run(t.as_dyn(), &image, &mut vm, &gate, right.as_mut());
    t.finish();
    let mut check = None;
    let mut reprotection = None;
    let outcome = match &result {
        Ok(r) if r.status == StandbyStatus::TookOver => {
            out!(
                "took over from epoch {}: the guest runs here ({:.0} ms after the primary's last word)",
                r.last_checkpoint.unwrap_or(0),
                r.failover_ms
            );
            let g = running.lock().unwrap_or_else(|p| p.into_inner()).take();
            let state = vm.state.clone().unwrap_or_default();
            match (&a.reprotect_to, g) {
                (Some(to), Some(g)) => {
                    let r = reprotect(to, &a, &image, g, &gate, state, &stop)?;
                    reprotection = Some(r);
                }
                (_, g) => {
                    let _ = stop.recv_timeout(Duration::from_secs(a.run_after_failover_s));
                    if let Some(g) = g {
                        g.stop();
                    }
                }
            }
            let c = vm
                .state
                .as_deref()
                .and_then(|s| guest::check_destination(&image, s));
            let ok = !matches!(c, Some(Err(_)));
            check = c;
            match reprotection.as_ref().map(|r: &ProtectionReport| r.status) {
                _ if !ok => Outcome::Failed,
                Some(ProtectStatus::Degraded) => Outcome::Degraded,
                Some(ProtectStatus::Fenced) => Outcome::Fenced,
                _ => Outcome::Done,
            }
        }
        Ok(r) if r.status == StandbyStatus::Released => {
            out!("released: the primary ended protection");
            Outcome::Done
        }
        Ok(r) if r.status == StandbyStatus::Fenced => {
            say!("fenced: the primary is lost but the witness refused the run right here");
            Outcome::Fenced
        }
        Ok(r) => {
            say!(
                "the primary is lost before any checkpoint: nothing to take over ({})",
                r.error.as_deref().unwrap_or("?")
            );
            Outcome::Failed
        }
        Err(IncomingError::Cancelled) => {
            say!("stopped: this end no longer stands by (the primary goes on without it)");
            Outcome::Failed
        }
        Err(e) => {
            say!("standby failed: {e}");
            Outcome::Failed
        }
    };
    // The last event is out (after the takeover's run, re-protection
    // included): the event stream ends, the socket goes.
    if let Some(t) = events {
        let _ = t.join();
    }
    drop(control_socket);
    if let Some(path) = &a.json {
        let mut v = match &result {
            Ok(r) => serde_json::to_value(r).unwrap_or_default(),
            Err(e @ IncomingError::Cancelled) => {
                json!({ "status": "cancelled", "error": e.to_string() })
            }
            Err(e) => json!({ "status": "failed", "error": e.to_string() }),
        };
        v["role"] = json!("standby");
        if let Some(r) = &reprotection {
            v["reprotection"] = serde_json::to_value(r).unwrap_or_default();
        }
        add_check(&mut v, check.as_ref());
        output::write_report("migrate-cli", path, &v);
    }
    Ok(outcome)
}

/// After a takeover: protect the running guest `g` (in `image`, its
/// output through `gate`) to the new standby at `to` for
/// `--run-after-failover-s`, then release that standby and stop the guest.
fn reprotect(
    to: &str,
    a: &StandbyArgs,
    image: &Arc<GuestMemory>,
    g: RunningGuest,
    gate: &OutputGate,
    state: Vec<u8>,
    stop: &crossbeam_channel::Receiver<()>,
) -> Result<ProtectionReport> {
    let tls = security::tls(
        &a.transport,
        &security::Role::Source {
            connect: to,
            hostname: None,
        },
    )?;
    let witness_tls = witness::client_tls(&a.witness, &a.transport)?;
    let mut vm = migrate_guests::FixtureSourceVm::new(g, state);
    let started = transport::connect(to, &a.transport, false, tls, false)
        .map_err(anyhow::Error::from)
        .and_then(|t| {
            let tracking = migrate_core::dirty::DirtyTracking::new(image, TrackerPreference::Best)?;
            Ok((t, tracking))
        });
    let (mut t, tracking) = match started {
        Ok(x) => x,
        Err(e) => {
            // The guest runs on here, unprotected, for the time asked.
            say!("re-protection to {to} could not start: {e:#}; the guest runs unprotected");
            let _ = stop.recv_timeout(Duration::from_secs(a.run_after_failover_s));
            vm.stop();
            return Err(e);
        }
    };
    out!("re-protecting to {to}");
    gate.close();
    let protection = Protection::new(ProtectConfig::with_epoch(Duration::from_millis(
        a.epoch_ms.max(1),
    )));
    let handle = protection.handle();
    say_when_protected(handle.clone());
    let run = Duration::from_secs(a.run_after_failover_s);
    let stop = stop.clone();
    std::thread::spawn(move || {
        let _ = stop.recv_timeout(run);
        handle.end();
    });
    let mut right = witness::run_right(&a.witness, &a.transport, witness_tls);
    let result = protection.run(t.as_dyn(), image, &tracking, &mut vm, gate, right.as_mut());
    vm.stop();
    Ok(result?)
}

/// `migrate-cli witness`: serve claims until killed.
pub fn witness(a: WitnessArgs) -> Result<Outcome> {
    let tls = security::tls(
        &a.transport,
        &security::Role::Destination {
            listen: &a.listen,
            allow: &[],
        },
    )?;
    let listener = transport_tcp::TcpMigrationListener::bind(
        &a.listen,
        transport::tcp_config(&a.transport, false, tls),
    )
    .with_context(|| format!("--listen {}: cannot listen", a.listen))?;
    out!("witness listening on {}", listener.local_addr()?);
    std::io::stdout().flush().ok();
    witness::serve(&listener)
        .map_err(|e| anyhow::anyhow!("witness: {}", report::error_text(&e.into())))?;
    Ok(Outcome::Done)
}
