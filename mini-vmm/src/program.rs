//! The guest programs: flat 32-bit x86 code, encoded here byte by byte
//! (a few instructions each, checked against [`TableProgram::expected`], a
//! model of the same arithmetic in Rust), so the VMM needs no assembler.
//!
//! The guest talks to the VMM through I/O ports only:
//!
//! | port | guest writes | VMM does |
//! |---|---|---|
//! | [`PORT_PAGE`] | the table index after each [`PAGES_PER_REPORT`] pages of the table | counts, paces the vCPU, checks for pause |
//! | [`PORT_PASS`] | the number of passes done | records it |
//! | [`PORT_RESULT`] | the final checksum, then `hlt` | records it |

/// Where the code is loaded (guest-physical).
pub const CODE_GPA: u64 = 0x1000;
/// Where [`ScatterProgram`]'s address list is loaded.
pub const LIST_GPA: u64 = 0x8000;
/// The first byte after the low region: where the table starts.
pub const TABLE_GPA: u64 = 0x10_0000;
/// Progress: one write per [`PAGES_PER_REPORT`] table pages.
pub const PORT_PAGE: u16 = 0x10;
/// Table pages between two progress reports. Each report is a VM exit, and
/// exits are slow under nested KVM (about 7 ms each on the machines here),
/// so the guest reports every 256 KiB rather than every page.
pub const PAGES_PER_REPORT: u32 = 64;
/// A pass over the table is done.
pub const PORT_PASS: u16 = 0x11;
/// The final answer.
pub const PORT_RESULT: u16 = 0x12;

const LCG_MUL: u32 = 1_103_515_245;
const LCG_ADD: u32 = 12_345;

/// A tiny x86 encoder: raw bytes plus 8-bit relative jumps.
#[derive(Default)]
struct Code(Vec<u8>);

impl Code {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn imm32(&mut self, v: u32) -> &mut Self {
        self.op(&v.to_le_bytes())
    }
    fn here(&self) -> usize {
        self.0.len()
    }
    /// `jcc rel8` backwards to `target`.
    fn jump_back(&mut self, opcode: u8, target: usize) {
        let rel = target as isize - (self.here() as isize + 2);
        let rel = i8::try_from(rel).expect("guest loop body fits a rel8 jump");
        self.op(&[opcode, rel as u8]);
    }
    /// `jcc rel8` forwards; returns the fix-up for [`bind`](Self::bind).
    fn jump_forward(&mut self, opcode: u8) -> usize {
        self.op(&[opcode, 0]);
        self.here()
    }
    fn bind(&mut self, fixup: usize) {
        let rel = u8::try_from(self.here() - fixup).expect("short forward jump");
        self.0[fixup - 1] = rel;
    }
}

/// The memory-heavy guest: it rewrites a table of `u32`s in place, `passes`
/// times, and folds every value it writes into a checksum that lives in a
/// register (`ebx`). Its answer depends on every byte of the table and on
/// the registers surviving, so a migration that loses either changes it.
///
/// ```text
/// for pass in 0..passes:           ; esi
///   for i in 0..dwords:            ; edi
///     v = table[i] * 1103515245 + pass ^ i + 12345
///     table[i] = v
///     sum = rol(sum, 5) ^ v        ; ebx
///     if (i + 1) % (1024 * 64) == 0: out PORT_PAGE, i + 1
///   out PORT_PASS, pass + 1
/// out PORT_RESULT, sum; hlt
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableProgram {
    /// Table length in `u32`s (a multiple of 1024 × [`PAGES_PER_REPORT`]).
    pub dwords: u32,
    /// Passes over the table.
    pub passes: u32,
}

impl TableProgram {
    /// A table of `mib` MiB rewritten `passes` times.
    pub fn new(mib: u32, passes: u32) -> Self {
        Self {
            dwords: mib << 18,
            passes,
        }
    }

    /// Table size in bytes.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.dwords) * 4
    }

    /// The machine code, to load at [`CODE_GPA`].
    pub fn code(&self) -> Vec<u8> {
        let table = TABLE_GPA as u32;
        let mut c = Code::default();
        c.op(&[0xBB]).imm32(0); //                    mov ebx, 0
        c.op(&[0xBE]).imm32(0); //                    mov esi, 0
        let pass_loop = c.here();
        c.op(&[0x31, 0xFF]); //                       xor edi, edi
        let inner = c.here();
        c.op(&[0x8B, 0x04, 0xBD]).imm32(table); //    mov eax, [edi*4 + table]
        c.op(&[0x69, 0xC0]).imm32(LCG_MUL); //        imul eax, eax, LCG_MUL
        c.op(&[0x01, 0xF0]); //                       add eax, esi
        c.op(&[0x31, 0xF8]); //                       xor eax, edi
        c.op(&[0x05]).imm32(LCG_ADD); //              add eax, LCG_ADD
        c.op(&[0x89, 0x04, 0xBD]).imm32(table); //    mov [edi*4 + table], eax
        c.op(&[0xC1, 0xC3, 0x05]); //                 rol ebx, 5
        c.op(&[0x31, 0xC3]); //                       xor ebx, eax
        c.op(&[0x47]); //                             inc edi
        c.op(&[0xF7, 0xC7]).imm32(1024 * PAGES_PER_REPORT - 1); // test edi, mask
        let not_page_end = c.jump_forward(0x75); //   jnz .not_page_end
        c.op(&[0x89, 0xF8]); //                       mov eax, edi
        c.op(&[0xE7, PORT_PAGE as u8]); //            out PORT_PAGE, eax
        c.bind(not_page_end);
        c.op(&[0x81, 0xFF]).imm32(self.dwords); //    cmp edi, dwords
        c.jump_back(0x72, inner); //                  jb .inner
        c.op(&[0x46]); //                             inc esi
        c.op(&[0x89, 0xF0]); //                       mov eax, esi
        c.op(&[0xE7, PORT_PASS as u8]); //            out PORT_PASS, eax
        c.op(&[0x81, 0xFE]).imm32(self.passes); //    cmp esi, passes
        c.jump_back(0x72, pass_loop); //              jb .pass_loop
        c.op(&[0x89, 0xD8]); //                       mov eax, ebx
        c.op(&[0xE7, PORT_RESULT as u8]); //          out PORT_RESULT, eax
        let halt = c.here();
        c.op(&[0xF4]); //                             hlt
        c.jump_back(0xEB, halt); //                   jmp .halt
        c.0
    }

    /// What the guest must answer: the same arithmetic in Rust.
    pub fn expected(&self) -> u32 {
        let mut table = vec![0u32; self.dwords as usize];
        let mut sum = 0u32;
        for pass in 0..self.passes {
            for (i, t) in table.iter_mut().enumerate() {
                let v =
                    (t.wrapping_mul(LCG_MUL).wrapping_add(pass) ^ i as u32).wrapping_add(LCG_ADD);
                *t = v;
                sum = sum.rotate_left(5) ^ v;
            }
        }
        sum
    }
}

/// A guest that writes one `u32` into each page of a list, then answers
/// [`ScatterProgram::DONE`] on [`PORT_RESULT`] and halts: exact, known
/// writes by a real vCPU, for checking a dirty tracker.
#[derive(Debug, Clone)]
pub struct ScatterProgram {
    /// Guest-physical addresses to write (4-byte aligned, inside guest memory).
    pub targets: Vec<u32>,
}

impl ScatterProgram {
    /// What the guest answers when every write is done.
    pub const DONE: u32 = 0x600d;

    /// The machine code, to load at [`CODE_GPA`].
    pub fn code(&self) -> Vec<u8> {
        let mut c = Code::default();
        c.op(&[0xBE]).imm32(LIST_GPA as u32); //                 mov esi, LIST
        c.op(&[0xB9]).imm32(self.targets.len() as u32); //       mov ecx, count
        let done = c.jump_forward(0xE3); //                      jecxz .done
        let next = c.here();
        c.op(&[0x8B, 0x3E]); //                                  mov edi, [esi]
        c.op(&[0x89, 0x0F]); //                                  mov [edi], ecx
        c.op(&[0x83, 0xC6, 0x04]); //                            add esi, 4
        c.op(&[0x49]); //                                        dec ecx
        c.jump_back(0x75, next); //                              jnz .next
        c.bind(done);
        c.op(&[0xB8]).imm32(Self::DONE); //                      mov eax, DONE
        c.op(&[0xE7, PORT_RESULT as u8]); //                     out PORT_RESULT, eax
        let halt = c.here();
        c.op(&[0xF4]); //                                        hlt
        c.jump_back(0xEB, halt); //                              jmp .halt
        c.0
    }

    /// The address list, to load at [`LIST_GPA`].
    pub fn list(&self) -> Vec<u8> {
        self.targets.iter().flat_map(|t| t.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_labels() {
        let code = TableProgram::new(1, 2).code();
        // `jb .inner` lands on `mov eax, [edi*4 + table]`.
        let jb = code.windows(2).position(|w| w[0] == 0x72).unwrap();
        let target = (jb as isize + 2 + code[jb + 1] as i8 as isize) as usize;
        assert_eq!(&code[target..target + 3], &[0x8B, 0x04, 0xBD]);
        // The program ends in `hlt; jmp hlt`.
        let n = code.len();
        assert_eq!(&code[n - 3..], &[0xF4, 0xEB, 0xFD]);
    }

    #[test]
    fn the_model_depends_on_every_pass() {
        let a = TableProgram::new(1, 2).expected();
        let b = TableProgram::new(1, 3).expected();
        assert_ne!(a, b);
    }
}
