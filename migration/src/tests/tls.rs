//! Mutual TLS over real loopback sockets: the duplex stream both threads of a migration
//! share, and every refusal (other CA, expired, no certificate, plaintext to TLS).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::certs::{CertsSpec, write_test_certs};
use crate::protocol::{Channel, Message};
use crate::transport::{MigStream, TlsDir, TlsError};

pub(super) fn certs(dir: &Path, expired: bool) {
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    let spec = CertsSpec {
        hosts: &hosts,
        expired,
        ca: None,
    };
    write_test_certs(dir, &spec).unwrap();
}

/// A listener and a dialled connection to it (client side, server side).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    for t in [&c, &s] {
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    (c, s)
}

/// Handshakes with `client` and `server` identities; returns both results.
pub(super) fn handshake(
    client: &Path,
    server: &Path,
) -> (Result<MigStream, TlsError>, Result<MigStream, TlsError>) {
    let (c, s) = pair();
    let scfg = TlsDir::load(server).unwrap().server_config().unwrap();
    let srv = thread::spawn(move || MigStream::accept_tls(s, scfg));
    let ccfg = TlsDir::load(client).unwrap().client_config().unwrap();
    let cli = MigStream::connect_tls(c, "127.0.0.1", ccfg);
    (cli, srv.join().unwrap())
}

#[test]
fn both_directions_at_once_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), false);
    let (cli, srv) = handshake(&dir.path().join("source"), &dir.path().join("destination"));
    let (cli, mut srv) = (cli.unwrap(), srv.unwrap());
    assert!(cli.is_tls());
    // The source writes 8 MiB on one handle while its return-path reader takes the
    // destination's messages on a clone, as a migration does.
    let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 7) as u8).collect();
    let mut rp = Channel::new(cli.try_clone().unwrap());
    let reader = thread::spawn(move || (0..100).map(|_| rp.recv().unwrap()).count());
    let want = payload.clone();
    let dest = thread::spawn(move || {
        let mut back = Channel::new(srv.try_clone().unwrap());
        let mut got = vec![0u8; want.len()];
        let mut at = 0;
        let mut acks = 0;
        while at < got.len() {
            let n = srv.read(&mut got[at..]).unwrap();
            assert!(n > 0, "early EOF");
            at += n;
            if acks < 100 {
                back.send(&Message::Ready { token: [7; 32] }).unwrap();
                acks += 1;
            }
        }
        while acks < 100 {
            back.send(&Message::Ready { token: [7; 32] }).unwrap();
            acks += 1;
        }
        assert!(got == want, "payload corrupted");
    });
    let mut w = cli.try_clone().unwrap();
    w.write_all(&payload).unwrap();
    w.flush().unwrap();
    dest.join().unwrap();
    assert_eq!(reader.join().unwrap(), 100);
    let _ = cli.shutdown();
}

#[test]
fn a_certificate_from_another_ca_is_refused_on_both_sides() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certs(a.path(), false);
    certs(b.path(), false);
    let (cli, srv) = handshake(&a.path().join("source"), &b.path().join("destination"));
    let (ce, se) = (
        cli.err().unwrap().to_string(),
        srv.err().unwrap().to_string(),
    );
    assert!(ce.starts_with("TLS handshake with 127.0.0.1:"), "{ce}");
    assert!(ce.contains("invalid peer certificate"), "{ce}");
    assert!(se.contains("TLS handshake with 127.0.0.1:"), "{se}");
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let old = tempfile::tempdir().unwrap();
    certs(old.path(), true);
    let (cli, srv) = handshake(&old.path().join("source"), &old.path().join("destination"));
    let ce = cli.err().unwrap().to_string();
    assert!(ce.contains("certificate expired"), "{ce}");
    assert!(srv.is_err());
}

#[test]
fn an_expired_source_certificate_from_the_same_ca_is_refused_by_the_destination() {
    let (good, old) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certs(good.path(), false);
    let hosts = ["127.0.0.1".to_string()];
    let spec = CertsSpec {
        hosts: &hosts,
        expired: true,
        ca: Some(good.path()),
    };
    write_test_certs(old.path(), &spec).unwrap();
    let (cli, srv) = handshake(&old.path().join("source"), &good.path().join("destination"));
    let se = srv.err().unwrap().to_string();
    assert!(se.contains("certificate expired"), "{se}");
    // TLS 1.3: the source learns it from the alert on its first read.
    if let Ok(mut c) = cli {
        let e = c.read(&mut [0u8; 1]).unwrap_err().to_string();
        assert!(e.contains("CertificateExpired"), "{e}");
    }
}

#[test]
fn plaintext_to_a_tls_destination_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), false);
    let (mut c, s) = pair();
    let scfg = TlsDir::load(&dir.path().join("destination"))
        .unwrap()
        .server_config()
        .unwrap();
    let srv = thread::spawn(move || MigStream::accept_tls(s, scfg));
    let mut ch = Channel::new(&mut c);
    let _ = ch.send(&Message::Ready { token: [7; 32] });
    let e = srv.join().unwrap().err().unwrap().to_string();
    assert!(e.starts_with("TLS handshake with 127.0.0.1:"), "{e}");
}

#[test]
fn missing_or_bad_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let e = TlsDir::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("key.pem"), "{e}");
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let e = TlsDir::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no usable private key"), "{e}");
}

#[test]
fn a_source_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), false);
    let (c, s) = pair();
    let scfg = TlsDir::load(&dir.path().join("destination"))
        .unwrap()
        .server_config()
        .unwrap();
    let srv = thread::spawn(move || MigStream::accept_tls(s, scfg));
    // A client that trusts the CA but presents no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let cli = MigStream::connect_tls(c, "127.0.0.1", std::sync::Arc::new(cfg));
    let se = srv.join().unwrap().err().unwrap().to_string();
    assert!(se.contains("peer sent no certificates"), "{se}");
    // TLS 1.3 finishes the client's side before the server's verdict arrives; the first
    // read then fails.
    if let Ok(mut c) = cli {
        let mut b = [0u8; 1];
        assert!(c.read(&mut b).is_err());
    }
}

/// Loopback throughput of 1 GiB through MigStream, plain and TLS, ignored by default. Run
/// with `cargo test -p migration --release -- --ignored tls_throughput --nocapture`.
#[test]
#[ignore = "a measurement, run by hand"]
fn tls_throughput() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path(), false);
    for tls in [false, true] {
        let (c, s) = pair();
        let (mut tx, mut rx) = if tls {
            let (a, b) = handshake(&dir.path().join("source"), &dir.path().join("destination"));
            let _ = (c, s);
            (a.unwrap(), b.unwrap())
        } else {
            (MigStream::Plain(c), MigStream::Plain(s))
        };
        let total = 1usize << 30;
        let start = std::time::Instant::now();
        let r = thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < total {
                let n = rx.read(&mut buf).unwrap();
                assert!(n > 0);
                got += n;
            }
        });
        let chunk = vec![0x5au8; 256 << 10];
        for _ in 0..total / chunk.len() {
            tx.write_all(&chunk).unwrap();
        }
        r.join().unwrap();
        let s = start.elapsed().as_secs_f64();
        println!("tls={tls}: 1 GiB in {s:.3} s = {:.0} MiB/s", 1024.0 / s);
    }
}
