//! Conversions between protobuf and domain types: parsing what callers send (limits, roles,
//! permissions, times) and building the messages keyring answers with.

use chrono::{DateTime, Utc};
use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::error::InvalidInput;
use keyshare_runtime::wire::timestamp;

use crate::app;
use crate::domain::{
    self, InvitationSummary, Key, KeyEnvironment, KeyMember, KeyRole, Permissions, Project, ProjectLimits,
    ProjectMember, ProjectRole,
};

pub(super) fn limits(limits: Option<pb::ProjectEnvironmentLimits>, field: &str) -> Result<ProjectLimits, InvalidInput> {
    let limits = limits.unwrap_or_default();
    let mut errors = InvalidInput::default();
    let rate = errors.check(domain::limit(limits.rate_limit_per_second, &format!("{field}.rate_limit_per_second")));
    let quota = errors.check(domain::limit(limits.monthly_quota, &format!("{field}.monthly_quota")));
    errors.finish()?;
    Ok(ProjectLimits { rate_limit: rate.unwrap_or_default(), monthly_quota: quota.unwrap_or_default() })
}

pub(super) fn grace_period(grace: Option<prost_types::Duration>) -> Result<chrono::Duration, InvalidInput> {
    let Some(grace) = grace else { return Ok(chrono::Duration::zero()) };
    let bad = |why: &str| InvalidInput::field("grace_period", why);
    if grace.seconds < 0 || grace.nanos < 0 {
        return Err(bad("must not be negative"));
    }
    let duration = chrono::Duration::seconds(grace.seconds) + chrono::Duration::nanoseconds(grace.nanos.into());
    if duration > domain::MAX_GRACE {
        return Err(bad("must be at most 24 hours"));
    }
    Ok(duration)
}

pub(super) fn project_role(value: i32, field: &str) -> Result<ProjectRole, InvalidInput> {
    match pb::ProjectRole::try_from(value) {
        Ok(pb::ProjectRole::Owner) => Ok(ProjectRole::Owner),
        Ok(pb::ProjectRole::Member) => Ok(ProjectRole::Member),
        _ => Err(InvalidInput::field(field, "must be PROJECT_ROLE_OWNER or PROJECT_ROLE_MEMBER")),
    }
}

/// A role that can be given to a key member: never owner (ownership never changes).
pub(super) fn shared_role(value: i32, field: &str) -> Result<KeyRole, InvalidInput> {
    match pb::KeyRole::try_from(value) {
        Ok(pb::KeyRole::Admin) => Ok(KeyRole::Admin),
        Ok(pb::KeyRole::Contributor) => Ok(KeyRole::Contributor),
        _ => Err(InvalidInput::field(field, "must be KEY_ROLE_ADMIN or KEY_ROLE_CONTRIBUTOR")),
    }
}

pub(super) fn permissions_domain(p: pb::Permissions) -> Permissions {
    Permissions { create: p.create, read: p.read, update: p.update, delete: p.delete }
}

pub(super) fn permissions_pb(p: Permissions) -> pb::Permissions {
    pb::Permissions { create: p.create, read: p.read, update: p.update, delete: p.delete }
}

/// A timestamp a caller sent: out of range (or with nanos outside 0..1e9) is bad input, never
/// taken as "no time".
pub(super) fn timestamp_domain(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, InvalidInput> {
    u32::try_from(t.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .filter(|at| at.timestamp() >= 0 && at.timestamp() < 253_402_300_800)
        .ok_or_else(|| InvalidInput::field(field, "must be a time between 1970-01-01 and 9999-12-31"))
}

pub(super) fn project_role_pb(role: ProjectRole) -> i32 {
    match role {
        ProjectRole::Owner => pb::ProjectRole::Owner as i32,
        ProjectRole::Member => pb::ProjectRole::Member as i32,
    }
}

pub(super) fn key_role_pb(role: KeyRole) -> i32 {
    match role {
        KeyRole::Owner => pb::KeyRole::Owner as i32,
        KeyRole::Admin => pb::KeyRole::Admin as i32,
        KeyRole::Contributor => pb::KeyRole::Contributor as i32,
    }
}

pub(super) fn limits_pb(l: ProjectLimits) -> pb::ProjectEnvironmentLimits {
    pb::ProjectEnvironmentLimits { rate_limit_per_second: l.rate_limit, monthly_quota: l.monthly_quota }
}

pub(super) fn project_pb(p: Project) -> pb::Project {
    pb::Project {
        name: format!("projects/{}", p.id),
        organization: format!("organizations/{}", p.organization_id),
        display_name: p.display_name,
        sandbox: Some(limits_pb(p.sandbox)),
        production: Some(limits_pb(p.production)),
        create_time: Some(timestamp(p.created_at)),
        caller_role: p.caller_role.map_or(0, project_role_pb),
    }
}

pub(super) fn project_member_pb(m: ProjectMember) -> pb::ProjectMember {
    pb::ProjectMember {
        name: format!("projects/{}/members/{}", m.project_id, m.account_id),
        account: domain::member_name(m.account_id, m.service_account_org),
        role: project_role_pb(m.role),
        create_time: Some(timestamp(m.created_at)),
    }
}

pub(super) fn key_member_pb(m: KeyMember) -> pb::KeyMember {
    pb::KeyMember {
        name: format!("{}/members/{}", m.key.name(), m.account_id),
        account: domain::member_name(m.account_id, m.service_account_org),
        role: key_role_pb(m.role),
        create_time: Some(timestamp(m.created_at)),
    }
}

pub(super) fn key_environment_pb(key_name: &str, e: KeyEnvironment) -> pb::KeyEnvironment {
    let info = |c: domain::CredentialInfo| pb::CredentialInfo {
        prefix: c.prefix,
        last_four: c.last_four,
        create_time: Some(timestamp(c.created_at)),
    };
    let (previous, previous_expire) = match e.previous {
        Some((c, until)) => (Some(info(c)), Some(timestamp(until))),
        None => (None, None),
    };
    pb::KeyEnvironment {
        name: format!("{key_name}/environments/{}", e.environment.as_str()),
        environment: e.environment.number(),
        active: e.active,
        permissions: Some(permissions_pb(e.permissions)),
        rate_limit_per_second: e.rate_limit,
        daily_quota: e.daily_quota,
        ip_allowlist: e.ip_allowlist,
        expire_time: e.expire_at.map(timestamp),
        credential: e.credential.map(info),
        previous_credential: previous,
        previous_credential_expire_time: previous_expire,
    }
}

pub(super) fn key_pb(k: Key) -> pb::Key {
    let name = k.key.name();
    pb::Key {
        sandbox: Some(key_environment_pb(&name, k.sandbox)),
        production: Some(key_environment_pb(&name, k.production)),
        display_name: k.display_name,
        description: k.description,
        invitations: match k.invitations {
            InvitationSummary::Hidden => None,
            InvitationSummary::Unknown => Some(pb::InvitationCounts { known: false, accepted: 0, pending: 0 }),
            InvitationSummary::Counts(c) => {
                Some(pb::InvitationCounts { known: true, accepted: c.accepted, pending: c.pending })
            }
        },
        create_time: Some(timestamp(k.created_at)),
        update_time: Some(timestamp(k.updated_at)),
        etag: app::etag(k.version),
        caller_role: k.caller_role.map_or(0, key_role_pb),
        name,
    }
}
