//! Keyring's use cases. Each write is one transaction that also records its audit event and,
//! when the authorizer cares, its feed entry.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use keyshare_runtime::auth::{Caller, Principal, Scope};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::credential::Credential;
use keyshare_runtime::crypto::{Sealed, Sealer};
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use crate::directory::{Directory, OrgRole};
use crate::domain::{
    AuditEvent, Environment, InvitationSummary, Key, KeyAccess, KeyAction, KeyEnvironment, KeyMember, KeyRef, KeyRole,
    Page, Permissions, Project, ProjectLimits, ProjectMember, ProjectRole,
};
use crate::error::{Error, Result};
use crate::feed::{self, FeedEvent};
use crate::invitations::InvitationClient;
use crate::store;

/// Who is calling and the request id, for authorisation and the audit log.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub caller: Caller,
    pub request_id: String,
}

impl Ctx {
    fn account(&self) -> Result<Uuid> {
        match self.caller.principal {
            Principal::Account { id } => Ok(id),
            // Keyshare's own services act only through the internal RPCs their scopes name.
            Principal::ServiceAccount { organization: None, .. } => {
                Err(Error::PermissionDenied("Keyshare's internal clients may call only the RPCs their scopes name"))
            }
            // An organization's service account acts as itself: it sees and does what its project
            // memberships (and the keys it created) allow, like a person.
            Principal::ServiceAccount { id, organization: Some(_), .. } => Ok(id),
        }
    }

    /// The caller, who must be a person (not a service account of any kind).
    fn person(&self) -> Result<Uuid> {
        match self.caller.principal {
            Principal::Account { id } => Ok(id),
            Principal::ServiceAccount { .. } => Err(Error::PermissionDenied("only people may do this")),
        }
    }

    /// Internal RPCs answer only the Keyshare service whose scopes name them.
    pub fn require(&self, scope: Scope) -> Result<()> {
        if self.caller.has_scope(scope) { Ok(()) } else { Err(Error::PermissionDenied(scope.denial())) }
    }
}

/// A change to one environment's settings; `None` leaves a setting as it is.
#[derive(Clone, Debug, Default)]
pub struct EnvironmentChange {
    pub active: Option<bool>,
    pub permissions: Option<Permissions>,
    pub rate_limit: Option<i64>,
    pub daily_quota: Option<i64>,
    pub ip_allowlist: Option<Vec<String>>,
    pub expire_at: Option<Option<DateTime<Utc>>>,
}

/// A change to a project; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ProjectChange {
    pub display_name: Option<String>,
    pub sandbox_rate_limit: Option<i64>,
    pub sandbox_monthly_quota: Option<i64>,
    pub production_rate_limit: Option<i64>,
    pub production_monthly_quota: Option<i64>,
}

/// A key as created: the key and both plaintext credentials.
pub struct CreatedKey {
    pub key: Key,
    pub sandbox: String,
    pub production: String,
}

pub struct Keyring {
    pool: Pool,
    clock: SharedClock,
    sealer: Sealer,
    directory: Directory,
    invitations: InvitationClient,
}

struct ProjectAccess {
    project: Project,
    role: Option<ProjectRole>,
    org_owner: bool,
}

impl ProjectAccess {
    fn manages(&self) -> bool {
        self.role == Some(ProjectRole::Owner) || self.org_owner
    }
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("sealer", &self.sealer).finish_non_exhaustive()
    }
}

impl Keyring {
    pub fn new(
        pool: Pool,
        clock: SharedClock,
        sealer: Sealer,
        directory: Directory,
        invitations: InvitationClient,
    ) -> Self {
        Self { pool, clock, sealer, directory, invitations }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    // --- Access ---

    async fn is_org_owner(&self, org: Uuid, account: Uuid) -> Result<bool> {
        Ok(self.directory.org_role(org, account).await? == Some(OrgRole::Owner))
    }

    /// The caller's standing in a project; NOT_FOUND for those with none. With `manage`, the
    /// organization role is asked for when the project role does not already settle it.
    async fn project_access(&self, account: Uuid, project: Uuid, manage: bool) -> Result<ProjectAccess> {
        let client = self.pool.get().await?;
        let project = store::project(&client, project).await?.ok_or(Error::NotFound("project"))?;
        let role = store::project_role(&client, project.id, account).await?;
        drop(client);
        let settled = role == Some(ProjectRole::Owner) || (role.is_some() && !manage);
        let org_owner = !settled && self.is_org_owner(project.organization_id, account).await?;
        let access = ProjectAccess { project, role, org_owner };
        if access.role.is_none() && !access.org_owner {
            return Err(Error::NotFound("project"));
        }
        if manage && !access.manages() {
            return Err(Error::PermissionDenied("only project and organization owners may do this"));
        }
        Ok(access)
    }

    /// The caller's standing on a live key, checked against `action`: NOT_FOUND for those who
    /// may not see it, PERMISSION_DENIED for those who may see it but not do `action`.
    async fn key_access(&self, account: Uuid, key: KeyRef, action: KeyAction) -> Result<KeyAccess> {
        let client = self.pool.get().await?;
        store::key_row(&client, key, false).await?.ok_or(Error::NotFound("key"))?;
        let key_role = store::key_role(&client, key.key, account).await?;
        let project_role = store::project_role(&client, key.project, account).await?;
        let mut access =
            KeyAccess { key_role, project_owner: project_role == Some(ProjectRole::Owner), org_owner: false };
        if !access.settled_locally(action) {
            let project = store::project(&client, key.project).await?.ok_or(Error::NotFound("key"))?;
            drop(client);
            access.org_owner = self.is_org_owner(project.organization_id, account).await?;
        }
        if !access.sees() {
            return Err(Error::NotFound("key"));
        }
        if !access.allows(action) {
            return Err(Error::PermissionDenied(match action {
                KeyAction::Delete => "only the key owner and project or organization owners may delete a key",
                _ => "only key owners and admins, and project or organization owners, may do this",
            }));
        }
        Ok(access)
    }

    async fn audit(
        &self,
        tx: &Transaction<'_>,
        ctx: &Ctx,
        project: Uuid,
        key: Option<Uuid>,
        action: &str,
        target: &str,
    ) -> Result<()> {
        store::insert_audit(
            tx,
            &store::NewAuditEvent {
                project,
                key,
                actor: &ctx.caller.subject(),
                action,
                target,
                request_id: &ctx.request_id,
                now: self.now(),
            },
        )
        .await?;
        Ok(())
    }

    // --- Projects ---

    pub async fn create_project(
        &self,
        ctx: &Ctx,
        org: Uuid,
        display_name: String,
        sandbox: ProjectLimits,
        production: ProjectLimits,
    ) -> Result<Project> {
        let account = ctx.account()?;
        match self.directory.org_role(org, account).await? {
            Some(OrgRole::Owner) => {}
            Some(OrgRole::Reader) => {
                return Err(Error::PermissionDenied("only organization owners may create projects"));
            }
            None => return Err(Error::NotFound("organization")),
        }
        let now = self.now();
        let project = Project {
            id: Uuid::now_v7(),
            organization_id: org,
            display_name,
            sandbox,
            production,
            created_at: now,
            caller_role: Some(ProjectRole::Owner),
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::insert_project(&tx, &project).await?;
        store::insert_project_member(&tx, project.id, account, ProjectRole::Owner, now).await?;
        self.audit(&tx, ctx, project.id, None, "project.create", &format!("projects/{}", project.id)).await?;
        feed::record_project(&tx, project.id).await?;
        tx.commit().await?;
        Ok(project)
    }

    pub async fn get_project(&self, ctx: &Ctx, project: Uuid) -> Result<Project> {
        let access = self.project_access(ctx.account()?, project, false).await?;
        Ok(Project { caller_role: access.role, ..access.project })
    }

    pub async fn list_projects(&self, ctx: &Ctx, org: Uuid, page: PageRequest) -> Result<Page<Project>> {
        let account = ctx.account()?;
        let owner = self.is_org_owner(org, account).await?;
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let member = if owner { None } else { Some(account) };
        let mut rows = store::projects(&client, org, member, after, page.size as i64 + 1).await?;
        let scope = format!("organizations/{org}/projects");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |(p, _)| page::time_id_cursor(p.created_at, p.id));
        Ok(Page {
            items: rows.into_iter().map(|(p, role)| Project { caller_role: role, ..p }).collect(),
            next_page_token,
        })
    }

    pub async fn update_project(&self, ctx: &Ctx, project: Uuid, change: ProjectChange) -> Result<Project> {
        let access = self.project_access(ctx.account()?, project, true).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let mut p = store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
        if let Some(name) = change.display_name {
            p.display_name = name;
        }
        let limits_before = (p.sandbox, p.production);
        p.sandbox.rate_limit = change.sandbox_rate_limit.unwrap_or(p.sandbox.rate_limit);
        p.sandbox.monthly_quota = change.sandbox_monthly_quota.unwrap_or(p.sandbox.monthly_quota);
        p.production.rate_limit = change.production_rate_limit.unwrap_or(p.production.rate_limit);
        p.production.monthly_quota = change.production_monthly_quota.unwrap_or(p.production.monthly_quota);
        store::update_project(&tx, &p, self.now()).await?;
        self.audit(&tx, ctx, project, None, "project.update", &format!("projects/{project}")).await?;
        if limits_before != (p.sandbox, p.production) {
            feed::record_project(&tx, project).await?;
        }
        tx.commit().await?;
        Ok(Project { caller_role: access.role, ..p })
    }

    pub async fn delete_project(&self, ctx: &Ctx, project: Uuid, force: bool) -> Result<()> {
        self.project_access(ctx.account()?, project, true).await?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
        let keys = store::live_keys(&tx, project).await?;
        if !keys.is_empty() && !force {
            return Err(Error::ProjectHasKeys);
        }
        for key in &keys {
            let key = KeyRef { project, key: *key };
            store::delete_key(&tx, key.key, now).await?;
            store::queue_call(&tx, "revoke_invitations", &key.name()).await?;
        }
        // Invitations to the project itself end with it, whether or not it had keys.
        store::queue_call(&tx, "revoke_invitations", &format!("projects/{project}")).await?;
        store::delete_project(&tx, project).await?;
        // The project's audit events stay (they reference it by id only).
        self.audit(&tx, ctx, project, None, "project.delete", &format!("projects/{project}")).await?;
        for key in keys {
            feed::record(&tx, &FeedEvent::KeyRemoved { project, key }).await?;
        }
        feed::record(&tx, &FeedEvent::ProjectRemoved { project }).await?;
        tx.commit().await?;
        self.invitations.run_now(&self.pool).await;
        Ok(())
    }

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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
        let current = store::project_role(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
        if current == ProjectRole::Owner
            && role != ProjectRole::Owner
            && store::count_project_owners(&tx, project).await? <= 1
        {
            return Err(Error::LastProjectOwner);
        }
        store::set_project_role(&tx, project, account, role).await?;
        self.audit(&tx, ctx, project, None, "project_member.update", &format!("projects/{project}/members/{account}"))
            .await?;
        let member = store::project_member(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
        if let Some(invitation) = invitation.filter(|_| by_invitation)
            && !self.granted_by(&tx, invitation, &format!("projects/{project}"), account).await?
        {
            return Ok(());
        }
        let current = store::project_role(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
        if current == ProjectRole::Owner && store::count_project_owners(&tx, project).await? <= 1 {
            return Err(Error::LastProjectOwner);
        }
        store::delete_project_member(&tx, project, account).await?;
        self.audit(&tx, ctx, project, None, "project_member.delete", &format!("projects/{project}/members/{account}"))
            .await?;
        if !by_invitation {
            store::queue_member_call(&tx, "end_invitations", &format!("projects/{project}"), account).await?;
        }
        tx.commit().await?;
        self.invitations.run_now(&self.pool).await;
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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
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
        tx.commit().await?;
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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
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
            self.audit(&tx, ctx, project, None, "project_member.add", &format!("{target}/members/{account}")).await?;
        }
        let member = store::project_member(&tx, project, account).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
        store::record_service_account(&tx, sa, org).await?;
        if !store::insert_project_member(&tx, project, sa, role, now).await? {
            return Err(Error::AlreadyMember);
        }
        let name = format!("projects/{project}/members/{sa}");
        self.audit(&tx, ctx, project, None, "project_member.add", &name).await?;
        let member = store::project_member(&tx, project, sa).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
        Ok(member)
    }

    // --- Keys ---

    pub async fn create_key(
        &self,
        ctx: &Ctx,
        project: Uuid,
        display_name: String,
        description: String,
        permissions: Permissions,
        request_id: Option<String>,
    ) -> Result<CreatedKey> {
        let account = ctx.account()?;
        self.project_access(account, project, false).await?;
        if let Some(request_id) = &request_id {
            let client = self.pool.get().await?;
            if let Some(existing) = store::key_by_request(&client, account, request_id).await? {
                drop(client);
                return self.created_again(ctx, existing).await;
            }
        }
        let now = self.now();
        let key = KeyRef { project, key: Uuid::now_v7() };
        let sandbox = Credential::generate(Environment::Sandbox);
        let production = Credential::generate(Environment::Production);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let new_key = store::NewKey {
            key,
            display_name: &display_name,
            description: &description,
            created_by: account,
            request_id: request_id.as_deref(),
            now,
        };
        if let Err(e) = store::insert_key(&tx, &new_key).await {
            return Err(match e.unique_violation() {
                Some("keys_name_unique") => Error::KeyNameTaken,
                // A concurrent retry with the same request id won the race: answer as it did.
                Some("keys_request") => {
                    drop(tx);
                    drop(client);
                    let client = self.pool.get().await?;
                    let existing = store::key_by_request(&client, account, request_id.as_deref().unwrap_or_default())
                        .await?
                        .ok_or(Error::Internal("request id conflict without a key".into()))?;
                    drop(client);
                    return self.created_again(ctx, existing).await;
                }
                _ => e.into(),
            });
        }
        for (env, credential) in [(Environment::Sandbox, &sandbox), (Environment::Production, &production)] {
            store::insert_environment(&tx, key.key, env, permissions).await?;
            self.insert_credential(&tx, key.key, credential, now).await?;
        }
        store::insert_key_member(&tx, key.key, account, KeyRole::Owner, now).await?;
        self.audit(&tx, ctx, project, Some(key.key), "key.create", &key.name()).await?;
        feed::record_key(&tx, key, now).await?;
        tx.commit().await?;
        let key = self.load(key, Some(KeyRole::Owner)).await?;
        Ok(CreatedKey { key, sandbox: sandbox.expose().to_owned(), production: production.expose().to_owned() })
    }

    /// The answer to a retried CreateKey: the same key and its current credentials.
    async fn created_again(&self, ctx: &Ctx, key: KeyRef) -> Result<CreatedKey> {
        let sandbox = self.reveal(ctx, key, Environment::Sandbox).await?;
        let production = self.reveal(ctx, key, Environment::Production).await?;
        let account = ctx.account()?;
        let client = self.pool.get().await?;
        let role = store::key_role(&client, key.key, account).await?;
        drop(client);
        Ok(CreatedKey { key: self.load(key, role).await?, sandbox, production })
    }

    async fn insert_credential(
        &self,
        tx: &Transaction<'_>,
        key: Uuid,
        credential: &Credential,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let id = Uuid::now_v7();
        // The sealed copy is bound to its row: it cannot be moved to another credential.
        let sealed = self.sealer.seal(credential.expose().as_bytes(), id.as_bytes());
        let hint = credential.hint();
        store::insert_credential(
            tx,
            &store::NewCredential {
                id,
                key,
                environment: credential.environment(),
                sha256: &credential.hash(),
                sealed: &sealed.blob,
                kek_id: &sealed.key_id,
                prefix: hint.prefix,
                last_four: &hint.last_four,
                now,
            },
        )
        .await?;
        Ok(())
    }

    async fn load(&self, key: KeyRef, caller_role: Option<KeyRole>) -> Result<Key> {
        let client = self.pool.get().await?;
        let key = store::load_key(&client, key, self.now()).await?.ok_or(Error::NotFound("key"))?;
        Ok(Key { caller_role, ..key })
    }

    pub async fn get_key(&self, ctx: &Ctx, key: KeyRef) -> Result<Key> {
        let access = self.key_access(ctx.account()?, key, KeyAction::See).await?;
        self.load(key, access.key_role).await
    }

    pub async fn list_keys(&self, ctx: &Ctx, project: Uuid, page: PageRequest) -> Result<Page<Key>> {
        let account = ctx.account()?;
        let client = self.pool.get().await?;
        let p = store::project(&client, project).await?.ok_or(Error::NotFound("project"))?;
        let project_role = store::project_role(&client, project, account).await?;
        let key_member = project_role.is_none() && store::has_key_role_in(&client, project, account).await?;
        drop(client);
        let manager = project_role == Some(ProjectRole::Owner) || self.is_org_owner(p.organization_id, account).await?;
        // Decided before the page token is looked at, so no token can tell an outsider whether
        // the project exists.
        if !manager && project_role.is_none() && !key_member {
            return Err(Error::NotFound("project"));
        }
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let member = if manager { None } else { Some(account) };
        let mut rows = store::project_keys(&client, project, member, after, page.size as i64 + 1).await?;
        drop(client);
        let scope = format!("projects/{project}/keys");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |(k, _, at)| page::time_id_cursor(*at, k.key));
        // Invitation counts are sharing information: only for those who may see who a key is
        // shared with (its owner and admins, project and organization owners), never contributors.
        let sees_sharing = |role: Option<KeyRole>| {
            KeyAccess { key_role: role, project_owner: manager, org_owner: false }.allows(KeyAction::Manage)
        };
        let shown: Vec<String> =
            rows.iter().filter(|(_, role, _)| sees_sharing(*role)).map(|(key, _, _)| key.name()).collect();
        let counts = self.invitations.counts(shown).await;
        let mut items = Vec::with_capacity(rows.len());
        for (key, role, _) in rows {
            let mut loaded = self.load(key, role).await?;
            loaded.invitations = match &counts {
                _ if !sees_sharing(role) => InvitationSummary::Hidden,
                Some(counts) => InvitationSummary::Counts(counts.get(&key.name()).copied().unwrap_or_default()),
                None => InvitationSummary::Unknown,
            };
            items.push(loaded);
        }
        Ok(Page { items, next_page_token })
    }

    pub async fn update_key(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        display_name: Option<String>,
        description: Option<String>,
        etag: Option<i64>,
    ) -> Result<Key> {
        let access = self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
        if etag.is_some_and(|etag| etag != row.version) {
            return Err(Error::EtagMismatch { field: "etag" });
        }
        let name = display_name.unwrap_or(row.display_name);
        let description = description.unwrap_or(row.description);
        store::update_key_text(&tx, key.key, &name, &description)
            .await
            .map_err(|e| if e.unique_violation().is_some() { Error::KeyNameTaken } else { e.into() })?;
        store::touch_key(&tx, key.key, self.now()).await?;
        self.audit(&tx, ctx, key.project, Some(key.key), "key.update", &key.name()).await?;
        tx.commit().await?;
        self.load(key, access.key_role).await
    }

    pub async fn update_environment(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        environment: Environment,
        change: EnvironmentChange,
        etag: Option<i64>,
    ) -> Result<Key> {
        let access = self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
        if etag.is_some_and(|etag| etag != row.version) {
            return Err(Error::EtagMismatch { field: "etag" });
        }
        let current = store::load_key(&tx, key, now).await?.ok_or(Error::NotFound("key"))?;
        let mut env: KeyEnvironment =
            if environment == Environment::Sandbox { current.sandbox } else { current.production };
        env.active = change.active.unwrap_or(env.active);
        env.permissions = change.permissions.unwrap_or(env.permissions);
        env.rate_limit = change.rate_limit.unwrap_or(env.rate_limit);
        env.daily_quota = change.daily_quota.unwrap_or(env.daily_quota);
        env.ip_allowlist = change.ip_allowlist.unwrap_or(env.ip_allowlist);
        env.expire_at = change.expire_at.unwrap_or(env.expire_at);
        store::update_environment(&tx, key.key, &env).await?;
        store::touch_key(&tx, key.key, now).await?;
        let target = format!("{}/environments/{}", key.name(), environment.as_str());
        self.audit(&tx, ctx, key.project, Some(key.key), "key_environment.update", &target).await?;
        feed::record_key(&tx, key, now).await?;
        tx.commit().await?;
        self.load(key, access.key_role).await
    }

    pub async fn reveal(&self, ctx: &Ctx, key: KeyRef, environment: Environment) -> Result<String> {
        self.key_access(ctx.account()?, key, KeyAction::See).await?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (id, blob, kek_id) = store::current_sealed(&tx, key.key, environment).await?.ok_or(Error::NoCredential)?;
        let plaintext = self
            .sealer
            .open(&Sealed { key_id: kek_id, blob }, id.as_bytes())
            .map_err(|e| Error::Internal(format!("opening credential {id}: {e}")))?;
        let plaintext =
            String::from_utf8(plaintext).map_err(|_| Error::Internal(format!("credential {id} is not text")))?;
        let target = format!("{}/environments/{}", key.name(), environment.as_str());
        self.audit(&tx, ctx, key.project, Some(key.key), "credential.reveal", &target).await?;
        tx.commit().await?;
        Ok(plaintext)
    }

    pub async fn regenerate(
        &self,
        ctx: &Ctx,
        key: KeyRef,
        environment: Environment,
        grace: chrono::Duration,
    ) -> Result<(String, Key)> {
        let access = self.key_access(ctx.account()?, key, KeyAction::Manage).await?;
        let now = self.now();
        let credential = Credential::generate(environment);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
        store::retire_current(&tx, key.key, environment, now, now + grace).await?;
        self.insert_credential(&tx, key.key, &credential, now).await?;
        store::touch_key(&tx, key.key, now).await?;
        let target = format!("{}/environments/{}", key.name(), environment.as_str());
        self.audit(&tx, ctx, key.project, Some(key.key), "credential.regenerate", &target).await?;
        feed::record_key(&tx, key, now).await?;
        tx.commit().await?;
        Ok((credential.expose().to_owned(), self.load(key, access.key_role).await?))
    }

    pub async fn delete_key(&self, ctx: &Ctx, key: KeyRef, etag: Option<i64>) -> Result<()> {
        self.key_access(ctx.account()?, key, KeyAction::Delete).await?;
        let now = self.now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
        if etag.is_some_and(|etag| etag != row.version) {
            return Err(Error::EtagMismatch { field: "etag" });
        }
        store::delete_key(&tx, key.key, now).await?;
        // Invitations live in the invitation service: revoke them after commit, with retries.
        store::queue_call(&tx, "revoke_invitations", &key.name()).await?;
        self.audit(&tx, ctx, key.project, Some(key.key), "key.delete", &key.name()).await?;
        feed::record(&tx, &FeedEvent::KeyRemoved { project: key.project, key: key.key }).await?;
        tx.commit().await?;
        self.invitations.run_now(&self.pool).await;
        Ok(())
    }

    // --- Key members ---

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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
        let current = store::key_role(&tx, key.key, account).await?.ok_or(Error::NotFound("member"))?;
        if current == KeyRole::Owner {
            return Err(Error::OwnerImmutable);
        }
        store::set_key_role(&tx, key.key, account, role).await?;
        let target = format!("{}/members/{account}", key.name());
        self.audit(&tx, ctx, key.project, Some(key.key), "key_member.update", &target).await?;
        let member = store::key_member(&tx, key, account).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        store::key_row(&tx, key, true).await?.ok_or(Error::NotFound("key"))?;
        if let Some(invitation) = invitation.filter(|_| by_invitation)
            && !self.granted_by(&tx, invitation, &key.name(), account).await?
        {
            return Ok(());
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
        tx.commit().await?;
        self.invitations.run_now(&self.pool).await;
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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
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
            self.audit(&tx, ctx, key.project, Some(key.key), "key_member.add", &format!("{target}/members/{account}"))
                .await?;
        }
        let member = store::key_member(&tx, key, account).await?.ok_or(Error::NotFound("member"))?;
        tx.commit().await?;
        Ok(member)
    }

    pub async fn shared_keys(&self, ctx: &Ctx, page: PageRequest) -> Result<Page<(Key, KeyRole)>> {
        let account = ctx.account()?;
        let after = page.after.as_deref().map(page::parse_time_id_cursor).transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::shared_keys(&client, account, after, page.size as i64 + 1).await?;
        drop(client);
        let scope = format!("sharedKeys:{account}");
        let next_page_token =
            page::next_token(&mut rows, page.size, &scope, |(k, _, at)| page::time_id_cursor(*at, k.key));
        let mut items = Vec::with_capacity(rows.len());
        for (key, role, _) in rows {
            items.push((self.load(key, Some(role)).await?, role));
        }
        Ok(Page { items, next_page_token })
    }

    /// Which of `permissions` the caller holds on a project or key (none for what they cannot
    /// see). Unknown permission names are refused by the adapter.
    /// With `on_behalf_of` (internal callers only), answers for that account, and a resource
    /// that does not exist is NOT_FOUND.
    pub async fn test_permissions(
        &self,
        ctx: &Ctx,
        project: Uuid,
        key: Option<KeyRef>,
        permissions: &[Permission],
        on_behalf_of: Option<Uuid>,
    ) -> Result<Vec<Permission>> {
        if on_behalf_of.is_some() {
            ctx.require(Scope::MembershipsRead)?;
        }
        let missing = || if on_behalf_of.is_some() { Err(Error::NotFound("resource")) } else { Ok(Vec::new()) };
        let account = match (on_behalf_of, ctx.account()) {
            (Some(account), _) | (None, Ok(account)) => account,
            (None, Err(_)) => return Ok(Vec::new()),
        };
        let client = self.pool.get().await?;
        let Some(p) = store::project(&client, project).await? else { return missing() };
        let project_role = store::project_role(&client, project, account).await?;
        let key_role = match key {
            Some(key) => {
                if store::key_row(&client, key, false).await?.is_none() {
                    return missing();
                }
                store::key_role(&client, key.key, account).await?
            }
            None => None,
        };
        drop(client);
        let mut access =
            KeyAccess { key_role, project_owner: project_role == Some(ProjectRole::Owner), org_owner: false };
        // Ask identity only when a local role does not already grant everything asked for.
        let settled = access.project_owner || (key.is_some() && matches!(key_role, Some(KeyRole::Owner)));
        if !settled {
            access.org_owner = self.is_org_owner(p.organization_id, account).await?;
        }
        let manages_project = access.project_owner || access.org_owner;
        Ok(permissions
            .iter()
            .copied()
            .filter(|permission| match (permission, key) {
                (Permission::ProjectsGet, _) => project_role.is_some() || manages_project,
                (Permission::ProjectsManage, _) => manages_project,
                (Permission::KeysGet, Some(_)) => access.allows(KeyAction::See),
                (Permission::KeysManage, Some(_)) => access.allows(KeyAction::Manage),
                (Permission::KeysDelete, Some(_)) => access.allows(KeyAction::Delete),
                (_, None) => false,
            })
            .collect())
    }

    /// Audit events of a project (project and organization owners) or of a key (those who may
    /// see its sharing settings), newest first.
    pub async fn audit_events(
        &self,
        ctx: &Ctx,
        project: Uuid,
        key: Option<KeyRef>,
        page: PageRequest,
    ) -> Result<Page<AuditEvent>> {
        let account = ctx.account()?;
        match key {
            Some(key) => {
                self.key_access(account, key, KeyAction::Manage).await?;
            }
            None => {
                self.project_access(account, project, true).await?;
            }
        }
        let before = page
            .after
            .as_deref()
            .map(|c| {
                c.parse::<i64>().map_err(|_| {
                    keyshare_runtime::error::InvalidInput::field("page_token", "is not a page token of this listing")
                })
            })
            .transpose()?;
        let client = self.pool.get().await?;
        let mut rows = store::audit_events(&client, project, key.map(|k| k.key), before, page.size as i64 + 1).await?;
        let scope = match key {
            Some(key) => format!("{}/auditEvents", key.name()),
            None => format!("projects/{project}/auditEvents"),
        };
        let next_page_token = page::next_token(&mut rows, page.size, &scope, |e| e.id.to_string());
        Ok(Page { items: rows, next_page_token })
    }
}

/// Permissions other services may test (TestPermissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    ProjectsGet,
    ProjectsManage,
    KeysGet,
    KeysManage,
    KeysDelete,
}

impl Permission {
    pub const ALL: [Permission; 5] = [
        Permission::ProjectsGet,
        Permission::ProjectsManage,
        Permission::KeysGet,
        Permission::KeysManage,
        Permission::KeysDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ProjectsGet => "projects.get",
            Permission::ProjectsManage => "projects.manage",
            Permission::KeysGet => "keys.get",
            Permission::KeysManage => "keys.manage",
            Permission::KeysDelete => "keys.delete",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == raw)
    }
}

/// The key's etag: its version, quoted as HTTP etags are.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Reads an etag back; `None` for an empty one (no precondition).
pub fn parse_etag(raw: &str) -> Result<Option<i64>, keyshare_runtime::error::InvalidInput> {
    let trimmed = raw.trim().trim_matches('"');
    if trimmed.is_empty() {
        return Ok(None);
    }
    trimmed
        .parse()
        .map(Some)
        .map_err(|_| keyshare_runtime::error::InvalidInput::field("etag", "is not an etag of this key"))
}
