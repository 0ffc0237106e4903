//! The audit log: recording an event inside a write's transaction, and listing a project's or
//! a key's events.

use deadpool_postgres::Transaction;
use keyshare_runtime::page::{self, PageRequest};
use uuid::Uuid;

use super::{CallerChecks, Ctx, Keyring};
use crate::domain::{AuditEvent, KeyAction, KeyRef, Page};
use crate::error::Result;
use crate::store;

impl Keyring {
    pub(super) async fn audit(
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
