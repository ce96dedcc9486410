//! The byte stream a migration runs over: plain TCP, or mutual TLS 1.3 (rustls) on TCP.
//!
//! A migration connection is full duplex across two threads (the source's sender and its
//! return-path reader), and [`MigStream::try_clone`] hands each its own handle, as
//! `TcpStream::try_clone` does. For TLS the handles share one rustls connection behind a
//! lock that is never held across a socket read or write: a reader waits for ciphertext
//! without the lock, then decrypts under it; a writer encrypts under it, then sends under a
//! second lock that keeps records in the order they were sealed.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, version::TLS13};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, WriteVolatile};

/// Largest piece of guest memory copied out for encryption at once.
const TLS_CHUNK: usize = 256 << 10;
/// Ciphertext read from the socket at once.
const READ_CHUNK: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read {path}: {err}")]
    File {
        path: PathBuf,
        #[source]
        err: io::Error,
    },
    #[error("TLS: {path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS: the CA in {0} cannot verify peers: {1}")]
    Verifier(PathBuf, String),
    #[error("TLS: '{0}' is not a host name or IP address to verify the destination against")]
    ServerName(String),
    #[error("TLS handshake with {peer} failed: {err}")]
    Handshake {
        peer: String,
        #[source]
        err: io::Error,
    },
}

/// One side's TLS identity and trust: `DIR/ca.pem`, `DIR/cert.pem`, `DIR/key.pem`.
#[derive(Clone, Debug)]
pub struct TlsDir {
    dir: PathBuf,
    ca: Vec<CertificateDer<'static>>,
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

// ring, not aws-lc-rs: it builds with nothing but a C compiler. rustls deprecates it only
// for lacking post-quantum key exchange, which TLS 1.3 with X25519/P-256 does not need here.
// AES-128-GCM first: the fastest suite with AES-NI, and the bulk of a migration is cipher.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

type Scratch = std::cell::RefCell<Vec<u8>>;

thread_local! {
    /// Per-thread scratch, so that no chunk allocates (or zeroes) a buffer: ciphertext read
    /// from the socket, and plaintext staged between guest memory and rustls.
    static CIPHER: Scratch = const { Scratch::new(Vec::new()) };
    static PLAIN: Scratch = const { Scratch::new(Vec::new()) };
}

/// Runs `f` with this thread's `which` scratch buffer grown to `len` bytes.
fn with_scratch<T>(
    which: &'static std::thread::LocalKey<Scratch>,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> T,
) -> T {
    which.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0);
        }
        f(&mut s[..len])
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(|err| TlsError::File {
        path: path.into(),
        err,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

impl TlsDir {
    /// Loads the three PEM files (keys PKCS#8, SEC1 or PKCS#1; EC P-256 or RSA).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let key_path = dir.join("key.pem");
        let key_bytes = fs::read(&key_path).map_err(|err| TlsError::File {
            path: key_path.clone(),
            err,
        })?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
            path: key_path,
            what: format!("no usable private key: {e}"),
        })?;
        Ok(TlsDir {
            dir: dir.to_owned(),
            ca: read_certs(&dir.join("ca.pem"))?,
            certs: read_certs(&dir.join("cert.pem"))?,
            key: Arc::new(key),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Verifier(self.dir.join("ca.pem"), e.to_string()))?;
        }
        Ok(Arc::new(roots))
    }

    /// The source's side: verifies the destination against the CA, presents its own cert.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }

    /// The destination's side: requires a client certificate from the same CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .map_err(|e| TlsError::Verifier(self.dir.join("ca.pem"), e.to_string()))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        // One connection per migration: no resumption, and no tickets to send after the
        // handshake.
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }
}

/// The shared half of a TLS stream: the rustls state, ciphertext read but not yet taken by
/// rustls, and the order of sealed records.
pub struct TlsShared {
    state: Mutex<TlsState>,
    /// Held from sealing to sending; holds the sealed bytes between the two.
    send: Mutex<Vec<u8>>,
}

struct TlsState {
    conn: Connection,
    /// Ciphertext from `taken` on is not yet in rustls.
    incoming: Vec<u8>,
    taken: usize,
}

/// A migration connection, plain or TLS; clones share the connection.
pub enum MigStream {
    Plain(TcpStream),
    Tls {
        sock: TcpStream,
        shared: Arc<TlsShared>,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs the handshake to its end on `sock`, with its timeouts.
fn handshake(mut conn: Connection, sock: TcpStream, peer: String) -> Result<MigStream, TlsError> {
    let server = matches!(conn, Connection::Server(_));
    let mut s = &sock;
    while conn.is_handshaking() {
        if let Err(err) = conn.complete_io(&mut s) {
            // Tell the peer why, if rustls has an alert queued.
            let _ = conn.write_tls(&mut s);
            return Err(TlsError::Handshake {
                peer: format!("{peer}{}", hint(&err, server)),
                err,
            });
        }
    }
    conn.set_buffer_limit(None);
    Ok(MigStream::Tls {
        sock,
        shared: Arc::new(TlsShared {
            state: Mutex::new(TlsState {
                conn,
                incoming: Vec::new(),
                taken: 0,
            }),
            send: Mutex::new(Vec::new()),
        }),
    })
}

/// What a failed handshake most likely means, when the error says it.
fn hint(err: &io::Error, server: bool) -> &'static str {
    let text = err.to_string();
    let plaintext = text.contains("InvalidContentType") || text.contains("corrupt message");
    let closed = matches!(
        err.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    );
    match (plaintext, closed, server) {
        (true, _, true) => " (it does not speak TLS: a source without --tls-dir?)",
        (true, _, false) | (false, true, false) => {
            " (it does not speak TLS: a destination without --tls-dir?)"
        }
        _ => "",
    }
}

/// Sends what rustls has sealed, in the order it sealed it.
fn flush_tls(mut sock: &TcpStream, shared: &TlsShared) -> io::Result<()> {
    let mut out = lock(&shared.send);
    out.clear();
    {
        let mut st = lock(&shared.state);
        while st.conn.wants_write() {
            st.conn.write_tls(&mut *out)?;
        }
    }
    sock.write_all(&out)
}

/// Hands rustls the ciphertext it can take now (it refuses more while it holds a full
/// buffer of plaintext) and decrypts it.
fn feed(st: &mut TlsState) -> io::Result<()> {
    let TlsState {
        conn,
        incoming,
        taken,
    } = st;
    let mut rest = &incoming[*taken..];
    while !rest.is_empty() {
        match conn.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {
                conn.process_new_packets().map_err(tls_io)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Other => break,
            Err(e) => return Err(e),
        }
    }
    *taken = incoming.len() - rest.len();
    if *taken == incoming.len() {
        incoming.clear();
        *taken = 0;
    }
    Ok(())
}

/// Reads plaintext: what rustls holds, else ciphertext from the socket (without the lock).
fn read_tls_stream(sock: &mut TcpStream, shared: &TlsShared, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        {
            let mut st = lock(&shared.state);
            match st.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let left = st.incoming.len() - st.taken;
            if left > 0 {
                feed(&mut st)?;
                if st.incoming.len() - st.taken < left {
                    continue;
                }
            }
        }
        let wants_write = with_scratch(&CIPHER, READ_CHUNK, |raw| -> io::Result<bool> {
            let n = sock.read(raw)?;
            let mut st = lock(&shared.state);
            if n == 0 {
                // EOF: rustls decides whether it was a clean close_notify.
                st.conn.read_tls(&mut &[][..])?;
                st.conn.process_new_packets().map_err(tls_io)?;
            } else {
                st.incoming.extend_from_slice(&raw[..n]);
                feed(&mut st)?;
            }
            Ok(st.conn.wants_write())
        })?;
        // Alerts or key updates that the peer's records called for.
        if wants_write {
            flush_tls(sock, shared)?;
        }
    }
}

impl MigStream {
    /// TLS as the source: `host` (the part of HOST:PORT before the port) must be in the
    /// destination certificate's IP or DNS SANs.
    pub fn connect_tls(
        sock: TcpStream,
        host: &str,
        cfg: Arc<ClientConfig>,
    ) -> Result<Self, TlsError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|_| TlsError::ServerName(host.to_owned()))?;
        let conn = ClientConnection::new(cfg, name)?;
        let peer = peer_text(&sock);
        handshake(conn.into(), sock, peer)
    }

    /// TLS as the destination.
    pub fn accept_tls(sock: TcpStream, cfg: Arc<ServerConfig>) -> Result<Self, TlsError> {
        let conn = ServerConnection::new(cfg)?;
        let peer = peer_text(&sock);
        handshake(conn.into(), sock, peer)
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, MigStream::Tls { .. })
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            MigStream::Plain(s) | MigStream::Tls { sock: s, .. } => s,
        }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            MigStream::Plain(s) => MigStream::Plain(s.try_clone()?),
            MigStream::Tls { sock, shared } => MigStream::Tls {
                sock: sock.try_clone()?,
                shared: shared.clone(),
            },
        })
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)?;
        self.tcp().set_write_timeout(t)
    }

    /// Ends both directions for every clone (a blocked reader returns).
    pub fn shutdown(&self) -> io::Result<()> {
        if let MigStream::Tls { sock, shared } = self {
            lock(&shared.state).conn.send_close_notify();
            let _ = flush_tls(sock, shared);
        }
        self.tcp().shutdown(Shutdown::Both)
    }
}

fn peer_text(s: &TcpStream) -> String {
    s.peer_addr()
        .map_or_else(|_| "the peer".into(), |a| a.to_string())
}

impl Read for MigStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MigStream::Plain(s) => s.read(buf),
            MigStream::Tls { sock, shared } => read_tls_stream(sock, shared, buf),
        }
    }
}

impl Write for MigStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MigStream::Plain(s) => s.write(buf),
            MigStream::Tls { sock, shared } => {
                let n = lock(&shared.state).conn.writer().write(buf)?;
                flush_tls(sock, shared)?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MigStream::Plain(s) => s.flush(),
            MigStream::Tls { sock, shared } => flush_tls(sock, shared),
        }
    }
}

fn volatile_io(e: io::Error) -> VolatileMemoryError {
    VolatileMemoryError::IOError(e)
}

impl WriteVolatile for MigStream {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        if let MigStream::Plain(s) = self {
            return s.write_volatile(buf);
        }
        // rustls seals from a byte slice: guest memory is copied out a chunk at a time.
        let len = buf.len().min(TLS_CHUNK);
        let part = buf.subslice(0, len)?;
        with_scratch(&PLAIN, len, |tmp| {
            part.copy_to(&mut tmp[..]);
            self.write_all(tmp)
        })
        .map_err(volatile_io)?;
        Ok(len)
    }
}

impl ReadVolatile for MigStream {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        if let MigStream::Plain(s) = self {
            return s.read_volatile(buf);
        }
        let len = buf.len().min(TLS_CHUNK);
        with_scratch(&PLAIN, len, |tmp| {
            let n = self.read(tmp)?;
            buf.copy_from(&tmp[..n]);
            Ok(n)
        })
        .map_err(volatile_io)
    }
}
