//! A small certificate authority for tests, demos and a first try: it
//! writes the files [`TlsConfig::source_from_dir`](crate::TlsConfig::source_from_dir)
//! and [`TlsConfig::destination_from_dir`](crate::TlsConfig::destination_from_dir)
//! read. Production sites use their own CA (README: "TLS").

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::TlsError;

/// Which end a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// The destination: `server-cert.pem`, `server-key.pem`.
    Server,
    /// The source: `client-cert.pem`, `client-key.pem`.
    Client,
}

/// A certificate authority whose key lives only in this value.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn cert_err(e: rcgen::Error) -> TlsError {
    TlsError::Setup(format!("making a certificate: {e}"))
}

/// Write `text` to `path` as a new file (0600 for a `secret`, 0644 else,
/// whatever the umask and whatever was there): written aside with
/// `O_EXCL|O_NOFOLLOW`, synced, then renamed over `path`. A link planted at
/// `path` is replaced, never followed, and a reader never sees half a key.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Read {
        path: path.into(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("pem");
    let aside = path.with_file_name(format!(".{name}.{}.new", std::process::id()));
    let _ = std::fs::remove_file(&aside);
    let mode = if secret { 0o600 } else { 0o644 };
    let written = write_new(&aside, mode, text).and_then(|()| std::fs::rename(&aside, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&aside);
    }
    written.map_err(err)
}

/// Write `text` into a new file at `path` with `mode` (never through a
/// link, never over an existing file), synced.
fn write_new(path: &Path, mode: u32, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // The umask may have taken bits from a certificate's 0644.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

impl TestCa {
    /// A new CA named `name`, valid from yesterday for ten years.
    ///
    /// # Errors
    /// [`TlsError::Setup`] when the key or certificate cannot be made.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, false);
        let key = KeyPair::generate().map_err(cert_err)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(cert_err)?;
        Ok(Self { issuer })
    }

    /// Write `ca-cert.pem` into `dir`.
    ///
    /// # Errors
    /// [`TlsError::Read`] when the file cannot be written.
    pub fn write_ca(&self, dir: &Path) -> Result<(), TlsError> {
        write(&dir.join("ca-cert.pem"), &self.issuer.pem(), false)
    }

    /// Issue a certificate for `names` (DNS names or IP addresses) and
    /// write it and its key into `dir` under the names of `leaf`. An
    /// `expired` one ended yesterday (for tests).
    ///
    /// Returns the certificate's serial number (for
    /// [`TestCa::write_crl`]).
    ///
    /// # Errors
    /// [`TlsError`] when a name is invalid or a file cannot be written.
    pub fn issue(
        &self,
        dir: &Path,
        leaf: Leaf,
        names: &[String],
        expired: bool,
    ) -> Result<u64, TlsError> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(cert_err)?;
        let serial = fresh_serial();
        params.serial_number = Some(serial.into());
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match leaf {
            Leaf::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Leaf::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        validity(&mut params, expired);
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let stem = match leaf {
            Leaf::Server => "server",
            Leaf::Client => "client",
        };
        write(&dir.join(format!("{stem}-cert.pem")), &cert.pem(), false)?;
        write(
            &dir.join(format!("{stem}-key.pem")),
            &key.serialize_pem(),
            true,
        )?;
        Ok(serial)
    }

    /// Write `ca-crl.pem` into `dir`: a revocation list, signed by this CA,
    /// that revokes the certificates with the serial numbers `revoked`.
    ///
    /// # Errors
    /// [`TlsError`] when the list cannot be made or written.
    pub fn write_crl(&self, dir: &Path, revoked: &[u64]) -> Result<(), TlsError> {
        use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams};
        let now = std::time::SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: (now - std::time::Duration::from_secs(60)).into(),
            next_update: (now + std::time::Duration::from_secs(30 * 86_400)).into(),
            crl_number: fresh_serial().into(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: serial.into(),
                    revocation_time: (now - std::time::Duration::from_secs(60)).into(),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(cert_err)?;
        write(
            &dir.join("ca-crl.pem"),
            &crl.pem().map_err(cert_err)?,
            false,
        )
    }
}

/// A serial number no other certificate of this process has (positive,
/// unique enough for a test CA: the clock and a counter).
fn fresh_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    ((nanos << 8) | (NEXT.fetch_add(1, Ordering::Relaxed) & 0xff)) >> 1 | 1
}

fn validity(params: &mut CertificateParams, expired: bool) {
    let day = std::time::Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    let (from, to) = if expired {
        (now - 30 * day, now - day)
    } else {
        (now - day, now + 3650 * day)
    };
    params.not_before = from.into();
    params.not_after = to.into();
}

/// Make a fresh CA and write a complete directory for both ends into
/// `dir` (made 0700 when new): `ca-cert.pem`, a server certificate for
/// `server_names` and a client certificate for `client_names`, keys 0600.
/// The CA's key is not kept: to add hosts later, run it again with
/// `replace` (and copy the directory to every host): without it an
/// existing CA is never replaced, since every certificate it signed would
/// stop being trusted.
///
/// # Errors
/// [`TlsError::Setup`] when a name is not a DNS name or an IP address
/// (wildcards included), [`TlsError::WouldReplace`] for an existing CA
/// without `replace`, [`TlsError::Read`] when a file cannot be written.
pub fn write_test_pki(
    dir: &Path,
    server_names: &[String],
    client_names: &[String],
    replace: bool,
) -> Result<(), TlsError> {
    for name in server_names.iter().chain(client_names) {
        check_name(name)?;
    }
    let ca_cert = dir.join("ca-cert.pem");
    if !replace && ca_cert.symlink_metadata().is_ok() {
        return Err(TlsError::WouldReplace { path: ca_cert });
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| TlsError::Read {
                path: dir.into(),
                source,
            })?;
    }
    let ca = TestCa::new("live-migration test CA")?;
    ca.write_ca(dir)?;
    ca.issue(dir, Leaf::Server, server_names, false)?;
    ca.issue(dir, Leaf::Client, client_names, false)?;
    Ok(())
}

/// A certificate name must be a DNS name or an IP address, exactly: no
/// wildcard, no URL, no spaces.
fn check_name(name: &str) -> Result<(), TlsError> {
    if name.contains('*') {
        return Err(TlsError::Setup(format!(
            "'{name}': no wildcard names (a destination allows exact names only)"
        )));
    }
    rustls::pki_types::ServerName::try_from(name)
        .map(|_| ())
        .map_err(|e| TlsError::Setup(format!("'{name}' is not a DNS name or IP address: {e}")))
}
