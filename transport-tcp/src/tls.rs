//! Who may take part: mutual TLS 1.3 on every connection (control and data),
//! with certificates from a CA, or with a pre-shared key.
//!
//! **Certificates.** [`TlsConfig::source_from_dir`] and
//! [`TlsConfig::destination_from_dir`] read the file names of QEMU's x509
//! credential directory (`ca-cert.pem`, `client-cert.pem`/`client-key.pem`
//! on the source, `server-cert.pem`/`server-key.pem` on the destination).
//! Both ends present a certificate and both check the other's against the
//! CA: the source checks that the destination's certificate names the host
//! it meant to reach; the destination may in addition accept only certain
//! client names (like QEMU's `tls-authz`).
//!
//! **Pre-shared key.** For sites without a PKI, [`TlsConfig::source_psk`]
//! and [`TlsConfig::destination_psk`]: rustls has no TLS 1.3 external PSK,
//! so each end makes a throw-away certificate, the TLS handshake runs as
//! usual (encryption, forward secrecy), and then each end proves that it
//! holds the key by an HMAC-SHA256, keyed by the PSK, of a value bound to
//! this very TLS session (HKDF of both directions' first traffic keys,
//! which only the two ends know: rustls' unbuffered API, which gives up the
//! secrets for our record layer, has no exporter): the source's proof
//! first, and the destination answers only a valid one. A man in the middle
//! has two TLS sessions with two different bindings, so a proof it relays
//! is worthless, and a stranger learns nothing but one MAC of a random
//! value; that is why the key must be long and random (at least
//! [`MIN_PSK_LEN`] bytes, written as base64 or hex), never a password, and
//! its file readable by its owner alone.
//!
//! **After the handshake** ([`crate::handshake`]) the destination confirms
//! the session in one TLS record (the source learns there, not later, that
//! its certificate was refused), and from then on both directions travel
//! as standard TLS 1.3 records from the session's own traffic secrets, with
//! key updates and `close_notify`: sealed and opened by this crate
//! ([`crate::record`]: one key and one lock per direction, page bytes
//! sealed straight from guest memory), or by the kernel where it has TLS
//! ([`crate::ktls`], [`KernelTls`]). The wire is the same either way.
//!
//! Nothing of the migration (not even its preamble) crosses a connection
//! before both ends are authenticated, so a stranger never learns the
//! destination's memory layout or causes an allocation.

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use migrate_core::transport::TransportError;

use crate::conn::{Conn, Receiving, Sending, TlsConn};
use crate::handshake::{self, Session};
use crate::ktls::{self, KernelRx, KernelTx, Offload};
use crate::record::{Keys, Opener, Sealer, Shared, Suite};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};

/// The shortest pre-shared key accepted, in bytes (after trimming
/// whitespace): 32 random bytes, or their hex or base64 text.
pub const MIN_PSK_LEN: usize = 32;
/// A credential file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file holds no usable PEM item of the kind needed.
    #[error("{}: {detail}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The pre-shared key is too short to be safe.
    #[error(
        "{}: the pre-shared key has {len} bytes; it must have at least {MIN_PSK_LEN} random bytes (e.g. `(umask 077; head -c 32 /dev/urandom | base64 > key)`)",
        path.display()
    )]
    WeakKey {
        /// The key file.
        path: PathBuf,
        /// Its length after trimming.
        len: usize,
    },
    /// A key file that users other than its owner can read (as ssh
    /// refuses one).
    #[error(
        "{}: the key file has mode {mode:04o}, readable by others: `chmod 600` it",
        path.display()
    )]
    KeyFileExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A pre-shared key file that is neither base64 nor hex.
    #[error(
        "{}: the pre-shared key is neither base64 nor hex (make one with `(umask 077; head -c 32 /dev/urandom | base64 > key)`)",
        path.display()
    )]
    KeyEncoding {
        /// The key file.
        path: PathBuf,
    },
    /// A file that would be replaced without being asked to (an existing
    /// CA: every certificate it signed would stop being trusted).
    #[error("{} exists: not replaced (give --force to make a new CA)", path.display())]
    WouldReplace {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the credentials (a key that does not match its
    /// certificate, an unsupported algorithm, a bad client name).
    #[error("TLS set-up: {0}")]
    Setup(String),
}

/// One end's TLS credentials and the peers it accepts; cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    role: Arc<Role>,
    kernel: KernelTls,
}

/// Whether the kernel seals and opens the TLS records (`tls.ko`: kTLS).
/// The records are the same either way, so each end chooses alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelTls {
    /// Where the kernel takes the session's keys, it seals and opens;
    /// elsewhere this crate does.
    #[default]
    Auto,
    /// This crate seals and opens.
    Off,
    /// The kernel must take both directions, or the connection fails.
    On,
}

enum Role {
    Source {
        config: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        psk: Option<Vec<u8>>,
    },
    Destination {
        config: Arc<ServerConfig>,
        /// Client names accepted (empty: any the CA signed).
        allowed: Vec<ServerName<'static>>,
        psk: Option<Vec<u8>>,
    },
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        match &*self.role {
            Role::Source {
                server_name, psk, ..
            } => f
                .debug_struct("TlsConfig::Source")
                .field("server_name", server_name)
                .field("psk", &psk.is_some())
                .field("kernel", &self.kernel)
                .finish(),
            Role::Destination { allowed, psk, .. } => f
                .debug_struct("TlsConfig::Destination")
                .field("allowed", allowed)
                .field("psk", &psk.is_some())
                .field("kernel", &self.kernel)
                .finish(),
        }
    }
}

impl PartialEq for TlsConfig {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.role, &other.role) && self.kernel == other.kernel
    }
}

/// aws-lc-rs's provider (the records' too: one crypto library), AES-128-GCM
/// first: it takes 10 rounds per block against AES-256's 14, so it seals
/// and opens pages faster, and 128-bit keys are what TLS 1.3 itself makes
/// mandatory (RFC 8446 §9.1).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// Two ends of one real TLS session over loopback TCP that negotiated
/// `suite` (the client's, then the server's), without the PSK proofs: for
/// tests and fuzzing of the record layers.
pub(crate) fn session_pair(suite: Suite) -> io::Result<(Session, Session)> {
    use rustls::crypto::aws_lc_rs::cipher_suite as s;
    let only = Arc::new(CryptoProvider {
        cipher_suites: vec![match suite {
            Suite::Aes128Gcm => s::TLS13_AES_128_GCM_SHA256,
            Suite::Aes256Gcm => s::TLS13_AES_256_GCM_SHA384,
            Suite::Chacha20Poly1305 => s::TLS13_CHACHA20_POLY1305_SHA256,
        }],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let key = vec![1u8; MIN_PSK_LEN];
    let client =
        TlsConfig::source_psk_with(key.clone(), Arc::clone(&only)).map_err(io::Error::other)?;
    let server = TlsConfig::destination_psk_with(key, only).map_err(io::Error::other)?;
    let (
        Role::Source {
            config: cc,
            server_name,
            ..
        },
        Role::Destination { config: sc, .. },
    ) = (&*client.role, &*server.role)
    else {
        return Err(io::Error::other("the roles are the wrong way round"));
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (cc, name) = (Arc::clone(cc), server_name.clone());
    let client = std::thread::spawn(move || {
        let sock = TcpStream::connect(addr)?;
        handshake::client(&sock, cc, name).map(|s| (s, sock))
    });
    let (sock, _) = listener.accept()?;
    let server = handshake::server(&sock, Arc::clone(sc), |_| Ok::<(), io::Error>(()))?;
    let (client, _sock) = client
        .join()
        .map_err(|_| io::Error::other("the client thread panicked"))??;
    Ok((client, server))
}

fn setup(e: impl fmt::Display) -> TlsError {
    TlsError::Setup(e.to_string())
}

impl TlsConfig {
    /// The source's credentials from a QEMU-style x509 directory:
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`. The destination
    /// must present a certificate from that CA naming `server_name` (a DNS
    /// name or an IP address).
    ///
    /// # Errors
    /// [`TlsError`] when a file is missing, unreadable or holds no
    /// certificate or key, or the name is not a valid server name.
    pub fn source_from_dir(dir: &Path, server_name: &str) -> Result<Self, TlsError> {
        let roots = load_roots(&dir.join("ca-cert.pem"))?;
        let chain = load_certs(&dir.join("client-cert.pem"))?;
        let key = load_key(&dir.join("client-key.pem"))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .with_crls(load_crls(dir)?)
        .build()
        .map_err(setup)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(setup)?;
        Ok(Self::source(config, parse_name(server_name)?, None))
    }

    /// The destination's credentials from a QEMU-style x509 directory:
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`. Every source must
    /// present a certificate from that CA; when `allowed_clients` is not
    /// empty, also one valid for one of those names (like QEMU's
    /// `tls-authz`).
    ///
    /// # Errors
    /// [`TlsError`] when a file is missing, unreadable or holds no
    /// certificate or key, or a client name is not a valid name.
    pub fn destination_from_dir(dir: &Path, allowed_clients: &[String]) -> Result<Self, TlsError> {
        let roots = load_roots(&dir.join("ca-cert.pem"))?;
        let chain = load_certs(&dir.join("server-cert.pem"))?;
        let key = load_key(&dir.join("server-key.pem"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(load_crls(dir)?)
            .build()
            .map_err(setup)?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(setup)?;
        let allowed = allowed_clients
            .iter()
            .map(|n| parse_name(n))
            .collect::<Result<_, _>>()?;
        Ok(Self::destination(config, allowed, None))
    }

    /// A source that proves, and asks the destination to prove, that it
    /// holds `key` (see the module docs).
    ///
    /// # Errors
    /// [`TlsError::Setup`] when a throw-away certificate cannot be made.
    pub fn source_psk(key: Vec<u8>) -> Result<Self, TlsError> {
        Self::source_psk_with(key, provider())
    }

    fn source_psk_with(key: Vec<u8>, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let (chain, private) = throw_away_certificate()?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ProvenByPsk::new()))
            .with_client_auth_cert(chain, private)
            .map_err(setup)?;
        let name = parse_name("migration-psk")?;
        Ok(Self::source(config, name, Some(key)))
    }

    /// A destination that accepts only sources that prove they hold `key`,
    /// and proves it holds it too (see the module docs).
    ///
    /// # Errors
    /// [`TlsError::Setup`] when a throw-away certificate cannot be made.
    pub fn destination_psk(key: Vec<u8>) -> Result<Self, TlsError> {
        Self::destination_psk_with(key, provider())
    }

    fn destination_psk_with(key: Vec<u8>, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let (chain, private) = throw_away_certificate()?;
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_client_cert_verifier(Arc::new(ProvenByPsk::new()))
            .with_single_cert(chain, private)
            .map_err(setup)?;
        Ok(Self::destination(config, Vec::new(), Some(key)))
    }

    /// Read a pre-shared key file: base64 (padded or not) or hex text,
    /// surrounding whitespace trimmed, that decodes to at least
    /// [`MIN_PSK_LEN`] bytes. The file must not be readable by group or
    /// others: a key anyone can read authenticates anyone.
    ///
    /// # Errors
    /// [`TlsError::Read`], [`TlsError::KeyFileExposed`],
    /// [`TlsError::KeyEncoding`] or [`TlsError::WeakKey`] (`len` is the
    /// decoded length).
    pub fn read_psk(path: &Path) -> Result<Vec<u8>, TlsError> {
        use std::os::unix::fs::MetadataExt;
        let read_err = |source| TlsError::Read {
            path: path.into(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyFileExposed {
                path: path.into(),
                mode,
            });
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes).map_err(read_err)?;
        let key = decode_psk(bytes.trim_ascii())
            .ok_or_else(|| TlsError::KeyEncoding { path: path.into() })?;
        if key.len() < MIN_PSK_LEN {
            return Err(TlsError::WeakKey {
                path: path.into(),
                len: key.len(),
            });
        }
        Ok(key)
    }

    fn source(
        config: ClientConfig,
        server_name: ServerName<'static>,
        psk: Option<Vec<u8>>,
    ) -> Self {
        let mut config = config;
        config.resumption = rustls::client::Resumption::disabled();
        // The records are sealed from the session's own secrets.
        config.enable_secret_extraction = true;
        Self {
            role: Arc::new(Role::Source {
                config: Arc::new(config),
                server_name,
                psk,
            }),
            kernel: KernelTls::default(),
        }
    }

    fn destination(
        mut config: ServerConfig,
        allowed: Vec<ServerName<'static>>,
        psk: Option<Vec<u8>>,
    ) -> Self {
        // No session tickets: nothing but records of the migration after
        // the handshake.
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = true;
        Self {
            role: Arc::new(Role::Destination {
                config: Arc::new(config),
                allowed,
                psk,
            }),
            kernel: KernelTls::default(),
        }
    }

    /// The same credentials, with the kernel's TLS used as `kernel` says.
    #[must_use]
    pub fn with_kernel_tls(mut self, kernel: KernelTls) -> Self {
        self.kernel = kernel;
        self
    }

    /// Whether the kernel seals and opens this end's records.
    pub fn kernel_tls(&self) -> KernelTls {
        self.kernel
    }
}

/// A key's text as bytes: hex when it is only hex digits (an even number),
/// else base64, padded or not.
fn decode_psk(text: &[u8]) -> Option<Vec<u8>> {
    use data_encoding::{BASE64, BASE64_NOPAD, HEXLOWER_PERMISSIVE};
    if text.is_empty() {
        return None;
    }
    if text.len() % 2 == 0 && text.iter().all(u8::is_ascii_hexdigit) {
        return HEXLOWER_PERMISSIVE.decode(text).ok();
    }
    BASE64
        .decode(text)
        .or_else(|_| BASE64_NOPAD.decode(text))
        .ok()
}

fn parse_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| TlsError::Setup(format!("'{name}' is not a DNS name or IP address: {e}")))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            detail: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: path.into(),
            detail: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The revocation lists in `ca-crl.pem` of `dir` (QEMU's name), if that
/// file exists: a certificate they revoke is refused.
fn load_crls(
    dir: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    use rustls::pki_types::CertificateRevocationListDer;
    let path = dir.join("ca-crl.pem");
    let pem = match std::fs::read(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(TlsError::Read { path, source }),
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    if crls.is_empty() {
        return Err(TlsError::Pem {
            path,
            detail: "no X509 CRL in the file".into(),
        });
    }
    Ok(crls)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.into(),
        detail: format!("no private key: {e}"),
    })
}

fn throw_away_certificate()
-> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(setup)?;
    let cert = rcgen::CertificateParams::new(vec!["migration-psk".to_string()])
        .and_then(|p| p.self_signed(&key))
        .map_err(setup)?;
    let private = PrivateKeyDer::try_from(key.serialize_der()).map_err(setup)?;
    Ok((vec![cert.der().clone()], private))
}

/// In PSK mode, a certificate proves nothing by itself: any is taken, the
/// peer must still sign the handshake with its key, and then prove it holds
/// the PSK over the exported value.
#[derive(Debug)]
struct ProvenByPsk {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ProvenByPsk {
    fn new() -> Self {
        Self {
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ProvenByPsk {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for ProvenByPsk {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Run the TLS handshake (and PSK proofs) on a fresh connection, or pass it
/// through as plain TCP when `tls` is `None`. The socket's timeouts bound
/// each step, but the handshake's public-key steps may take up to
/// [`HANDSHAKE_TIMEOUT`](crate::accept::HANDSHAKE_TIMEOUT) without progress
/// whatever the connection's I/O timeout: that timeout is how soon a
/// running migration or protection counts its peer lost (a protection's
/// `--failover-after-ms` may be a few hundred milliseconds), not a bound on
/// signing and verifying certificates on a loaded host. (A destination
/// closes a handshake older than that anyway.)
///
/// # Errors
/// [`TransportError::Auth`] when the peer is not who it must be (no
/// certificate, wrong CA, wrong name, no PSK proof, not TLS at all);
/// [`TransportError::Io`] when the connection fails, or the kernel refuses
/// the keys under [`KernelTls::On`].
pub(crate) fn secure(sock: TcpStream, tls: Option<&TlsConfig>) -> Result<Conn, TransportError> {
    let Some(tls) = tls else {
        return Ok(Conn::Plain(Arc::new(sock)));
    };
    let is_source = matches!(&*tls.role, Role::Source { .. });
    let io_timeouts = (
        sock.read_timeout()
            .map_err(crate::control::io("read the socket's timeout"))?,
        sock.write_timeout()
            .map_err(crate::control::io("read the socket's timeout"))?,
    );
    let step = io_timeouts
        .0
        .map(|t| t.max(crate::accept::HANDSHAKE_TIMEOUT));
    set_timeouts(&sock, (step, step.or(io_timeouts.1)))?;
    let handshake_error = |e| handshake_error(e, is_source, step);
    let (session, psk) = match &*tls.role {
        Role::Source {
            config,
            server_name,
            psk,
        } => (
            handshake::client(&sock, Arc::clone(config), server_name.clone())
                .map_err(handshake_error)?,
            psk.as_deref(),
        ),
        Role::Destination {
            config,
            psk,
            allowed,
        } => {
            turn_away_plaintext(&sock)?;
            let session = handshake::server(&sock, Arc::clone(config), |state| {
                check_allowed(state, allowed).map_err(Admission::Refused)
            })
            .map_err(|e| match e {
                Admission::Io(e) => handshake_error(e),
                Admission::Refused(e) => e,
            })?;
            (session, psk.as_deref())
        }
    };
    set_timeouts(&sock, io_timeouts)?;
    let binding = psk.map(|_| session_binding(&session)).transpose()?;
    let conn = records(sock, session, tls.kernel)?;
    if let (Some(key), Some(binding)) = (psk, binding) {
        prove_psk(&conn, key, is_source, &binding)?;
    }
    Ok(Conn::Tls(Arc::new(conn)))
}

/// The destination's handshake failed on the wire, or refused the source.
enum Admission {
    Io(io::Error),
    Refused(TransportError),
}

impl From<io::Error> for Admission {
    fn from(e: io::Error) -> Self {
        Admission::Io(e)
    }
}

impl From<TransportError> for Admission {
    fn from(e: TransportError) -> Self {
        Admission::Refused(e)
    }
}

/// The value both PSK proofs sign: bound to this very session, as an
/// exporter value would be (rustls' unbuffered API, which gives up the
/// traffic secrets, has no exporter): HKDF of both directions' first
/// traffic keys and IVs, which only the two ends of this session know. A
/// man in the middle holds two sessions with different keys, so a proof it
/// relays is worthless.
fn session_binding(session: &Session) -> Result<[u8; 32], TransportError> {
    use aws_lc_rs::hkdf;
    // The source's sending keys first, whichever end computes it.
    let (first, second) = match session.is_client {
        true => (&session.tx, &session.rx),
        false => (&session.rx, &session.tx),
    };
    let mut ikm = Vec::with_capacity(2 * (32 + 12));
    for s in [first, second] {
        ikm.extend_from_slice(&s.key);
        ikm.extend_from_slice(&s.iv);
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"live-migration psk binding v1").extract(&ikm);
    ikm.fill(0);
    let mut out = [0u8; 32];
    // Never a proof over a value that is not this session's: a failure
    // here (32 bytes of HKDF-SHA256 cannot fail) refuses the connection.
    prk.expand(&[b"binding"], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| auth("could not derive the session's PSK binding".into()))?;
    Ok(out)
}

/// The connection's record layers: each direction the kernel takes (per
/// `kernel`) is sealed or opened there, the others here.
fn records(
    sock: TcpStream,
    session: Session,
    kernel: KernelTls,
) -> Result<TlsConn, TransportError> {
    let Session {
        tx, rx, ratchet, ..
    } = session;
    let shared = Shared::new(ratchet);
    let offload = match kernel {
        KernelTls::Off => Offload::default(),
        KernelTls::Auto | KernelTls::On => match ktls::offload(&sock, &tx, &rx) {
            Ok(o) => o,
            Err(e) if kernel == KernelTls::Auto => {
                tracing::debug!("kernel TLS not used: {e}");
                Offload::default()
            }
            Err(source) => {
                return Err(TransportError::Io {
                    op: "hand the TLS keys to the kernel (--kernel-tls on; is the tls module there?)",
                    source,
                });
            }
        },
    };
    if kernel == KernelTls::On && !(offload.tx && offload.rx) {
        return Err(TransportError::Io {
            op: "hand the TLS keys to the kernel (--kernel-tls on)",
            source: io::Error::other(format!(
                "the kernel took only {offload:?} of this {:?} session",
                tx.suite
            )),
        });
    }
    tracing::debug!(?offload, suite = ?tx.suite, "TLS records");
    let io_err = |source| TransportError::Io {
        op: "set up the TLS records",
        source,
    };
    let send = if offload.tx {
        Sending::Kernel(KernelTx::new(Arc::clone(&shared)))
    } else {
        Sending::User(Sealer::new(
            Keys::new(&tx).map_err(io_err)?,
            Arc::clone(&shared),
        ))
    };
    let recv = if offload.rx {
        Receiving::Kernel(KernelRx::new(shared))
    } else {
        Receiving::User(Opener::new(Keys::new(&rx).map_err(io_err)?, shared))
    };
    Ok(TlsConn::new(sock, send, recv))
}

/// A source without TLS starts with our plaintext preamble: tell it, in
/// its own protocol, that this destination requires authentication (a
/// `Refused` with [`RefusalCode::Auth`]) rather than leave it to guess from
/// a closed connection, and fail this connection. Nothing else is said: no
/// layout, no version beyond the preamble's.
fn turn_away_plaintext(sock: &TcpStream) -> Result<(), TransportError> {
    use migrate_core::protocol::MAGIC;
    let mut first = [0u8; MAGIC.len()];
    let mut seen = 0;
    // Peek until the bytes tell TLS (a handshake record starts 0x16) from
    // our preamble; the socket's read timeout bounds the wait.
    while seen < first.len() {
        seen = sock.peek(&mut first).map_err(|source| TransportError::Io {
            op: "read the first bytes",
            source,
        })?;
        if seen == 0 || first[..seen] != MAGIC[..seen] {
            return Ok(());
        }
    }
    refuse_in_protocol(
        sock,
        "this destination requires mutual TLS (--tls-dir) or a pre-shared key (--psk-file)",
    );
    Err(auth(
        "a source without TLS was told this destination requires authentication".into(),
    ))
}

/// Tell a plaintext peer, in its own protocol (preamble, then `Refused`
/// with the authentication code), why it is refused, and close gently:
/// what it still sends is read for up to a second, so that a reset does
/// not destroy the refusal before it is read.
pub(crate) fn refuse_in_protocol(sock: &TcpStream, message: &str) {
    use migrate_core::protocol::wire::{write_message, write_preamble};
    use migrate_core::protocol::{Message, RefusalCode};
    let mut w = sock;
    let _ = write_preamble(&mut w).and_then(|()| {
        write_message(
            &mut w,
            &Message::Refused {
                code: RefusalCode::Auth,
                message: message.into(),
            },
        )
    });
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match io::Read::read(&mut w, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn auth(detail: String) -> TransportError {
    TransportError::Auth { detail }
}

/// Set the socket's read and write timeouts.
fn set_timeouts(
    sock: &TcpStream,
    (read, write): (Option<std::time::Duration>, Option<std::time::Duration>),
) -> Result<(), TransportError> {
    sock.set_read_timeout(read)
        .and_then(|()| sock.set_write_timeout(write))
        .map_err(crate::control::io("set the socket's timeouts"))
}

/// A failed handshake as what it means to an operator (`step`: how long a
/// step may take without progress).
fn handshake_error(
    e: io::Error,
    is_source: bool,
    step: Option<std::time::Duration>,
) -> TransportError {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let side = if is_source { "destination" } else { "source" };
    match rustls_error {
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => auth(format!(
            "the {side} does not speak TLS (a peer without --tls-dir/--psk-file?): {e}"
        )),
        Some(rustls::Error::InvalidCertificate(c)) => {
            auth(format!("the {side}'s certificate is not accepted: {c}"))
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            auth(format!("the {side} presented no certificate"))
        }
        Some(rustls::Error::AlertReceived(a)) => auth(format!(
            "the {side} refused this end's TLS credentials (alert: {a:?})"
        )),
        Some(other) => auth(format!("TLS handshake with the {side}: {other}")),
        None if e.kind() == io::ErrorKind::UnexpectedEof => auth(format!(
            "the {side} closed the connection during the TLS handshake (does it use TLS with these credentials?)"
        )),
        None => TransportError::Io {
            op: "TLS handshake",
            source: crate::control::timed_out(e, step),
        },
    }
}

/// The destination's allow-list: the client's certificate must carry one
/// of the names exactly, as a DNS name (ASCII case aside) or an IP address
/// in its subject alternative names. A wildcard name in the certificate
/// (`*.corp.example`) stands for itself only: it allows no host (QEMU's
/// tls-authz matches exactly too).
fn check_allowed(
    state: &CommonState,
    allowed: &[ServerName<'static>],
) -> Result<(), TransportError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let Some(cert) = state.peer_certificates().and_then(|c| c.first()) else {
        return Err(auth("the source presented no certificate".into()));
    };
    let names = certificate_names(cert)
        .map_err(|e| auth(format!("the source's certificate does not parse: {e}")))?;
    if allowed.iter().any(|a| names.iter().any(|n| n.is(a))) {
        Ok(())
    } else {
        let allowed: Vec<String> = allowed.iter().map(|n| n.to_str().into_owned()).collect();
        let had: Vec<String> = names.iter().map(ToString::to_string).collect();
        Err(auth(format!(
            "the source's certificate ({}) names none of the allowed clients ({}) exactly",
            had.join(", "),
            allowed.join(", ")
        )))
    }
}

/// A name a certificate carries in its subject alternative names.
#[derive(Debug)]
enum CertName {
    Dns(String),
    Ip(std::net::IpAddr),
}

impl CertName {
    fn is(&self, name: &ServerName<'_>) -> bool {
        match (self, name) {
            (CertName::Dns(d), ServerName::DnsName(n)) => d.eq_ignore_ascii_case(n.as_ref()),
            (CertName::Ip(i), ServerName::IpAddress(n)) => *i == std::net::IpAddr::from(*n),
            _ => false,
        }
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertName::Dns(d) => write!(f, "DNS:{d}"),
            CertName::Ip(i) => write!(f, "IP:{i}"),
        }
    }
}

/// The DNS names and IP addresses of a certificate's subject alternative
/// names.
fn certificate_names(cert: &CertificateDer<'_>) -> Result<Vec<CertName>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(CertName::Dns((*d).to_string())),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(|a| CertName::Ip(a.into())),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| CertName::Ip(a.into())),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// The PSK proofs over the exported value: the source's first; the
/// destination answers only a valid one.
fn prove_psk(
    conn: &TlsConn,
    key: &[u8],
    is_source: bool,
    exported: &[u8; 32],
) -> Result<(), TransportError> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    // What each side signs: its role, then the exported value.
    let signed = |role: &[u8]| [role, &exported[..]].concat();
    let proof = |role: &[u8]| aws_lc_rs::hmac::sign(&key, &signed(role));
    let check = |role: &[u8], got: &[u8]| aws_lc_rs::hmac::verify(&key, &signed(role), got).is_ok();
    let (mine, theirs): (&[u8], &[u8]) = if is_source {
        (b"source", b"destination")
    } else {
        (b"destination", b"source")
    };
    let send = |tag| -> Result<(), TransportError> {
        let tag: aws_lc_rs::hmac::Tag = tag;
        let mut left = tag.as_ref();
        while !left.is_empty() {
            let n = conn
                .write_vectored(&[io::IoSlice::new(left)])
                .map_err(|source| TransportError::Io {
                    op: "send the PSK proof",
                    source,
                })?;
            left = &left[n..];
        }
        Ok(())
    };
    let peer = if is_source { "destination" } else { "source" };
    let receive = || -> Result<[u8; 32], TransportError> {
        let mut got = [0u8; 32];
        let mut filled = 0;
        while filled < got.len() {
            match conn.read(&mut got[filled..]) {
                Ok(0) => {
                    return Err(auth(format!(
                        "the {peer} closed the connection instead of proving it holds the pre-shared key (a different key?)"
                    )));
                }
                Ok(n) => filled += n,
                Err(e) => {
                    return Err(auth(format!(
                        "the {peer} did not prove it holds the pre-shared key: {e}"
                    )));
                }
            }
        }
        Ok(got)
    };
    if is_source {
        send(proof(mine))?;
    }
    if !check(theirs, &receive()?) {
        return Err(auth(format!("the {peer} does not hold the pre-shared key")));
    }
    if !is_source {
        send(proof(mine))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Both ends over a real loopback connection: bytes both ways after
    /// the PSK proofs.
    #[test]
    fn psk_pair_talks_both_ways() {
        let key = vec![7u8; 40];
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_cfg = TlsConfig::destination_psk(key.clone()).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let conn = secure(s, Some(&server_cfg)).unwrap();
            let mut buf = [0u8; 5];
            (&conn).read_exact(&mut buf).unwrap();
            (&conn).write_all(b"world").unwrap();
            buf
        });
        let s = TcpStream::connect(addr).unwrap();
        let conn = secure(s, Some(&TlsConfig::source_psk(key).unwrap())).unwrap();
        (&conn).write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        (&conn).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"world");
        assert_eq!(&server.join().unwrap(), b"hello");
    }

    /// Our records are TLS 1.3 as rustls itself speaks it: a destination
    /// of ours (certificates, userspace records) and a plain rustls client
    /// with its own record layer exchange 300 KB each way, each end
    /// updates its key mid-stream (rustls' KeyUpdate and ours), and each
    /// end's close_notify ends the other's reading cleanly.
    #[test]
    fn our_records_are_tls_13_as_rustls_speaks_it() {
        let dir = fixtures::scratch_dir("tls-interop");
        crate::pki::write_test_pki(&dir, &["localhost".into()], &["source".into()], true).unwrap();
        let dest = TlsConfig::destination_from_dir(&dir, &[])
            .unwrap()
            .with_kernel_tls(KernelTls::Off);
        let source = TlsConfig::source_from_dir(&dir, "localhost").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 11 % 253) as u8).collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let theirs = data.clone();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let Conn::Tls(conn) = secure(s, Some(&dest)).unwrap() else {
                panic!("not TLS")
            };
            conn.key_update_every(1);
            let mut left = &theirs[..];
            while !left.is_empty() {
                let n = conn
                    .write_vectored(&[io::IoSlice::new(&left[..left.len().min(50_000)])])
                    .unwrap();
                left = &left[n..];
            }
            conn.close().unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                match conn.read(&mut buf).unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            (got, conn.key_updates())
        });
        let Role::Source {
            config,
            server_name,
            ..
        } = &*source.role
        else {
            panic!("not a source")
        };
        let mut sock = TcpStream::connect(addr).unwrap();
        let mut tls =
            rustls::ClientConnection::new(Arc::clone(config), server_name.clone()).unwrap();
        // Everything the destination sends: READY, then its data.
        let mut got = Vec::new();
        let mut sent = 0;
        let mut refreshed = false;
        let mut closed_ours = false;
        loop {
            if !tls.is_handshaking() && sent < data.len() {
                let n = tls
                    .writer()
                    .write(&data[sent..(sent + 20_000).min(data.len())])
                    .unwrap();
                sent += n;
                if sent > data.len() / 2 && !refreshed {
                    tls.refresh_traffic_keys().unwrap();
                    refreshed = true;
                }
            } else if sent == data.len() && !closed_ours {
                tls.send_close_notify();
                closed_ours = true;
            }
            while tls.wants_write() {
                tls.write_tls(&mut sock).unwrap();
            }
            if tls.wants_read() {
                if tls.read_tls(&mut sock).unwrap() == 0 {
                    break;
                }
                let state = tls.process_new_packets().unwrap();
                let mut buf = vec![0u8; state.plaintext_bytes_to_read()];
                tls.reader().read_exact(&mut buf).unwrap();
                got.extend_from_slice(&buf);
                if state.peer_has_closed() && closed_ours {
                    break;
                }
            }
        }
        assert_eq!(got[0], 0x5a, "READY first");
        assert!(got[1..] == data[..], "rustls read our records");
        let (theirs_got, (updates_sent, updates_received)) = server.join().unwrap();
        assert!(theirs_got == data, "we read rustls' records");
        assert!(updates_sent >= 2, "{updates_sent} key updates sent");
        assert_eq!(updates_received, 1, "rustls' key update");
    }
}
