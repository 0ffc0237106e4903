//! Membership RPCs: project members and key members (list, update, delete, create, add), and
//! EndOrganizationMembership.

use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::error::{InvalidInput, update_paths};

use super::convert::{key_member_pb, project_member_pb, project_role, shared_role, timestamp_domain};
use super::{finish, page};
use crate::app::{Ctx, Keyring};
use crate::domain;
use crate::error::Error;

pub(super) async fn list_project_members(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::ListProjectMembersRequest,
) -> Result<pb::ListProjectMembersResponse, Error> {
    let project = domain::parse_project(&r.parent, "parent")?;
    let page = page(r.page_size, &r.page_token, &format!("projects/{project}/members"))?;
    let page = keyring.list_project_members(&ctx, project, page).await?;
    Ok(pb::ListProjectMembersResponse {
        members: page.items.into_iter().map(project_member_pb).collect(),
        next_page_token: page.next_page_token,
    })
}

pub(super) async fn update_project_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::UpdateProjectMemberRequest,
) -> Result<pb::UpdateProjectMemberResponse, Error> {
    let member = r.member.ok_or_else(|| InvalidInput::field("member", "is required"))?;
    let mut errors = InvalidInput::default();
    let name = errors.check(domain::parse_project_member(&member.name, "member.name"));
    let populated: &[&str] = if member.role == 0 { &[] } else { &["role"] };
    errors.check(update_paths(r.update_mask, &["role"], populated));
    let role = errors.check(project_role(member.role, "member.role"));
    let ((project, account), role) = finish(errors, name.zip(role))?;
    let member = keyring.set_project_role(&ctx, project, account, role).await?;
    Ok(pb::UpdateProjectMemberResponse { member: Some(project_member_pb(member)) })
}

pub(super) async fn delete_project_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::DeleteProjectMemberRequest,
) -> Result<pb::DeleteProjectMemberResponse, Error> {
    let (project, account) = domain::parse_project_member(&r.name, "name")?;
    let invitation = Some(r.invitation_id.as_str()).filter(|id| !id.is_empty());
    keyring.remove_project_member(&ctx, project, account, invitation).await?;
    Ok(pb::DeleteProjectMemberResponse {})
}

pub(super) async fn create_project_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::CreateProjectMemberRequest,
) -> Result<pb::CreateProjectMemberResponse, Error> {
    let mut errors = InvalidInput::default();
    let project = errors.check(domain::parse_project(&r.parent, "parent"));
    let member = r.member.unwrap_or_default();
    let account = member.account.trim();
    let service_account = errors.check(
        keyshare_runtime::resource::uuids(account, &["organizations", "*", "serviceAccounts", "*"])
            .map(|ids| (ids[0], ids[1]))
            .ok_or_else(|| {
                let reason = if account.starts_with("accounts/") {
                    "people join a project by invitation; name a service account here"
                } else {
                    "must look like organizations/{id}/serviceAccounts/{id}"
                };
                InvalidInput::field("member.account", reason)
            }),
    );
    let role = errors.check(project_role(member.role, "member.role"));
    let ((project, service_account), role) = finish(errors, project.zip(service_account).zip(role))?;
    let member = keyring.create_project_member(&ctx, project, service_account, role).await?;
    Ok(pb::CreateProjectMemberResponse { member: Some(project_member_pb(member)) })
}

pub(super) async fn add_project_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::AddProjectMemberRequest,
) -> Result<pb::AddProjectMemberResponse, Error> {
    let mut errors = InvalidInput::default();
    let project = errors.check(domain::parse_project(&r.parent, "parent"));
    let account = errors.check(domain::parse_account(&r.account, "account"));
    let role = errors.check(project_role(r.role, "role"));
    let invitation = errors.check(domain::parse_invitation_id(&r.invitation_id, "invitation_id"));
    let (((project, account), role), invitation) = finish(errors, project.zip(account).zip(role).zip(invitation))?;
    let member = keyring.add_project_member(&ctx, project, account, role, &invitation).await?;
    Ok(pb::AddProjectMemberResponse { member: Some(project_member_pb(member)) })
}

pub(super) async fn list_key_members(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::ListKeyMembersRequest,
) -> Result<pb::ListKeyMembersResponse, Error> {
    let key = domain::parse_key(&r.parent, "parent")?;
    let page = page(r.page_size, &r.page_token, &format!("{}/members", key.name()))?;
    let page = keyring.list_key_members(&ctx, key, page).await?;
    Ok(pb::ListKeyMembersResponse {
        members: page.items.into_iter().map(key_member_pb).collect(),
        next_page_token: page.next_page_token,
    })
}

pub(super) async fn update_key_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::UpdateKeyMemberRequest,
) -> Result<pb::UpdateKeyMemberResponse, Error> {
    let member = r.member.ok_or_else(|| InvalidInput::field("member", "is required"))?;
    let mut errors = InvalidInput::default();
    let name = errors.check(domain::parse_key_member(&member.name, "member.name"));
    let populated: &[&str] = if member.role == 0 { &[] } else { &["role"] };
    errors.check(update_paths(r.update_mask, &["role"], populated));
    let role = errors.check(shared_role(member.role, "member.role"));
    let ((key, account), role) = finish(errors, name.zip(role))?;
    let member = keyring.set_key_role(&ctx, key, account, role).await?;
    Ok(pb::UpdateKeyMemberResponse { member: Some(key_member_pb(member)) })
}

pub(super) async fn delete_key_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::DeleteKeyMemberRequest,
) -> Result<pb::DeleteKeyMemberResponse, Error> {
    let (key, account) = domain::parse_key_member(&r.name, "name")?;
    let invitation = Some(r.invitation_id.as_str()).filter(|id| !id.is_empty());
    keyring.remove_key_member(&ctx, key, account, invitation).await?;
    Ok(pb::DeleteKeyMemberResponse {})
}

pub(super) async fn add_key_member(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::AddKeyMemberRequest,
) -> Result<pb::AddKeyMemberResponse, Error> {
    let mut errors = InvalidInput::default();
    let key = errors.check(domain::parse_key(&r.parent, "parent"));
    let account = errors.check(domain::parse_account(&r.account, "account"));
    let role = errors.check(shared_role(r.role, "role"));
    let invitation = errors.check(domain::parse_invitation_id(&r.invitation_id, "invitation_id"));
    let (((key, account), role), invitation) = finish(errors, key.zip(account).zip(role).zip(invitation))?;
    let member = keyring.add_key_member(&ctx, key, account, role, &invitation).await?;
    Ok(pb::AddKeyMemberResponse { member: Some(key_member_pb(member)) })
}

pub(super) async fn end_organization_membership(
    keyring: &Keyring,
    ctx: Ctx,
    r: pb::EndOrganizationMembershipRequest,
) -> Result<pb::EndOrganizationMembershipResponse, Error> {
    let mut errors = InvalidInput::default();
    let member = errors.check(
        keyshare_runtime::resource::uuids(&r.name, &["organizations", "*", "members", "*"])
            .map(|ids| (ids[0], ids[1]))
            .ok_or_else(|| InvalidInput::field("name", "must look like organizations/{id}/members/{id}")),
    );
    let removed_at = match r.remove_time {
        Some(t) => errors.check(timestamp_domain(&t, "remove_time")),
        None => errors.check(Err(InvalidInput::field("remove_time", "is required"))),
    };
    let ((org, account), removed_at) = finish(errors, member.zip(removed_at))?;
    let (projects, keys) = keyring.end_org_membership(&ctx, org, account, removed_at).await?;
    Ok(pb::EndOrganizationMembershipResponse {
        project_memberships: i32::try_from(projects).unwrap_or(i32::MAX),
        key_memberships: i32::try_from(keys).unwrap_or(i32::MAX),
    })
}
