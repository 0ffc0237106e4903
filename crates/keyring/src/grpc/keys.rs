//! Key and credential RPCs: CreateKey, GetKey, ListKeys, UpdateKey, UpdateKeyEnvironment,
//! RevealCredential, RegenerateCredential, DeleteKey and ListSharedKeys.

use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::error::{FieldViolation, InvalidInput, update_paths};

use super::convert::{grace_period, key_pb, key_role_pb, permissions_domain, timestamp_domain};
use super::{finish, page};
use crate::app::{self, Ctx, EnvironmentChange, Keyring};
use crate::domain::{self, Permissions};
use crate::error::Error;

pub(super) async fn create_key(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::CreateKeyRequest,
) -> Result<pb::CreateKeyResponse, Error> {
    let mut errors = InvalidInput::default();
    let project = errors.check(domain::parse_project(&r.parent, "parent"));
    let key = r.key.unwrap_or_default();
    let name = errors.check(domain::key_name(&key.display_name, "key.display_name"));
    let description = errors.check(domain::description(&key.description, "key.description"));
    let request_id = r.request_id.trim();
    if request_id.len() > 100 {
        errors.0.push(FieldViolation::new("request_id", "must be at most 100 characters"));
    }
    let ((project, name), description) = finish(errors, project.zip(name).zip(description))?;
    let permissions = r.permissions.map_or(Permissions::ALL, permissions_domain);
    let request_id = (!request_id.is_empty()).then(|| request_id.to_owned());
    let created = keyring.create_key(&ctx, project, name, description, permissions, request_id).await?;
    Ok(pb::CreateKeyResponse {
        key: Some(key_pb(created.key)),
        sandbox_credential: created.sandbox,
        production_credential: created.production,
    })
}

pub(super) async fn get_key(keyring: &Keyring, ctx: Ctx, r: pb::GetKeyRequest) -> Result<pb::GetKeyResponse, Error> {
    let key = keyring.get_key(&ctx, domain::parse_key(&r.name, "name")?).await?;
    Ok(pb::GetKeyResponse { key: Some(key_pb(key)) })
}

pub(super) async fn list_keys(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::ListKeysRequest,
) -> Result<pb::ListKeysResponse, Error> {
    let project = domain::parse_project(&r.parent, "parent")?;
    let page = page(r.page_size, &r.page_token, &format!("projects/{project}/keys"))?;
    let page = keyring.list_keys(&ctx, project, page).await?;
    Ok(pb::ListKeysResponse {
        keys: page.items.into_iter().map(key_pb).collect(),
        next_page_token: page.next_page_token,
    })
}

pub(super) async fn update_key(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::UpdateKeyRequest,
) -> Result<pb::UpdateKeyResponse, Error> {
    let key = r.key.ok_or_else(|| InvalidInput::field("key", "is required"))?;
    let mut errors = InvalidInput::default();
    let name = errors.check(domain::parse_key(&key.name, "key.name"));
    let populated = [("display_name", &key.display_name), ("description", &key.description)]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(path, _)| path)
        .collect::<Vec<_>>();
    let paths =
        errors.check(update_paths(r.update_mask, &["display_name", "description"], &populated)).unwrap_or_default();
    let display_name = paths
        .iter()
        .any(|p| p == "display_name")
        .then(|| errors.check(domain::key_name(&key.display_name, "key.display_name")))
        .flatten();
    let description = paths
        .iter()
        .any(|p| p == "description")
        .then(|| errors.check(domain::description(&key.description, "key.description")))
        .flatten();
    let etag = errors.check(app::parse_etag(&key.etag).map_err(|e| e.under("key"))).flatten();
    let name = finish(errors, name)?;
    let key = keyring.update_key(&ctx, name, display_name, description, etag).await.map_err(|e| match e {
        Error::EtagMismatch { .. } => Error::EtagMismatch { field: "key.etag" },
        other => other,
    })?;
    Ok(pb::UpdateKeyResponse { key: Some(key_pb(key)) })
}

pub(super) async fn update_key_environment(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::UpdateKeyEnvironmentRequest,
) -> Result<pb::UpdateKeyEnvironmentResponse, Error> {
    let env = r.environment.ok_or_else(|| InvalidInput::field("environment", "is required"))?;
    let allowed = ["active", "permissions", "rate_limit_per_second", "daily_quota", "ip_allowlist", "expire_time"];
    let mut errors = InvalidInput::default();
    let name = errors.check(domain::parse_key_environment(&env.name, "environment.name"));
    let populated = [
        ("active", env.active),
        ("permissions", env.permissions.is_some()),
        ("rate_limit_per_second", env.rate_limit_per_second != 0),
        ("daily_quota", env.daily_quota != 0),
        ("ip_allowlist", !env.ip_allowlist.is_empty()),
        ("expire_time", env.expire_time.is_some()),
    ]
    .into_iter()
    .filter_map(|(path, set)| set.then_some(path))
    .collect::<Vec<_>>();
    let paths = errors.check(update_paths(r.update_mask, &allowed, &populated)).unwrap_or_default();
    let has = |path: &str| paths.iter().any(|p| p == path);
    let mut change = EnvironmentChange::default();
    if has("active") {
        change.active = Some(env.active);
    }
    if has("permissions") {
        change.permissions = Some(env.permissions.map_or(Permissions::ALL, permissions_domain));
    }
    if has("rate_limit_per_second") {
        change.rate_limit = errors.check(domain::limit(env.rate_limit_per_second, "environment.rate_limit_per_second"));
    }
    if has("daily_quota") {
        change.daily_quota = errors.check(domain::limit(env.daily_quota, "environment.daily_quota"));
    }
    if has("ip_allowlist") {
        change.ip_allowlist = errors
            .check(domain::allowlist(&env.ip_allowlist, "environment.ip_allowlist"))
            .map(|nets| nets.iter().map(ToString::to_string).collect());
    }
    if has("expire_time") {
        change.expire_at = match env.expire_time {
            None => Some(None),
            Some(t) => errors.check(timestamp_domain(&t, "environment.expire_time")).map(Some),
        };
    }
    let etag = errors.check(app::parse_etag(&r.etag)).flatten();
    let (key, environment) = finish(errors, name)?;
    let key = keyring.update_environment(&ctx, key, environment, change, etag).await?;
    Ok(pb::UpdateKeyEnvironmentResponse { key: Some(key_pb(key)) })
}

pub(super) async fn reveal_credential(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::RevealCredentialRequest,
) -> Result<pb::RevealCredentialResponse, Error> {
    let (key, environment) = domain::parse_key_environment(&r.name, "name")?;
    let credential = keyring.reveal(&ctx, key, environment).await?;
    Ok(pb::RevealCredentialResponse { credential })
}

pub(super) async fn regenerate_credential(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::RegenerateCredentialRequest,
) -> Result<pb::RegenerateCredentialResponse, Error> {
    let mut errors = InvalidInput::default();
    let name = errors.check(domain::parse_key_environment(&r.name, "name"));
    let grace = errors.check(grace_period(r.grace_period));
    let ((key, environment), grace) = finish(errors, name.zip(grace))?;
    let (credential, key) = keyring.regenerate(&ctx, key, environment, grace).await?;
    Ok(pb::RegenerateCredentialResponse { credential, key: Some(key_pb(key)) })
}

pub(super) async fn delete_key(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::DeleteKeyRequest,
) -> Result<pb::DeleteKeyResponse, Error> {
    let mut errors = InvalidInput::default();
    let key = errors.check(domain::parse_key(&r.name, "name"));
    let etag = errors.check(app::parse_etag(&r.etag)).flatten();
    let key = finish(errors, key)?;
    keyring.delete_key(&ctx, key, etag).await?;
    Ok(pb::DeleteKeyResponse {})
}

pub(super) async fn list_shared_keys(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::ListSharedKeysRequest,
) -> Result<pb::ListSharedKeysResponse, Error> {
    let account = ctx.caller.account_id().unwrap_or_default();
    let page = page(r.page_size, &r.page_token, &format!("sharedKeys:{account}"))?;
    let page = keyring.shared_keys(&ctx, page).await?;
    Ok(pb::ListSharedKeysResponse {
        keys: page
            .items
            .into_iter()
            .map(|(key, role)| pb::SharedKey { key: Some(key_pb(key)), role: key_role_pb(role) })
            .collect(),
        next_page_token: page.next_page_token,
    })
}
