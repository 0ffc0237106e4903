//! Organizations and their members (`keyring_calls` tells keyring when someone leaves).

use keyshare_runtime::auth::{Caller, Principal, Scope};
use keyshare_runtime::in_transaction;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use super::{Identity, require};
use crate::domain::{DisplayName, Member, OrgRole, Organization, Page};
use crate::error::{Error, Result};
use crate::store;

impl Identity {
    pub async fn create_organization(&self, caller: &Caller, display_name: DisplayName) -> Result<Organization> {
        let me = self.require_account(caller).await?;
        let now = self.now();
        let id = Uuid::now_v7();
        in_transaction!(self.pool, |tx| -> Result<()> {
            store::insert_organization(&tx, id, display_name.as_str(), me, now).await?;
            store::insert_member(&tx, id, me, OrgRole::Owner, now).await?;
            Ok(())
        })?;
        Ok(Organization {
            id,
            display_name: display_name.as_str().to_owned(),
            created_at: now,
            caller_role: Some(OrgRole::Owner),
        })
    }

    /// The caller's role in `org`. Internal services and the organization's own service
    /// accounts see it as readers; anyone else gets NOT_FOUND, so existence does not leak.
    pub(super) async fn role_in(&self, caller: &Caller, org: Uuid) -> Result<OrgRole> {
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

    pub(super) async fn require_owner(&self, caller: &Caller, org: Uuid) -> Result<Uuid> {
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
        let member = in_transaction!(self.pool, |tx| -> Result<_> {
            store::lock_organization(&tx, org).await?;
            let current = store::member_role(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
            if current == OrgRole::Owner && role != OrgRole::Owner && store::count_owners(&tx, org).await? <= 1 {
                return Err(Error::LastOwner);
            }
            store::set_member_role(&tx, org, account, role).await?;
            let member = store::member(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
            Ok(member)
        })?;
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
        let removed = in_transaction!(self.pool, |tx| -> Result<bool> {
            store::lock_organization(&tx, org).await?;
            if let Some(invitation) = invitation.filter(|_| on_behalf) {
                match store::grant_created(&tx, invitation).await? {
                    Some((granted_org, granted_account, _)) if (granted_org, granted_account) != (org, account) => {
                        return Err(Error::InvitationConflict(invitation.to_owned()));
                    }
                    // The invitation made nothing (it never ran, or the person was a member already).
                    None | Some((_, _, false)) => return Ok(false),
                    Some(_) => {}
                }
            }
            let current = store::member_role(&tx, org, account).await?.ok_or(Error::NotFound("member"))?;
            if current == OrgRole::Owner && store::count_owners(&tx, org).await? <= 1 {
                return Err(Error::LastOwner);
            }
            store::delete_member(&tx, org, account).await?;
            store::queue_keyring_call(&tx, org, account, now).await?;
            Ok(true)
        })?;
        if removed {
            tracing::info!(organization = %org, account = %account, "organization member removed");
            self.tell_keyring().await;
        }
        Ok(())
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
        in_transaction!(self.pool, |tx| -> Result<Member> {
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
            store::member(&tx, org, account).await?.ok_or(Error::NotFound("member"))
        })
    }

    // --- Service accounts ---
}
