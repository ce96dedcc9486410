//! Test certificates for mutual TLS (`minivmm certs`): one CA, and for each side of a
//! migration a certificate it signed, each in a directory `--tls-dir` takes (`ca.pem`,
//! `cert.pem`, `key.pem`). For trying TLS out and for tests; operators use their own CA.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {err}")]
    Write {
        path: PathBuf,
        #[source]
        err: io::Error,
    },
}

/// What `write_test_certs` makes.
pub struct CertsSpec<'a> {
    /// IP addresses and DNS names both certificates are valid for (the destination's are
    /// checked against the address the source dials).
    pub hosts: &'a [String],
    /// Certificates that expired long ago, to test refusals.
    pub expired: bool,
}

fn write(path: PathBuf, text: &str) -> Result<(), CertsError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|err| CertsError::Write {
            path: dir.to_owned(),
            err,
        })?;
    }
    fs::write(&path, text).map_err(|err| CertsError::Write { path, err })
}

/// Writes `DIR/ca.pem` and `DIR/ca-key.pem`, then `DIR/source/` and `DIR/destination/`, each
/// holding `ca.pem`, `cert.pem` and `key.pem` (EC P-256, PKCS#8).
pub fn write_test_certs(dir: &Path, spec: &CertsSpec<'_>) -> Result<(), CertsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "minivmm test CA");
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    write(dir.join("ca.pem"), &ca_pem)?;
    write(dir.join("ca-key.pem"), &ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for side in ["source", "destination"] {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(spec.hosts.to_vec())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("minivmm {side}"));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if spec.expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &issuer)?;
        let d = dir.join(side);
        write(d.join("ca.pem"), &ca_pem)?;
        write(d.join("cert.pem"), &cert.pem())?;
        write(d.join("key.pem"), &key.serialize_pem())?;
    }
    Ok(())
}
