//! ListAuditEvents: a project's or a key's audit log, newest first.

use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::error::InvalidInput;
use keyshare_runtime::wire::timestamp;

use super::page;
use crate::app::{Ctx, Keyring};
use crate::domain;
use crate::error::Error;

pub(super) async fn list_audit_events(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Error> {
    let (project, key, scope) = match domain::parse_key(&r.parent, "parent") {
        Ok(key) => (key.project, Some(key), format!("{}/auditEvents", key.name())),
        Err(_) => {
            let project = domain::parse_project(&r.parent, "parent").map_err(|_| {
                InvalidInput::field("parent", "must look like projects/{id} or projects/{id}/keys/{id}")
            })?;
            (project, None, format!("projects/{project}/auditEvents"))
        }
    };
    let page = page(r.page_size, &r.page_token, &scope)?;
    let page = keyring.audit_events(&ctx, project, key, page).await?;
    Ok(pb::ListAuditEventsResponse {
        events: page
            .items
            .into_iter()
            .map(|e| pb::AuditEvent {
                actor: e.actor,
                action: e.action,
                target: e.target,
                request_id: e.request_id,
                create_time: Some(timestamp(e.created_at)),
            })
            .collect(),
        next_page_token: page.next_page_token,
    })
}
