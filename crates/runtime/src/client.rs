//! Calling other Keyshare services: lazily connected channels, and the access token of this
//! service's own (internal) service account, fetched from identity and renewed before it expires.

use std::sync::Arc;
use std::time::Duration;

use keyshare_proto::identity::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use crate::env::{ConfigError, Env};
use crate::tls::TlsSettings;

/// How long a client waits to connect to another Keyshare service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to `url` that connects on first use and reconnects after failures, so a service
/// starts even while its dependencies are still coming up. An `https://` URL connects with TLS:
/// the peer is verified against `KEYSHARE_TLS_CA` (the webpki roots when unset), and this
/// service presents its own certificate (`KEYSHARE_TLS_CERT`) when it has one.
pub fn lazy_channel(var: &str, url: &str, tls: &TlsSettings) -> Result<Channel, ConfigError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| ConfigError::new(var, "must be a URL such as http://identity:50051"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(10));
    match endpoint.uri().scheme_str() {
        Some("https") => Ok(endpoint.connect_with_connector_lazy(crate::tls::Connector::new(tls.client_config()?))),
        _ => Ok(endpoint.connect_lazy()),
    }
}

/// A request for another Keyshare service carrying `token` as `authorization: Bearer` and the
/// current trace context. `None` if the token cannot be a header value (it then is no token).
pub fn with_bearer<T>(token: &str, message: T) -> Option<tonic::Request<T>> {
    let mut request = crate::telemetry::traced(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().ok()?);
    Some(request)
}

/// This service's identity as an internal client (`KEYSHARE_CLIENT_ID`/`KEYSHARE_CLIENT_SECRET`).
#[derive(Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    secret: String,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

impl ClientCredentials {
    pub fn new(client_id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self { client_id: client_id.into(), secret: secret.into() }
    }

    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self::new(env.required("KEYSHARE_CLIENT_ID")?, env.required("KEYSHARE_CLIENT_SECRET")?))
    }
}

/// A call to another Keyshare service that did not go through, as queued work reads it: tried
/// again later, or recorded as refused for good.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Worth trying again: the peer is down, busy, restarting, timed out, failed on its side,
    /// or did not take this service's token yet.
    #[error("{0}")]
    Retry(String),
    /// The peer answered and will answer the same again (invalid, not found, denied, a failed
    /// precondition): trying again cannot help.
    #[error("{0}")]
    Permanent(String),
}

impl PeerError {
    /// How a peer's `status` reads for queued work; the message names the code and what the
    /// peer said, never the request.
    pub fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        let why = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unauthenticated
            | Code::Cancelled => Self::Retry(why),
            _ => Self::Permanent(why),
        }
    }
}

impl From<TokenError> for PeerError {
    /// Without this service's own token no call went out: tried again.
    fn from(e: TokenError) -> Self {
        Self::Retry(e.to_string())
    }
}

/// Failure to obtain a service token.
#[derive(Debug, thiserror::Error)]
#[error("obtaining a service token from identity failed: {0}")]
pub struct TokenError(String);

/// The current access token of this service, renewed a minute before it expires.
pub struct ServiceToken {
    identity: Channel,
    credentials: ClientCredentials,
    // Expiry is judged by the service's clock, the one the services verifying the token use.
    clock: crate::clock::SharedClock,
    current: tokio::sync::Mutex<Option<(Arc<str>, chrono::DateTime<chrono::Utc>)>>,
}

impl std::fmt::Debug for ServiceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceToken").field("client_id", &self.credentials.client_id).finish_non_exhaustive()
    }
}

const RENEW_BEFORE: Duration = Duration::from_secs(60);

impl ServiceToken {
    pub fn new(identity: Channel, credentials: ClientCredentials, clock: crate::clock::SharedClock) -> Arc<Self> {
        Arc::new(Self { identity, credentials, clock, current: tokio::sync::Mutex::new(None) })
    }

    /// A valid token, fetching a new one when the cached one is about to expire.
    pub async fn get(&self) -> Result<Arc<str>, TokenError> {
        let mut current = self.current.lock().await;
        if let Some((token, renew_at)) = current.as_ref()
            && self.clock.now() < *renew_at
        {
            return Ok(token.clone());
        }
        let mut client = pb::identity_service_client::IdentityServiceClient::new(self.identity.clone());
        let response = client
            .issue_service_account_token(crate::telemetry::traced(pb::IssueServiceAccountTokenRequest {
                client_id: self.credentials.client_id.clone(),
                client_secret: self.credentials.secret.clone(),
            }))
            .await
            .map_err(|status| TokenError(format!("{:?}: {}", status.code(), status.message())))?;
        let grant = response.into_inner().grant.ok_or_else(|| TokenError("no grant in response".into()))?;
        let expires_at = grant
            .access_token_expire_time
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
            .unwrap_or_else(|| self.clock.now());
        let renew_at = expires_at - chrono::Duration::from_std(RENEW_BEFORE).unwrap_or_default();
        let token: Arc<str> = grant.access_token.into();
        *current = Some((token.clone(), renew_at));
        Ok(token)
    }

    /// A request carrying this service's token and the current trace context.
    pub async fn request<T>(&self, message: T) -> Result<tonic::Request<T>, TokenError> {
        let token = self.get().await?;
        with_bearer(&token, message).ok_or_else(|| TokenError("token is not a header value".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_may_answer_otherwise_later_is_tried_again_and_a_refusal_is_final() {
        use tonic::Code;
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Internal, Code::Unauthenticated, Code::Aborted] {
            assert!(matches!(PeerError::from_status(&tonic::Status::new(code, "x")), PeerError::Retry(_)), "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::NotFound, Code::PermissionDenied, Code::FailedPrecondition] {
            assert!(
                matches!(PeerError::from_status(&tonic::Status::new(code, "x")), PeerError::Permanent(_)),
                "{code:?}"
            );
        }
        let refused = PeerError::from_status(&tonic::Status::not_found("no such key"));
        assert_eq!(refused.to_string(), "NotFound: no such key");
    }
}
