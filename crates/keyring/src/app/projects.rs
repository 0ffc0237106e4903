//! Projects: create, get, list, update (name and limits) and delete.

use keyshare_runtime::in_transaction;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use super::{CallerChecks, Ctx, Keyring, ProjectChange};
use crate::directory::OrgRole;
use crate::domain::{KeyRef, Page, Project, ProjectLimits, ProjectRole};
use crate::error::{Error, Result};
use crate::feed::{self, FeedEvent};
use crate::store;

impl Keyring {
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
        in_transaction!(self.pool, |tx| -> Result<()> {
            store::insert_project(&tx, &project).await?;
            store::insert_project_member(&tx, project.id, account, ProjectRole::Owner, now).await?;
            self.audit(&tx, ctx, project.id, None, "project.create", &format!("projects/{}", project.id)).await?;
            feed::record_project(&tx, project.id).await?;
            Ok(())
        })?;
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
        let p = in_transaction!(self.pool, |tx| -> Result<_> {
            let mut p = store::lock_project(&tx, project).await?.ok_or(Error::NotFound("project"))?;
            if let Some(name) = change.display_name.clone() {
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
            Ok(p)
        })?;
        Ok(Project { caller_role: access.role, ..p })
    }

    pub async fn delete_project(&self, ctx: &Ctx, project: Uuid, force: bool) -> Result<()> {
        self.project_access(ctx.account()?, project, true).await?;
        let now = self.now();
        in_transaction!(self.pool, |tx| -> Result<()> {
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
            Ok(())
        })?;
        self.invitations.run_now(&self.pool).await;
        Ok(())
    }
}
