//! The gRPC adapter: parse the request into domain input, call the use case, map the result.
//! The only module that knows protobuf types.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use keyshare_proto::identity::v1 as pb;
use keyshare_runtime::auth::{self, Caller};
use keyshare_runtime::error::{InvalidInput, Reply, update_paths};
use keyshare_runtime::page::PageRequest;
use keyshare_runtime::wire::timestamp;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::app::{self, Identity};
use crate::domain::{
    self, Account, DisplayName, Email, Member, NewPassword, OrgRole, Organization, ServiceAccount, TokenGrant,
};
use crate::error::Error;
use crate::revocations::{RevocationMessage, Revocations};

/// Implements `keyshare.identity.v1.IdentityService`.
pub struct IdentityGrpc {
    app: Arc<Identity>,
    /// Whether the client address comes from `x-forwarded-for` (behind a trusted proxy).
    trust_forwarded_for: bool,
    revocations: Revocations,
}

impl IdentityGrpc {
    pub fn new(app: Arc<Identity>, trust_forwarded_for: bool, revocations: Revocations) -> Self {
        Self { app, trust_forwarded_for, revocations }
    }

    /// Where the call comes from, for per-address throttling: the peer, or the last
    /// `x-forwarded-for` entry (the one the trusted proxy appended) when so configured.
    fn client_address<T>(&self, request: &Request<T>) -> String {
        let forwarded = self
            .trust_forwarded_for
            .then(|| request.metadata().get("x-forwarded-for").and_then(|v| v.to_str().ok()))
            .flatten()
            .and_then(|list| list.rsplit(',').next())
            .and_then(|last| last.trim().parse::<std::net::IpAddr>().ok());
        match forwarded.or_else(|| request.remote_addr().map(|addr| addr.ip())) {
            Some(ip) => ip.to_string(),
            None => "unknown".to_owned(),
        }
    }
}

/// [`keyshare_runtime::error::handle`] for this service's errors.
async fn handle<T>(name: &'static str, body: impl std::future::Future<Output = Result<T, Error>>) -> Reply<T> {
    keyshare_runtime::error::handle(name, body).await
}

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    auth::caller(request)
}

#[tonic::async_trait]
impl pb::identity_service_server::IdentityService for IdentityGrpc {
    async fn create_account(&self, request: Request<pb::CreateAccountRequest>) -> Reply<pb::CreateAccountResponse> {
        let r = request.into_inner();
        handle("identity.create_account", async {
            let mut errors = InvalidInput::default();
            let email = errors.check(Email::parse(&r.email, "email"));
            let name = errors.check(DisplayName::parse(&r.display_name, "display_name"));
            let password = errors.check(NewPassword::parse(&r.password, "password"));
            errors.finish()?;
            let (Some(email), Some(name), Some(password)) = (email, name, password) else { unreachable!() };
            let account = self.app.sign_up(email, name, password).await?;
            Ok(pb::CreateAccountResponse { account: Some(account_pb(account)) })
        })
        .await
    }

    async fn verify_email(&self, request: Request<pb::VerifyEmailRequest>) -> Reply<pb::VerifyEmailResponse> {
        let r = request.into_inner();
        handle("identity.verify_email", async {
            let token = required(&r.token, "token")?;
            let account = self.app.verify_email(token).await?;
            Ok(pb::VerifyEmailResponse { account: Some(account_pb(account)) })
        })
        .await
    }

    async fn resend_verification_email(
        &self,
        request: Request<pb::ResendVerificationEmailRequest>,
    ) -> Reply<pb::ResendVerificationEmailResponse> {
        let r = request.into_inner();
        handle("identity.resend_verification_email", async {
            self.app.resend_verification(Email::parse(&r.email, "email")?).await?;
            Ok(pb::ResendVerificationEmailResponse {})
        })
        .await
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Reply<pb::LoginResponse> {
        let client_address = self.client_address(&request);
        let r = request.into_inner();
        handle("identity.login", async {
            let mut errors = InvalidInput::default();
            let email = errors.check(Email::parse(&r.email, "email"));
            errors.check(required(&r.password, "password").map_err(only_input));
            errors.finish()?;
            let Some(email) = email else { unreachable!() };
            let (grant, account) = self.app.login(email, r.password, &client_address).await?;
            Ok(pb::LoginResponse { grant: Some(grant_pb(grant)), account: Some(account_pb(account)) })
        })
        .await
    }

    async fn refresh_token(&self, request: Request<pb::RefreshTokenRequest>) -> Reply<pb::RefreshTokenResponse> {
        let r = request.into_inner();
        handle("identity.refresh_token", async {
            let grant = self.app.refresh(required(&r.refresh_token, "refresh_token")?).await?;
            Ok(pb::RefreshTokenResponse { grant: Some(grant_pb(grant)) })
        })
        .await
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Reply<pb::LogoutResponse> {
        let r = request.into_inner();
        handle("identity.logout", async {
            self.app.logout(required(&r.refresh_token, "refresh_token")?).await?;
            Ok(pb::LogoutResponse {})
        })
        .await
    }

    async fn get_account(&self, request: Request<pb::GetAccountRequest>) -> Reply<pb::GetAccountResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.get_account", async {
            let id = account_name(&r.name, "name")?;
            let account = self.app.get_account(&caller, id).await?;
            Ok(pb::GetAccountResponse { account: Some(account_pb(account)) })
        })
        .await
    }

    async fn update_account(&self, request: Request<pb::UpdateAccountRequest>) -> Reply<pb::UpdateAccountResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.update_account", async {
            let account = r.account.ok_or_else(|| InvalidInput::field("account", "is required"))?;
            let id = account_name(&account.name, "account.name")?;
            let populated: &[&str] = if account.display_name.is_empty() { &[] } else { &["display_name"] };
            let paths = update_paths(r.update_mask, &["display_name"], populated)?;
            let display_name = if paths.iter().any(|p| p == "display_name") {
                Some(DisplayName::parse(&account.display_name, "account.display_name")?)
            } else {
                None
            };
            let account = self.app.update_account(&caller, id, display_name).await?;
            Ok(pb::UpdateAccountResponse { account: Some(account_pb(account)) })
        })
        .await
    }

    async fn change_password(&self, request: Request<pb::ChangePasswordRequest>) -> Reply<pb::ChangePasswordResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.change_password", async {
            let mut errors = InvalidInput::default();
            errors.check(required(&r.current_password, "current_password").map_err(only_input));
            let new = errors.check(NewPassword::parse(&r.new_password, "new_password"));
            errors.finish()?;
            let Some(new) = new else { unreachable!() };
            let revoked = self.app.change_password(&caller, r.current_password, new).await?;
            Ok(pb::ChangePasswordResponse { revoked_sessions: i32::try_from(revoked).unwrap_or(i32::MAX) })
        })
        .await
    }

    async fn request_password_reset(
        &self,
        request: Request<pb::RequestPasswordResetRequest>,
    ) -> Reply<pb::RequestPasswordResetResponse> {
        let r = request.into_inner();
        handle("identity.request_password_reset", async {
            self.app.request_password_reset(Email::parse(&r.email, "email")?).await?;
            Ok(pb::RequestPasswordResetResponse {})
        })
        .await
    }

    async fn reset_password(&self, request: Request<pb::ResetPasswordRequest>) -> Reply<pb::ResetPasswordResponse> {
        let r = request.into_inner();
        handle("identity.reset_password", async {
            let mut errors = InvalidInput::default();
            errors.check(required(&r.token, "token").map_err(only_input));
            let new = errors.check(NewPassword::parse(&r.new_password, "new_password"));
            errors.finish()?;
            let Some(new) = new else { unreachable!() };
            let (account, revoked) = self.app.reset_password(&r.token, new).await?;
            Ok(pb::ResetPasswordResponse {
                account: Some(account_pb(account)),
                revoked_sessions: i32::try_from(revoked).unwrap_or(i32::MAX),
            })
        })
        .await
    }

    async fn create_organization(
        &self,
        request: Request<pb::CreateOrganizationRequest>,
    ) -> Reply<pb::CreateOrganizationResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.create_organization", async {
            let org = r.organization.ok_or_else(|| InvalidInput::field("organization", "is required"))?;
            let name = DisplayName::parse(&org.display_name, "organization.display_name")?;
            let org = self.app.create_organization(&caller, name).await?;
            Ok(pb::CreateOrganizationResponse { organization: Some(organization_pb(org)) })
        })
        .await
    }

    async fn get_organization(
        &self,
        request: Request<pb::GetOrganizationRequest>,
    ) -> Reply<pb::GetOrganizationResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.get_organization", async {
            let org = domain::parse_name(&r.name, "organizations", "name")?;
            let org = self.app.get_organization(&caller, org).await?;
            Ok(pb::GetOrganizationResponse { organization: Some(organization_pb(org)) })
        })
        .await
    }

    async fn list_organizations(
        &self,
        request: Request<pb::ListOrganizationsRequest>,
    ) -> Reply<pb::ListOrganizationsResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.list_organizations", async {
            let scope = format!("organizations:{}", caller.account_id().unwrap_or_default());
            let page = PageRequest::parse(r.page_size, &r.page_token, &scope)?;
            let page = self.app.list_organizations(&caller, page).await?;
            Ok(pb::ListOrganizationsResponse {
                organizations: page.items.into_iter().map(organization_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn list_organization_members(
        &self,
        request: Request<pb::ListOrganizationMembersRequest>,
    ) -> Reply<pb::ListOrganizationMembersResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.list_organization_members", async {
            let mut errors = InvalidInput::default();
            let org = errors.check(domain::parse_name(&r.parent, "organizations", "parent"));
            let page = org.and_then(|org| {
                errors.check(PageRequest::parse(r.page_size, &r.page_token, &format!("organizations/{org}/members")))
            });
            if org.is_none() {
                errors.check(PageRequest::parse(r.page_size, "", ""));
            }
            errors.finish()?;
            let (Some(org), Some(page)) = (org, page) else { unreachable!() };
            let page = self.app.list_members(&caller, org, page).await?;
            Ok(pb::ListOrganizationMembersResponse {
                members: page.items.into_iter().map(member_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn get_organization_member(
        &self,
        request: Request<pb::GetOrganizationMemberRequest>,
    ) -> Reply<pb::GetOrganizationMemberResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.get_organization_member", async {
            let (org, account) = domain::parse_child_name(&r.name, "members", "name")?;
            let member = self.app.get_member(&caller, org, account).await?;
            Ok(pb::GetOrganizationMemberResponse { member: Some(member_pb(member)) })
        })
        .await
    }

    async fn update_organization_member(
        &self,
        request: Request<pb::UpdateOrganizationMemberRequest>,
    ) -> Reply<pb::UpdateOrganizationMemberResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.update_organization_member", async {
            let member = r.member.ok_or_else(|| InvalidInput::field("member", "is required"))?;
            let mut errors = InvalidInput::default();
            let name = errors.check(domain::parse_child_name(&member.name, "members", "member.name"));
            let populated: &[&str] = if member.role == 0 { &[] } else { &["role"] };
            let paths = errors.check(update_paths(r.update_mask, &["role"], populated));
            let role = errors.check(org_role(member.role, "member.role"));
            errors.finish()?;
            let (Some((org, account)), Some(_), Some(role)) = (name, paths, role) else { unreachable!() };
            let member = self.app.set_member_role(&caller, org, account, role).await?;
            Ok(pb::UpdateOrganizationMemberResponse { member: Some(member_pb(member)) })
        })
        .await
    }

    async fn delete_organization_member(
        &self,
        request: Request<pb::DeleteOrganizationMemberRequest>,
    ) -> Reply<pb::DeleteOrganizationMemberResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.delete_organization_member", async {
            let (org, account) = domain::parse_child_name(&r.name, "members", "name")?;
            let invitation = Some(r.invitation_id.as_str()).filter(|id| !id.is_empty());
            self.app.remove_member(&caller, org, account, invitation).await?;
            Ok(pb::DeleteOrganizationMemberResponse {})
        })
        .await
    }

    async fn add_organization_member(
        &self,
        request: Request<pb::AddOrganizationMemberRequest>,
    ) -> Reply<pb::AddOrganizationMemberResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.add_organization_member", async {
            let mut errors = InvalidInput::default();
            let org = errors.check(domain::parse_name(&r.parent, "organizations", "parent"));
            let account = errors.check(domain::parse_name(&r.account, "accounts", "account"));
            let role = errors.check(org_role(r.role, "role"));
            errors.check(required(&r.invitation_id, "invitation_id").map_err(only_input));
            if r.invitation_id.len() > 200 {
                errors.0.push(keyshare_runtime::error::FieldViolation::new(
                    "invitation_id",
                    "must be at most 200 characters",
                ));
            }
            errors.finish()?;
            let (Some(org), Some(account), Some(role)) = (org, account, role) else { unreachable!() };
            let member = self.app.add_member(&caller, org, account, role, &r.invitation_id).await?;
            Ok(pb::AddOrganizationMemberResponse { member: Some(member_pb(member)) })
        })
        .await
    }

    async fn create_service_account(
        &self,
        request: Request<pb::CreateServiceAccountRequest>,
    ) -> Reply<pb::CreateServiceAccountResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.create_service_account", async {
            let mut errors = InvalidInput::default();
            let org = errors.check(domain::parse_name(&r.parent, "organizations", "parent"));
            let display = r.service_account.map(|s| s.display_name).unwrap_or_default();
            let name = errors.check(DisplayName::parse(&display, "service_account.display_name"));
            errors.finish()?;
            let (Some(org), Some(name)) = (org, name) else { unreachable!() };
            let (account, secret) = self.app.create_service_account(&caller, org, name).await?;
            Ok(pb::CreateServiceAccountResponse {
                service_account: Some(service_account_pb(account)),
                client_secret: secret,
            })
        })
        .await
    }

    async fn list_service_accounts(
        &self,
        request: Request<pb::ListServiceAccountsRequest>,
    ) -> Reply<pb::ListServiceAccountsResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.list_service_accounts", async {
            let org = domain::parse_name(&r.parent, "organizations", "parent")?;
            let page = PageRequest::parse(r.page_size, &r.page_token, &format!("organizations/{org}/serviceAccounts"))?;
            let page = self.app.list_service_accounts(&caller, org, page).await?;
            Ok(pb::ListServiceAccountsResponse {
                service_accounts: page.items.into_iter().map(service_account_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }

    async fn get_service_account(
        &self,
        request: Request<pb::GetServiceAccountRequest>,
    ) -> Reply<pb::GetServiceAccountResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.get_service_account", async {
            let (org, id) = domain::parse_child_name(&r.name, "serviceAccounts", "name")?;
            let account = self.app.get_service_account(&caller, org, id).await?;
            Ok(pb::GetServiceAccountResponse { service_account: Some(service_account_pb(account)) })
        })
        .await
    }

    async fn delete_service_account(
        &self,
        request: Request<pb::DeleteServiceAccountRequest>,
    ) -> Reply<pb::DeleteServiceAccountResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.delete_service_account", async {
            let (org, id) = domain::parse_child_name(&r.name, "serviceAccounts", "name")?;
            self.app.delete_service_account(&caller, org, id).await?;
            Ok(pb::DeleteServiceAccountResponse {})
        })
        .await
    }

    async fn issue_service_account_token(
        &self,
        request: Request<pb::IssueServiceAccountTokenRequest>,
    ) -> Reply<pb::IssueServiceAccountTokenResponse> {
        let r = request.into_inner();
        handle("identity.issue_service_account_token", async {
            let mut errors = InvalidInput::default();
            errors.check(required(&r.client_id, "client_id").map_err(only_input));
            errors.check(required(&r.client_secret, "client_secret").map_err(only_input));
            errors.finish()?;
            let grant = self.app.issue_service_account_token(&r.client_id, &r.client_secret).await?;
            Ok(pb::IssueServiceAccountTokenResponse { grant: Some(grant_pb(grant)) })
        })
        .await
    }

    async fn lookup_account(&self, request: Request<pb::LookupAccountRequest>) -> Reply<pb::LookupAccountResponse> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        handle("identity.lookup_account", async {
            let account = self.app.lookup_account(&caller, Email::parse(&r.email, "email")?).await?;
            Ok(pb::LookupAccountResponse { account: Some(account_pb(account)) })
        })
        .await
    }

    type WatchSessionRevocationsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchSessionRevocationsResponse, Status>> + Send>>;

    async fn watch_session_revocations(
        &self,
        request: Request<pb::WatchSessionRevocationsRequest>,
    ) -> Reply<Self::WatchSessionRevocationsStream> {
        app::require_revocation_watcher(&caller(&request)?)?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(self.revocations.clone().stream(tx));
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|message| match message {
            Ok(message) => Ok(revocation_pb(message)),
            Err(e) => Err(Status::from(Error::from(e))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_public_keys(&self, request: Request<pb::ListPublicKeysRequest>) -> Reply<pb::ListPublicKeysResponse> {
        let r = request.into_inner();
        handle("identity.list_public_keys", async {
            let page = PageRequest::parse(r.page_size, &r.page_token, crate::keys::PAGE_SCOPE)?;
            let (keys, next_page_token) = crate::keys::page(self.app.public_keys().await?, &page)?;
            Ok(pb::ListPublicKeysResponse {
                next_page_token,
                keys: keys
                    .into_iter()
                    .map(|k| pb::PublicKey {
                        kid: k.kid,
                        algorithm: "EdDSA".into(),
                        public_key: k.public_key.to_vec(),
                        retire_time: k.retire_at.map(timestamp),
                    })
                    .collect(),
            })
        })
        .await
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Error> {
    if value.trim().is_empty() { Err(InvalidInput::field(field, "is required").into()) } else { Ok(value) }
}

fn only_input(e: Error) -> InvalidInput {
    match e {
        Error::InvalidInput(input) => input,
        other => InvalidInput::field("request", other.to_string()),
    }
}

/// `accounts/me` → `None` (the caller); `accounts/{id}` → `Some(id)`.
fn account_name(raw: &str, field: &str) -> Result<Option<Uuid>, InvalidInput> {
    if raw == "accounts/me" { Ok(None) } else { domain::parse_name(raw, "accounts", field).map(Some) }
}

fn org_role(value: i32, field: &str) -> Result<OrgRole, InvalidInput> {
    match pb::OrganizationRole::try_from(value) {
        Ok(pb::OrganizationRole::Owner) => Ok(OrgRole::Owner),
        Ok(pb::OrganizationRole::Reader) => Ok(OrgRole::Reader),
        _ => Err(InvalidInput::field(field, "must be ORGANIZATION_ROLE_OWNER or ORGANIZATION_ROLE_READER")),
    }
}

fn role_pb(role: OrgRole) -> i32 {
    match role {
        OrgRole::Owner => pb::OrganizationRole::Owner as i32,
        OrgRole::Reader => pb::OrganizationRole::Reader as i32,
    }
}

fn account_pb(a: Account) -> pb::Account {
    pb::Account {
        name: format!("accounts/{}", a.id),
        email: a.email,
        display_name: a.display_name,
        email_verified: a.email_verified,
        create_time: Some(timestamp(a.created_at)),
    }
}

fn revocation_pb(message: RevocationMessage) -> pb::WatchSessionRevocationsResponse {
    use pb::watch_session_revocations_response::Event;
    let event = match message {
        RevocationMessage::Revoked { revocation, expire_at } => Event::Revocation(pb::SessionRevocation {
            session_id: revocation.session_id.to_string(),
            account: format!("accounts/{}", revocation.account_id),
            revoke_time: Some(timestamp(revocation.revoked_at)),
            expire_time: Some(timestamp(expire_at)),
        }),
        RevocationMessage::SnapshotEnd => Event::SnapshotEnd(pb::SnapshotEnd {}),
    };
    pb::WatchSessionRevocationsResponse { event: Some(event) }
}

fn grant_pb(g: TokenGrant) -> pb::TokenGrant {
    pb::TokenGrant {
        access_token: g.access_token,
        access_token_expire_time: Some(timestamp(g.access_expires_at)),
        refresh_token: g.refresh_token.unwrap_or_default(),
        refresh_token_expire_time: g.refresh_expires_at.map(timestamp),
    }
}

fn organization_pb(o: Organization) -> pb::Organization {
    pb::Organization {
        name: format!("organizations/{}", o.id),
        display_name: o.display_name,
        create_time: Some(timestamp(o.created_at)),
        caller_role: o.caller_role.map_or(0, role_pb),
    }
}

fn member_pb(m: Member) -> pb::OrganizationMember {
    pb::OrganizationMember {
        name: format!("organizations/{}/members/{}", m.organization_id, m.account_id),
        account: format!("accounts/{}", m.account_id),
        email: m.email,
        display_name: m.display_name,
        role: role_pb(m.role),
        create_time: Some(timestamp(m.created_at)),
    }
}

fn service_account_pb(s: ServiceAccount) -> pb::ServiceAccount {
    pb::ServiceAccount {
        name: match s.organization_id {
            Some(org) => format!("organizations/{org}/serviceAccounts/{}", s.id),
            None => format!("serviceAccounts/{}", s.id),
        },
        display_name: s.display_name,
        client_id: s.client_id,
        create_time: Some(timestamp(s.created_at)),
    }
}
