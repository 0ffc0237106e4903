//! PostgreSQL over TLS, as libpq spells it in `DATABASE_URL`:
//!
//! - `sslmode=disable`, `prefer` or none: plaintext, as before;
//! - `sslmode=require`: encrypted, the server's certificate not checked;
//! - `sslmode=verify-ca`: encrypted, the certificate must chain to the CA;
//! - `sslmode=verify-full`: and must name the host connected to.
//!
//! The CA is `sslrootcert=<PEM file>` in the URL (`KEYSHARE_DATABASE_CA` puts it there), or
//! `sslrootcert=system` for the webpki roots. tokio-postgres itself knows neither the verify
//! modes nor `sslrootcert`: both are taken out of the string before it is parsed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// Why `DATABASE_URL`'s TLS options cannot be used; the message names `DATABASE_URL`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsOptionsError(String);

/// What `sslmode` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Plain,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The connection settings and TLS connector a `DATABASE_URL` describes.
pub fn prepare(database_url: &str) -> Result<(tokio_postgres::Config, MakeRustls), TlsOptionsError> {
    let invalid = || TlsOptionsError("DATABASE_URL is not a valid PostgreSQL URL".into());
    let (rest, mode, root_cert) = split_tls_options(database_url).ok_or_else(invalid)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|_| invalid())?;
    config.ssl_mode(if mode == SslMode::Plain {
        tokio_postgres::config::SslMode::Disable
    } else {
        tokio_postgres::config::SslMode::Require
    });
    Ok((config, MakeRustls { config: client_config(mode, root_cert.as_deref())? }))
}

fn client_config(mode: SslMode, root_cert: Option<&str>) -> Result<Arc<ClientConfig>, TlsOptionsError> {
    let provider = crate::tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsOptionsError(format!("DATABASE_URL: TLS setup: {e}")))?;
    let roots = || -> Result<Arc<RootCertStore>, TlsOptionsError> {
        match root_cert {
            Some("system") => Ok(Arc::new(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })),
            Some(path) => crate::tls::roots_from("DATABASE_URL sslrootcert", std::path::Path::new(path))
                .map(Arc::new)
                .map_err(|e| TlsOptionsError(e.to_string())),
            None => Err(TlsOptionsError(
                "DATABASE_URL: sslmode=verify-ca and verify-full need the CA: sslrootcert=<PEM file> (or \
                 KEYSHARE_DATABASE_CA), or sslrootcert=system"
                    .into(),
            )),
        }
    };
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        // Never used: the connection is plaintext.
        SslMode::Plain | SslMode::Require => Arc::new(EncryptOnly(provider)),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots()?, provider)
                .build()
                .map_err(|e| TlsOptionsError(format!("DATABASE_URL: sslrootcert: {e}")))?;
            if mode == SslMode::VerifyCa { Arc::new(AnyName(inner)) } else { inner }
        }
    };
    Ok(Arc::new(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()))
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query or a `key=value` string.
fn split_tls_options(database_url: &str) -> Option<(String, SslMode, Option<String>)> {
    let mut mode = SslMode::Plain;
    let mut root_cert = None;
    let mut take = |key: &str, value: String| -> Option<bool> {
        match key {
            "sslmode" => {
                mode = match value.as_str() {
                    "disable" | "prefer" | "allow" => SslMode::Plain,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => return None,
                };
                Some(true)
            }
            "sslrootcert" => {
                root_cert = Some(value);
                Some(true)
            }
            _ => Some(false),
        }
    };
    let rest = if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let (base, query) = database_url.split_once('?').unwrap_or((database_url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(key, percent_decode(value)?)? {
                kept.push(pair);
            }
        }
        if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) }
    } else {
        let mut kept = Vec::new();
        for word in database_url.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            if !take(key.trim(), value.trim_matches('\'').to_owned())? {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    Some((rest, mode, root_cert))
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `database_url` with `sslrootcert=<path>` added, unless it names one already.
pub fn with_root_cert(database_url: &str, path: &str) -> String {
    if database_url.contains("sslrootcert=") {
        return database_url.to_owned();
    }
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        let encoded: String = path
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let separator = if database_url.contains('?') { '&' } else { '?' };
        format!("{database_url}{separator}sslrootcert={encoded}")
    } else {
        format!("{database_url} sslrootcert={path}")
    }
}

/// The TLS failure inside a connection error, if that is what it was.
pub fn tls_failure(error: &tokio_postgres::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(rustls) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).and_then(|inner| {
            let inner: &(dyn std::error::Error + 'static) = inner;
            inner.downcast_ref::<rustls::Error>()
        }) {
            return Some(rustls.to_string());
        }
        source = e.source();
    }
    error.to_string().contains("TLS").then(|| error.to_string())
}

/// `sslmode=require`: encrypted, whoever the server is. Handshake signatures are still checked.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A rustls `MakeTlsConnect` for tokio-postgres.
#[derive(Clone, Debug)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the database host is not a valid server name"))?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

/// Connects one database connection over TLS.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A database connection's TLS stream.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, mode, ca) =
            split_tls_options("postgres://u:p@db:5432/k?sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.crt").unwrap();
        assert_eq!(
            (rest.as_str(), mode, ca.as_deref()),
            ("postgres://u:p@db:5432/k", SslMode::VerifyFull, Some("/ca dir/ca.crt"))
        );
        let (rest, mode, _) = split_tls_options("postgres://db/k?application_name=x&sslmode=require").unwrap();
        assert_eq!((rest.as_str(), mode), ("postgres://db/k?application_name=x", SslMode::Require));
        let (rest, mode, ca) = split_tls_options("host=db user=k sslmode=verify-ca sslrootcert=/ca.crt").unwrap();
        assert_eq!((rest.as_str(), mode, ca.as_deref()), ("host=db user=k", SslMode::VerifyCa, Some("/ca.crt")));
        assert_eq!(split_tls_options("postgres://db/k").unwrap().1, SslMode::Plain);
        assert!(split_tls_options("postgres://db/k?sslmode=sometimes").is_none());
    }

    #[test]
    fn the_database_ca_setting_joins_the_url() {
        assert_eq!(with_root_cert("postgres://db/k", "/ca/ca.crt"), "postgres://db/k?sslrootcert=/ca/ca.crt");
        assert_eq!(
            with_root_cert("postgres://db/k?sslmode=verify-full", "/c a"),
            "postgres://db/k?sslmode=verify-full&sslrootcert=/c%20a"
        );
        assert_eq!(with_root_cert("postgres://db/k?sslrootcert=/x", "/y"), "postgres://db/k?sslrootcert=/x");
        let (_, _, ca) = split_tls_options(&with_root_cert("postgres://db/k?sslmode=verify-full", "/c a")).unwrap();
        assert_eq!(ca.as_deref(), Some("/c a"));
    }

    #[test]
    fn verify_modes_need_a_ca_and_plain_stays_plain() {
        let err = prepare("postgres://db/k?sslmode=verify-full").unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
        let (config, _) = prepare("postgres://db/k").unwrap();
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let (config, _) = prepare("postgres://db/k?sslmode=require").unwrap();
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }
}
