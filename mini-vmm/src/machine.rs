//! The VM: KVM, guest memory in vm-memory (as rust-vmm VMMs keep it), one
//! dirty-logging memory slot per region, one vCPU; and its two faces to the
//! migration engine, [`SourceVm`] and [`DestinationVm`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use migrate_core::dirty::{DirtyError, DirtyUnion, KvmDirtyLogTracker, VmMemoryBitmap};
use migrate_core::memory::{GuestMemory, MemoryError, MemoryLayout, VmMemory, file_reads_zero};
use migrate_core::vm::{DestinationVm, SourceVm, VmError};
use vm_memory::{Bytes, FileOffset, GuestAddress};

use crate::boot::{LOAD_GPA, SECTOR};
use crate::program::{CODE_GPA, LIST_GPA, ScatterProgram, TABLE_GPA, TableProgram};
use crate::state::{DeviceState, VmState};
use crate::vcpu::{SerialSink, VcpuError, VcpuRunner};

/// A VMM error.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` cannot be used.
    #[error("KVM unavailable: {0}")]
    NoKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be made or adopted.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Dirty tracking could not start.
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    /// The vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// The file at `path`, created with `bytes` reserved, or checked to hold
/// exactly `bytes`; and whether it reads as zeros (created here, or only
/// holes).
fn backing_file(path: &Path, bytes: u64) -> Result<(File, bool), VmmError> {
    let err = |e: std::io::Error| VmmError::Memory(format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    let actual = file.metadata().map_err(err)?.len();
    if actual == 0 {
        let len = libc::off_t::try_from(bytes)
            .map_err(|_| VmmError::Memory(format!("{bytes} B do not fit a file")))?;
        // SAFETY: a plain syscall on a file descriptor this function owns.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(err(std::io::Error::from_raw_os_error(rc)));
        }
        return Ok((file, true));
    } else if actual != bytes {
        return Err(VmmError::Memory(format!(
            "{} holds {actual} B, the guest has {bytes} B",
            path.display()
        )));
    }
    let zeros = file_reads_zero(&file);
    Ok((file, zeros))
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// CR0's cache-disable and not-write-through bits.
const CR0_CD_NW: u64 = 0x6000_0000;

/// The low region: code and the scatter list below 1 MiB.
const LOW_BYTES: u64 = TABLE_GPA;

/// A KVM virtual machine with its guest memory and one vCPU.
pub struct Machine {
    vm: Arc<VmFd>,
    vmm_mem: Arc<VmMemory>,
    mem: Arc<GuestMemory>,
    vcpu: Option<VcpuFd>,
    serial: Option<SerialSink>,
    /// Known to read as zeros (fresh); see [`Machine::reads_zero`].
    reads_zero: bool,
    _kvm: Kvm,
}

impl Machine {
    /// A VM with 1 MiB of low memory and `table_bytes` from [`TABLE_GPA`]
    /// on (rounded up to whole pages).
    ///
    /// # Errors
    /// [`VmmError`] when KVM or the memory cannot be set up.
    pub fn new(table_bytes: u64) -> Result<Self, VmmError> {
        let high = table_bytes.div_ceil(4096).max(1) * 4096;
        Self::with_ranges(&[(0, LOW_BYTES), (TABLE_GPA, high)])
    }

    /// A PC: `bytes` of RAM from address 0 (rounded up to whole pages; the
    /// legacy hole below 1 MiB is plain RAM), for a boot sector.
    ///
    /// # Errors
    /// [`VmmError`] when KVM or the memory cannot be set up, or `bytes` is
    /// below 2 MiB.
    pub fn pc(bytes: u64) -> Result<Self, VmmError> {
        if bytes < 2 << 20 {
            return Err(VmmError::Memory(format!(
                "a PC needs at least 2 MiB of memory, not {bytes} B"
            )));
        }
        Self::with_ranges(&[(0, bytes.div_ceil(4096) * 4096)])
    }

    /// A VM whose memory has the layout a migration source announced.
    ///
    /// # Errors
    /// [`VmmError`] as for [`new`](Self::new).
    pub fn for_layout(layout: &MemoryLayout) -> Result<Self, VmmError> {
        Self::for_layout_in(layout, None)
    }

    /// As [`for_layout`](Self::for_layout), with the guest's memory in the
    /// file at `path` when given (shared mapping, regions one after another
    /// in the file), so that it can be read once the VMM has exited. The
    /// file is created at the layout's size, or must have exactly that size.
    ///
    /// # Errors
    /// As for [`new`](Self::new); [`VmmError::Memory`] when the file cannot
    /// be created, has another size, or its blocks cannot be reserved (a
    /// full disk fails here, not as a fault when the guest touches a page).
    pub fn for_layout_in(layout: &MemoryLayout, path: Option<&Path>) -> Result<Self, VmmError> {
        let ranges: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.gpa, r.len)).collect();
        let file = path
            .map(|p| backing_file(p, ranges.iter().map(|r| r.1).sum()))
            .transpose()?;
        // Fresh anonymous memory, a file made here, or one of only holes.
        let reads_zero = file.as_ref().is_none_or(|f| f.1);
        let mut m = Self::with_ranges_in(&ranges, file.map(|f| f.0))?;
        m.reads_zero = reads_zero;
        Ok(m)
    }

    /// Whether the guest memory reads as zeros everywhere (nothing written
    /// yet): an incoming migration then need not send zero pages
    /// (`IncomingMigration::memory_reads_zero`).
    pub fn reads_zero(&self) -> bool {
        self.reads_zero
    }

    fn with_ranges(ranges: &[(u64, u64)]) -> Result<Self, VmmError> {
        Self::with_ranges_in(ranges, None)
    }

    fn with_ranges_in(ranges: &[(u64, u64)], file: Option<File>) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        let file = file.map(Arc::new);
        let mut offset = 0;
        let mut vr = Vec::with_capacity(ranges.len());
        for &(gpa, len) in ranges {
            let at = file
                .as_ref()
                .map(|f| FileOffset::from_arc(f.clone(), offset));
            vr.push((GuestAddress(gpa), len as usize, at));
            offset += len;
        }
        let vmm_mem = Arc::new(
            VmMemory::from_ranges_with_files(&vr).map_err(|e| VmmError::Memory(e.to_string()))?,
        );
        let mem = Arc::new(
            GuestMemory::from_vm_memory(&vmm_mem)
                .map_err(|e: MemoryError| VmmError::Memory(e.to_string()))?,
        );
        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: r.gpa(),
                memory_size: r.len() as u64,
                userspace_addr: r.as_ptr() as u64,
            };
            // SAFETY: the mapping belongs to `vmm_mem`, which this machine
            // keeps (and `mem` keeps) alive as long as the VM fd.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        Ok(Self {
            reads_zero: false,
            vm: Arc::new(vm),
            vmm_mem,
            mem,
            vcpu: Some(vcpu),
            serial: None,
            _kvm: kvm,
        })
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The guest memory, as the migration engine sees it.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The guest memory, as the VMM's devices see it (vm-memory).
    pub fn vmm_memory(&self) -> &Arc<VmMemory> {
        &self.vmm_mem
    }

    /// Start dirty tracking as a KVM VMM does: KVM's log of the guest's
    /// writes ∪ vm-memory's bitmap of the VMM's own.
    ///
    /// Why KVM's log and not userfaultfd write-protect: under this kernel
    /// both see every page a vCPU writes (the boot-sector test
    /// `userfaultfd_sees_a_kvm_guests_writes_as_the_dirty_log_does` runs
    /// both on one running guest), and the log is the cheaper harvest:
    /// 61 µs against 234 µs for 32 MiB with 5889 pages dirty, measured
    /// here; it also needs no re-protection of the host mappings, which
    /// would make KVM drop its own mappings of every harvested page.
    ///
    /// # Errors
    /// [`VmmError::Dirty`] when KVM refuses the dirty log.
    pub fn dirty_tracking(&self) -> Result<DirtyUnion, VmmError> {
        let slots: Vec<u32> = (0..self.mem.regions().len() as u32).collect();
        Ok(DirtyUnion::new(vec![
            Box::new(KvmDirtyLogTracker::new(self.vm.clone(), &self.mem, &slots)?),
            Box::new(VmMemoryBitmap::new(&self.vmm_mem, &self.mem)?),
        ]))
    }

    /// Load `program` (through vm-memory, so the VMM's bitmap sees it) and
    /// return the boot state: flat 32-bit protected mode at [`CODE_GPA`].
    ///
    /// # Errors
    /// [`VmmError`] when the code does not fit or KVM refuses a register read.
    pub fn load_table_program(&self, program: &TableProgram) -> Result<VmState, VmmError> {
        if program.table_bytes() > self.mem.total_bytes() - LOW_BYTES {
            return Err(VmmError::Memory(format!(
                "a {} B table does not fit the guest memory",
                program.table_bytes()
            )));
        }
        self.load(&program.code(), &[])
    }

    /// Load a boot sector at [`LOAD_GPA`] (through vm-memory) and return
    /// the state a PC BIOS hands over: real mode, `CS:IP` = 0000:7C00,
    /// `DL` = 0x80 (the first hard disk), interrupts off, the other
    /// registers as the vCPU's reset left them.
    ///
    /// # Errors
    /// [`VmmError`] when the memory or KVM refuses.
    pub fn load_boot_sector(&self, sector: &[u8; SECTOR]) -> Result<VmState, VmmError> {
        self.vmm_mem
            .write_slice(sector, GuestAddress(LOAD_GPA))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let fd = self
            .vcpu
            .as_ref()
            .ok_or_else(|| VmmError::Memory("the vCPU already runs".into()))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        // A BIOS turns the caches on (CR0.CD and NW are set at reset); a
        // guest that finds them off runs every access uncached.
        sregs.cr0 &= !CR0_CD_NW;
        let mut regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = LOAD_GPA;
        regs.rflags = 2;
        regs.rdx = 0x80;
        Ok(VmState {
            regs,
            sregs,
            device: DeviceState {
                boot_sector: true,
                ..DeviceState::default()
            },
        })
    }

    /// Send the guest's serial output (COM1) to `sink` once the vCPU
    /// starts (without one it is dropped).
    pub fn set_serial(&mut self, sink: SerialSink) {
        self.serial = Some(sink);
    }

    /// Load a [`ScatterProgram`] and its address list.
    ///
    /// # Errors
    /// As [`load_table_program`](Self::load_table_program).
    pub fn load_scatter_program(&self, program: &ScatterProgram) -> Result<VmState, VmmError> {
        self.load(&program.code(), &program.list())
    }

    fn load(&self, code: &[u8], list: &[u8]) -> Result<VmState, VmmError> {
        if CODE_GPA + code.len() as u64 > LIST_GPA || LIST_GPA + list.len() as u64 > LOW_BYTES {
            return Err(VmmError::Memory("program too large".into()));
        }
        let write = |data: &[u8], gpa: u64| {
            self.vmm_mem
                .write_slice(data, GuestAddress(gpa))
                .map_err(|e| VmmError::Memory(e.to_string()))
        };
        write(code, CODE_GPA)?;
        write(list, LIST_GPA)?;
        let fd = self.vcpu.as_ref().expect("vCPU not started yet");
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code_seg = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 8,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            ..Default::default()
        };
        let data_seg = kvm_segment {
            type_: 3,
            selector: 0x10,
            ..code_seg
        };
        sregs.cs = code_seg;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) =
            (data_seg, data_seg, data_seg, data_seg, data_seg);
        sregs.cr0 |= 1;
        let mut regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        regs.rsp = LIST_GPA;
        Ok(VmState {
            regs,
            sregs,
            device: DeviceState::default(),
        })
    }

    /// Start the vCPU from `state`, pacing the guest to `pages_per_sec`
    /// table pages per second (0: unpaced).
    ///
    /// # Errors
    /// [`VmmError::Vcpu`] when KVM refuses the registers.
    pub fn start(&mut self, state: &VmState, pages_per_sec: u64) -> Result<VcpuRunner, VmmError> {
        let fd = self
            .vcpu
            .take()
            .ok_or_else(|| VmmError::Memory("the vCPU already runs".into()))?;
        Ok(VcpuRunner::start(
            fd,
            state,
            pages_per_sec,
            self.serial.take(),
        )?)
    }

    /// The guest memory's digest: xxh3-128 over every page in address order.
    pub fn digest(&self) -> u128 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for r in self.mem.regions() {
            // The caller reads it with the vCPU paused or not yet started.
            h.update(&r.io_slice(0, r.pages()));
        }
        h.digest128()
    }
}

/// The migration source's view of the VM: a running vCPU.
pub struct KvmSource<'a> {
    /// The vCPU.
    pub vcpu: &'a VcpuRunner,
    /// The state saved by the last pause.
    paused: Option<VmState>,
}

impl<'a> KvmSource<'a> {
    /// Control `vcpu` for a migration.
    pub fn new(vcpu: &'a VcpuRunner) -> Self {
        Self { vcpu, paused: None }
    }
}

impl SourceVm for KvmSource<'_> {
    fn pause(&mut self) -> Result<(), VmError> {
        self.paused = Some(self.vcpu.pause().map_err(|e| VmError::new("pause", e))?);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.paused = None;
        self.vcpu.resume();
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.paused
            .as_ref()
            .map(VmState::encode)
            .ok_or_else(|| VmError::new("save device state", "the vCPU is not paused"))
    }

    fn throttle(&mut self, percent: u8) -> Result<bool, VmError> {
        self.vcpu.throttle(percent);
        Ok(true)
    }
}

/// The migration destination's view of the VM: registers to load, a vCPU
/// to start at commit.
pub struct KvmDestination<'a> {
    machine: &'a mut Machine,
    state: Option<VmState>,
    pages_per_sec: u64,
    /// The running vCPU, after commit.
    pub running: Option<VcpuRunner>,
    /// The memory digest taken at commit, before the vCPU ran (when asked
    /// for: hashing all of the guest's memory there adds to the downtime).
    pub digest_at_resume: Option<u128>,
    /// Take [`digest_at_resume`](Self::digest_at_resume).
    pub digest: bool,
    /// The guest resumes in post-copy: its memory is incomplete at resume,
    /// so no digest is taken there.
    pub postcopy: bool,
    /// Called once the vCPU runs in post-copy (its missing pages still on
    /// the source): the binary tells its operator.
    pub on_postcopy_resume: Option<Box<dyn FnOnce() + Send>>,
}

impl<'a> KvmDestination<'a> {
    /// Receive into `machine`; the guest runs paced like the source's.
    pub fn new(machine: &'a mut Machine, pages_per_sec: u64) -> Self {
        Self {
            machine,
            state: None,
            pages_per_sec,
            running: None,
            digest_at_resume: None,
            digest: true,
            postcopy: false,
            on_postcopy_resume: None,
        }
    }
}

impl DestinationVm for KvmDestination<'_> {
    fn postcopy(&mut self) {
        self.postcopy = true;
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.state =
            Some(VmState::decode(state).map_err(|e| VmError::new("load device state", e))?);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        let state = self
            .state
            .ok_or_else(|| VmError::new("resume", "no device state was loaded"))?;
        if self.digest && !self.postcopy {
            self.digest_at_resume = Some(self.machine.digest());
        }
        let runner = self
            .machine
            .start(&state, self.pages_per_sec)
            .map_err(|e| VmError::new("resume", e))?;
        self.running = Some(runner);
        if self.postcopy
            && let Some(tell) = self.on_postcopy_resume.take()
        {
            tell();
        }
        Ok(())
    }
}

/// How long a test or the CLI waits for a guest to finish.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
