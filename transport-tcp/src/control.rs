//! The control connection.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream};

use migrate_core::protocol::Message;
use migrate_core::protocol::wire::{read_message, read_preamble, write_message, write_preamble};
use migrate_core::transport::{ControlChannel, TransportError};

use crate::TcpConfig;

/// Bytes buffered per connection for headers and run tables; page bytes
/// beyond what is buffered are read straight into guest memory.
const READ_BUFFER: usize = 64 << 10;

/// Messages over one TCP connection.
#[derive(Debug)]
pub struct TcpControl {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpControl {
    /// Set up a connected stream: timeouts, no Nagle, preamble sent and the
    /// peer's checked (so a stray client or server fails on its first bytes).
    pub(crate) fn open(stream: TcpStream, cfg: &TcpConfig) -> Result<Self, TransportError> {
        prepare(&stream, cfg)?;
        let mut w = &stream;
        write_preamble(&mut w)?;
        let reader =
            BufReader::with_capacity(READ_BUFFER, stream.try_clone().map_err(io("clone socket"))?);
        let mut control = Self { stream, reader };
        read_preamble(&mut control.reader)?;
        Ok(control)
    }

    /// The underlying socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Close both directions (wakes a peer blocked on reading).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    pub(crate) fn into_parts(self) -> (TcpStream, BufReader<TcpStream>) {
        (self.stream, self.reader)
    }
}

impl ControlChannel for TcpControl {
    fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        let mut w = &self.stream;
        write_message(&mut w, msg)?;
        w.flush().map_err(io("flush control"))
    }

    fn recv(&mut self) -> Result<Message, TransportError> {
        Ok(read_message(&mut self.reader)?)
    }
}

pub(crate) fn prepare(stream: &TcpStream, cfg: &TcpConfig) -> Result<(), TransportError> {
    stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(cfg.io_timeout))
        .map_err(io("set read timeout"))?;
    stream
        .set_write_timeout(Some(cfg.io_timeout))
        .map_err(io("set write timeout"))
}

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}
