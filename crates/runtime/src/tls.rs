//! TLS for gRPC, both ways, with rustls.
//!
//! - [`TlsSettings`]: the shared settings (`KEYSHARE_TLS_CERT`, `KEYSHARE_TLS_KEY`,
//!   `KEYSHARE_TLS_CLIENT_CA`, `KEYSHARE_TLS_CA`); none given means plaintext, as before.
//! - [`ReloadingCert`]: this service's certificate and key, re-read from their files when they
//!   change (cert-manager renews them in place), at most once a second; a new pair that does not
//!   load keeps the old one and logs a warning. Servers present it, and clients too (mTLS).
//! - A server acceptor: the handshake runs in a task of its own per connection (a slow client
//!   never holds up the accept loop), and the verified client certificate's DNS names reach
//!   every request as [`PeerInfo`], where [`crate::auth::AuthLayer`] matches them against the
//!   internal client a token names (see [`certificate_names_client`]).
//! - A client connector for `https://` peer URLs, verifying the server against `KEYSHARE_TLS_CA`
//!   (the webpki roots when unset) and presenting this service's certificate when it has one.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::env::{ConfigError, Env};

/// The certificate variable, named in errors.
pub const CERT_VAR: &str = "KEYSHARE_TLS_CERT";
/// The private key variable, named in errors.
pub const KEY_VAR: &str = "KEYSHARE_TLS_KEY";
/// The CA that signs client certificates; setting it requires them (mTLS).
pub const CLIENT_CA_VAR: &str = "KEYSHARE_TLS_CLIENT_CA";
/// The CA clients verify servers against.
pub const CA_VAR: &str = "KEYSHARE_TLS_CA";

/// How often, at most, the certificate files are looked at again.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; beyond them, accepting waits (connections queue in the
/// kernel's backlog), so a flood of idle connections cannot make unbounded tasks.
const MAX_HANDSHAKES: usize = 512;

/// The TLS settings every service shares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// This service's certificate chain and private key (PEM files), presented as a server and,
    /// to `https://` peers, as a client.
    pub identity: Option<CertFiles>,
    /// When set, the servers require a client certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
    /// The CA (PEM) clients verify `https://` peers against; the webpki roots when unset.
    pub ca: Option<PathBuf>,
}

/// The PEM files of a certificate chain and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsSettings {
    /// Reads the settings; certificate and key come both or not at all, and a mTLS CA needs a
    /// server certificate. The files are read (and checked) when servers and clients are made.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let identity = match (env.get(CERT_VAR), env.get(KEY_VAR)) {
            (Some(cert), Some(key)) => Some(CertFiles { cert: cert.trim().into(), key: key.trim().into() }),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::new(KEY_VAR, format!("is required when {CERT_VAR} is set"))),
            (None, Some(_)) => return Err(ConfigError::new(CERT_VAR, format!("is required when {KEY_VAR} is set"))),
        };
        let client_ca = env.get(CLIENT_CA_VAR).map(|path| PathBuf::from(path.trim()));
        if client_ca.is_some() && identity.is_none() {
            return Err(ConfigError::new(CLIENT_CA_VAR, format!("requires TLS: set {CERT_VAR} and {KEY_VAR} as well")));
        }
        let ca = env.get(CA_VAR).map(|path| PathBuf::from(path.trim()));
        Ok(Self { identity, client_ca, ca })
    }

    /// Whether the gRPC servers serve TLS.
    pub fn serves_tls(&self) -> bool {
        self.identity.is_some()
    }

    /// The servers' TLS configuration, or `None` for plaintext.
    pub fn server_config(&self) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
        let Some(files) = &self.identity else { return Ok(None) };
        let provider = provider();
        let resolver = Arc::new(ReloadingCert::load(files.clone())?);
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(CERT_VAR, format!("TLS setup: {e}")))?;
        let builder = match &self.client_ca {
            Some(path) => {
                let roots = Arc::new(roots_from(CLIENT_CA_VAR, path)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| ConfigError::new(CLIENT_CA_VAR, format!("cannot verify clients with it: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// The TLS configuration of clients of `https://` peers.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, ConfigError> {
        let roots = match &self.ca {
            Some(path) => roots_from(CA_VAR, path)?,
            None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(CA_VAR, format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some(files) => builder.with_client_cert_resolver(Arc::new(ReloadingCert::load(files.clone())?)),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The one crypto provider Keyshare uses (ring, also lettre's).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file into a root store; `var` names the setting in errors.
pub fn roots_from(var: &str, path: &Path) -> Result<RootCertStore, ConfigError> {
    let pem = std::fs::read(path).map_err(|e| ConfigError::new(var, format!("cannot read {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|_| ConfigError::new(var, "is not a PEM certificate file"))?;
        roots.add(cert).map_err(|e| ConfigError::new(var, format!("holds a certificate that is not a CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ConfigError::new(var, "holds no PEM certificate"));
    }
    Ok(roots)
}

/// A certificate and key loaded from files, re-read when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: RwLock<Loaded>,
    /// When the files were last looked at; held while looking, so one caller reads them.
    checked: Mutex<Instant>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' bytes that gave `key` (or last failed to): a change is any other content.
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for Loaded {
    // The key file's bytes are secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair; an error names the variable whose file is at fault.
    pub fn load(files: CertFiles) -> Result<Self, ConfigError> {
        let (cert_pem, key_pem) = read_pair(&files)?;
        let key = Arc::new(parse_pair(&cert_pem, &key_pem)?);
        let current = RwLock::new(Loaded { key, cert_pem, key_pem });
        Ok(Self { files, current, checked: Mutex::new(Instant::now()) })
    }

    /// The certificate to present now, after re-reading the files if they were last looked at
    /// more than [`RELOAD_CHECK_INTERVAL`] ago.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.check();
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).key.clone()
    }

    fn check(&self) {
        // Whoever holds the lock is already looking; the others use what is loaded.
        let Ok(mut checked) = self.checked.try_lock() else { return };
        if checked.elapsed() < RELOAD_CHECK_INTERVAL {
            return;
        }
        *checked = Instant::now();
        let (cert_pem, key_pem) = match read_pair(&self.files) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate files unreadable; keeping the loaded certificate");
                return;
            }
        };
        {
            let loaded = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            if loaded.cert_pem == cert_pem && loaded.key_pem == key_pem {
                return;
            }
        }
        let parsed = parse_pair(&cert_pem, &key_pem);
        let mut loaded = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match parsed {
            Ok(key) => {
                loaded.key = Arc::new(key);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            // Remembering the failed content warns once per bad version, not every second.
            Err(e) => {
                tracing::warn!(error = %e, "new TLS certificate files do not load; keeping the loaded certificate")
            }
        }
        loaded.cert_pem = cert_pem;
        loaded.key_pem = key_pem;
    }
}

fn read_pair(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>), ConfigError> {
    let read = |var: &str, path: &Path| {
        std::fs::read(path).map_err(|e| ConfigError::new(var, format!("cannot read {}: {e}", path.display())))
    };
    Ok((read(CERT_VAR, &files.cert)?, read(KEY_VAR, &files.key)?))
}

/// Parses a PEM chain and key and checks that they belong together. Errors never carry the
/// key's bytes.
fn parse_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ConfigError::new(CERT_VAR, "is not a PEM certificate file"))?;
    if chain.is_empty() {
        return Err(ConfigError::new(CERT_VAR, "holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| ConfigError::new(KEY_VAR, "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        ConfigError::new(KEY_VAR, format!("does not fit the certificate of {CERT_VAR}, or is unsupported: {e}"))
    })
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What the server knows of a connection, in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub tcp: TcpConnectInfo,
    /// The DNS names (SAN) of the client's verified certificate; `None` without one.
    pub client_dns_names: Option<Arc<[String]>>,
}

/// Whether a client certificate with these DNS names may speak for internal client
/// `client_id`: one of the names is the client id itself (`keyring`), or begins with it as its
/// first label (`keyring.keyshare.svc`, `keyring.keyshare.svc.cluster.local`).
pub fn certificate_names_client(dns_names: &[String], client_id: &str) -> bool {
    !client_id.is_empty()
        && dns_names.iter().any(|name| {
            name.split('.').next().is_some_and(|label| label.eq_ignore_ascii_case(client_id)) && !name.starts_with('*')
        })
}

/// A TLS connection accepted by a server.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The TLS connections of `incoming`: each handshake runs in its own task (at most
/// [`MAX_HANDSHAKES`] at once, each for at most 10 s), and connections
/// whose handshake fails (no or a wrong client certificate, not TLS at all) are dropped there.
/// Accepting stops when the returned stream is dropped.
pub fn accept<S>(
    mut incoming: S,
    config: Arc<ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>>
where
    S: futures::Stream<Item = Result<TcpStream, io::Error>> + Unpin + Send + 'static,
{
    use futures::StreamExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = tx.closed() => return,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let tcp = tokio::select! {
                () = tx.closed() => return,
                next = incoming.next() => match next {
                    Some(Ok(tcp)) => tcp,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "accepting a connection failed");
                        continue;
                    }
                    None => return,
                },
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let tcp_info = tcp.connect_info();
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let inner = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, peer = ?tcp_info.remote_addr, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = ?tcp_info.remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
                let client_dns_names = inner.get_ref().1.peer_certificates().and_then(|chain| chain.first()).map(
                    |cert| -> Arc<[String]> {
                        webpki::EndEntityCert::try_from(cert)
                            .map(|cert| cert.valid_dns_names().map(str::to_owned).collect())
                            .unwrap_or_default()
                    },
                );
                let _ = tx.send(Ok(TlsConn { inner, info: PeerInfo { tcp: tcp_info, client_dns_names } })).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Connects to `https://` peers over TLS (TCP with Nagle off, then the handshake).
#[derive(Clone, Debug)]
pub struct Connector {
    config: Arc<ClientConfig>,
}

impl Connector {
    pub fn new(config: Arc<ClientConfig>) -> Self {
        Self { config }
    }
}

type Connecting = Pin<
    Box<dyn Future<Output = io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send>,
>;

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} in {uri}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.to_owned()).map_err(|_| invalid("not a valid server name"))?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_and_key_come_together() {
        let env = Env::from_pairs([(CERT_VAR, "/tls/tls.crt")]);
        assert_eq!(TlsSettings::from_env(&env).unwrap_err().var, KEY_VAR);
        let env = Env::from_pairs([(KEY_VAR, "/tls/tls.key")]);
        assert_eq!(TlsSettings::from_env(&env).unwrap_err().var, CERT_VAR);
        let env = Env::from_pairs([(CLIENT_CA_VAR, "/tls/ca.crt")]);
        assert_eq!(TlsSettings::from_env(&env).unwrap_err().var, CLIENT_CA_VAR);
        let none = TlsSettings::from_env(&Env::from_pairs::<_, String, String>([])).unwrap();
        assert_eq!(none, TlsSettings::default());
        assert!(!none.serves_tls());
    }

    #[test]
    fn unreadable_or_bad_files_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsSettings {
            identity: Some(CertFiles { cert: dir.path().join("none.crt"), key: dir.path().join("none.key") }),
            ..TlsSettings::default()
        };
        assert_eq!(missing.server_config().unwrap_err().var, CERT_VAR);
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let made = rcgen::generate_simple_self_signed(vec!["identity".to_owned()]).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nnot-a-key\n-----END PRIVATE KEY-----\n").unwrap();
        let bad_key = TlsSettings { identity: Some(CertFiles { cert: cert.clone(), key: key.clone() }), ..missing };
        let err = bad_key.server_config().unwrap_err();
        assert_eq!(err.var, KEY_VAR);
        assert!(!err.to_string().contains("not-a-key"), "{err}");
        let bad_ca = TlsSettings { ca: Some(key), ..TlsSettings::default() };
        assert_eq!(bad_ca.client_config().unwrap_err().var, CA_VAR);
    }

    #[test]
    fn the_first_label_names_the_internal_client() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(certificate_names_client(&names(&["keyring"]), "keyring"));
        assert!(certificate_names_client(&names(&["other", "keyring.keyshare.svc"]), "keyring"));
        assert!(!certificate_names_client(&names(&["keyring-evil.keyshare.svc"]), "keyring"));
        assert!(!certificate_names_client(&names(&["invitation.keyshare.svc"]), "keyring"));
        assert!(!certificate_names_client(&names(&["*.keyshare.svc"]), "*"));
        assert!(!certificate_names_client(&names(&[]), "keyring"));
        assert!(!certificate_names_client(&names(&["keyring"]), ""));
    }
}
