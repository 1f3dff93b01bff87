//! The TCP transport passes the shared transport suite over real loopback
//! sockets, byte for byte.

use fixtures::transport_suite::{TransportPair, kill_slot};
use migrate_core::transport::{DestinationTransport, SourceTransport};
use transport_tcp::{KillSwitch, TcpConfig, TcpMigrationListener, TcpSource};

fn cfg() -> TcpConfig {
    TcpConfig {
        io_timeout: std::time::Duration::from_secs(10),
        ..TcpConfig::default()
    }
}

fn tcp_pair_with(cfg: TcpConfig) -> TransportPair {
    let listener = TcpMigrationListener::bind("127.0.0.1:0", cfg.clone()).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (slot, kill) = kill_slot::<Box<dyn Fn() + Send + Sync>>();
    TransportPair {
        source: Box::new(move |_| {
            Ok(Box::new(TcpSource::connect(&addr, cfg)?) as Box<dyn SourceTransport>)
        }),
        destination: Box::new(move || {
            let d = listener.accept()?;
            let k: KillSwitch = d.kill_switch();
            *slot.lock().unwrap() = Some(Box::new(move || k.kill()));
            Ok(Box::new(d) as Box<dyn DestinationTransport>)
        }),
        kill_destination: kill,
    }
}

fn tcp_pair() -> TransportPair {
    tcp_pair_with(cfg())
}

mod plain {
    use super::*;
    fixtures::transport_suite!(tcp_pair);
}

mod one_stream_zstd {
    use super::*;
    fn pair() -> TransportPair {
        tcp_pair_with(TcpConfig {
            data_streams: 1,
            compress: true,
            ..cfg()
        })
    }
    fixtures::transport_suite!(pair);
}
