//! Identity's use cases. Each write is one transaction; mails are queued in it (outbox).

mod accounts;
mod keyring_calls;
mod organizations;
mod service_accounts;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use keyshare_runtime::auth::{Caller, Claims, Principal, Scope, Scopes};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::mail::OutboxWaker;
use uuid::Uuid;

use crate::config::Config;
use crate::domain::TokenGrant;
use crate::error::{Error, Result};
use crate::keys::SigningKeys;
use crate::password::Passwords;
use crate::store::{self, Limit};

/// How long an email verification token works.
const VERIFICATION_TTL: chrono::Duration = chrono::Duration::hours(24);
/// How long a password reset token works.
const PASSWORD_RESET_TTL: chrono::Duration = chrono::Duration::minutes(30);

/// The internal client identity calls keyring as (its secret is random: nobody logs in as it).
const SELF_CLIENT: &str = "identity";

/// Identity's use cases, shared by every call.
pub struct Identity {
    pool: Pool,
    /// Keyring, told when someone leaves an organization.
    keyring: crate::peers::Keyring,
    clock: SharedClock,
    config: Config,
    keys: Arc<SigningKeys>,
    outbox: OutboxWaker,
    passwords: Passwords,
}

/// What a reset-style mail is for: both carry a token that sets a new password.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PasswordMail {
    Reset,
    FinishSignUp,
}

impl Identity {
    pub fn new(
        pool: Pool,
        clock: SharedClock,
        config: Config,
        keys: Arc<SigningKeys>,
        outbox: OutboxWaker,
        keyring: crate::peers::Keyring,
    ) -> Self {
        let passwords = Passwords::new(config.password_hash_threads, config.password_hash_queue);
        Self { pool, keyring, clock, config, keys, outbox, passwords }
    }

    pub(super) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub(super) fn login_limit(&self, max_hits: i32) -> Limit {
        Limit {
            max_hits,
            window: duration(self.config.login_window),
            lockout: Some(duration(self.config.login_lockout)),
        }
    }

    pub(super) async fn sign(
        &self,
        sub: String,
        session_id: Option<Uuid>,
        org: Option<Uuid>,
        scopes: Scopes,
        internal_client: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<TokenGrant> {
        let expires = now + duration(self.config.access_token_ttl);
        let claims = Claims {
            iss: self.config.tokens.issuer.clone(),
            aud: self.config.tokens.audience.clone(),
            sub,
            exp: expires.timestamp(),
            nbf: now.timestamp(),
            iat: now.timestamp(),
            jti: Uuid::new_v4().to_string(),
            sid: session_id.map(|s| s.to_string()),
            org: org.map(|o| o.to_string()),
            scope: scopes.to_claim(),
            cid: internal_client.map(str::to_owned),
        };
        let signer = self.keys.signer().await?;
        let access_token = signer.sign(&claims).map_err(Error::Internal)?;
        Ok(TokenGrant { access_token, access_expires_at: expires, refresh_token: None, refresh_expires_at: None })
    }

    /// The caller as an account whose session is still live. Identity checks the session on
    /// every call, so a logout or password change takes effect here at once; other services
    /// learn of it within moments from the session-revocation feed.
    pub async fn require_account(&self, caller: &Caller) -> Result<Uuid> {
        let Principal::Account { id } = caller.principal else {
            return Err(Error::PermissionDenied("only accounts may do this"));
        };
        let client = self.pool.get().await?;
        if let Some(session) = caller.session_id
            && !store::session_is_live(&client, session).await?
        {
            return Err(Error::SessionEnded);
        }
        Ok(id)
    }

    /// A service account caller that has not been deleted since its token was issued.
    pub(super) async fn require_live_service_account(&self, caller: &Caller) -> Result<()> {
        if let Principal::ServiceAccount { id, .. } = caller.principal {
            let client = self.pool.get().await?;
            if !store::service_account_is_live(&client, id).await? {
                return Err(Error::Unauthenticated);
            }
        }
        Ok(())
    }

    pub async fn public_keys(&self) -> Result<Vec<keyshare_runtime::auth::PublicKeyMaterial>> {
        let client = self.pool.get().await?;
        Ok(store::public_keys(&client, self.now()).await?)
    }
}

/// Who may follow the session-revocation feed: Keyshare's services holding `sessions.watch`.
pub fn require_revocation_watcher(caller: &Caller) -> Result<()> {
    require(caller, Scope::SessionsWatch)
}

/// Internal RPCs answer only the Keyshare service whose scopes name them.
fn require(caller: &Caller, scope: Scope) -> Result<()> {
    if caller.has_scope(scope) { Ok(()) } else { Err(Error::PermissionDenied(scope.denial())) }
}

fn duration(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
