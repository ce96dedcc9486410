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
    #[error("{path}: {err}")]
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
    /// Sign with the CA an earlier `write_test_certs` left in this directory (`ca.pem`,
    /// `ca-key.pem`) instead of a new one, e.g. to add a host's certificates to it.
    pub ca: Option<&'a Path>,
}

fn read(path: PathBuf) -> Result<String, CertsError> {
    fs::read_to_string(&path).map_err(|err| CertsError::Write { path, err })
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

fn ca_params() -> Result<CertificateParams, CertsError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "minivmm test CA");
    Ok(ca)
}

/// Writes `DIR/ca.pem` and `DIR/ca-key.pem`, then `DIR/source/` and `DIR/destination/`, each
/// holding `ca.pem`, `cert.pem` and `key.pem` (EC P-256, PKCS#8).
pub fn write_test_certs(dir: &Path, spec: &CertsSpec<'_>) -> Result<(), CertsError> {
    // The CA's name and key identifier follow from these parameters and its key, so a CA
    // made here earlier signs again from its key alone.
    let (ca_pem, issuer) = match spec.ca {
        Some(from) => {
            let key = KeyPair::from_pem(&read(from.join("ca-key.pem"))?)?;
            (read(from.join("ca.pem"))?, Issuer::new(ca_params()?, key))
        }
        None => {
            let key = KeyPair::generate()?;
            let ca = ca_params()?;
            (ca.self_signed(&key)?.pem(), Issuer::new(ca, key))
        }
    };
    write(dir.join("ca.pem"), &ca_pem)?;
    if spec.ca.is_none() {
        write(dir.join("ca-key.pem"), &issuer.key().serialize_pem())?;
    }
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
