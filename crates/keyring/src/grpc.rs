//! The gRPC adapter: parse the request into domain input, call the use case, map the result.
//! The only module that knows protobuf types.

use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::Stream;
use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::auth;
use keyshare_runtime::error::{FieldViolation, InvalidInput, update_paths};
use keyshare_runtime::page::PageRequest;
use keyshare_runtime::wire::timestamp;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::app::{self, Ctx, EnvironmentChange, Keyring, ProjectChange};
use crate::domain::{
    self, Environment, InvitationSummary, Key, KeyEnvironment, KeyMember, KeyRole, Permissions, Project, ProjectLimits,
    ProjectMember, ProjectRole,
};
use crate::error::Error;
use crate::feed::{self, FeedEvent, FeedMessage};

/// Implements `keyshare.keyring.v1.KeyringService`.
pub struct KeyringGrpc {
    app: Arc<Keyring>,
    feed_wake: watch::Receiver<i64>,
    stopping: watch::Receiver<bool>,
}

impl KeyringGrpc {
    pub fn new(app: Arc<Keyring>, feed_wake: watch::Receiver<i64>, stopping: watch::Receiver<bool>) -> Self {
        Self { app, feed_wake, stopping }
    }
}

type Reply<T> = Result<Response<T>, Status>;

async fn handle<T>(name: &'static str, body: impl Future<Output = Result<T, Error>>) -> Reply<T> {
    body.instrument(tracing::info_span!("keyring", otel.name = name)).await.map(Response::new).map_err(Status::from)
}

fn ctx<T>(request: &Request<T>) -> Result<Ctx, Status> {
    let caller = auth::caller(request)?;
    let request_id =
        request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    Ok(Ctx { caller, request_id })
}

/// Collects parse results: `field!(errors, expr)` records a violation and yields `Option`.
fn finish<T>(errors: InvalidInput, value: Option<T>) -> Result<T, Error> {
    errors.finish()?;
    value.ok_or_else(|| Error::Internal("parsed input missing".into()))
}

fn page(size: i32, token: &str, scope: &str) -> Result<PageRequest, InvalidInput> {
    PageRequest::parse(size, token, scope)
}

#[tonic::async_trait]
impl pb::keyring_service_server::KeyringService for KeyringGrpc {
    async fn create_project(&self, request: Request<pb::CreateProjectRequest>) -> Reply<pb::CreateProjectResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.create_project", async {
            let mut errors = InvalidInput::default();
            let org = errors.check(domain::parse_org(&r.parent, "parent"));
            let project = r.project.unwrap_or_default();
            let name = errors.check(domain::project_name(&project.display_name, "project.display_name"));
            let sandbox = errors.check(limits(project.sandbox, "project.sandbox"));
            let production = errors.check(limits(project.production, "project.production"));
            let (org, name, sandbox, production) =
                finish(errors, org.zip(name).zip(sandbox).zip(production).map(|(((a, b), c), d)| (a, b, c, d)))?;
            let project = self.app.create_project(&ctx, org, name, sandbox, production).await?;
            Ok(pb::CreateProjectResponse { project: Some(project_pb(project)) })
        })
        .await
    }

    async fn get_project(&self, request: Request<pb::GetProjectRequest>) -> Reply<pb::GetProjectResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.get_project", async {
            let project = self.app.get_project(&ctx, domain::parse_project(&r.name, "name")?).await?;
            Ok(pb::GetProjectResponse { project: Some(project_pb(project)) })
        })
        .await
    }

    async fn list_projects(&self, request: Request<pb::ListProjectsRequest>) -> Reply<pb::ListProjectsResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.list_projects", async {
            let org = domain::parse_org(&r.parent, "parent")?;
            let page = page(r.page_size, &r.page_token, &format!("organizations/{org}/projects"))?;
            let page = self.app.list_projects(&ctx, org, page).await?;
            Ok(pb::ListProjectsResponse {
                projects: page.items.into_iter().map(project_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn update_project(&self, request: Request<pb::UpdateProjectRequest>) -> Reply<pb::UpdateProjectResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.update_project", async {
            let project = r.project.ok_or_else(|| InvalidInput::field("project", "is required"))?;
            let allowed = [
                "display_name",
                "sandbox",
                "production",
                "sandbox.rate_limit_per_second",
                "sandbox.monthly_quota",
                "production.rate_limit_per_second",
                "production.monthly_quota",
            ];
            let mut errors = InvalidInput::default();
            let id = errors.check(domain::parse_project(&project.name, "project.name"));
            let limits = |env: &str, l: &Option<pb::ProjectEnvironmentLimits>| {
                let l = l.unwrap_or_default();
                [
                    (l.rate_limit_per_second != 0).then(|| format!("{env}.rate_limit_per_second")),
                    (l.monthly_quota != 0).then(|| format!("{env}.monthly_quota")),
                ]
            };
            let mut populated: Vec<String> = limits("sandbox", &project.sandbox)
                .into_iter()
                .chain(limits("production", &project.production))
                .flatten()
                .collect();
            if !project.display_name.is_empty() {
                populated.push("display_name".into());
            }
            let populated: Vec<&str> = populated.iter().map(String::as_str).collect();
            let paths = errors.check(update_paths(r.update_mask, &allowed, &populated)).unwrap_or_default();
            let has = |path: &str| paths.iter().any(|p| p == path || path.starts_with(&format!("{p}.")));
            let mut change = ProjectChange::default();
            if has("display_name") {
                change.display_name = errors.check(domain::project_name(&project.display_name, "project.display_name"));
            }
            for (env, limits) in [("sandbox", project.sandbox), ("production", project.production)] {
                let limits = limits.unwrap_or_default();
                let rate_path = format!("{env}.rate_limit_per_second");
                let quota_path = format!("{env}.monthly_quota");
                let rate = has(&rate_path)
                    .then(|| errors.check(domain::limit(limits.rate_limit_per_second, &format!("project.{rate_path}"))))
                    .flatten();
                let quota = has(&quota_path)
                    .then(|| errors.check(domain::limit(limits.monthly_quota, &format!("project.{quota_path}"))))
                    .flatten();
                if env == "sandbox" {
                    (change.sandbox_rate_limit, change.sandbox_monthly_quota) = (rate, quota);
                } else {
                    (change.production_rate_limit, change.production_monthly_quota) = (rate, quota);
                }
            }
            let id = finish(errors, id)?;
            let project = self.app.update_project(&ctx, id, change).await?;
            Ok(pb::UpdateProjectResponse { project: Some(project_pb(project)) })
        })
        .await
    }

    async fn delete_project(&self, request: Request<pb::DeleteProjectRequest>) -> Reply<pb::DeleteProjectResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.delete_project", async {
            self.app.delete_project(&ctx, domain::parse_project(&r.name, "name")?, r.force).await?;
            Ok(pb::DeleteProjectResponse {})
        })
        .await
    }

    async fn list_project_members(
        &self,
        request: Request<pb::ListProjectMembersRequest>,
    ) -> Reply<pb::ListProjectMembersResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.list_project_members", async {
            let project = domain::parse_project(&r.parent, "parent")?;
            let page = page(r.page_size, &r.page_token, &format!("projects/{project}/members"))?;
            let page = self.app.list_project_members(&ctx, project, page).await?;
            Ok(pb::ListProjectMembersResponse {
                members: page.items.into_iter().map(project_member_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn update_project_member(
        &self,
        request: Request<pb::UpdateProjectMemberRequest>,
    ) -> Reply<pb::UpdateProjectMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.update_project_member", async {
            let member = r.member.ok_or_else(|| InvalidInput::field("member", "is required"))?;
            let mut errors = InvalidInput::default();
            let name = errors.check(domain::parse_project_member(&member.name, "member.name"));
            let populated: &[&str] = if member.role == 0 { &[] } else { &["role"] };
            errors.check(update_paths(r.update_mask, &["role"], populated));
            let role = errors.check(project_role(member.role, "member.role"));
            let ((project, account), role) = finish(errors, name.zip(role))?;
            let member = self.app.set_project_role(&ctx, project, account, role).await?;
            Ok(pb::UpdateProjectMemberResponse { member: Some(project_member_pb(member)) })
        })
        .await
    }

    async fn delete_project_member(
        &self,
        request: Request<pb::DeleteProjectMemberRequest>,
    ) -> Reply<pb::DeleteProjectMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.delete_project_member", async {
            let (project, account) = domain::parse_project_member(&r.name, "name")?;
            let invitation = Some(r.invitation_id.as_str()).filter(|id| !id.is_empty());
            self.app.remove_project_member(&ctx, project, account, invitation).await?;
            Ok(pb::DeleteProjectMemberResponse {})
        })
        .await
    }

    async fn create_project_member(
        &self,
        request: Request<pb::CreateProjectMemberRequest>,
    ) -> Reply<pb::CreateProjectMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.create_project_member", async {
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
            let member = self.app.create_project_member(&ctx, project, service_account, role).await?;
            Ok(pb::CreateProjectMemberResponse { member: Some(project_member_pb(member)) })
        })
        .await
    }

    async fn add_project_member(
        &self,
        request: Request<pb::AddProjectMemberRequest>,
    ) -> Reply<pb::AddProjectMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.add_project_member", async {
            let mut errors = InvalidInput::default();
            let project = errors.check(domain::parse_project(&r.parent, "parent"));
            let account = errors.check(domain::parse_account(&r.account, "account"));
            let role = errors.check(project_role(r.role, "role"));
            let invitation = errors.check(domain::parse_invitation_id(&r.invitation_id, "invitation_id"));
            let (((project, account), role), invitation) =
                finish(errors, project.zip(account).zip(role).zip(invitation))?;
            let member = self.app.add_project_member(&ctx, project, account, role, &invitation).await?;
            Ok(pb::AddProjectMemberResponse { member: Some(project_member_pb(member)) })
        })
        .await
    }

    async fn create_key(&self, request: Request<pb::CreateKeyRequest>) -> Reply<pb::CreateKeyResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.create_key", async {
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
            let created = self.app.create_key(&ctx, project, name, description, permissions, request_id).await?;
            Ok(pb::CreateKeyResponse {
                key: Some(key_pb(created.key)),
                sandbox_credential: created.sandbox,
                production_credential: created.production,
            })
        })
        .await
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Reply<pb::GetKeyResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.get_key", async {
            let key = self.app.get_key(&ctx, domain::parse_key(&r.name, "name")?).await?;
            Ok(pb::GetKeyResponse { key: Some(key_pb(key)) })
        })
        .await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Reply<pb::ListKeysResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.list_keys", async {
            let project = domain::parse_project(&r.parent, "parent")?;
            let page = page(r.page_size, &r.page_token, &format!("projects/{project}/keys"))?;
            let page = self.app.list_keys(&ctx, project, page).await?;
            Ok(pb::ListKeysResponse {
                keys: page.items.into_iter().map(key_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn update_key(&self, request: Request<pb::UpdateKeyRequest>) -> Reply<pb::UpdateKeyResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.update_key", async {
            let key = r.key.ok_or_else(|| InvalidInput::field("key", "is required"))?;
            let mut errors = InvalidInput::default();
            let name = errors.check(domain::parse_key(&key.name, "key.name"));
            let populated = [("display_name", &key.display_name), ("description", &key.description)]
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(path, _)| path)
                .collect::<Vec<_>>();
            let paths = errors
                .check(update_paths(r.update_mask, &["display_name", "description"], &populated))
                .unwrap_or_default();
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
            let key = self.app.update_key(&ctx, name, display_name, description, etag).await.map_err(|e| match e {
                Error::EtagMismatch { .. } => Error::EtagMismatch { field: "key.etag" },
                other => other,
            })?;
            Ok(pb::UpdateKeyResponse { key: Some(key_pb(key)) })
        })
        .await
    }

    async fn update_key_environment(
        &self,
        request: Request<pb::UpdateKeyEnvironmentRequest>,
    ) -> Reply<pb::UpdateKeyEnvironmentResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.update_key_environment", async {
            let env = r.environment.ok_or_else(|| InvalidInput::field("environment", "is required"))?;
            let allowed =
                ["active", "permissions", "rate_limit_per_second", "daily_quota", "ip_allowlist", "expire_time"];
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
                change.rate_limit =
                    errors.check(domain::limit(env.rate_limit_per_second, "environment.rate_limit_per_second"));
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
            let key = self.app.update_environment(&ctx, key, environment, change, etag).await?;
            Ok(pb::UpdateKeyEnvironmentResponse { key: Some(key_pb(key)) })
        })
        .await
    }

    async fn reveal_credential(
        &self,
        request: Request<pb::RevealCredentialRequest>,
    ) -> Reply<pb::RevealCredentialResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.reveal_credential", async {
            let (key, environment) = domain::parse_key_environment(&r.name, "name")?;
            let credential = self.app.reveal(&ctx, key, environment).await?;
            Ok(pb::RevealCredentialResponse { credential })
        })
        .await
    }

    async fn regenerate_credential(
        &self,
        request: Request<pb::RegenerateCredentialRequest>,
    ) -> Reply<pb::RegenerateCredentialResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.regenerate_credential", async {
            let mut errors = InvalidInput::default();
            let name = errors.check(domain::parse_key_environment(&r.name, "name"));
            let grace = errors.check(grace_period(r.grace_period));
            let ((key, environment), grace) = finish(errors, name.zip(grace))?;
            let (credential, key) = self.app.regenerate(&ctx, key, environment, grace).await?;
            Ok(pb::RegenerateCredentialResponse { credential, key: Some(key_pb(key)) })
        })
        .await
    }

    async fn delete_key(&self, request: Request<pb::DeleteKeyRequest>) -> Reply<pb::DeleteKeyResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.delete_key", async {
            let mut errors = InvalidInput::default();
            let key = errors.check(domain::parse_key(&r.name, "name"));
            let etag = errors.check(app::parse_etag(&r.etag)).flatten();
            let key = finish(errors, key)?;
            self.app.delete_key(&ctx, key, etag).await?;
            Ok(pb::DeleteKeyResponse {})
        })
        .await
    }

    async fn list_key_members(&self, request: Request<pb::ListKeyMembersRequest>) -> Reply<pb::ListKeyMembersResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.list_key_members", async {
            let key = domain::parse_key(&r.parent, "parent")?;
            let page = page(r.page_size, &r.page_token, &format!("{}/members", key.name()))?;
            let page = self.app.list_key_members(&ctx, key, page).await?;
            Ok(pb::ListKeyMembersResponse {
                members: page.items.into_iter().map(key_member_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn update_key_member(
        &self,
        request: Request<pb::UpdateKeyMemberRequest>,
    ) -> Reply<pb::UpdateKeyMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.update_key_member", async {
            let member = r.member.ok_or_else(|| InvalidInput::field("member", "is required"))?;
            let mut errors = InvalidInput::default();
            let name = errors.check(domain::parse_key_member(&member.name, "member.name"));
            let populated: &[&str] = if member.role == 0 { &[] } else { &["role"] };
            errors.check(update_paths(r.update_mask, &["role"], populated));
            let role = errors.check(shared_role(member.role, "member.role"));
            let ((key, account), role) = finish(errors, name.zip(role))?;
            let member = self.app.set_key_role(&ctx, key, account, role).await?;
            Ok(pb::UpdateKeyMemberResponse { member: Some(key_member_pb(member)) })
        })
        .await
    }

    async fn delete_key_member(
        &self,
        request: Request<pb::DeleteKeyMemberRequest>,
    ) -> Reply<pb::DeleteKeyMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.delete_key_member", async {
            let (key, account) = domain::parse_key_member(&r.name, "name")?;
            let invitation = Some(r.invitation_id.as_str()).filter(|id| !id.is_empty());
            self.app.remove_key_member(&ctx, key, account, invitation).await?;
            Ok(pb::DeleteKeyMemberResponse {})
        })
        .await
    }

    async fn add_key_member(&self, request: Request<pb::AddKeyMemberRequest>) -> Reply<pb::AddKeyMemberResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.add_key_member", async {
            let mut errors = InvalidInput::default();
            let key = errors.check(domain::parse_key(&r.parent, "parent"));
            let account = errors.check(domain::parse_account(&r.account, "account"));
            let role = errors.check(shared_role(r.role, "role"));
            let invitation = errors.check(domain::parse_invitation_id(&r.invitation_id, "invitation_id"));
            let (((key, account), role), invitation) = finish(errors, key.zip(account).zip(role).zip(invitation))?;
            let member = self.app.add_key_member(&ctx, key, account, role, &invitation).await?;
            Ok(pb::AddKeyMemberResponse { member: Some(key_member_pb(member)) })
        })
        .await
    }

    async fn list_shared_keys(&self, request: Request<pb::ListSharedKeysRequest>) -> Reply<pb::ListSharedKeysResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.list_shared_keys", async {
            let account = ctx.caller.account_id().unwrap_or_default();
            let page = page(r.page_size, &r.page_token, &format!("sharedKeys:{account}"))?;
            let page = self.app.shared_keys(&ctx, page).await?;
            Ok(pb::ListSharedKeysResponse {
                keys: page
                    .items
                    .into_iter()
                    .map(|(key, role)| pb::SharedKey { key: Some(key_pb(key)), role: key_role_pb(role) })
                    .collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Reply<pb::ListAuditEventsResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.list_audit_events", async {
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
            let page = self.app.audit_events(&ctx, project, key, page).await?;
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
        })
        .await
    }

    async fn test_permissions(
        &self,
        request: Request<pb::TestPermissionsRequest>,
    ) -> Reply<pb::TestPermissionsResponse> {
        let ctx = ctx(&request)?;
        let r = request.into_inner();
        handle("keyring.test_permissions", async {
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
                    None => {
                        errors.0.push(FieldViolation::new(format!("permissions[{index}]"), "is not a known permission"))
                    }
                }
            }
            let on_behalf_of =
                (!r.account.is_empty()).then(|| errors.check(domain::parse_account(&r.account, "account"))).flatten();
            errors.finish()?;
            let held = self.app.test_permissions(&ctx, project, key, &permissions, on_behalf_of).await?;
            Ok(pb::TestPermissionsResponse { permissions: held.into_iter().map(|p| p.as_str().to_owned()).collect() })
        })
        .await
    }

    type WatchKeysStream = Pin<Box<dyn Stream<Item = Result<pb::WatchKeysResponse, Status>> + Send>>;

    async fn watch_keys(&self, request: Request<pb::WatchKeysRequest>) -> Reply<Self::WatchKeysStream> {
        let ctx = ctx(&request)?;
        if !ctx.caller.has_scope(auth::Scope::KeysWatch) {
            return Err(Error::PermissionDenied(auth::Scope::KeysWatch.denial()).into());
        }
        let after = request.into_inner().after_sequence;
        if after < 0 {
            return Err(Error::from(InvalidInput::field("after_sequence", "must not be negative")).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let app = self.app.clone();
        let clock_app = self.app.clone();
        tokio::spawn(feed::stream(
            app.pool().clone(),
            self.feed_wake.clone(),
            self.stopping.clone(),
            after,
            move || clock_app.now(),
            tx,
        ));
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|message| match message {
            Ok(message) => Ok(feed_pb(message)),
            Err(e) => Err(Status::from(Error::from(e))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn end_organization_membership(
        &self,
        request: Request<pb::EndOrganizationMembershipRequest>,
    ) -> Reply<pb::EndOrganizationMembershipResponse> {
        let ctx = ctx(&request)?;
        // Who may ask comes before what is asked (AIP-211).
        ctx.require(auth::Scope::MembershipsEnd)?;
        let r = request.into_inner();
        handle("keyring.end_organization_membership", async {
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
            let (projects, keys) = self.app.end_org_membership(&ctx, org, account, removed_at).await?;
            Ok(pb::EndOrganizationMembershipResponse {
                project_memberships: i32::try_from(projects).unwrap_or(i32::MAX),
                key_memberships: i32::try_from(keys).unwrap_or(i32::MAX),
            })
        })
        .await
    }
}

use futures::StreamExt as _;

fn limits(limits: Option<pb::ProjectEnvironmentLimits>, field: &str) -> Result<ProjectLimits, InvalidInput> {
    let limits = limits.unwrap_or_default();
    let mut errors = InvalidInput::default();
    let rate = errors.check(domain::limit(limits.rate_limit_per_second, &format!("{field}.rate_limit_per_second")));
    let quota = errors.check(domain::limit(limits.monthly_quota, &format!("{field}.monthly_quota")));
    errors.finish()?;
    Ok(ProjectLimits { rate_limit: rate.unwrap_or_default(), monthly_quota: quota.unwrap_or_default() })
}

fn grace_period(grace: Option<prost_types::Duration>) -> Result<chrono::Duration, InvalidInput> {
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

fn project_role(value: i32, field: &str) -> Result<ProjectRole, InvalidInput> {
    match pb::ProjectRole::try_from(value) {
        Ok(pb::ProjectRole::Owner) => Ok(ProjectRole::Owner),
        Ok(pb::ProjectRole::Member) => Ok(ProjectRole::Member),
        _ => Err(InvalidInput::field(field, "must be PROJECT_ROLE_OWNER or PROJECT_ROLE_MEMBER")),
    }
}

/// A role that can be given to a key member: never owner (ownership never changes).
fn shared_role(value: i32, field: &str) -> Result<KeyRole, InvalidInput> {
    match pb::KeyRole::try_from(value) {
        Ok(pb::KeyRole::Admin) => Ok(KeyRole::Admin),
        Ok(pb::KeyRole::Contributor) => Ok(KeyRole::Contributor),
        _ => Err(InvalidInput::field(field, "must be KEY_ROLE_ADMIN or KEY_ROLE_CONTRIBUTOR")),
    }
}

fn permissions_domain(p: pb::Permissions) -> Permissions {
    Permissions { create: p.create, read: p.read, update: p.update, delete: p.delete }
}

fn permissions_pb(p: Permissions) -> pb::Permissions {
    pb::Permissions { create: p.create, read: p.read, update: p.update, delete: p.delete }
}

/// A timestamp a caller sent: out of range (or with nanos outside 0..1e9) is bad input, never
/// taken as "no time".
fn timestamp_domain(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, InvalidInput> {
    u32::try_from(t.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
        .filter(|at| at.timestamp() >= 0 && at.timestamp() < 253_402_300_800)
        .ok_or_else(|| InvalidInput::field(field, "must be a time between 1970-01-01 and 9999-12-31"))
}

fn environment_pb(env: Environment) -> i32 {
    match env {
        Environment::Sandbox => pb::Environment::Sandbox as i32,
        Environment::Production => pb::Environment::Production as i32,
    }
}

fn project_role_pb(role: ProjectRole) -> i32 {
    match role {
        ProjectRole::Owner => pb::ProjectRole::Owner as i32,
        ProjectRole::Member => pb::ProjectRole::Member as i32,
    }
}

fn key_role_pb(role: KeyRole) -> i32 {
    match role {
        KeyRole::Owner => pb::KeyRole::Owner as i32,
        KeyRole::Admin => pb::KeyRole::Admin as i32,
        KeyRole::Contributor => pb::KeyRole::Contributor as i32,
    }
}

fn limits_pb(l: ProjectLimits) -> pb::ProjectEnvironmentLimits {
    pb::ProjectEnvironmentLimits { rate_limit_per_second: l.rate_limit, monthly_quota: l.monthly_quota }
}

fn project_pb(p: Project) -> pb::Project {
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

fn project_member_pb(m: ProjectMember) -> pb::ProjectMember {
    pb::ProjectMember {
        name: format!("projects/{}/members/{}", m.project_id, m.account_id),
        account: domain::member_name(m.account_id, m.service_account_org),
        role: project_role_pb(m.role),
        create_time: Some(timestamp(m.created_at)),
    }
}

fn key_member_pb(m: KeyMember) -> pb::KeyMember {
    pb::KeyMember {
        name: format!("{}/members/{}", m.key.name(), m.account_id),
        account: domain::member_name(m.account_id, m.service_account_org),
        role: key_role_pb(m.role),
        create_time: Some(timestamp(m.created_at)),
    }
}

fn key_environment_pb(key_name: &str, e: KeyEnvironment) -> pb::KeyEnvironment {
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
        environment: environment_pb(e.environment),
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

fn key_pb(k: Key) -> pb::Key {
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

fn feed_pb(message: FeedMessage) -> pb::WatchKeysResponse {
    use pb::watch_keys_response::Event;
    let (sequence, event) = match message {
        FeedMessage::SnapshotStart { sequence } => (sequence, Event::SnapshotStart(pb::SnapshotStart {})),
        FeedMessage::SnapshotEnd { sequence } => (sequence, Event::SnapshotEnd(pb::SnapshotEnd {})),
        FeedMessage::Event { sequence, event } => (
            sequence,
            match event {
                FeedEvent::KeyUpserted(state) => Event::KeyUpserted(pb::KeyState {
                    key: format!("projects/{}/keys/{}", state.project, state.key),
                    project: format!("projects/{}", state.project),
                    credentials: state
                        .credentials
                        .into_iter()
                        .map(|c| pb::CredentialState {
                            sha256: unhex(&c.sha256),
                            environment: Environment::parse(&c.environment).map_or(0, environment_pb),
                            active: c.active,
                            permissions: Some(permissions_pb(c.permissions)),
                            rate_limit_per_second: c.rate_limit,
                            daily_quota: c.daily_quota,
                            ip_allowlist: c.ip_allowlist,
                            expire_time: c.expire_at.map(timestamp),
                            grace_end_time: c.grace_end.map(timestamp),
                        })
                        .collect(),
                }),
                FeedEvent::KeyRemoved { project, key } => Event::KeyRemoved(format!("projects/{project}/keys/{key}")),
                FeedEvent::ProjectUpserted(state) => Event::ProjectUpserted(pb::ProjectState {
                    project: format!("projects/{}", state.project),
                    sandbox: Some(limits_pb(state.sandbox)),
                    production: Some(limits_pb(state.production)),
                }),
                FeedEvent::ProjectRemoved { project } => Event::ProjectRemoved(format!("projects/{project}")),
            },
        ),
    };
    pb::WatchKeysResponse { sequence, event: Some(event) }
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).filter_map(|i| u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()).collect()
}
