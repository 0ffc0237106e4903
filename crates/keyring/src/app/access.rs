//! Who may do what: the caller's standing in a project or on a key, the organization-owner
//! question asked of identity, and TestPermissions.

use keyshare_runtime::auth::Scope;
use uuid::Uuid;

use super::{CallerChecks, Ctx, Keyring, Permission};
use crate::directory::OrgRole;
use crate::domain::{KeyAccess, KeyAction, KeyRef, KeyRole, Project, ProjectRole};
use crate::error::{Error, Result};
use crate::store;

pub(super) struct ProjectAccess {
    pub(super) project: Project,
    pub(super) role: Option<ProjectRole>,
    pub(super) org_owner: bool,
}

impl ProjectAccess {
    fn manages(&self) -> bool {
        self.role == Some(ProjectRole::Owner) || self.org_owner
    }
}

impl Keyring {
    pub(super) async fn is_org_owner(&self, org: Uuid, account: Uuid) -> Result<bool> {
        Ok(self.directory.org_role(org, account).await? == Some(OrgRole::Owner))
    }

    /// The caller's standing in a project; NOT_FOUND for those with none. With `manage`, the
    /// organization role is asked for when the project role does not already settle it.
    pub(super) async fn project_access(&self, account: Uuid, project: Uuid, manage: bool) -> Result<ProjectAccess> {
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
    pub(super) async fn key_access(&self, account: Uuid, key: KeyRef, action: KeyAction) -> Result<KeyAccess> {
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
}
