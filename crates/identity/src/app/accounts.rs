//! Accounts: sign-up, email verification, password resets, login, refresh and logout, and the
//! account's own reads and changes.

use chrono::{DateTime, Utc};
use keyshare_runtime::auth::{Caller, Scope, Scopes};
use keyshare_runtime::crypto::{random_token, sha256};
use keyshare_runtime::in_transaction;
use keyshare_runtime::mail::{self, Mail};
use uuid::Uuid;

use super::{Identity, PASSWORD_RESET_TTL, PasswordMail, VERIFICATION_TTL, duration, require};
use crate::domain::{Account, DisplayName, Email, NewPassword, TokenGrant};
use crate::error::{Error, Result};
use crate::store::{self, Bucket, Limit};

impl Identity {
    /// Counts a mail to `email` against its address's budget, whether or not an account has
    /// the address, so the answer reveals nothing.
    pub(super) async fn count_mail(&self, email: &Email, now: DateTime<Utc>) -> Result<()> {
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
        let account = in_transaction!(self.pool, |tx| -> Result<_> {
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
            .await?
            .map_err(|_| Error::EmailTaken)?;
            self.queue_verification(&tx, &account, now).await?;
            Ok(account)
        })?;
        self.outbox.wake();
        tracing::info!(account = %account.id, "account created");
        Ok(account)
    }

    pub(super) async fn queue_verification(
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
    pub(super) async fn queue_password_mail(
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
        let account = in_transaction!(self.pool, |tx| -> Result<_> {
            let verification = store::lock_verification(&tx, &hash).await?.ok_or(Error::VerificationTokenInvalid)?;
            if verification.used || verification.expires_at <= now {
                return Err(Error::VerificationTokenInvalid);
            }
            store::use_verification(&tx, &hash, verification.account_id, now).await?;
            let account =
                store::account_by_id(&tx, verification.account_id).await?.ok_or(Error::VerificationTokenInvalid)?;
            Ok(account)
        })?;
        Ok(account)
    }

    /// Resending does not resend a link that verifies the account as it is: its password may
    /// have been chosen by someone who typed another person's address. The mail's token sets
    /// the password instead, so the verified account's password is its verifier's.
    pub async fn resend_verification(&self, email: Email) -> Result<()> {
        let now = self.now();
        self.count_mail(&email, now).await?;
        in_transaction!(self.pool, |tx| -> Result<()> {
            if let Some(account) = store::lock_account_by_email(&tx, &email.normalized()).await?
                && !account.email_verified
            {
                self.queue_password_mail(&tx, &account, PasswordMail::FinishSignUp, now).await?;
            }
            Ok(())
        })?;
        self.outbox.wake();
        Ok(())
    }

    /// Mails a reset link if an account has the email; answers the same either way.
    pub async fn request_password_reset(&self, email: Email) -> Result<()> {
        let now = self.now();
        self.count_mail(&email, now).await?;
        in_transaction!(self.pool, |tx| -> Result<()> {
            if let Some(account) = store::lock_account_by_email(&tx, &email.normalized()).await? {
                self.queue_password_mail(&tx, &account, PasswordMail::Reset, now).await?;
                tracing::info!(account = %account.id, "password reset requested");
            }
            Ok(())
        })?;
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
        let (account, revoked) = in_transaction!(self.pool, |tx| -> Result<_> {
            let reset = store::password_reset(&tx, &hash, true)
                .await?
                .filter(|reset| usable(reset, now))
                .ok_or(Error::PasswordResetTokenInvalid)?;
            store::spend_password_resets(&tx, reset.account_id, now).await?;
            store::spend_verifications(&tx, reset.account_id, now).await?;
            store::set_password_hash(&tx, reset.account_id, &password_hash, now).await?;
            let account = store::mark_email_verified(&tx, reset.account_id, now)
                .await?
                .ok_or(Error::PasswordResetTokenInvalid)?;
            let revoked = store::revoke_all_sessions(&tx, reset.account_id, now, "password reset").await?;
            store::throttle_clear(&tx, Bucket::LoginEmail, &account.email.to_ascii_lowercase()).await?;
            Ok((account, revoked))
        })?;
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
        let grant = in_transaction!(self.pool, |tx| -> Result<_> {
            store::insert_session(&tx, session_id, found.account.id, now).await?;
            let grant = self.issue_account_grant(&tx, found.account.id, session_id, now).await?;
            Ok(grant)
        })?;
        tracing::info!(account = %found.account.id, session = %session_id, "logged in");
        Ok((grant, found.account))
    }

    pub(super) async fn issue_account_grant(
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

    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenGrant> {
        let now = self.now();
        let hash = sha256(refresh_token.trim().as_bytes());
        // Ok(Err(session)): a used token presented again, whose session this transaction ends.
        let outcome = in_transaction!(self.pool, |tx| -> Result<Result<TokenGrant, Uuid>> {
            let token = store::lock_refresh_token(&tx, &hash).await?.ok_or(Error::RefreshTokenInvalid)?;
            if token.used {
                // A used token presented again means two holders: end the session for both.
                store::revoke_session(&tx, token.session_id, now, "refresh token reuse").await?;
                return Ok(Err(token.session_id));
            }
            if token.session_revoked || token.expires_at <= now {
                return Err(Error::RefreshTokenInvalid);
            }
            store::use_refresh_token(&tx, &hash, now).await?;
            Ok(Ok(self.issue_account_grant(&tx, token.account_id, token.session_id, now).await?))
        })?;
        outcome.map_err(|session| {
            tracing::warn!(session = %session, "refresh token reused; session ended");
            Error::RefreshTokenReused
        })
    }

    pub async fn logout(&self, refresh_token: &str) -> Result<()> {
        let now = self.now();
        let hash = sha256(refresh_token.trim().as_bytes());
        in_transaction!(self.pool, |tx| -> Result<()> {
            let token = store::lock_refresh_token(&tx, &hash).await?.ok_or(Error::RefreshTokenInvalid)?;
            store::revoke_session(&tx, token.session_id, now, "logout").await?;
            Ok(())
        })?;
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
        let revoked = in_transaction!(self.pool, |tx| -> Result<_> {
            store::set_password_hash(&tx, me, &new_hash, now).await?;
            store::spend_password_resets(&tx, me, now).await?;
            let revoked = store::revoke_other_sessions(&tx, me, caller.session_id, now).await?;
            Ok(revoked)
        })?;
        Ok(revoked)
    }

    // --- Organizations ---

    pub async fn lookup_account(&self, caller: &Caller, email: Email) -> Result<Account> {
        require(caller, Scope::AccountsLookup)?;
        let client = self.pool.get().await?;
        store::verified_account_by_email(&client, &email.normalized()).await?.ok_or(Error::NotFound("account"))
    }
}
