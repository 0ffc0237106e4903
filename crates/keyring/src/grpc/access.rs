//! TestPermissions: which of the named permissions the caller (or, for internal callers, an
//! account) holds on a project or key.

use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::error::{FieldViolation, InvalidInput};

use crate::app::{self, Ctx, Keyring};
use crate::domain;
use crate::error::Error;

pub(super) async fn test_permissions(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::TestPermissionsRequest,
) -> Result<pb::TestPermissionsResponse, Error> {
    let (project, key) = match domain::parse_key(&r.resource, "resource") {
        Ok(key) => (key.project, Some(key)),
        Err(_) => (
            domain::parse_project(&r.resource, "resource").map_err(|_| {
                InvalidInput::field("resource", "must look like projects/{id} or projects/{id}/keys/{id}")
            })?,
            None,
        ),
    };
    let mut errors = InvalidInput::default();
    let mut permissions = Vec::new();
    for (index, raw) in r.permissions.iter().enumerate() {
        match app::Permission::parse(raw) {
            Some(permission) => permissions.push(permission),
            None => errors.0.push(FieldViolation::new(format!("permissions[{index}]"), "is not a known permission")),
        }
    }
    let on_behalf_of =
        (!r.account.is_empty()).then(|| errors.check(domain::parse_account(&r.account, "account"))).flatten();
    errors.finish()?;
    let held = keyring.test_permissions(&ctx, project, key, &permissions, on_behalf_of).await?;
    Ok(pb::TestPermissionsResponse { permissions: held.into_iter().map(|p| p.as_str().to_owned()).collect() })
}
