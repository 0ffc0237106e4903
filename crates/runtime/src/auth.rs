//! Access tokens: what they claim, how identity signs them, and how every service verifies them.
//!
//! Tokens are JWTs signed with Ed25519 (`alg: EdDSA`) and carry a `kid`. Verification pins the
//! algorithm and checks `exp`, `nbf`, `iss` and `aud` against the service's clock. Public keys come
//! from a [`KeySource`] (identity's own database, or identity's `ListPublicKeys` for everyone else)
//! and are fetched again when a token names a key not seen yet, so a signing-key rotation needs
//! no restart anywhere.
//!
//! [`AuthLayer`] runs verification once per call and leaves the outcome in the request's
//! extensions; handlers ask for the caller with [`caller`].

pub mod sessions;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use uuid::Uuid;

use self::sessions::SessionRevocations;
use crate::clock::SharedClock;
use crate::error;

/// Domain used in `ErrorInfo` for authentication failures.
pub const AUTH_DOMAIN: &str = "auth.keyshare.dev";
/// Leeway for `exp` and `nbf`, to absorb clock skew between replicas.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Shortest interval between two key fetches caused by unknown `kid`s, so a flood of forged
/// tokens cannot turn into a flood of calls to identity.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(5);

/// A power one of Keyshare's own services holds over another's internal RPCs. Each internal
/// client is given only the scopes it needs (identity's `KEYSHARE_INTERNAL_CLIENT_SCOPES`); its
/// tokens carry them in the `scope` claim, and every internal RPC asks for exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Follow keyring's key feed (`WatchKeys`).
    KeysWatch,
    /// Follow identity's session-revocation feed.
    SessionsWatch,
    /// Find an account by verified email (`LookupAccount`).
    AccountsLookup,
    /// Read any organization and its members' roles.
    OrganizationsRead,
    /// Read project and key members, and test another account's permissions.
    MembershipsRead,
    /// Grant and remove memberships on behalf of invitations.
    MembershipsWrite,
    /// End everything a person held in an organization they left (`EndOrganizationMembership`).
    MembershipsEnd,
    /// Count invitations (`CountInvitations`).
    InvitationsRead,
    /// Revoke or end invitations of deleted targets and removed members.
    InvitationsRevoke,
}

impl Scope {
    pub const ALL: [Scope; 9] = [
        Scope::KeysWatch,
        Scope::SessionsWatch,
        Scope::AccountsLookup,
        Scope::OrganizationsRead,
        Scope::MembershipsRead,
        Scope::MembershipsWrite,
        Scope::MembershipsEnd,
        Scope::InvitationsRead,
        Scope::InvitationsRevoke,
    ];

    /// The name used in configuration and in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::KeysWatch => "keys.watch",
            Scope::SessionsWatch => "sessions.watch",
            Scope::AccountsLookup => "accounts.lookup",
            Scope::OrganizationsRead => "organizations.read",
            Scope::MembershipsRead => "memberships.read",
            Scope::MembershipsWrite => "memberships.write",
            Scope::MembershipsEnd => "memberships.end",
            Scope::InvitationsRead => "invitations.read",
            Scope::InvitationsRevoke => "invitations.revoke",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == name)
    }

    /// Why a caller without this scope is refused (safe to return).
    pub fn denial(self) -> &'static str {
        match self {
            Scope::KeysWatch => "this needs the keys.watch scope",
            Scope::SessionsWatch => "this needs the sessions.watch scope",
            Scope::AccountsLookup => "this needs the accounts.lookup scope",
            Scope::OrganizationsRead => "this needs the organizations.read scope",
            Scope::MembershipsRead => "this needs the memberships.read scope",
            Scope::MembershipsWrite => "this needs the memberships.write scope",
            Scope::MembershipsEnd => "this needs the memberships.end scope",
            Scope::InvitationsRead => "this needs the invitations.read scope",
            Scope::InvitationsRevoke => "this needs the invitations.revoke scope",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of [`Scope`]s, as small as a number.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Scopes(u16);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |scope| self.contains(*scope))
    }

    /// From a space-separated list (the OAuth `scope` claim). Names this version does not know
    /// are ignored, so a newer identity's tokens still work here with the scopes both know.
    pub fn from_claim(claim: &str) -> Scopes {
        claim.split_ascii_whitespace().filter_map(Scope::parse).collect()
    }

    /// The space-separated list, for the `scope` claim.
    pub fn to_claim(self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().fold(0, |bits, scope| bits | scope.bit()))
    }
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter().map(Scope::as_str)).finish()
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A person, `accounts/{id}`.
    Account { id: Uuid },
    /// A machine identity: an organization's service account
    /// (`organizations/{org}/serviceAccounts/{id}`, no scopes), or one of Keyshare's own services
    /// (no organization), which may call the internal RPCs its scopes name and nothing else.
    ServiceAccount { id: Uuid, organization: Option<Uuid>, scopes: Scopes },
}

/// The authenticated caller of an RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// The login session an account's token belongs to.
    pub session_id: Option<Uuid>,
    /// For one of Keyshare's own services, its internal client id (`keyring`), which its
    /// client certificate must name under mTLS.
    pub internal_client: Option<String>,
}

impl Caller {
    /// The account id, if the caller is a person.
    pub fn account_id(&self) -> Option<Uuid> {
        match self.principal {
            Principal::Account { id } => Some(id),
            Principal::ServiceAccount { .. } => None,
        }
    }

    /// Whether the caller is one of Keyshare's own services holding `scope`.
    pub fn has_scope(&self, scope: Scope) -> bool {
        matches!(self.principal, Principal::ServiceAccount { scopes, .. } if scopes.contains(scope))
    }

    /// The subject as written in tokens and logs (never secret).
    pub fn subject(&self) -> String {
        match &self.principal {
            Principal::Account { id } => format!("accounts/{id}"),
            Principal::ServiceAccount { id, .. } => format!("serviceAccounts/{id}"),
        }
    }
}

/// The claims of a Keyshare access token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// `accounts/{id}` or `serviceAccounts/{id}`.
    pub sub: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    /// Session id, for account tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Organization of a service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// The internal RPCs one of Keyshare's own service accounts may call, space-separated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// The client id of one of Keyshare's own service accounts (`keyring`), matched against
    /// its client certificate under mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

impl Claims {
    fn caller(&self) -> Result<Caller, AuthError> {
        let parse = |s: &str| Uuid::parse_str(s).map_err(|_| AuthError::Invalid);
        let session_id = self.sid.as_deref().map(parse).transpose()?;
        let principal = if let Some(id) = self.sub.strip_prefix("accounts/") {
            Principal::Account { id: parse(id)? }
        } else if let Some(id) = self.sub.strip_prefix("serviceAccounts/") {
            let organization = self.org.as_deref().map(parse).transpose()?;
            // Scopes belong to Keyshare's own services only; an organization's service account
            // never holds one, whatever its token says.
            let scopes = if organization.is_some() { Scopes::NONE } else { Scopes::from_claim(&self.scope) };
            Principal::ServiceAccount { id: parse(id)?, organization, scopes }
        } else {
            return Err(AuthError::Invalid);
        };
        let internal_client = match &principal {
            Principal::ServiceAccount { organization: None, .. } => self.cid.clone(),
            _ => None,
        };
        Ok(Caller { principal, session_id, internal_client })
    }
}

/// Why a token was not accepted. The messages are safe to return: they never include the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Missing,
    #[error("access token is malformed or its signature is invalid")]
    Invalid,
    #[error("access token must be signed with EdDSA")]
    Algorithm,
    #[error("access token is signed by an unknown key")]
    UnknownKey,
    #[error("access token has expired")]
    Expired,
    #[error("access token is not valid yet")]
    NotYetValid,
    #[error("access token was issued for another issuer or audience")]
    WrongAudience,
    #[error("token verification keys are unavailable")]
    KeysUnavailable,
    #[error("the session has ended; log in again")]
    SessionRevoked,
    #[error("which sessions have ended is not known yet; try again shortly")]
    SessionsUnavailable,
    /// Under mTLS, an internal client's token came over a connection whose certificate is not
    /// that client's.
    #[error(
        "the client certificate does not name internal client {0:?}: one of its DNS names must be {0:?} or begin with \"{0}.\""
    )]
    CertificateMismatch(String),
    /// Under mTLS, a token of one of Keyshare's own services that names no internal client
    /// (issued before tokens did), whose certificate therefore cannot be checked.
    #[error("the token names no internal client to check the client certificate against; get a new token")]
    CertificateUnchecked,
}

impl AuthError {
    fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "UNAUTHENTICATED",
            AuthError::Invalid => "TOKEN_INVALID",
            AuthError::Algorithm => "TOKEN_ALGORITHM",
            AuthError::UnknownKey => "TOKEN_UNKNOWN_KEY",
            AuthError::Expired => "TOKEN_EXPIRED",
            AuthError::NotYetValid => "TOKEN_NOT_YET_VALID",
            AuthError::WrongAudience => "TOKEN_AUDIENCE",
            AuthError::KeysUnavailable => "KEYS_UNAVAILABLE",
            AuthError::SessionRevoked => "SESSION_REVOKED",
            AuthError::SessionsUnavailable => "SESSIONS_UNAVAILABLE",
            AuthError::CertificateMismatch(_) | AuthError::CertificateUnchecked => "CERTIFICATE_MISMATCH",
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::KeysUnavailable | AuthError::SessionsUnavailable => Code::Unavailable,
            AuthError::CertificateMismatch(_) | AuthError::CertificateUnchecked => Code::PermissionDenied,
            _ => Code::Unauthenticated,
        };
        error::status(code, AUTH_DOMAIN, e.reason(), e.to_string())
    }
}

/// A public key that verifies tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeyMaterial {
    pub kid: String,
    /// Raw 32-byte Ed25519 public key.
    pub public_key: [u8; 32],
    /// After this, tokens signed by the key are no longer accepted.
    pub retire_at: Option<DateTime<Utc>>,
}

/// Where a verifier gets its public keys.
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<PublicKeyMaterial>, String>> + Send + '_>>;
}

/// Issuer and audience every token must name.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    pub issuer: String,
    pub audience: String,
}

impl TokenPolicy {
    pub fn from_env(env: &crate::env::Env) -> Self {
        Self {
            issuer: env.get("KEYSHARE_JWT_ISSUER").unwrap_or_else(|| "keyshare-identity".into()),
            audience: env.get("KEYSHARE_JWT_AUDIENCE").unwrap_or_else(|| "keyshare".into()),
        }
    }
}

struct KeyEntry {
    key: DecodingKey,
    retire_at: Option<DateTime<Utc>>,
}

struct KeyCache {
    keys: HashMap<String, KeyEntry>,
    fetched_at: Option<Instant>,
    last_unknown_fetch: Option<Instant>,
}

/// Verifies access tokens against a cached, refreshable set of public keys.
pub struct TokenVerifier {
    source: Box<dyn KeySource>,
    policy: TokenPolicy,
    clock: SharedClock,
    refresh_every: Duration,
    // A std lock, never held across an await: lookups copy what they need and release it.
    cache: RwLock<KeyCache>,
    // Serialises fetches so concurrent calls with a new kid cause one fetch, not many.
    fetching: tokio::sync::Mutex<()>,
    // Sessions that ended, for services that learn of them from identity's feed.
    sessions: std::sync::OnceLock<Arc<SessionRevocations>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl TokenVerifier {
    pub fn new(source: impl KeySource, policy: TokenPolicy, clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            source: Box::new(source),
            policy,
            clock,
            refresh_every: Duration::from_secs(300),
            cache: RwLock::new(KeyCache { keys: HashMap::new(), fetched_at: None, last_unknown_fetch: None }),
            fetching: tokio::sync::Mutex::new(()),
            sessions: std::sync::OnceLock::new(),
        })
    }

    /// Refuses, from now on, tokens of the sessions `sessions` says have ended (set once).
    pub fn refuse_revoked_sessions(&self, sessions: Arc<SessionRevocations>) {
        let _ = self.sessions.set(sessions);
    }

    /// Verifies a bearer token and returns who it authenticates.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Algorithm);
        }
        let kid = header.kid.ok_or(AuthError::Invalid)?;
        if !self.has_fetched() {
            self.refresh(false).await?;
        }
        let key = match self.lookup(&kid)? {
            Some(key) => key,
            None => {
                self.refresh(true).await?;
                self.lookup(&kid)?.ok_or(AuthError::UnknownKey)?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.policy.issuer]);
        validation.set_audience(&[&self.policy.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        // Time is checked below against the service clock, which tests can move.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidAudience | jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                    AuthError::WrongAudience
                }
                _ => AuthError::Invalid,
            })?
            .claims;
        let now = self.clock.now().timestamp();
        let skew = CLOCK_SKEW.as_secs() as i64;
        if claims.exp + skew <= now {
            return Err(AuthError::Expired);
        }
        if claims.nbf - skew > now {
            return Err(AuthError::NotYetValid);
        }
        let caller = claims.caller()?;
        if let (Some(sessions), Some(session)) = (self.sessions.get(), caller.session_id) {
            sessions.check(session).await?;
        }
        Ok(caller)
    }

    fn has_fetched(&self) -> bool {
        self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner()).fetched_at.is_some()
    }

    /// The key for `kid`, if known and not retired. Triggers a periodic refresh when stale.
    fn lookup(&self, kid: &str) -> Result<Option<DecodingKey>, AuthError> {
        let cache = self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.fetched_at.is_none() {
            return Ok(None);
        }
        let now = self.clock.now();
        Ok(cache
            .keys
            .get(kid)
            .filter(|entry| entry.retire_at.is_none_or(|retire| retire > now))
            .map(|entry| entry.key.clone()))
    }

    /// Fetches the keys again. With `unknown_kid`, at most once per few seconds.
    pub async fn refresh(&self, unknown_kid: bool) -> Result<(), AuthError> {
        let _guard = self.fetching.lock().await;
        {
            let cache = self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            let recently = |at: Option<Instant>, within: Duration| at.is_some_and(|t| t.elapsed() < within);
            if unknown_kid && recently(cache.last_unknown_fetch, UNKNOWN_KID_REFETCH) {
                return Ok(());
            }
            if !unknown_kid && recently(cache.fetched_at, self.refresh_every / 2) {
                return Ok(());
            }
        }
        let fetched = self.source.fetch().await;
        let mut cache = self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if unknown_kid {
            cache.last_unknown_fetch = Some(Instant::now());
        }
        match fetched {
            Ok(keys) => {
                cache.keys = keys
                    .into_iter()
                    .map(|k| {
                        let entry = KeyEntry { key: DecodingKey::from_ed_der(&k.public_key), retire_at: k.retire_at };
                        (k.kid, entry)
                    })
                    .collect();
                cache.fetched_at = Some(Instant::now());
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "fetching token verification keys failed");
                if cache.fetched_at.is_none() { Err(AuthError::KeysUnavailable) } else { Ok(()) }
            }
        }
    }

    /// Refreshes the keys periodically until the process ends, so retired keys are dropped and
    /// new ones are known before the first token that uses them.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let verifier = Arc::downgrade(self);
        let every = self.refresh_every;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                let Some(verifier) = verifier.upgrade() else {
                    return;
                };
                let _ = verifier.refresh(false).await;
            }
        });
    }
}

/// Signs access tokens with one Ed25519 key.
#[derive(Clone)]
pub struct TokenSigner {
    kid: String,
    key: EncodingKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// From a PKCS#8 DER private key.
    pub fn from_pkcs8(kid: impl Into<String>, pkcs8_der: &[u8]) -> Self {
        Self { kid: kid.into(), key: EncodingKey::from_ed_der(pkcs8_der) }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| e.to_string())
    }
}

/// Outcome of authentication, left in the request extensions by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Authentication(pub Result<Caller, AuthError>);

/// The bearer token a request carried (empty without one), to forward with calls made on the
/// caller's behalf. [`caller`] says whether it was valid.
pub fn bearer_token<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// What a use case knows of the call it serves, taken from the request by the server adapter:
/// the verified caller, the request id (for audit logs) and the caller's bearer token (to ask
/// another service on the caller's behalf). Its `Debug` never shows the token.
#[derive(Clone)]
pub struct CallContext {
    pub caller: Caller,
    pub request_id: String,
    pub token: String,
}

impl std::fmt::Debug for CallContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("caller", &self.caller)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl CallContext {
    /// The context of an authenticated call; UNAUTHENTICATED (as [`caller`] says) otherwise.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Self, Status> {
        let caller = caller(request)?;
        let request_id =
            request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        Ok(Self { caller, request_id, token: bearer_token(request) })
    }
}

/// The authenticated caller of a request, or UNAUTHENTICATED.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    match request.extensions().get::<Authentication>() {
        Some(Authentication(Ok(caller))) => Ok(caller.clone()),
        Some(Authentication(Err(e))) => Err(e.clone().into()),
        None => Err(AuthError::Missing.into()),
    }
}

/// Tower layer that verifies `authorization: Bearer …` on every call. Calls without the header
/// pass through unauthenticated (some RPCs, like login, need no token); handlers decide.
///
/// Over a connection with a verified client certificate (mTLS), a token of one of Keyshare's
/// own services is accepted only if the certificate names that internal client
/// ([`crate::tls::certificate_names_client`]); otherwise the call is PERMISSION_DENIED. Tokens
/// of people and of organizations' service accounts are not matched against certificates.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    verifier: Arc<TokenVerifier>,
}

impl AuthLayer {
    pub fn new(verifier: Arc<TokenVerifier>) -> Self {
        Self { verifier }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, verifier: self.verifier.clone() }
    }
}

/// The service [`AuthLayer`] produces.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<TokenVerifier>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready inner service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        // A TLS connection's peer: its TCP addresses are also left where `remote_addr` finds them.
        let client_dns_names = match request.extensions().get::<crate::tls::PeerInfo>().cloned() {
            Some(peer) => {
                request.extensions_mut().insert(peer.tcp);
                peer.client_dns_names
            }
            None => None,
        };
        let token = request.headers().get(http::header::AUTHORIZATION).map(|value| {
            match value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
                Some(token) => Ok(token.trim().to_owned()),
                None => Err(AuthError::Invalid),
            }
        });
        Box::pin(async move {
            if let Some(token) = token {
                let mut outcome = match token {
                    Ok(token) => verifier.verify(&token).await,
                    Err(e) => Err(e),
                };
                if let (Ok(caller), Some(names)) = (&outcome, &client_dns_names)
                    && let Err(e) = check_certificate(caller, names)
                {
                    tracing::info!(caller = %caller.subject(), certificate_names = ?names, "{e}");
                    outcome = Err(e);
                }
                if let Ok(caller) = &outcome {
                    tracing::Span::current().record("caller", caller.subject());
                }
                request.extensions_mut().insert(Authentication(outcome));
            }
            inner.call(request).await
        })
    }
}

/// Under mTLS: whether a caller may use a connection whose client certificate has these DNS
/// names. Only Keyshare's own services are matched; one whose token names no internal client
/// (issued before tokens carried it) is refused too, as its certificate cannot be checked.
fn check_certificate(caller: &Caller, dns_names: &[String]) -> Result<(), AuthError> {
    match (&caller.principal, &caller.internal_client) {
        (Principal::ServiceAccount { organization: None, .. }, Some(client)) => {
            if crate::tls::certificate_names_client(dns_names, client) {
                Ok(())
            } else {
                Err(AuthError::CertificateMismatch(client.clone()))
            }
        }
        (Principal::ServiceAccount { organization: None, .. }, None) => Err(AuthError::CertificateUnchecked),
        _ => Ok(()),
    }
}

/// Keys fetched from identity's `ListPublicKeys`, for every service but identity itself.
#[derive(Clone, Debug)]
pub struct IdentityKeySource {
    channel: tonic::transport::Channel,
}

impl IdentityKeySource {
    pub fn new(channel: tonic::transport::Channel) -> Self {
        Self { channel }
    }
}

impl KeySource for IdentityKeySource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<PublicKeyMaterial>, String>> + Send + '_>> {
        use keyshare_proto::identity::v1 as pb;
        Box::pin(async move {
            let mut client = pb::identity_service_client::IdentityServiceClient::new(self.channel.clone());
            let mut keys = Vec::new();
            let mut page_token = String::new();
            // A handful of keys in practice; the bound only stops a misbehaving peer.
            for _ in 0..100 {
                let request = pb::ListPublicKeysRequest { page_size: 1000, page_token };
                let page = client
                    .list_public_keys(crate::telemetry::traced(request))
                    .await
                    .map_err(|status| format!("identity ListPublicKeys: {}", status.code()))?
                    .into_inner();
                for key in page.keys {
                    let public_key: [u8; 32] =
                        key.public_key.as_slice().try_into().map_err(|_| format!("key {} is not 32 bytes", key.kid))?;
                    let retire_at =
                        key.retire_time.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32));
                    keys.push(PublicKeyMaterial { kid: key.kid, public_key, retire_at });
                }
                if page.next_page_token.is_empty() {
                    return Ok(keys);
                }
                page_token = page.next_page_token;
            }
            Err("identity ListPublicKeys: more pages than any key set has".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use rand::rngs::OsRng;

    use super::*;
    use crate::clock::ManualClock;

    struct Fixed(Vec<PublicKeyMaterial>);

    impl KeySource for Fixed {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<PublicKeyMaterial>, String>> + Send + '_>> {
            let keys = self.0.clone();
            Box::pin(async move { Ok(keys) })
        }
    }

    fn keypair(kid: &str) -> (TokenSigner, PublicKeyMaterial) {
        let key = SigningKey::generate(&mut OsRng);
        let der = key.to_pkcs8_der().unwrap();
        let signer = TokenSigner::from_pkcs8(kid, der.as_bytes());
        let public = PublicKeyMaterial { kid: kid.into(), public_key: key.verifying_key().to_bytes(), retire_at: None };
        (signer, public)
    }

    #[test]
    fn under_mtls_only_internal_clients_are_matched_against_their_certificate() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let internal = |client: Option<&str>| Caller {
            principal: Principal::ServiceAccount {
                id: Uuid::nil(),
                organization: None,
                scopes: [Scope::KeysWatch].into_iter().collect(),
            },
            session_id: None,
            internal_client: client.map(str::to_owned),
        };
        let keyring = internal(Some("keyring"));
        assert_eq!(check_certificate(&keyring, &names(&["keyring.keyshare.svc"])), Ok(()));
        let refused = check_certificate(&keyring, &names(&["invitation.keyshare.svc"])).unwrap_err();
        assert_eq!(refused, AuthError::CertificateMismatch("keyring".into()));
        assert_eq!(Status::from(refused).code(), Code::PermissionDenied);
        assert_eq!(check_certificate(&internal(None), &names(&["keyring"])), Err(AuthError::CertificateUnchecked));
        // People and organizations' service accounts: any certificate of the CA.
        let person =
            Caller { principal: Principal::Account { id: Uuid::nil() }, session_id: None, internal_client: None };
        assert_eq!(check_certificate(&person, &names(&["console"])), Ok(()));
        let org_account = Caller {
            principal: Principal::ServiceAccount {
                id: Uuid::nil(),
                organization: Some(Uuid::nil()),
                scopes: Scopes::NONE,
            },
            session_id: None,
            internal_client: Some("keyring".into()),
        };
        assert_eq!(check_certificate(&org_account, &names(&["console"])), Ok(()));
    }

    #[test]
    fn only_internal_service_accounts_carry_their_client_id() {
        let mut claims = claims(0);
        claims.sub = format!("serviceAccounts/{}", Uuid::nil());
        claims.cid = Some("keyring".into());
        assert_eq!(claims.caller().unwrap().internal_client.as_deref(), Some("keyring"));
        claims.org = Some(Uuid::nil().to_string());
        assert_eq!(claims.caller().unwrap().internal_client, None);
        claims.org = None;
        claims.sub = format!("accounts/{}", Uuid::nil());
        assert_eq!(claims.caller().unwrap().internal_client, None);
    }

    fn claims(now: i64) -> Claims {
        Claims {
            iss: "keyshare-identity".into(),
            aud: "keyshare".into(),
            sub: format!("accounts/{}", Uuid::new_v4()),
            exp: now + 600,
            nbf: now,
            iat: now,
            jti: Uuid::new_v4().to_string(),
            sid: Some(Uuid::new_v4().to_string()),
            org: None,
            scope: String::new(),
            cid: None,
        }
    }

    #[tokio::test]
    async fn verification_table() {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

        let clock = ManualClock::new();
        let (signer, public) = keypair("k1");
        let (stranger, _) = keypair("k1");
        let policy = TokenPolicy { issuer: "keyshare-identity".into(), audience: "keyshare".into() };
        let verifier = TokenVerifier::new(Fixed(vec![public]), policy, clock.clone());
        let now = Utc::now().timestamp();
        let good = signer.sign(&claims(now)).unwrap();
        assert!(verifier.verify(&good).await.is_ok());

        let mut wrong_aud = claims(now);
        wrong_aud.aud = "other".into();
        let mut expired = claims(now);
        expired.exp = now - 120;
        let mut future = claims(now);
        future.nbf = now + 3600;
        let (head, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let mut forged_claims = claims(now);
        forged_claims.sub = format!("accounts/{}", Uuid::new_v4());
        let tampered = format!("{head}.{}.{sig}", B64.encode(serde_json::to_vec(&forged_claims).unwrap()));
        let none_alg = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
            B64.encode(serde_json::to_vec(&claims(now)).unwrap())
        );
        let hs256 = jsonwebtoken::encode(
            &Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS256) },
            &claims(now),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        let (unknown, _) = keypair("k9");

        let cases: Vec<(&str, String, AuthError)> = vec![
            ("wrong audience", signer.sign(&wrong_aud).unwrap(), AuthError::WrongAudience),
            ("expired", signer.sign(&expired).unwrap(), AuthError::Expired),
            ("not yet valid", signer.sign(&future).unwrap(), AuthError::NotYetValid),
            ("tampered payload", tampered, AuthError::Invalid),
            ("alg none", none_alg, AuthError::Invalid),
            ("hs256", hs256, AuthError::Algorithm),
            ("unknown kid", unknown.sign(&claims(now)).unwrap(), AuthError::UnknownKey),
            ("known kid, other key", stranger.sign(&claims(now)).unwrap(), AuthError::Invalid),
            ("garbage", "not.a.token".into(), AuthError::Invalid),
        ];
        for (name, token, expected) in cases {
            assert_eq!(verifier.verify(&token).await.unwrap_err(), expected, "{name}");
        }

        clock.advance(chrono::Duration::minutes(11));
        assert_eq!(verifier.verify(&good).await.unwrap_err(), AuthError::Expired);
    }
}
