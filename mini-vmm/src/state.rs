//! The device-state blob the engine carries from source to destination:
//! the vCPU's registers and the devices' state, in a versioned,
//! fixed-layout little-endian encoding (decoding checks every length).
//! Version 2 added the PC devices (COM1, port 0x92) and how the guest
//! booted; a version-1 blob is refused as foreign.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::pc::PcState;

const MAGIC: &[u8; 8] = b"MINIVMM2";

/// The guest-visible device: what the guest reported on its ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Table pages the guest reported writing ([`PORT_PAGE`](crate::program::PORT_PAGE)).
    pub pages: u64,
    /// Passes done ([`PORT_PASS`](crate::program::PORT_PASS)).
    pub passes: u32,
    /// The answer, once given ([`PORT_RESULT`](crate::program::PORT_RESULT)).
    pub result: Option<u32>,
    /// The vCPU executed `hlt`.
    pub halted: bool,
    /// The guest is a boot sector (it runs until stopped), not the table
    /// program (which halts with a result).
    pub boot_sector: bool,
    /// The PC devices.
    pub pc: PcState,
}

/// Everything the destination needs to continue the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmState {
    /// General-purpose registers, `rip`, `rflags`.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The I/O device.
    pub device: DeviceState,
}

/// A device-state blob that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a blob of this VMM (or of another version of it).
    #[error("device state has no MINIVMM2 header (not this VMM's, or another version's)")]
    BadMagic,
    /// Shorter than its layout.
    #[error("device state truncated at byte {0}")]
    Truncated(usize),
    /// Longer than its layout.
    #[error("device state has {0} trailing bytes")]
    Trailing(usize),
}

struct Writer(Vec<u8>);
impl Writer {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn segment(&mut self, s: &kvm_segment) {
        self.u64(s.base);
        self.u32(s.limit);
        self.u16(s.selector);
        for b in [
            s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
        ] {
            self.u8(b);
        }
    }
    fn dtable(&mut self, d: &kvm_dtable) {
        self.u64(d.base);
        self.u16(d.limit);
    }
}

struct Reader<'a>(&'a [u8], usize);
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let b = self
            .0
            .get(self.1..self.1 + N)
            .ok_or(StateError::Truncated(self.0.len()))?;
        self.1 += N;
        Ok(b.try_into().expect("N bytes"))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        self.take().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        self.take().map(u16::from_le_bytes)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        self.take::<1>().map(|b| b[0])
    }
    fn segment(&mut self) -> Result<kvm_segment, StateError> {
        Ok(kvm_segment {
            base: self.u64()?,
            limit: self.u32()?,
            selector: self.u16()?,
            type_: self.u8()?,
            present: self.u8()?,
            dpl: self.u8()?,
            db: self.u8()?,
            s: self.u8()?,
            l: self.u8()?,
            g: self.u8()?,
            avl: self.u8()?,
            unusable: self.u8()?,
            ..Default::default()
        })
    }
    fn dtable(&mut self) -> Result<kvm_dtable, StateError> {
        Ok(kvm_dtable {
            base: self.u64()?,
            limit: self.u16()?,
            ..Default::default()
        })
    }
}

fn regs_fields(r: &mut kvm_regs) -> [&mut u64; 18] {
    [
        &mut r.rax,
        &mut r.rbx,
        &mut r.rcx,
        &mut r.rdx,
        &mut r.rsi,
        &mut r.rdi,
        &mut r.rsp,
        &mut r.rbp,
        &mut r.r8,
        &mut r.r9,
        &mut r.r10,
        &mut r.r11,
        &mut r.r12,
        &mut r.r13,
        &mut r.r14,
        &mut r.r15,
        &mut r.rip,
        &mut r.rflags,
    ]
}

impl VmState {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(MAGIC.to_vec());
        let d = &self.device;
        w.u64(d.pages);
        w.u32(d.passes);
        w.u8(d.result.is_some() as u8);
        w.u32(d.result.unwrap_or(0));
        w.u8(d.halted as u8);
        w.u8(d.boot_sector as u8);
        let pc = &d.pc;
        for v in [pc.ier, pc.lcr, pc.mcr, pc.scr, pc.dll, pc.dlm, pc.port92] {
            w.u8(v);
        }
        w.u64(pc.serial_bytes);
        let mut regs = self.regs;
        for f in regs_fields(&mut regs) {
            w.u64(*f);
        }
        let s = &self.sregs;
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            w.segment(seg);
        }
        w.dtable(&s.gdt);
        w.dtable(&s.idt);
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            w.u64(v);
        }
        for v in s.interrupt_bitmap {
            w.u64(v);
        }
        w.0
    }

    /// Decode what [`encode`](Self::encode) wrote.
    ///
    /// # Errors
    /// [`StateError`] for a foreign, truncated or over-long blob.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let mut r = Reader(bytes, MAGIC.len());
        let pages = r.u64()?;
        let passes = r.u32()?;
        let has_result = r.u8()? != 0;
        let result = r.u32()?;
        let halted = r.u8()? != 0;
        let boot_sector = r.u8()? != 0;
        let pc = PcState {
            ier: r.u8()?,
            lcr: r.u8()?,
            mcr: r.u8()?,
            scr: r.u8()?,
            dll: r.u8()?,
            dlm: r.u8()?,
            port92: r.u8()?,
            serial_bytes: r.u64()?,
        };
        let mut regs = kvm_regs::default();
        for f in regs_fields(&mut regs) {
            *f = r.u64()?;
        }
        let mut s = kvm_sregs::default();
        for seg in [
            &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
        ] {
            *seg = r.segment()?;
        }
        s.gdt = r.dtable()?;
        s.idt = r.dtable()?;
        for v in [
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.cr8,
            &mut s.efer,
            &mut s.apic_base,
        ] {
            *v = r.u64()?;
        }
        for v in &mut s.interrupt_bitmap {
            *v = r.u64()?;
        }
        if r.1 != bytes.len() {
            return Err(StateError::Trailing(bytes.len() - r.1));
        }
        Ok(Self {
            regs,
            sregs: s,
            device: DeviceState {
                pages,
                passes,
                result: has_result.then_some(result),
                halted,
                boot_sector,
                pc,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let mut st = VmState::default();
        st.regs.rip = 0x1234;
        st.regs.rbx = 0xdead_beef;
        st.sregs.cs.db = 1;
        st.sregs.cr0 = 1;
        st.sregs.interrupt_bitmap[3] = 7;
        st.device = DeviceState {
            pages: 9,
            passes: 2,
            result: Some(5),
            halted: true,
            boot_sector: true,
            pc: PcState {
                lcr: 3,
                scr: 0x5a,
                port92: 2,
                serial_bytes: 77,
                ..PcState::default()
            },
        };
        let b = st.encode();
        assert_eq!(VmState::decode(&b).unwrap(), st);
        for cut in [0, 7, 8, 20, b.len() - 1] {
            assert!(VmState::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            VmState::decode(&long),
            Err(StateError::Trailing(1))
        ));
    }

    /// The fuzzer starts from seeds in today's format: a seed of an older
    /// version would only ever test the magic check.
    #[test]
    fn the_fuzz_seeds_are_of_this_version() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/machine_state");
        let mut seeds = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            VmState::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seeds += 1;
        }
        assert!(seeds > 0, "no seed in {dir}");
    }
}
