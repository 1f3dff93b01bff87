//! The built-in guest: an image and a workload in the guest memory, driven
//! like a VMM drives vCPUs.

use std::sync::Arc;

use anyhow::{Context, Result};
use migrate_core::memory::GuestMemory;
use migrate_core::mirror::OutputGate;
use migrate_guests::{
    BankConfig, BankGuest, FixtureSourceVm, RunningGuest, SyntheticGuest, WorkloadConfig,
    fill_memory,
};
use serde_json::json;

use crate::args::{GuestArgs, GuestKind};

/// Write the initial image (before dirty tracking starts: the image is the
/// guest's past, not its dirtying).
pub fn fill(mem: &GuestMemory, g: &GuestArgs) -> Result<()> {
    if !g.no_fill {
        fill_memory(mem, g.mix, g.seed)?;
    }
    if g.kind() == GuestKind::Bank {
        BankGuest::format(mem, &bank_config(mem, g))?;
    }
    Ok(())
}

/// Start the workload; the device state names the guest so the destination
/// knows how to check it.
pub fn start(mem: &Arc<GuestMemory>, g: &GuestArgs) -> Result<FixtureSourceVm> {
    start_gated(mem, g, None)
}

/// As [`start`], the bank guest sending its receipts through `gate` (a
/// protected guest's output). The device state says how to resume it
/// elsewhere ([`resume`]).
pub fn start_gated(
    mem: &Arc<GuestMemory>,
    g: &GuestArgs,
    gate: Option<Arc<OutputGate>>,
) -> Result<FixtureSourceVm> {
    let guest = match g.kind() {
        GuestKind::Idle => RunningGuest::idle(),
        GuestKind::Dirty => SyntheticGuest::start(
            Arc::clone(mem),
            WorkloadConfig {
                threads: g.threads.max(1),
                pages_per_sec: g.dirty_rate,
                pattern: g.pattern,
                seed: g.seed,
            },
        )
        .context("start the built-in guest's threads")?,
        GuestKind::Bank => match gate {
            Some(gate) => {
                BankGuest::start_with_receipts(Arc::clone(mem), bank_config(mem, g), gate)
            }
            None => BankGuest::start(Arc::clone(mem), bank_config(mem, g)),
        }
        .context("start the built-in guest's threads")?,
    };
    let kind = match g.kind() {
        GuestKind::Idle => "idle",
        GuestKind::Dirty => "dirty",
        GuestKind::Bank => "bank",
    };
    let state = json!({
        "guest": kind,
        "seed": g.seed,
        "threads": g.threads,
        "rate": g.dirty_rate,
    })
    .to_string()
    .into_bytes();
    Ok(FixtureSourceVm::new(guest, state))
}

/// Resume the built-in guest described by `state` (as [`start_gated`]
/// wrote it) on `mem`, a copy of its memory: the bank guest goes on with
/// its ledger and receipts where the copy stood, through `gate`. `None`
/// for a state that names no guest that runs (idle, or not ours).
pub fn resume(
    mem: &Arc<GuestMemory>,
    state: &[u8],
    gate: Arc<OutputGate>,
) -> Result<Option<RunningGuest>> {
    let v: serde_json::Value = match serde_json::Deserializer::from_slice(state)
        .into_iter()
        .next()
    {
        Some(Ok(v)) => v,
        _ => return Ok(None),
    };
    let g = GuestArgs {
        guest: None,
        dirty_rate: v["rate"].as_u64().unwrap_or(5000),
        pattern: migrate_guests::DirtyPattern::Uniform,
        threads: v["threads"].as_u64().unwrap_or(2) as usize,
        mix: migrate_guests::PageMix::parse("40:30:30").context("the default page mix")?,
        seed: v["seed"].as_u64().unwrap_or(1),
        no_fill: true,
        fill: false,
    };
    let guest = match v["guest"].as_str() {
        Some("bank") => {
            BankGuest::start_with_receipts(Arc::clone(mem), bank_config(mem, &g), gate)?
        }
        Some("dirty") => SyntheticGuest::start(
            Arc::clone(mem),
            WorkloadConfig {
                threads: g.threads.max(1),
                pages_per_sec: g.dirty_rate,
                pattern: g.pattern,
                seed: g.seed,
            },
        )?,
        _ => return Ok(None),
    };
    Ok(Some(guest))
}

fn bank_config(mem: &GuestMemory, g: &GuestArgs) -> BankConfig {
    // One account per 1 KiB of the first region, at most a million.
    let accounts = (mem.regions()[0].len() as u64 / 1024).clamp(64, 1 << 20);
    BankConfig {
        accounts,
        initial_balance: 1000,
        threads: g.threads.clamp(1, 64),
        transfers_per_sec: g.dirty_rate,
        seed: g.seed,
    }
}

/// After commit on the destination: check what can be checked of the guest
/// named in the device state. `None` when there is nothing to check.
pub fn check_destination(mem: &GuestMemory, state: &[u8]) -> Option<Result<String, String>> {
    // The state is our JSON descriptor, then the guest's counters.
    let v: serde_json::Value = serde_json::Deserializer::from_slice(state)
        .into_iter()
        .next()?
        .ok()?;
    if v.get("guest")?.as_str()? != "bank" {
        return None;
    }
    Some(
        BankGuest::validate(mem)
            .map(|s| {
                format!(
                    "ledger consistent: {} accounts, {} transfers, total {}",
                    s.accounts, s.transfers, s.total
                )
            })
            .map_err(|e| format!("ledger inconsistent: {e}")),
    )
}
