//! `mini-vmm protect` and `mini-vmm standby`: a running KVM guest mirrored
//! to a standby in epochs ([`migrate_core::mirror`]), its serial output
//! released through the output gate only once the standby holds the epoch
//! that printed it; the standby takes the guest over when the primary is
//! lost and the witness agrees.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use migrate_core::mirror::{
    OutputGate, ProtectConfig, ProtectStatus, Protection, Standby, StandbyStatus,
};
use migrate_frontend::args::{TransportArgs, WitnessChoice};
use migrate_frontend::{Outcome, output, security, transport, witness};
use mini_vmm::machine::{KvmDestination, KvmSource, Machine};
use serde_json::json;

use crate::{GuestArgs, boot_guest, run_for};

/// The guest's serial bytes, into the output gate.
struct Gated(Arc<OutputGate>);

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.emit(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `mini-vmm protect`.
#[derive(Args)]
pub struct ProtectArgs {
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    witness: WitnessChoice,
    /// The standby, host:port.
    #[arg(long)]
    standby: String,
    /// Time from one epoch's pause to the next, ms.
    #[arg(long, default_value_t = 25)]
    epoch_ms: u64,
    /// Silence from the standby after which it is lost, ms.
    #[arg(long, default_value_t = 1000)]
    failover_after_ms: u64,
    /// Write the protection's report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `mini-vmm standby`.
#[derive(Args)]
pub struct StandbyArgs {
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    witness: WitnessChoice,
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// Silence from the primary after which it is lost, ms.
    #[arg(long, default_value_t = 1000)]
    failover_after_ms: u64,
    /// After a takeover, run the guest this long, then exit.
    #[arg(long, default_value_t = 5)]
    run_after_failover_s: u64,
    /// Where the guest's serial port writes after a takeover (the last
    /// applied epoch's output first).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Write the standby's report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where released output goes: the file, or stdout.
fn sink(path: Option<&std::path::Path>) -> Result<Box<dyn Write + Send>> {
    Ok(match path {
        Some(p) => Box::new(output::create_output(p).context("--serial")?),
        None => Box::new(std::io::stdout()),
    })
}

/// Run a boot-sector guest protected for `--run-for-s`, then release the
/// standby.
pub fn protect(mut a: ProtectArgs) -> Result<Outcome> {
    if a.guest.boot_sector.is_none() {
        bail!("protect runs a boot-sector guest: give --boot-sector FILE");
    }
    if a.epoch_ms >= a.failover_after_ms {
        bail!("--epoch-ms must be shorter than --failover-after-ms");
    }
    output::check_outputs(output::Outputs {
        json: a.json.as_deref(),
        ..Default::default()
    })?;
    let (tls, witness_tls) = witness::protection_credentials(
        &mut a.transport,
        a.failover_after_ms,
        &security::Role::Source {
            connect: &a.standby,
            hostname: None,
        },
        &a.witness,
    )?;
    let gate = OutputGate::new(sink(a.guest.serial.as_deref())?);
    let serial = a.guest.serial.take();
    let (mut m, boot) = boot_guest(&a.guest)?;
    m.set_serial(Box::new(Gated(Arc::clone(&gate))));
    let mut t = transport::connect(&a.standby, &a.transport, false, tls, false)?;
    let tracking = m.dirty_tracking()?;
    let vcpu = m.start(&boot, a.guest.pages_per_sec)?;
    let protection = Protection::new(ProtectConfig::with_epoch(Duration::from_millis(
        a.epoch_ms.max(1),
    )));
    let handle = protection.handle();
    let run = Duration::from_secs(a.guest.run_for_s);
    std::thread::spawn(move || {
        std::thread::sleep(run);
        handle.end();
    });
    let mut right = witness::run_right(&a.witness, &a.transport, witness_tls);
    let result = protection.run(
        t.as_dyn(),
        m.memory(),
        &tracking,
        &mut KvmSource::new(&vcpu),
        &gate,
        right.as_mut(),
    );
    let outcome = match &result {
        Ok(r) if r.status == ProtectStatus::Degraded => Outcome::Degraded,
        Ok(r) if r.status == ProtectStatus::Fenced => Outcome::Fenced,
        Ok(_) => Outcome::Done,
        Err(_) => Outcome::Failed,
    };
    let serial_bytes = vcpu.device().pc.serial_bytes;
    drop(vcpu);
    if let Some(p) = &a.json {
        let mut v = match &result {
            Ok(r) => serde_json::to_value(r).unwrap_or_default(),
            Err(e) => json!({ "status": "failed", "error": e.to_string() }),
        };
        v["role"] = json!("primary");
        v["serial_bytes"] = json!(serial_bytes);
        output::write_report("mini-vmm", p, &v);
    }
    match &result {
        Ok(r) => say!(
            "protection {}: {} epochs, pause p99 {} us{}",
            r.status.name(),
            r.epochs,
            r.epoch_pause_us.p99,
            serial.map_or(String::new(), |s| format!("; output in {}", s.display()))
        ),
        Err(e) => say!("protection failed: {e}"),
    }
    Ok(outcome)
}

/// Stand by for a protected KVM guest; after a takeover run it for
/// `--run-after-failover-s`.
pub fn standby(mut a: StandbyArgs) -> Result<Outcome> {
    output::check_outputs(output::Outputs {
        json: a.json.as_deref(),
        ..Default::default()
    })?;
    let (tls, witness_tls) = witness::protection_credentials(
        &mut a.transport,
        a.failover_after_ms,
        &security::Role::Destination {
            listen: &a.listen,
            allow: &[],
        },
        &a.witness,
    )?;
    let gate = OutputGate::new(sink(a.serial.as_deref())?);
    let listener = transport::Listener::bind(&a.listen, &a.transport, tls)?;
    out!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush().ok();
    let mut t = listener.accept()?;
    let standby = Standby::accept(t.as_dyn())?;
    let mut m = Machine::for_layout_in(standby.layout(), None)?;
    m.set_serial(Box::new(Gated(Arc::clone(&gate))));
    let image = Arc::clone(m.memory());
    let mut vm = KvmDestination::new(&mut m, 0);
    vm.digest = false;
    let mut right = witness::run_right(&a.witness, &a.transport, witness_tls);
    let result = standby.run(t.as_dyn(), &image, &mut vm, &gate, right.as_mut());
    t.finish();
    let mut serial_bytes = None;
    let outcome = match &result {
        Ok(r) if r.status == StandbyStatus::TookOver => {
            let vcpu = vm.running.take().context("the guest was not started")?;
            out!(
                "took over from epoch {}: the guest runs here",
                r.last_checkpoint.unwrap_or(0)
            );
            let ran = run_for(&vcpu, a.run_after_failover_s, None)?;
            serial_bytes = Some(vcpu.device().pc.serial_bytes);
            if ran { Outcome::Done } else { Outcome::Failed }
        }
        Ok(r) if r.status == StandbyStatus::Released => Outcome::Done,
        Ok(r) if r.status == StandbyStatus::Fenced => Outcome::Fenced,
        Ok(_) | Err(_) => Outcome::Failed,
    };
    if let Some(p) = &a.json {
        let mut v = match &result {
            Ok(r) => serde_json::to_value(r).unwrap_or_default(),
            Err(e) => json!({ "status": "failed", "error": e.to_string() }),
        };
        v["role"] = json!("standby");
        if let Some(n) = serial_bytes {
            v["serial_bytes"] = json!(n);
        }
        output::write_report("mini-vmm", p, &v);
    }
    if let Err(e) = &result {
        say!("standby failed: {e}");
    }
    Ok(outcome)
}
