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

fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Read {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
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
    /// # Errors
    /// [`TlsError`] when a name is invalid or a file cannot be written.
    pub fn issue(
        &self,
        dir: &Path,
        leaf: Leaf,
        names: &[String],
        expired: bool,
    ) -> Result<(), TlsError> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(cert_err)?;
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
        )
    }
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
/// `dir`: `ca-cert.pem`, a server certificate for `server_names` and a
/// client certificate for `client_names`. The CA's key is not kept: to add
/// hosts later, run it again (and copy the directory to every host).
///
/// # Errors
/// [`TlsError`] when a name is invalid or a file cannot be written.
pub fn write_test_pki(
    dir: &Path,
    server_names: &[String],
    client_names: &[String],
) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.into(),
        source,
    })?;
    let ca = TestCa::new("live-migration test CA")?;
    ca.write_ca(dir)?;
    ca.issue(dir, Leaf::Server, server_names, false)?;
    ca.issue(dir, Leaf::Client, client_names, false)
}
