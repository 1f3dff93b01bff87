//! PC boot sectors: what a BIOS checks and hands over, and two guests of
//! our own written in this repository (assembled with `iced-x86`), each
//! with the rule its memory obeys at any instant, so a migrated copy can
//! be checked by the guest's own rule.
//!
//! Both guests switch to flat 32-bit protected mode (A20 through port
//! 0x92, a three-entry GDT in the sector) and then run forever:
//!
//! - [`sweeper`] adds one to the first byte of every page of a range, page
//!   after page, sweep after sweep (like QEMU's migration test guest), and
//!   prints a character on COM1 every few sweeps. At any instant the pages
//!   below the sweep's position hold one more than the pages at and above
//!   it ([`check_sweep`]).
//! - [`ledger`] keeps a table of 32-bit words in which each word is the one
//!   before it plus a constant: each pass adds one to every word, then
//!   checks the whole table and prints `G` (or `E` and stops, if it finds
//!   the rule broken). At any instant the rule holds except at most at one
//!   word, the pass's position, where the step is one less
//!   ([`check_ledger`]).

use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, al, ax, byte_ptr, cr0, ds, dword_ptr, dx, eax, ecx, edi, es, esp, fs,
    gs, ptr, sp, ss,
};
use iced_x86::{Code, IcedError, Instruction};

/// Where a BIOS loads the boot sector, and starts it.
pub const LOAD_GPA: u64 = 0x7c00;
/// A boot sector's size.
pub const SECTOR: usize = 512;
/// The 32-bit part of our guests (offset in the sector).
const PM_OFFSET: u64 = 0x80;
/// The GDT (offset in the sector) and its descriptor right after it.
const GDT_OFFSET: usize = 0x180;
const GDTR_OFFSET: usize = GDT_OFFSET + 24;

/// The step between the ledger guest's words that `mini-vmm guest` writes
/// (any odd constant works; this one makes neighbouring words differ in
/// many bits).
pub const LEDGER_STEP: u32 = 0x9e37_79b9;

/// A file that is not a bootable PC boot sector.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Not 512 bytes.
    #[error("a boot sector is 512 bytes; this one has {0}")]
    Size(usize),
    /// No 0x55 0xAA at its end.
    #[error("no boot signature (0x55 0xAA at bytes 510-511): found {0:#04x} {1:#04x}")]
    Signature(u8, u8),
    /// A guest of ours could not be assembled (a bug).
    #[error("assembling the guest: {0}")]
    Assemble(#[from] IcedError),
}

/// Check `image` as a BIOS does before it jumps to it.
///
/// # Errors
/// [`BootError::Size`] or [`BootError::Signature`].
pub fn check(image: &[u8]) -> Result<[u8; SECTOR], BootError> {
    let sector: [u8; SECTOR] = image.try_into().map_err(|_| BootError::Size(image.len()))?;
    if sector[510..] != [0x55, 0xaa] {
        return Err(BootError::Signature(sector[510], sector[511]));
    }
    Ok(sector)
}

/// The sweeper over pages `[start, end)` (guest-physical, 4 KiB aligned,
/// above 1 MiB), printing `B` every `every` sweeps.
///
/// # Errors
/// [`BootError::Assemble`] (a bug).
pub fn sweeper(start: u32, end: u32, every: u32) -> Result<[u8; SECTOR], BootError> {
    let mut a = CodeAssembler::new(32)?;
    let mut outer = a.create_label();
    let mut inner = a.create_label();
    let mut wait = a.create_label();
    a.xor(ecx, ecx)?;
    a.set_label(&mut outer)?;
    a.mov(eax, start)?;
    a.set_label(&mut inner)?;
    a.inc(byte_ptr(eax))?;
    a.add(eax, 4096)?;
    a.cmp(eax, end)?;
    a.jb(inner)?;
    a.inc(ecx)?;
    a.cmp(ecx, every)?;
    a.jb(outer)?;
    a.xor(ecx, ecx)?;
    print(&mut a, &mut wait, b'B')?;
    a.jmp(outer)?;
    sector(a)
}

/// The ledger over `[start, end)`: `(end - start) / 4` words, each the one
/// before plus `step`; prints `G` every `every` checked passes.
///
/// # Errors
/// [`BootError::Assemble`] (a bug).
pub fn ledger(start: u32, end: u32, step: u32, every: u32) -> Result<[u8; SECTOR], BootError> {
    let mut a = CodeAssembler::new(32)?;
    let (mut init, mut pass, mut add, mut verify, mut bad) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    let (mut counted, mut wait, mut wait_bad, mut halt) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    // The table: word i = i * step.
    a.mov(edi, start)?;
    a.xor(eax, eax)?;
    a.set_label(&mut init)?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(eax, step)?;
    a.add(edi, 4)?;
    a.cmp(edi, end)?;
    a.jb(init)?;
    a.xor(ecx, ecx)?;
    // A pass: every word plus one, then the whole table checked.
    a.set_label(&mut pass)?;
    a.mov(edi, start)?;
    a.set_label(&mut add)?;
    a.inc(dword_ptr(edi))?;
    a.add(edi, 4)?;
    a.cmp(edi, end)?;
    a.jb(add)?;
    a.mov(edi, start + 4)?;
    a.set_label(&mut verify)?;
    a.mov(eax, dword_ptr(edi))?;
    a.sub(eax, dword_ptr(edi - 4))?;
    a.cmp(eax, step)?;
    a.jne(bad)?;
    a.add(edi, 4)?;
    a.cmp(edi, end)?;
    a.jb(verify)?;
    a.inc(ecx)?;
    a.cmp(ecx, every)?;
    a.jb(counted)?;
    a.xor(ecx, ecx)?;
    print(&mut a, &mut wait, b'G')?;
    a.set_label(&mut counted)?;
    a.jmp(pass)?;
    a.set_label(&mut bad)?;
    print(&mut a, &mut wait_bad, b'E')?;
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    sector(a)
}

/// Send `c` on COM1 once the line is idle (clobbers al, dx).
fn print(a: &mut CodeAssembler, wait: &mut CodeLabel, c: u8) -> Result<(), IcedError> {
    a.mov(dx, 0x3fd)?;
    a.set_label(wait)?;
    a.in_(al, dx)?;
    a.test(al, 0x20)?;
    a.jz(*wait)?;
    a.mov(dx, 0x3f8)?;
    a.mov(al, c as u32)?;
    a.out(dx, al)?;
    Ok(())
}

/// The 16-bit start (segments, stack, A20, GDT, protected mode, far jump),
/// `body` (32-bit) at [`PM_OFFSET`], the GDT and the signature.
fn sector(mut body: CodeAssembler) -> Result<[u8; SECTOR], BootError> {
    let gdtr = LOAD_GPA + GDTR_OFFSET as u64;
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, LOAD_GPA as u32)?;
    a.in_(al, 0x92)?;
    a.or(al, 2)?;
    a.out(0x92, al)?;
    a.lgdt(ptr(gdtr))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.add_instruction(Instruction::with_far_branch(
        Code::Jmp_ptr1616,
        0x08,
        (LOAD_GPA + PM_OFFSET) as u32,
    )?)?;
    let real = a.assemble(LOAD_GPA)?;
    // The 32-bit part first loads the flat data segments and the stack.
    let mut pm = CodeAssembler::new(32)?;
    pm.mov(ax, 0x10)?;
    for seg in [ds, es, fs, gs, ss] {
        pm.mov(seg, ax)?;
    }
    pm.mov(esp, LOAD_GPA as u32)?;
    let mut pm = pm.assemble(LOAD_GPA + PM_OFFSET)?;
    let at = LOAD_GPA + PM_OFFSET + pm.len() as u64;
    pm.extend(body.assemble(at)?);
    let mut s = [0u8; SECTOR];
    let pm_at = PM_OFFSET as usize;
    if real.len() > pm_at || pm_at + pm.len() > GDT_OFFSET {
        return Err(BootError::Size(real.len() + pm.len()));
    }
    s[..real.len()].copy_from_slice(&real);
    s[pm_at..pm_at + pm.len()].copy_from_slice(&pm);
    // Null, flat 4 GiB code (0x08) and data (0x10) descriptors.
    let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        s[GDT_OFFSET + 8 * i..GDT_OFFSET + 8 * i + 8].copy_from_slice(&d.to_le_bytes());
    }
    s[GDTR_OFFSET..GDTR_OFFSET + 2].copy_from_slice(&23u16.to_le_bytes());
    s[GDTR_OFFSET + 2..GDTR_OFFSET + 6]
        .copy_from_slice(&((LOAD_GPA + GDT_OFFSET as u64) as u32).to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

/// Where a sweep stands in `pages` (the first byte of every page of the
/// swept range, in order): `(value of the pages not yet swept this time,
/// index of the first of them)`.
///
/// # Errors
/// A description of the first page that breaks the rule.
pub fn check_sweep(pages: &[u8]) -> Result<(u8, usize), String> {
    let Some(&last) = pages.last() else {
        return Err("no pages".into());
    };
    // Pages before the position hold last + 1, the rest last.
    let pos = pages
        .iter()
        .position(|&b| b == last)
        .ok_or_else(|| "no page holds the last page's value".to_string())?;
    if let Some(i) = pages[..pos].iter().position(|&b| b != last.wrapping_add(1)) {
        return Err(format!(
            "page {i} holds {} where the sweep had passed ({} expected)",
            pages[i],
            last.wrapping_add(1)
        ));
    }
    if let Some(i) = pages[pos..].iter().position(|&b| b != last) {
        return Err(format!(
            "page {} holds {} where the sweep had not passed ({last} expected)",
            pos + i,
            pages[pos + i]
        ));
    }
    Ok((last, pos))
}

/// Check the ledger rule over `words`: each word the one before plus
/// `step`, except at most one place where the step is one less (the
/// pass's position). Returns that position, if any.
///
/// # Errors
/// A description of the first word that breaks the rule.
pub fn check_ledger(words: &[u32], step: u32) -> Result<Option<usize>, String> {
    let mut seam = None;
    for (i, w) in words.windows(2).enumerate() {
        let d = w[1].wrapping_sub(w[0]);
        if d == step {
            continue;
        }
        if d == step.wrapping_sub(1) && seam.is_none() {
            seam = Some(i + 1);
            continue;
        }
        return Err(format!(
            "word {} is {:#x} after {:#x}: step {d:#x}, expected {step:#x}",
            i + 1,
            w[1],
            w[0]
        ));
    }
    Ok(seam)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_guests_are_boot_sectors() {
        for s in [
            sweeper(1 << 20, 4 << 20, 1).unwrap(),
            ledger(1 << 20, 2 << 20, 3, 1).unwrap(),
        ] {
            assert_eq!(check(&s).unwrap(), s);
        }
        assert!(matches!(check(&[0; 100]), Err(BootError::Size(100))));
        assert!(matches!(check(&[0; 512]), Err(BootError::Signature(0, 0))));
    }

    #[test]
    fn the_sweep_rule() {
        assert_eq!(check_sweep(&[5, 5, 4, 4]), Ok((4, 2)));
        assert_eq!(check_sweep(&[4, 4, 4]), Ok((4, 0)));
        assert_eq!(check_sweep(&[0, 255, 255]), Ok((255, 1)));
        assert!(check_sweep(&[5, 4, 5, 4]).is_err());
        assert!(check_sweep(&[6, 4, 4]).is_err());
    }

    #[test]
    fn the_ledger_rule() {
        assert_eq!(check_ledger(&[1, 4, 7, 10], 3), Ok(None));
        assert_eq!(check_ledger(&[2, 5, 7, 10], 3), Ok(Some(2)));
        assert!(check_ledger(&[2, 5, 7, 9], 3).is_err());
        assert!(check_ledger(&[1, 4, 8], 3).is_err());
    }
}
