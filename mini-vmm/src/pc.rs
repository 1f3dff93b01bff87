//! The PC devices a boot sector finds when a BIOS hands over: COM1 (a
//! 16550 UART's registers; transmit only, the line always idle) and port
//! 0x92 (fast A20). Their state migrates with the guest. Ports nobody
//! emulates read as all ones and ignore writes, like an empty ISA bus; the
//! vCPU logs each such port once.

/// COM1's base port.
pub const COM1: u16 = 0x3f8;
/// System control port A (bit 1: A20 gate).
pub const PORT_A20: u16 = 0x92;

/// Line status "transmit holding register and transmitter empty": every
/// byte the guest sends is taken at once.
const LSR_IDLE: u8 = 0x60;
/// Modem status: carrier detect, data set ready, clear to send.
const MSR_READY: u8 = 0xb0;
/// Interrupt identification: none pending.
const IIR_NONE: u8 = 0x01;
/// Line control's divisor-latch access bit.
const LCR_DLAB: u8 = 0x80;

/// What the PC devices hold, all of which migrates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PcState {
    /// UART interrupt enable.
    pub ier: u8,
    /// UART line control.
    pub lcr: u8,
    /// UART modem control.
    pub mcr: u8,
    /// UART scratch register.
    pub scr: u8,
    /// UART divisor latch, low byte.
    pub dll: u8,
    /// UART divisor latch, high byte.
    pub dlm: u8,
    /// Port 0x92.
    pub port92: u8,
    /// Bytes the guest has sent on COM1 since it booted.
    pub serial_bytes: u64,
}

/// What a guest's port write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// A device register took it.
    Register,
    /// The byte left on the serial line.
    Serial(u8),
    /// No PC device is at that port.
    Unclaimed,
}

impl PcState {
    /// A guest's read of `port` (`None`: no PC device there).
    pub fn read(&self, port: u16) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        Some(match port.wrapping_sub(COM1) {
            // Receive buffer (nothing is ever received) or divisor low.
            0 if dlab => self.dll,
            0 => 0,
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => IIR_NONE,
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_IDLE,
            6 => MSR_READY,
            7 => self.scr,
            _ if port == PORT_A20 => self.port92,
            _ => return None,
        })
    }

    /// A guest's write of `v` to `port`.
    pub fn write(&mut self, port: u16, v: u8) -> Written {
        let dlab = self.lcr & LCR_DLAB != 0;
        match port.wrapping_sub(COM1) {
            0 if dlab => self.dll = v,
            0 => {
                self.serial_bytes += 1;
                return Written::Serial(v);
            }
            1 if dlab => self.dlm = v,
            1 => self.ier = v & 0x0f,
            // FIFO control: accepted, no FIFO is modelled.
            2 => {}
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            // Line and modem status are read-only.
            5 | 6 => {}
            7 => self.scr = v,
            // Bit 0 would reset the CPU: not modelled, so not kept.
            _ if port == PORT_A20 => self.port92 = v & !1,
            _ => return Written::Unclaimed,
        }
        Written::Register
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uart_sends_and_keeps_its_registers() {
        let mut pc = PcState::default();
        assert_eq!(pc.read(COM1 + 5), Some(LSR_IDLE));
        assert_eq!(pc.write(COM1, b'B'), Written::Serial(b'B'));
        assert_eq!(pc.serial_bytes, 1);
        // The divisor latch hides behind DLAB.
        pc.write(COM1 + 3, LCR_DLAB | 3);
        assert_eq!(pc.write(COM1, 1), Written::Register);
        assert_eq!(pc.read(COM1), Some(1));
        pc.write(COM1 + 3, 3);
        assert_eq!(pc.read(COM1), Some(0));
        assert_eq!(pc.serial_bytes, 1);
        pc.write(COM1 + 7, 0x5a);
        assert_eq!(pc.read(COM1 + 7), Some(0x5a));
    }

    #[test]
    fn a20_is_kept_and_other_ports_are_unclaimed() {
        let mut pc = PcState::default();
        assert_eq!(pc.write(PORT_A20, 0x03), Written::Register);
        assert_eq!(pc.read(PORT_A20), Some(0x02));
        assert_eq!(pc.read(0x60), None);
        assert_eq!(pc.write(0x80, 1), Written::Unclaimed);
    }
}
