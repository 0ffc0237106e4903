//! Invitation's use cases.
//!
//! Accepting and revoking access change the invitation and queue the matching grant or removal
//! in one transaction; the calls then run in order per invitation (each idempotent, keyed by the
//! invitation id) right away and, if a peer is down, from the retry worker until they succeed.
//! So an accepted invitation always ends up with its membership, and a revoked one without.
//! Each call keeps the trace context of the request that queued it, so a retried grant still
//! shows in the acceptance's trace. The calls' runner is `calls`.

mod calls;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use keyshare_runtime::auth::{Principal, Scope};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::crypto::{random_token, sha256};
use keyshare_runtime::email::Email;
use keyshare_runtime::in_transaction;
use keyshare_runtime::mail::{self, Mail, OutboxWaker};
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use crate::domain::{Invitation, NotInvited, Role, Status, Target};
use crate::error::{Error, Result};
use crate::peers::{Grantable, Peers, Standing};
use crate::store;
use crate::trace::TraceContext;

/// The most emails one CreateInvitations call may carry.
pub const MAX_INVITEES: usize = 100;

/// Who is calling, with their bearer token for questions asked on their behalf: runtime's one
/// call context.
pub use keyshare_runtime::auth::CallContext as Ctx;

/// What invitation asks of the caller in a call's context.
trait CallerChecks {
    /// The caller, who must be a person.
    fn account(&self) -> Result<Uuid>;
    /// Internal RPCs answer only the Keyshare service whose scopes name them.
    fn require(&self, scope: Scope) -> Result<()>;
}

impl CallerChecks for Ctx {
    fn account(&self) -> Result<Uuid> {
        match self.caller.principal {
            Principal::Account { id } => Ok(id),
            Principal::ServiceAccount { .. } => Err(Error::PermissionDenied("only people may do this")),
        }
    }

    fn require(&self, scope: Scope) -> Result<()> {
        if self.caller.has_scope(scope) { Ok(()) } else { Err(Error::PermissionDenied(scope.denial())) }
    }
}

/// One email of a CreateInvitations call.
#[derive(Clone, Debug)]
pub struct InviteeInput {
    pub raw_email: String,
    /// `Err` with the reason when the address is malformed.
    pub email: std::result::Result<Email, String>,
    pub role: Role,
}

pub struct Invitations {
    pool: Pool,
    clock: SharedClock,
    peers: Peers,
    outbox: OutboxWaker,
    public_url: Option<String>,
    validity: chrono::Duration,
}

impl std::fmt::Debug for Invitations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invitations").finish_non_exhaustive()
    }
}

impl Invitations {
    pub fn new(
        pool: Pool,
        clock: SharedClock,
        peers: Peers,
        outbox: OutboxWaker,
        public_url: Option<String>,
        validity: Duration,
    ) -> Self {
        let validity = chrono::Duration::from_std(validity).unwrap_or(chrono::Duration::days(7));
        Self { pool, clock, peers, outbox, public_url, validity }
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// NOT_FOUND for those who do not see the target, PERMISSION_DENIED for those who see it but
    /// may not manage its sharing.
    async fn require_manager(&self, ctx: &Ctx, target: &Target) -> Result<Uuid> {
        let account = ctx.account()?;
        match self.peers.standing(&ctx.token, account, target).await? {
            Standing::Manager => Ok(account),
            Standing::Viewer => Err(Error::PermissionDenied("you may not manage who this is shared with")),
            Standing::Stranger => Err(Error::NotFound("target")),
        }
    }

    fn mail(&self, invitation: Uuid, email: &str, role: Role, inviter: &str, title: Option<&str>, token: &str) -> Mail {
        let steps = keyshare_runtime::mail::token_steps(
            self.public_url.as_deref(),
            "/invitations/accept",
            token,
            "keyshare.invitation.v1.InvitationService/AcceptInvitation",
            "accept",
        );
        let body = format!(
            "Hello,\n\n{inviter} invited you to Keyshare as {role}.\n\n{steps}\n\
             You need a Keyshare account with this email address ({email}); if you have none yet, sign up with it first.\n\
             The invitation is valid for {days} days.\n",
            role = role.describe(title),
            days = self.validity.num_days(),
        );
        let subject = match title {
            Some(title) => format!("{inviter} invited you to {title} on Keyshare"),
            None => format!("{inviter} invited you to Keyshare"),
        };
        Mail { to: email.to_owned(), subject, body, topic: Some(format!("invitations/{invitation}")) }
    }

    pub async fn create(
        &self,
        ctx: &Ctx,
        target: Target,
        invitees: Vec<InviteeInput>,
    ) -> Result<Vec<(String, std::result::Result<Invitation, NotInvited>)>> {
        let inviter = self.require_manager(ctx, &target).await?;
        let person = self.peers.person(&ctx.token).await?;
        let title = self.peers.title(&ctx.token, &target).await;
        let now = self.now();

        // Decide each email before writing anything: lookups happen outside the transaction.
        let mut seen = HashSet::new();
        let mut plans = Vec::with_capacity(invitees.len());
        for invitee in invitees {
            let outcome = match &invitee.email {
                Err(reason) => Err(NotInvited::MalformedEmail(reason.clone())),
                Ok(email) if !seen.insert(email.normalized()) => Err(NotInvited::DuplicateInRequest),
                Ok(email) => match self.peers.verified_account(email.as_str()).await? {
                    Some(account) if self.peers.is_member(&target, account).await? => Err(NotInvited::AlreadyMember),
                    _ => Ok(email.clone()),
                },
            };
            plans.push((invitee.raw_email, invitee.role, outcome));
        }

        let results = in_transaction!(self.pool, |tx| -> Result<_> {
            let mut created = Vec::new();
            let mut results = Vec::with_capacity(plans.len());
            for (raw, role, outcome) in plans.iter().cloned() {
                let email = match outcome {
                    Ok(email) => email,
                    Err(why) => {
                        results.push((raw, Err(why)));
                        continue;
                    }
                };
                let id = Uuid::now_v7();
                let token = random_token(32);
                let new = store::NewInvitation {
                    id,
                    target: &target,
                    email: email.as_str(),
                    email_normalized: &email.normalized(),
                    role,
                    inviter,
                    token_hash: &sha256(token.as_bytes()),
                    now,
                    expires_at: now + self.validity,
                };
                if store::insert(&tx, &new).await? {
                    mail::enqueue(
                        &tx,
                        "invitation",
                        &self.mail(id, email.as_str(), role, &person.display_name, title.as_deref(), &token),
                    )
                    .await?;
                    created.push(id);
                    results.push((raw, Ok(id)));
                } else {
                    let existing = store::open_invitation(&tx, &target, &email.normalized()).await?.unwrap_or_default();
                    results.push((raw, Err(NotInvited::AlreadyPending(existing))));
                }
            }
            Ok(results)
        })?;
        self.outbox.wake();
        let client = self.pool.get().await?;
        let mut answers = Vec::with_capacity(results.len());
        for (raw, result) in results {
            answers.push(match result {
                Ok(id) => (raw, Ok(store::get(&client, id, now).await?.ok_or(Error::NotFound("invitation"))?)),
                Err(why) => (raw, Err(why)),
            });
        }
        Ok(answers)
    }

    async fn load(&self, id: Uuid) -> Result<Invitation> {
        let client = self.pool.get().await?;
        store::get(&client, id, self.now()).await?.ok_or(Error::NotFound("invitation"))
    }

    pub async fn get(&self, ctx: &Ctx, id: Uuid) -> Result<Invitation> {
        let invitation = self.load(id).await?;
        self.require_manager(ctx, &invitation.target).await.map_err(|e| match e {
            Error::PermissionDenied(_) | Error::NotFound(_) => Error::NotFound("invitation"),
            other => other,
        })?;
        Ok(invitation)
    }

    pub async fn list(
        &self,
        ctx: &Ctx,
        target: Target,
        status: Option<Status>,
        page: PageRequest,
    ) -> Result<(Vec<Invitation>, String)> {
        self.require_manager(ctx, &target).await?;
        let before = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::list(&client, &target, status, self.now(), before, page.size as i64 + 1).await?;
        let next = page::next_token(&mut rows, page.size, &list_scope(&target, status), |i| {
            page::time_id_cursor(i.created_at, i.id)
        });
        Ok((rows, next))
    }

    /// Pending invitations to the caller's verified email, a page at a time (newest first).
    pub async fn list_mine(&self, ctx: &Ctx, page_size: i32, page_token: &str) -> Result<(Vec<Invitation>, String)> {
        let account = ctx.account()?;
        // A page token belongs to the account it was given to.
        let scope = format!("invitations/mine/{account}");
        let page = PageRequest::parse(page_size, page_token, &scope)?;
        let person = self.peers.person(&ctx.token).await?;
        if !person.email_verified {
            return Ok((Vec::new(), String::new()));
        }
        let email = Email::parse(&person.email, "email")
            .map_err(|_| Error::Internal("identity returned a malformed email".into()))?;
        let before = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows =
            store::pending_for(&client, &email.normalized(), self.now(), before, page.size as i64 + 1).await?;
        let next = page::next_token(&mut rows, page.size, &scope, |i| page::time_id_cursor(i.created_at, i.id));
        Ok((rows, next))
    }

    /// The invitation a token opens, and whether its email has a verified account yet.
    pub async fn lookup(&self, token: &str) -> Result<(Invitation, bool)> {
        let hash = sha256(token.as_bytes());
        let client = self.pool.get().await?;
        let Some(invitation) = store::by_token(&client, &hash, self.now()).await? else {
            return Err(if store::is_superseded(&client, &hash).await? {
                Error::Superseded
            } else {
                Error::NotFound("invitation")
            });
        };
        drop(client);
        let has_account = self.peers.verified_account(&invitation.email).await?.is_some();
        Ok((invitation, has_account))
    }

    pub async fn accept(&self, ctx: Option<&Ctx>, token: &str) -> Result<Invitation> {
        let ctx = ctx.ok_or(Error::LoginToAccept)?;
        // Only people accept: a service account is refused as such, not asked to log in.
        ctx.account()?;
        let person = self.peers.person(&ctx.token).await?;
        let hash = sha256(token.as_bytes());
        // Whether the target still exists and the inviter may still grant the role is asked
        // now, of the services that know; an invitation that fails either is revoked below.
        let client = self.pool.get().await?;
        let found = store::by_token(&client, &hash, self.now()).await?;
        // No connection is held across the call to another service.
        drop(client);
        let grantable = match found {
            Some(found) if found.status == Status::Pending => {
                Some(self.peers.grantable(&found.target, found.inviter).await?)
            }
            _ => None,
        };
        let now = self.now();
        // (id, Err(refused)): the inviter may no longer grant it, or its target is gone; this
        // transaction revokes it.
        let (id, accepted) = in_transaction!(self.pool, |tx| -> Result<(Uuid, Result<(), Grantable>)> {
            let Some(id) = store::lock_by_token(&tx, &hash).await? else {
                return Err(if store::is_superseded(&tx, &hash).await? {
                    Error::Superseded
                } else {
                    Error::NotFound("invitation")
                });
            };
            let (_, stored, expires_at) = store::lock(&tx, id).await?.ok_or(Error::NotFound("invitation"))?;
            let invitation = store::get(&tx, id, now).await?.ok_or(Error::NotFound("invitation"))?;
            match Status::of(&stored, expires_at, now) {
                Status::Pending => {}
                Status::Accepted => return Err(Error::AlreadyAccepted),
                Status::Revoked => return Err(Error::Revoked),
                Status::Expired => return Err(Error::Expired),
            }
            let invited = Email::parse(&invitation.email, "email").map(|e| e.normalized()).unwrap_or_default();
            let mine = Email::parse(&person.email, "email").map(|e| e.normalized()).unwrap_or_default();
            if invited != mine {
                return Err(Error::WrongAccount);
            }
            if !person.email_verified {
                return Err(Error::EmailNotVerified);
            }
            match grantable {
                Some(Grantable::Yes) => {}
                Some(refused) => {
                    store::mark_revoked(&tx, id, now).await?;
                    return Ok((id, Err(refused)));
                }
                // It became pending again between the two reads (a resend): ask again.
                None => return Err(Error::Unavailable("the invitation changed meanwhile; try again".into())),
            }
            store::mark_accepted(&tx, id, person.id, now).await?;
            store::queue_call(&tx, id, "grant", &TraceContext::current()).await?;
            Ok((id, Ok(())))
        })?;
        if let Err(refused) = accepted {
            tracing::info!(invitation = %id, ?refused, "invitation can no longer be accepted; revoked");
            return Err(if refused == Grantable::InviterLostRole { Error::InviterLostRole } else { Error::TargetGone });
        }
        tracing::info!(invitation = %id, account = %person.id, "invitation accepted");
        self.drain(id).await?;
        let accepted = self.load(id).await?;
        // A grant the target's service refused for good (the target went meanwhile) left the
        // invitation revoked: say so instead of answering ACCEPTED.
        if accepted.status == Status::Revoked {
            return Err(Error::TargetGone);
        }
        Ok(accepted)
    }

    pub async fn resend(&self, ctx: &Ctx, id: Uuid) -> Result<Invitation> {
        let invitation = self.get(ctx, id).await?;
        let person = self.peers.person(&ctx.token).await?;
        let title = self.peers.title(&ctx.token, &invitation.target).await;
        let now = self.now();
        let token = random_token(32);
        in_transaction!(self.pool, |tx| -> Result<()> {
            let (_, stored, expires_at) = store::lock(&tx, id).await?.ok_or(Error::NotFound("invitation"))?;
            if !matches!(Status::of(&stored, expires_at, now), Status::Pending | Status::Expired) {
                return Err(Error::WrongStatus { expected: "pending or expired", action: "resent" });
            }
            store::renew(&tx, id, &sha256(token.as_bytes()), now, now + self.validity).await?;
            mail::enqueue(
                &tx,
                "invitation",
                &self.mail(id, &invitation.email, invitation.role, &person.display_name, title.as_deref(), &token),
            )
            .await?;
            Ok(())
        })?;
        self.outbox.wake();
        self.load(id).await
    }

    pub async fn revoke(&self, ctx: &Ctx, id: Uuid) -> Result<Invitation> {
        self.get(ctx, id).await?;
        let now = self.now();
        in_transaction!(self.pool, |tx| -> Result<()> {
            let (_, stored, expires_at) = store::lock(&tx, id).await?.ok_or(Error::NotFound("invitation"))?;
            if Status::of(&stored, expires_at, now) != Status::Pending {
                return Err(Error::WrongStatus {
                    expected: "pending",
                    action: "revoked (revoke access for accepted ones)",
                });
            }
            store::mark_revoked(&tx, id, now).await?;
            Ok(())
        })?;
        self.load(id).await
    }

    pub async fn revoke_access(&self, ctx: &Ctx, id: Uuid) -> Result<Invitation> {
        self.get(ctx, id).await?;
        let now = self.now();
        in_transaction!(self.pool, |tx| -> Result<()> {
            let (_, stored, _) = store::lock(&tx, id).await?.ok_or(Error::NotFound("invitation"))?;
            if stored != "accepted" {
                return Err(Error::WrongStatus { expected: "accepted", action: "revoked access" });
            }
            store::mark_revoked(&tx, id, now).await?;
            store::queue_call(&tx, id, "remove", &TraceContext::current()).await?;
            Ok(())
        })?;
        tracing::info!(invitation = %id, "access revoked");
        self.drain(id).await?;
        self.load(id).await
    }

    pub async fn counts(&self, ctx: &Ctx, targets: Vec<String>) -> Result<Vec<(String, i64, i64)>> {
        ctx.require(Scope::InvitationsRead)?;
        let client = self.pool.get().await?;
        let found = store::counts(&client, &targets, self.now()).await?;
        Ok(targets
            .into_iter()
            .map(|target| {
                let (accepted, pending) = found
                    .iter()
                    .find(|(t, _, _)| *t == target)
                    .map_or((0, 0), |(_, accepted, pending)| (*accepted, *pending));
                (target, accepted, pending)
            })
            .collect())
    }

    /// A membership the invitation granted ended elsewhere: its accepted invitations become
    /// revoked, so lists and counts stop showing them as accepted.
    pub async fn end_accepted(&self, ctx: &Ctx, target: Target, account: Uuid) -> Result<u64> {
        ctx.require(Scope::InvitationsRevoke)?;
        let client = self.pool.get().await?;
        Ok(store::end_accepted(&client, &target.name(), account, self.now()).await?)
    }

    pub async fn revoke_target(&self, ctx: &Ctx, target: Target) -> Result<u64> {
        ctx.require(Scope::InvitationsRevoke)?;
        let client = self.pool.get().await?;
        Ok(store::revoke_target(&client, &target.name(), self.now()).await?)
    }
}

/// The page-token scope of a target's listing.
pub fn list_scope(target: &Target, status: Option<Status>) -> String {
    format!("{}/invitations:{status:?}", target.name())
}
