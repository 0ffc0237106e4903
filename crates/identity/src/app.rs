//! Identity's use cases. Each write is one transaction; mails are queued in it (outbox).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use keyshare_runtime::auth::{Caller, Claims, Principal, Scope, Scopes};
use keyshare_runtime::client::PeerError;
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::crypto::{constant_time_eq, random_token, sha256};
use keyshare_runtime::jobs::{Backoff, Round, Waker};
use keyshare_runtime::mail::{self, Mail, OutboxWaker};
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use crate::config::Config;
use crate::domain::{
    Account, DisplayName, Email, Member, NewPassword, OrgRole, Organization, Page, ServiceAccount, TokenGrant,
};
use crate::error::{Error, Result};
use crate::keys::SigningKeys;
use crate::password::Passwords;
use crate::store::{self, Bucket, Limit};

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

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn login_limit(&self, max_hits: i32) -> Limit {
        Limit {
            max_hits,
            window: duration(self.config.login_window),
            lockout: Some(duration(self.config.login_lockout)),
        }
    }

    /// Counts a mail to `email` against its address's budget, whether or not an account has
    /// the address, so the answer reveals nothing.
    async fn count_mail(&self, email: &Email, now: DateTime<Utc>) -> Result<()> {
        let window = duration(self.config.account_mail_window);
        let limit = Limit { max_hits: self.config.account_mails_per_address, window, lockout: None };
        let client = self.pool.get().await?;
        if let Some(until) = store::throttle_hit(&client, Bucket::MailAddress, &email.normalized(), now, limit).await? {
            return Err(Error::MailThrottled { retry_after: (until - now).to_std().unwrap_or_default() });
        }
        Ok(())
    }

    // --- Accounts ---

    /// Signs up. An unverified account with the same email is replaced: it belonged to
    /// whoever typed the address, not necessarily its owner, and must never block the owner.
    pub async fn sign_up(&self, email: Email, display_name: DisplayName, password: NewPassword) -> Result<Account> {
        let password_hash = self.passwords.reserve()?.hash(password.expose().to_owned()).await?;
        let now = self.now();
        self.count_mail(&email, now).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(existing) = store::lock_account_by_email(&tx, &email.normalized()).await? {
            if existing.email_verified || !store::delete_unverified_account(&tx, existing.id).await? {
                return Err(Error::EmailTaken);
            }
            tracing::info!(account = %existing.id, "unverified account replaced by a new sign-up");
        }
        let account = store::insert_account(
            &tx,
            Uuid::now_v7(),
            email.as_str(),
            &email.normalized(),
            display_name.as_str(),
            &password_hash,
            now,
        )
        .await
        .map_err(|e| if e.unique_violation().is_some() { Error::EmailTaken } else { e.into() })?;
        self.queue_verification(&tx, &account, now).await?;
        tx.commit().await?;
        self.outbox.wake();
        tracing::info!(account = %account.id, "account created");
        Ok(account)
    }

    async fn queue_verification(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        account: &Account,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let token = random_token(32);
        store::insert_verification(tx, &sha256(token.as_bytes()), account.id, now, now + VERIFICATION_TTL).await?;
        let steps = mail::token_steps(
            self.config.public_url.as_deref(),
            "/verify-email",
            &token,
            "keyshare.identity.v1.IdentityService/VerifyEmail",
            "confirm your email address for Keyshare",
        );
        let body = format!(
            "Hello {name},\n\n{steps}\n\
             The token works once and expires in 24 hours. If you did not sign up, ignore this mail.\n",
            name = account.display_name
        );
        let mail = Mail {
            to: account.email.clone(),
            subject: "Verify your Keyshare email address".into(),
            body,
            topic: Some(format!("accounts/{}", account.id)),
        };
        mail::enqueue(tx, "identity", &mail).await?;
        Ok(())
    }

    /// Queues a mail whose token sets a new password (and so verifies the email); earlier
    /// unused reset and verification tokens of the account stop working.
    async fn queue_password_mail(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        account: &Account,
        kind: PasswordMail,
        now: DateTime<Utc>,
    ) -> Result<()> {
        store::spend_password_resets(tx, account.id, now).await?;
        store::spend_verifications(tx, account.id, now).await?;
        let token = random_token(32);
        let ttl = if kind == PasswordMail::Reset { PASSWORD_RESET_TTL } else { VERIFICATION_TTL };
        store::insert_password_reset(tx, &sha256(token.as_bytes()), account.id, now, now + ttl).await?;
        let (subject, intro, action, expiry, ignore) = match kind {
            PasswordMail::Reset => (
                "Reset your Keyshare password",
                "Someone asked to reset the password of your Keyshare account.",
                "choose a new one",
                "30 minutes",
                "If you did not ask, ignore this mail: your password stays as it is.",
            ),
            PasswordMail::FinishSignUp => (
                "Finish signing up for Keyshare",
                "Someone signed up for Keyshare with this email address.",
                "confirm it and choose your password",
                "24 hours",
                "If you did not sign up, ignore this mail.",
            ),
        };
        let steps = mail::token_steps(
            self.config.public_url.as_deref(),
            "/reset-password",
            &token,
            "keyshare.identity.v1.IdentityService/ResetPassword (with your new password)",
            action,
        );
        let body = format!(
            "Hello {name},\n\n{intro} {steps}\n\
             The token works once and expires in {expiry}. Setting the password ends every session \
             of the account. {ignore}\n",
            name = account.display_name
        );
        let mail = Mail {
            to: account.email.clone(),
            subject: subject.into(),
            body,
            topic: Some(format!("accounts/{}", account.id)),
        };
        mail::enqueue(tx, "identity", &mail).await?;
        Ok(())
    }

    pub async fn verify_email(&self, token: &str) -> Result<Account> {
        let now = self.now();
        let hash = sha256(token.trim().as_bytes());
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let verification = store::lock_verification(&tx, &hash).await?.ok_or(Error::VerificationTokenInvalid)?;
        if verification.used || verification.expires_at <= now {
            return Err(Error::VerificationTokenInvalid);
        }
        store::use_verification(&tx, &hash, verification.account_id, now).await?;
        let account =
            store::account_by_id(&tx, verification.account_id).await?.ok_or(Error::VerificationTokenInvalid)?;
        tx.commit().await?;
        Ok(account)
    }

    /// Resending does not resend a link that verifies the account as it is: its password may
    /// have been chosen by someone who typed another person's address. The mail's token sets
    /// the password instead, so the verified account's password is its verifier's.
    pub async fn resend_verification(&self, email: Email) -> Result<()> {
        let now = self.now();
        self.count_mail(&email, now).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(account) = store::lock_account_by_email(&tx, &email.normalized()).await?
            && !account.email_verified
        {
            self.queue_password_mail(&tx, &account, PasswordMail::FinishSignUp, now).await?;
        }
        tx.commit().await?;
        self.outbox.wake();
        Ok(())
    }

    /// Mails a reset link if an account has the email; answers the same either way.
    pub async fn request_password_reset(&self, email: Email) -> Result<()> {
        let now = self.now();
        self.count_mail(&email, now).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some(account) = store::lock_account_by_email(&tx, &email.normalized()).await? {
            self.queue_password_mail(&tx, &account, PasswordMail::Reset, now).await?;
            tracing::info!(account = %account.id, "password reset requested");
        }
        tx.commit().await?;
        self.outbox.wake();
        Ok(())
    }

    /// Sets the password with a reset token, verifies the email, and ends every session.
    pub async fn reset_password(&self, token: &str, new: NewPassword) -> Result<(Account, u64)> {
        let hash = sha256(token.trim().as_bytes());
        let usable = |reset: &store::Verification, now| !reset.used && reset.expires_at > now;
        // A cheap look first, so a made-up token costs no hashing.
        let client = self.pool.get().await?;
        let found = store::password_reset(&client, &hash, false).await?;
        drop(client);
        if !found.is_some_and(|reset| usable(&reset, self.now())) {
            return Err(Error::PasswordResetTokenInvalid);
        }
        let password_hash = self.passwords.reserve()?.hash(new.expose().to_owned()).await?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let reset = store::password_reset(&tx, &hash, true)
            .await?
            .filter(|reset| usable(reset, now))
            .ok_or(Error::PasswordResetTokenInvalid)?;
        store::spend_password_resets(&tx, reset.account_id, now).await?;
        store::spend_verifications(&tx, reset.account_id, now).await?;
        store::set_password_hash(&tx, reset.account_id, &password_hash, now).await?;
        let account =
            store::mark_email_verified(&tx, reset.account_id, now).await?.ok_or(Error::PasswordResetTokenInvalid)?;
        let revoked = store::revoke_all_sessions(&tx, reset.account_id, now, "password reset").await?;
        store::throttle_clear(&tx, Bucket::LoginEmail, &account.email.to_ascii_lowercase()).await?;
        tx.commit().await?;
        tracing::info!(account = %account.id, revoked_sessions = revoked, "password reset");
        Ok((account, revoked))
    }

    /// Logs in. The attempt is counted (per email and per client address) before the password
    /// is checked, in one atomic statement each, so concurrent guesses cannot outrun the limit.
    pub async fn login(&self, email: Email, password: String, client_address: &str) -> Result<(TokenGrant, Account)> {
        let reservation = self.passwords.reserve()?;
        let normalized = email.normalized();
        let now = self.now();
        let client = self.pool.get().await?;
        let throttled =
            |until: DateTime<Utc>| Error::Throttled { retry_after: (until - now).to_std().unwrap_or_default() };
        let per_address = self.login_limit(self.config.login_max_failures_per_address);
        if let Some(until) =
            store::throttle_hit(&client, Bucket::LoginAddress, client_address, now, per_address).await?
        {
            return Err(throttled(until));
        }
        let per_email = self.login_limit(self.config.login_max_failures);
        if let Some(until) = store::throttle_hit(&client, Bucket::LoginEmail, &normalized, now, per_email).await? {
            return Err(throttled(until));
        }
        let found = store::credentials_by_email(&client, &normalized).await?;
        // The connection goes back to the pool while the password is checked.
        drop(client);
        let hash = found.as_ref().map_or_else(|| self.passwords.dummy_hash().to_owned(), |f| f.password_hash.clone());
        let matches = reservation.verify(password, hash).await? && found.is_some();
        let Some(found) = found.filter(|_| matches) else {
            tracing::info!("login failed");
            return Err(Error::InvalidCredentials);
        };
        let client = self.pool.get().await?;
        store::throttle_clear(&client, Bucket::LoginEmail, &normalized).await?;
        store::throttle_refund(&client, Bucket::LoginAddress, client_address).await?;
        drop(client);
        if self.config.require_verified_email && !found.account.email_verified {
            return Err(Error::EmailNotVerified);
        }
        let session_id = Uuid::now_v7();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::insert_session(&tx, session_id, found.account.id, now).await?;
        let grant = self.issue_account_grant(&tx, found.account.id, session_id, now).await?;
        tx.commit().await?;
        tracing::info!(account = %found.account.id, session = %session_id, "logged in");
        Ok((grant, found.account))
    }

    async fn issue_account_grant(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        account_id: Uuid,
        session_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<TokenGrant> {
        let refresh_token = random_token(32);
        let refresh_expires_at = now + duration(self.config.refresh_token_ttl);
        store::insert_refresh_token(tx, &sha256(refresh_token.as_bytes()), session_id, now, refresh_expires_at).await?;
        let mut grant =
            self.sign(format!("accounts/{account_id}"), Some(session_id), None, Scopes::NONE, None, now).await?;
        grant.refresh_token = Some(refresh_token);
        grant.refresh_expires_at = Some(refresh_expires_at);
        Ok(grant)
    }

    async fn sign(
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

    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenGrant> {
        let now = self.now();
        let hash = sha256(refresh_token.trim().as_bytes());
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let token = store::lock_refresh_token(&tx, &hash).await?.ok_or(Error::RefreshTokenInvalid)?;
        if token.used {
            // A used token presented again means two holders: end the session for both.
            store::revoke_session(&tx, token.session_id, now, "refresh token reuse").await?;
            tx.commit().await?;
            tracing::warn!(session = %token.session_id, "refresh token reused; session ended");
            return Err(Error::RefreshTokenReused);
        }
        if token.session_revoked || token.expires_at <= now {
            return Err(Error::RefreshTokenInvalid);
        }
        store::use_refresh_token(&tx, &hash, now).await?;
        let grant = self.issue_account_grant(&tx, token.account_id, token.session_id, now).await?;
        tx.commit().await?;
        Ok(grant)
    }

    pub async fn logout(&self, refresh_token: &str) -> Result<()> {
        let now = self.now();
        let hash = sha256(refresh_token.trim().as_bytes());
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let token = store::lock_refresh_token(&tx, &hash).await?.ok_or(Error::RefreshTokenInvalid)?;
        store::revoke_session(&tx, token.session_id, now, "logout").await?;
        tx.commit().await?;
        Ok(())
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
    async fn require_live_service_account(&self, caller: &Caller) -> Result<()> {
        if let Principal::ServiceAccount { id, .. } = caller.principal {
            let client = self.pool.get().await?;
            if !store::service_account_is_live(&client, id).await? {
                return Err(Error::Unauthenticated);
            }
        }
        Ok(())
    }

    pub async fn get_account(&self, caller: &Caller, id: Option<Uuid>) -> Result<Account> {
        let me = self.require_account(caller).await?;
        if id.is_some_and(|id| id != me) {
            return Err(Error::NotFound("account"));
        }
        let client = self.pool.get().await?;
        store::account_by_id(&client, me).await?.ok_or(Error::NotFound("account"))
    }

    pub async fn update_account(
        &self,
        caller: &Caller,
        id: Option<Uuid>,
        display_name: Option<DisplayName>,
    ) -> Result<Account> {
        let me = self.require_account(caller).await?;
        if id.is_some_and(|id| id != me) {
            return Err(Error::NotFound("account"));
        }
        let client = self.pool.get().await?;
        match display_name {
            Some(name) => store::set_display_name(&client, me, name.as_str(), self.now()).await?,
            None => store::account_by_id(&client, me).await?,
        }
        .ok_or(Error::NotFound("account"))
    }

    pub async fn change_password(&self, caller: &Caller, current: String, new: NewPassword) -> Result<u64> {
        let me = self.require_account(caller).await?;
        let client = self.pool.get().await?;
        let hash = store::password_hash(&client, me).await?.ok_or(Error::NotFound("account"))?;
        drop(client);
        if !self.passwords.reserve()?.verify(current, hash).await? {
            return Err(Error::WrongPassword);
        }
        let new_hash = self.passwords.reserve()?.hash(new.expose().to_owned()).await?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::set_password_hash(&tx, me, &new_hash, now).await?;
        store::spend_password_resets(&tx, me, now).await?;
        let revoked = store::revoke_other_sessions(&tx, me, caller.session_id, now).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    // --- Organizations ---

    pub async fn create_organization(&self, caller: &Caller, display_name: DisplayName) -> Result<Organization> {
        let me = self.require_account(caller).await?;
        let now = self.now();
        let id = Uuid::now_v7();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::insert_organization(&tx, id, display_name.as_str(), me, now).await?;
        store::insert_member(&tx, id, me, OrgRole::Owner, now).await?;
        tx.commit().await?;
        Ok(Organization {
            id,
            display_name: display_name.as_str().to_owned(),
            created_at: now,
            caller_role: Some(OrgRole::Owner),
        })
    }

    /// The caller's role in `org`. Internal services and the organization's own service
    /// accounts see it as readers; anyone else gets NOT_FOUND, so existence does not leak.
    async fn role_in(&self, caller: &Caller, org: Uuid) -> Result<OrgRole> {
        match caller.principal {
            Principal::Account { .. } => {
                let me = self.require_account(caller).await?;
                let client = self.pool.get().await?;
                store::member_role(&client, org, me).await?.ok_or(Error::NotFound("organization"))
            }
            Principal::ServiceAccount { .. } if caller.has_scope(Scope::OrganizationsRead) => Ok(OrgRole::Reader),
            Principal::ServiceAccount { organization: None, .. } => {
                Err(Error::PermissionDenied(Scope::OrganizationsRead.denial()))
            }
            Principal::ServiceAccount { organization, .. } if organization == Some(org) => {
                self.require_live_service_account(caller).await?;
                Ok(OrgRole::Reader)
            }
            Principal::ServiceAccount { .. } => Err(Error::NotFound("organization")),
        }
    }

    async fn require_owner(&self, caller: &Caller, org: Uuid) -> Result<Uuid> {
        let role = self.role_in(caller, org).await?;
        match (role, caller.account_id()) {
            (OrgRole::Owner, Some(me)) => Ok(me),
            _ => Err(Error::PermissionDenied("only organization owners may do this")),
        }
    }

    pub async fn get_organization(&self, caller: &Caller, org: Uuid) -> Result<Organization> {
        let role = self.role_in(caller, org).await?;
        let client = self.pool.get().await?;
        let mut organization = store::organization(&client, org).await?.ok_or(Error::NotFound("organization"))?;
        organization.caller_role = caller.account_id().map(|_| role);
        Ok(organization)
    }

    pub async fn list_organizations(&self, caller: &Caller, page: PageRequest) -> Result<Page<Organization>> {
        let me = self.require_account(caller).await?;
        let scope = format!("organizations:{me}");
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::organizations_of(&client, me, after, page.size as i64 + 1).await?;
        let next_page_token = page::next_token(&mut rows, page.size, &scope, |(o, at)| page::time_id_cursor(*at, o.id));
        Ok(Page { items: rows.into_iter().map(|(o, _)| o).collect(), next_page_token })
    }

    pub async fn list_members(&self, caller: &Caller, org: Uuid, page: PageRequest) -> Result<Page<Member>> {
        self.role_in(caller, org).await?;
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::members(&client, org, after, page.size as i64 + 1).await?;
        let scope = format!("organizations/{org}/members");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |m| page::time_id_cursor(m.created_at, m.account_id));
        Ok(Page { items: rows, next_page_token })
    }

    pub async fn get_member(&self, caller: &Caller, org: Uuid, account: Uuid) -> Result<Member> {
        self.role_in(caller, org).await?;
        let client = self.pool.get().await?;
        store::member(&client, org, account).await?.ok_or(Error::NotFound("member"))
    }

    pub async fn set_member_role(&self, caller: &Caller, org: Uuid, account: Uuid, role: OrgRole) -> Result<Member> {
        self.require_owner(caller, org).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_organization(&tx, org).await?;
        let current = store::member_role(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
        if current == OrgRole::Owner && role != OrgRole::Owner && store::count_owners(&tx, org).await? <= 1 {
            return Err(Error::LastOwner);
        }
        store::set_member_role(&tx, org, account, role).await?;
        let member = store::member(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
        Ok(member)
    }

    /// Owners remove anyone, a member may leave, and internal services remove on behalf of a
    /// revoked invitation (`invitation`: only a membership that invitation made). Keyring is
    /// told in the same transaction's queue and right after it, so the person's project and key
    /// roles in the organization end before this answers (or as soon as keyring is back).
    pub async fn remove_member(
        &self,
        caller: &Caller,
        org: Uuid,
        account: Uuid,
        invitation: Option<&str>,
    ) -> Result<()> {
        let on_behalf = caller.has_scope(Scope::MembershipsWrite);
        let allowed = on_behalf || {
            let role = self.role_in(caller, org).await?;
            role == OrgRole::Owner || caller.account_id() == Some(account)
        };
        if !allowed {
            return Err(Error::PermissionDenied("only organization owners may remove members"));
        }
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_organization(&tx, org).await?;
        if let Some(invitation) = invitation.filter(|_| on_behalf) {
            match store::grant_created(&tx, invitation).await? {
                Some((granted_org, granted_account, _)) if (granted_org, granted_account) != (org, account) => {
                    return Err(Error::InvitationConflict(invitation.to_owned()));
                }
                // The invitation made nothing (it never ran, or the person was a member already).
                None | Some((_, _, false)) => return Ok(()),
                Some(_) => {}
            }
        }
        let current = store::member_role(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
        if current == OrgRole::Owner && store::count_owners(&tx, org).await? <= 1 {
            return Err(Error::LastOwner);
        }
        store::delete_member(&tx, org, account).await?;
        store::queue_keyring_call(&tx, org, account, now).await?;
        tx.commit().await?;
        tracing::info!(organization = %org, account = %account, "organization member removed");
        self.tell_keyring().await;
        Ok(())
    }

    /// Tells keyring of the removals it has not confirmed yet: a call keyring refuses for good is
    /// recorded as such, any other failure is tried again with [`Backoff::PEER_CALL`].
    pub async fn tell_keyring(&self) {
        if let Err(e) = self.keyring_round().await {
            tracing::debug!(error = %e, "keyring calls wait for the database");
        }
    }

    async fn keyring_round(&self) -> Result<Round> {
        let client = self.pool.get().await?;
        let due = store::due_keyring_calls(&client).await?;
        for call in &due {
            match self.end_in_keyring(call).await {
                Ok(()) => store::keyring_call_done(&client, call.id, None).await?,
                Err(PeerError::Permanent(why)) => {
                    tracing::warn!(organization = %call.org, account = %call.account, error = %why,
                        "keyring refused the end of a membership for good");
                    store::keyring_call_done(&client, call.id, Some(&why)).await?;
                }
                Err(PeerError::Retry(why)) => {
                    tracing::warn!(organization = %call.org, account = %call.account, error = %why,
                        "keyring did not take the end of a membership yet; will retry");
                    let wait = Backoff::PEER_CALL.secs_after(call.attempts + 1);
                    store::keyring_call_failed(&client, call.id, &why, wait).await?;
                }
            }
        }
        Ok(if due.is_empty() { Round::Idle } else { Round::More })
    }

    async fn end_in_keyring(&self, call: &store::KeyringCall) -> std::result::Result<(), PeerError> {
        let token = self.self_token().await.map_err(|e| PeerError::Retry(e.to_string()))?;
        self.keyring.end_membership(&token, call.org, call.account, call.removed_at).await
    }

    /// An access token of identity's own internal client, signed here.
    async fn self_token(&self) -> Result<String> {
        let client = self.pool.get().await?;
        let (account, _, _) = store::service_account_by_client_id(&client, SELF_CLIENT)
            .await?
            .ok_or_else(|| Error::Internal("identity's own internal client is missing".into()))?;
        drop(client);
        let scopes = [Scope::MembershipsEnd].into_iter().collect();
        Ok(self
            .sign(format!("serviceAccounts/{}", account.id), None, None, scopes, Some(SELF_CLIENT), self.now())
            .await?
            .access_token)
    }

    /// Retries keyring calls until the process ends.
    pub fn spawn_keyring_calls(self: &Arc<Self>, every: std::time::Duration) {
        let app = Arc::downgrade(self);
        keyshare_runtime::jobs::spawn_rounds("keyring_calls", every, Waker::default(), move || {
            let app = app.upgrade()?;
            Some(async move { app.keyring_round().await.map_err(|e| e.to_string()) })
        });
    }

    /// Internal: grants a membership for an accepted invitation, once per invitation.
    pub async fn add_member(
        &self,
        caller: &Caller,
        org: Uuid,
        account: Uuid,
        role: OrgRole,
        invitation_id: &str,
    ) -> Result<Member> {
        require(caller, Scope::MembershipsWrite)?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if !store::lock_organization(&tx, org).await? {
            return Err(Error::NotFound("organization"));
        }
        if store::account_by_id(&tx, account).await?.is_none() {
            return Err(Error::NotFound("account"));
        }
        match store::grant_of_invitation(&tx, invitation_id).await? {
            // A retry: answer with the membership the first call made, unless it was removed
            // since, which a retry must not undo.
            Some(existing) if existing == (org, account) => {
                return store::member(&tx, org, account).await?.ok_or(Error::GrantRevoked);
            }
            Some(_) => return Err(Error::InvitationConflict(invitation_id.to_owned())),
            None => {
                // A member already keeps their role; the grant records that it made nothing, so
                // revoking the invitation's access later removes nothing.
                let created = store::insert_member(&tx, org, account, role, now).await?;
                store::insert_grant(&tx, invitation_id, org, account, role, created, now).await?;
            }
        }
        let member = store::member(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
        Ok(member)
    }

    // --- Service accounts ---

    pub async fn create_service_account(
        &self,
        caller: &Caller,
        org: Uuid,
        display_name: DisplayName,
    ) -> Result<(ServiceAccount, String)> {
        self.require_owner(caller, org).await?;
        let id = Uuid::now_v7();
        let client_id = format!("sa-{}", id.simple());
        let secret = random_token(32);
        let client = self.pool.get().await?;
        let account = store::insert_service_account(
            &client,
            id,
            org,
            display_name.as_str(),
            &client_id,
            &sha256(secret.as_bytes()),
            self.now(),
        )
        .await?;
        Ok((account, secret))
    }

    pub async fn list_service_accounts(
        &self,
        caller: &Caller,
        org: Uuid,
        page: PageRequest,
    ) -> Result<Page<ServiceAccount>> {
        self.require_owner(caller, org).await?;
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::service_accounts(&client, org, after, page.size as i64 + 1).await?;
        let scope = format!("organizations/{org}/serviceAccounts");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |s| page::time_id_cursor(s.created_at, s.id));
        Ok(Page { items: rows, next_page_token })
    }

    /// Owners read their organization's service accounts; so do Keyshare's services that read
    /// organizations (keyring, before making one a project member).
    pub async fn get_service_account(&self, caller: &Caller, org: Uuid, id: Uuid) -> Result<ServiceAccount> {
        if !caller.has_scope(Scope::OrganizationsRead) {
            self.require_owner(caller, org).await?;
        }
        let client = self.pool.get().await?;
        store::live_service_account(&client, org, id).await?.ok_or(Error::NotFound("service account"))
    }

    /// Deletes a service account. Keyring is told in the same transaction's queue, as for a
    /// person leaving, so its project memberships and key roles end before this answers.
    pub async fn delete_service_account(&self, caller: &Caller, org: Uuid, id: Uuid) -> Result<()> {
        self.require_owner(caller, org).await?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if !store::delete_service_account(&tx, org, id, now).await? {
            return Err(Error::NotFound("service account"));
        }
        store::queue_keyring_call(&tx, org, id, now).await?;
        tx.commit().await?;
        self.tell_keyring().await;
        Ok(())
    }

    pub async fn issue_service_account_token(&self, client_id: &str, secret: &str) -> Result<TokenGrant> {
        let client = self.pool.get().await?;
        let found = store::service_account_by_client_id(&client, client_id.trim()).await?;
        drop(client);
        let presented = sha256(secret.as_bytes());
        let Some((account, _, scopes)) = found.filter(|(_, stored, _)| constant_time_eq(stored, &presented)) else {
            return Err(Error::InvalidClientCredentials);
        };
        // Keyshare's own services' tokens name their client, for the certificate check of mTLS.
        let internal_client = account.organization_id.is_none().then_some(account.client_id.as_str());
        let org = account.organization_id;
        self.sign(format!("serviceAccounts/{}", account.id), None, org, scopes, internal_client, self.now()).await
    }

    /// Creates or updates Keyshare's own service accounts from configuration.
    pub async fn provision_internal_clients(&self) -> Result<()> {
        let client = self.pool.get().await?;
        let own = [Scope::MembershipsEnd].into_iter().collect();
        store::upsert_internal_client(&client, SELF_CLIENT, &sha256(random_token(32).as_bytes()), own, self.now())
            .await?;
        for internal in &self.config.internal_clients {
            let secret_hash = sha256(internal.secret.as_bytes());
            store::upsert_internal_client(&client, &internal.name, &secret_hash, internal.scopes, self.now()).await?;
        }
        Ok(())
    }

    // --- For other services ---

    pub async fn lookup_account(&self, caller: &Caller, email: Email) -> Result<Account> {
        require(caller, Scope::AccountsLookup)?;
        let client = self.pool.get().await?;
        store::verified_account_by_email(&client, &email.normalized()).await?.ok_or(Error::NotFound("account"))
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
