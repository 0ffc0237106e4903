//! Memberships: project members and key members (listing, roles, removal, grants made by
//! accepted invitations), and the end of a person's roles when they leave an organization.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use keyshare_runtime::auth::Scope;
use keyshare_runtime::in_transaction;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use super::{CallerChecks, Ctx, Keyring};
use crate::domain::{KeyAction, KeyMember, KeyRef, KeyRole, Page, ProjectMember, ProjectRole};
use crate::error::{Error, Result};
use crate::store;

impl Keyring {
    pub async fn list_project_members(
        &self,
        ctx: &Ctx,
        project: Uuid,
        page: PageRequest,
    ) -> Result<Page<ProjectMember>> {
        if !ctx.caller.has_scope(Scope::MembershipsRead) {
            self.project_access(ctx.account()?, project, false).await?;
        }
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::project_members(&client, project, after, page.size as i64 + 1).await?;
        let scope = format!("projects/{project}/members");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |m| page::time_id_cursor(m.created_at, m.account_id));
        Ok(Page { items: rows, next_page_token })
    }

    pub async fn set_project_role(
        &self,
        ctx: &Ctx,
        project: Uuid,
        account: Uuid,
        role: ProjectRole,
    ) -> Result<ProjectMember> {
        self.project_access(ctx.account()?, project, true).await?;
        let member = in_transaction!(self.pool, |tx| -> Result<_> {
            store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
            let current = store::project_role(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
            if current == ProjectRole::Owner
                && role != ProjectRole::Owner
                && store::count_project_owners(&tx, project).await? <= 1
            {
                return Err(Error::LastProjectOwner);
            }
            store::set_project_role(&tx, project, account, role).await?;
            self.audit(
                &tx,
                ctx,
                project,
                None,
                "project_member.update",
                &format!("projects/{project}/members/{account}"),
            )
            .await?;
            let member = store::project_member(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
            Ok(member)
        })?;
        Ok(member)
    }

    /// Removes a project member. With `invitation` (internal callers revoking an invitation's
    /// access), only a membership that invitation made is removed.
    pub async fn remove_project_member(
        &self,
        ctx: &Ctx,
        project: Uuid,
        account: Uuid,
        invitation: Option<&str>,
    ) -> Result<()> {
        let on_behalf = ctx.caller.has_scope(Scope::MembershipsWrite);
        let by_invitation = on_behalf && invitation.is_some();
        if !on_behalf {
            self.project_access(ctx.account()?, project, true).await?;
        }
        let removed = in_transaction!(self.pool, |tx| -> Result<bool> {
            store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
            if let Some(invitation) = invitation.filter(|_| by_invitation)
                && !self.granted_by(&tx, invitation, &format!("projects/{project}"), account).await?
            {
                return Ok(false);
            }
            let current = store::project_role(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
            if current == ProjectRole::Owner && store::count_project_owners(&tx, project).await? <= 1 {
                return Err(Error::LastProjectOwner);
            }
            store::delete_project_member(&tx, project, account).await?;
            self.audit(
                &tx,
                ctx,
                project,
                None,
                "project_member.delete",
                &format!("projects/{project}/members/{account}"),
            )
            .await?;
            if !by_invitation {
                store::queue_member_call(&tx, "end_invitations", &format!("projects/{project}"), account).await?;
            }
            Ok(true)
        })?;
        if removed {
            self.invitations.run_now(&self.pool).await;
        }
        Ok(())
    }

    /// Whether the invitation's grant made this membership (so revoking its access removes
    /// it). A grant that never ran, or found the person a member already, made nothing.
    async fn granted_by(&self, tx: &Transaction<'_>, invitation: &str, target: &str, account: Uuid) -> Result<bool> {
        match store::grant_created(tx, invitation).await? {
            None => Ok(false),
            Some((granted_target, granted_account, created)) => {
                if (granted_target.as_str(), granted_account) != (target, account) {
                    return Err(Error::InvitationConflict(invitation.to_owned()));
                }
                Ok(created)
            }
        }
    }

    /// Ends what a person held in an organization's projects once identity removed them from
    /// it: project memberships and key roles made up to `removed_at`. Later ones (granted after
    /// a return) stay, so a late retry cannot take them.
    pub async fn end_org_membership(
        &self,
        ctx: &Ctx,
        org: Uuid,
        account: Uuid,
        removed_at: DateTime<Utc>,
    ) -> Result<(usize, usize)> {
        ctx.require(Scope::MembershipsEnd)?;
        let (projects, keys) = in_transaction!(self.pool, |tx| -> Result<_> {
            let keys = store::end_org_key_roles(&tx, org, account, removed_at).await?;
            let projects = store::end_org_project_roles(&tx, org, account, removed_at).await?;
            for key in &keys {
                let target = format!("{}/members/{account}", key.name());
                self.audit(&tx, ctx, key.project, Some(key.key), "key_member.delete", &target).await?;
                store::queue_member_call(&tx, "end_invitations", &key.name(), account).await?;
            }
            for project in &projects {
                let target = format!("projects/{project}/members/{account}");
                self.audit(&tx, ctx, *project, None, "project_member.delete", &target).await?;
                store::queue_member_call(&tx, "end_invitations", &format!("projects/{project}"), account).await?;
            }
            // The organization invitation that made them a member, if any, ends too.
            store::queue_member_call(&tx, "end_invitations", &format!("organizations/{org}"), account).await?;
            Ok((projects, keys))
        })?;
        tracing::info!(organization = %org, account = %account, projects = projects.len(), keys = keys.len(),
            "organization membership ended in keyring");
        self.invitations.run_now(&self.pool).await;
        Ok((projects.len(), keys.len()))
    }

    pub async fn add_project_member(
        &self,
        ctx: &Ctx,
        project: Uuid,
        account: Uuid,
        role: ProjectRole,
        invitation_id: &str,
    ) -> Result<ProjectMember> {
        ctx.require(Scope::MembershipsWrite)?;
        let target = format!("projects/{project}");
        let member = in_transaction!(self.pool, |tx| -> Result<_> {
            store::share_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
            match store::grant(&tx, invitation_id).await? {
                Some(existing) if existing == (target.clone(), account) => {
                    return store::project_member(&tx, project, account).await?.ok_or(Error::GrantRevoked);
                }
                Some(_) => return Err(Error::InvitationConflict(invitation_id.to_owned())),
                None => {}
            }
            let now = self.now();
            // A person who is a member already keeps their membership as it is; the grant records
            // that it made nothing, so revoking the invitation's access later removes nothing.
            let created = store::insert_project_member(&tx, project, account, role, now).await?;
            store::insert_grant(&tx, invitation_id, &target, account, role.as_str(), created, now).await?;
            if created {
                self.audit(&tx, ctx, project, None, "project_member.add", &format!("{target}/members/{account}"))
                    .await?;
            }
            let member = store::project_member(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
            Ok(member)
        })?;
        Ok(member)
    }

    /// An organization owner makes one of the organization's service accounts a project
    /// member. People join only by invitation.
    pub async fn create_project_member(
        &self,
        ctx: &Ctx,
        project: Uuid,
        service_account: (Uuid, Uuid),
        role: ProjectRole,
    ) -> Result<ProjectMember> {
        let me = ctx.person()?;
        let access = self.project_access(me, project, true).await?;
        let org = access.project.organization_id;
        if !access.org_owner && !self.is_org_owner(org, me).await? {
            return Err(Error::PermissionDenied("only organization owners may add service accounts to a project"));
        }
        let (sa_org, sa) = service_account;
        if sa_org != org {
            return Err(keyshare_runtime::error::InvalidInput::field(
                "member.account",
                "must be a service account of the project's organization",
            )
            .into());
        }
        if !self.directory.service_account_exists(org, sa).await? {
            return Err(Error::NotFound("service account"));
        }
        let now = self.now();
        let member = in_transaction!(self.pool, |tx| -> Result<_> {
            store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
            store::record_service_account(&tx, sa, org).await?;
            if !store::insert_project_member(&tx, project, sa, role, now).await? {
                return Err(Error::AlreadyMember);
            }
            let name = format!("projects/{project}/members/{sa}");
            self.audit(&tx, ctx, project, None, "project_member.add", &name).await?;
            let member = store::project_member(&tx, project, sa).await?.ok_or(Error::NotFound("member"))?;
            Ok(member)
        })?;
        Ok(member)
    }

    pub async fn list_key_members(&self, ctx: &Ctx, key: KeyRef, page: PageRequest) -> Result<Page<KeyMember>> {
        if !ctx.caller.has_scope(Scope::MembershipsRead) {
            self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        }
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::key_members(&client, key, after, page.size as i64 + 1).await?;
        let scope = format!("{}/members", key.name());
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |m| page::time_id_cursor(m.created_at, m.account_id));
        Ok(Page { items: rows, next_page_token })
    }

    pub async fn set_key_role(&self, ctx: &Ctx, key: KeyRef, account: Uuid, role: KeyRole) -> Result<KeyMember> {
        self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        let member = in_transaction!(self.pool, |tx| -> Result<_> {
            store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            let current = store::key_role(&tx, key.key, account).await?.ok_or(Error::NotFound("member"))?;
            if current == KeyRole::Owner {
                return Err(Error::OwnerImmutable);
            }
            store::set_key_role(&tx, key.key, account, role).await?;
            let target = format!("{}/members/{account}", key.name());
            self.audit(&tx, ctx, key.project, Some(key.key), "key_member.update", &target).await?;
            let member = store::key_member(&tx, key, account).await?.ok_or(Error::NotFound("member"))?;
            Ok(member)
        })?;
        Ok(member)
    }

    /// Removes a key member (never the owner). With `invitation` (internal callers revoking an
    /// invitation's access), only a membership that invitation made is removed.
    pub async fn remove_key_member(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        account: Uuid,
        invitation: Option<&str>,
    ) -> Result<()> {
        let on_behalf = ctx.caller.has_scope(Scope::MembershipsWrite);
        let by_invitation = on_behalf && invitation.is_some();
        if !on_behalf {
            self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        }
        let removed = in_transaction!(self.pool, |tx| -> Result<bool> {
            store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            if let Some(invitation) = invitation.filter(|_| by_invitation)
                && !self.granted_by(&tx, invitation, &key.name(), account).await?
            {
                return Ok(false);
            }
            let current = store::key_role(&tx, key.key, account).await?.ok_or(Error::NotFound("member"))?;
            if current == KeyRole::Owner {
                return Err(Error::OwnerImmutable);
            }
            store::delete_key_member(&tx, key.key, account).await?;
            let target = format!("{}/members/{account}", key.name());
            self.audit(&tx, ctx, key.project, Some(key.key), "key_member.delete", &target).await?;
            if !by_invitation {
                store::queue_member_call(&tx, "end_invitations", &key.name(), account).await?;
            }
            Ok(true)
        })?;
        if removed {
            self.invitations.run_now(&self.pool).await;
        }
        Ok(())
    }

    pub async fn add_key_member(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        account: Uuid,
        role: KeyRole,
        invitation_id: &str,
    ) -> Result<KeyMember> {
        ctx.require(Scope::MembershipsWrite)?;
        let target = key.name();
        let member = in_transaction!(self.pool, |tx| -> Result<_> {
            store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
            match store::grant(&tx, invitation_id).await? {
                Some(existing) if existing == (target.clone(), account) => {
                    return store::key_member(&tx, key, account).await?.ok_or(Error::GrantRevoked);
                }
                Some(_) => return Err(Error::InvitationConflict(invitation_id.to_owned())),
                None => {}
            }
            let now = self.now();
            // As for projects: an existing member keeps their role, and the grant records that it
            // made nothing.
            let created = store::insert_key_member(&tx, key.key, account, role, now).await?;
            store::insert_grant(&tx, invitation_id, &target, account, role.as_str(), created, now).await?;
            if created {
                self.audit(
                    &tx,
                    ctx,
                    key.project,
                    Some(key.key),
                    "key_member.add",
                    &format!("{target}/members/{account}"),
                )
                .await?;
            }
            let member = store::key_member(&tx, key, account).await?.ok_or(Error::NotFound("member"))?;
            Ok(member)
        })?;
        Ok(member)
    }
}
