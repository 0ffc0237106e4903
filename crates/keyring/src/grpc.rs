//! The gRPC adapter: parse the request into domain input, call the use case, map the result.
//! With its submodules, the only module that knows protobuf types.
//!
//! This file holds the server and the `KeyringService` trait impl, each method a call to the
//! resource's handler: `projects`, `keys`, `members`, `access` (TestPermissions), `audit`
//! (ListAuditEvents) and `feed` (WatchKeys). `convert` maps between protobuf and domain types.

use std::sync::Arc;

use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::auth;
use keyshare_runtime::error::{InvalidInput, Reply};
use keyshare_runtime::page::PageRequest;
use tokio::sync::watch;
use tonic::Request;

use crate::app::{CallerChecks, Ctx, Keyring};
use crate::error::Error;

mod access;
mod audit;
mod convert;
mod feed;
mod keys;
mod members;
mod projects;

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

/// [`keyshare_runtime::error::handle`] for this service's errors.
async fn handle<T>(name: &'static str, body: impl std::future::Future<Output = Result<T, Error>>) -> Reply<T> {
    keyshare_runtime::error::handle(name, body).await
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
        let ctx = Ctx::of(&request)?;
        handle("keyring.create_project", projects::create_project(&self.app, ctx, request.into_inner())).await
    }

    async fn get_project(&self, request: Request<pb::GetProjectRequest>) -> Reply<pb::GetProjectResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.get_project", projects::get_project(&self.app, ctx, request.into_inner())).await
    }

    async fn list_projects(&self, request: Request<pb::ListProjectsRequest>) -> Reply<pb::ListProjectsResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.list_projects", projects::list_projects(&self.app, ctx, request.into_inner())).await
    }

    async fn update_project(&self, request: Request<pb::UpdateProjectRequest>) -> Reply<pb::UpdateProjectResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.update_project", projects::update_project(&self.app, ctx, request.into_inner())).await
    }

    async fn delete_project(&self, request: Request<pb::DeleteProjectRequest>) -> Reply<pb::DeleteProjectResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.delete_project", projects::delete_project(&self.app, ctx, request.into_inner())).await
    }

    async fn list_project_members(
        &self,
        request: Request<pb::ListProjectMembersRequest>,
    ) -> Reply<pb::ListProjectMembersResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.list_project_members", members::list_project_members(&self.app, ctx, request.into_inner()))
            .await
    }

    async fn update_project_member(
        &self,
        request: Request<pb::UpdateProjectMemberRequest>,
    ) -> Reply<pb::UpdateProjectMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.update_project_member", members::update_project_member(&self.app, ctx, request.into_inner()))
            .await
    }

    async fn delete_project_member(
        &self,
        request: Request<pb::DeleteProjectMemberRequest>,
    ) -> Reply<pb::DeleteProjectMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.delete_project_member", members::delete_project_member(&self.app, ctx, request.into_inner()))
            .await
    }

    async fn create_project_member(
        &self,
        request: Request<pb::CreateProjectMemberRequest>,
    ) -> Reply<pb::CreateProjectMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.create_project_member", members::create_project_member(&self.app, ctx, request.into_inner()))
            .await
    }

    async fn add_project_member(
        &self,
        request: Request<pb::AddProjectMemberRequest>,
    ) -> Reply<pb::AddProjectMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.add_project_member", members::add_project_member(&self.app, ctx, request.into_inner())).await
    }

    async fn create_key(&self, request: Request<pb::CreateKeyRequest>) -> Reply<pb::CreateKeyResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.create_key", keys::create_key(&self.app, ctx, request.into_inner())).await
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Reply<pb::GetKeyResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.get_key", keys::get_key(&self.app, ctx, request.into_inner())).await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Reply<pb::ListKeysResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.list_keys", keys::list_keys(&self.app, ctx, request.into_inner())).await
    }

    async fn update_key(&self, request: Request<pb::UpdateKeyRequest>) -> Reply<pb::UpdateKeyResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.update_key", keys::update_key(&self.app, ctx, request.into_inner())).await
    }

    async fn update_key_environment(
        &self,
        request: Request<pb::UpdateKeyEnvironmentRequest>,
    ) -> Reply<pb::UpdateKeyEnvironmentResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.update_key_environment", keys::update_key_environment(&self.app, ctx, request.into_inner()))
            .await
    }

    async fn reveal_credential(
        &self,
        request: Request<pb::RevealCredentialRequest>,
    ) -> Reply<pb::RevealCredentialResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.reveal_credential", keys::reveal_credential(&self.app, ctx, request.into_inner())).await
    }

    async fn regenerate_credential(
        &self,
        request: Request<pb::RegenerateCredentialRequest>,
    ) -> Reply<pb::RegenerateCredentialResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.regenerate_credential", keys::regenerate_credential(&self.app, ctx, request.into_inner())).await
    }

    async fn delete_key(&self, request: Request<pb::DeleteKeyRequest>) -> Reply<pb::DeleteKeyResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.delete_key", keys::delete_key(&self.app, ctx, request.into_inner())).await
    }

    async fn list_key_members(&self, request: Request<pb::ListKeyMembersRequest>) -> Reply<pb::ListKeyMembersResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.list_key_members", members::list_key_members(&self.app, ctx, request.into_inner())).await
    }

    async fn update_key_member(
        &self,
        request: Request<pb::UpdateKeyMemberRequest>,
    ) -> Reply<pb::UpdateKeyMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.update_key_member", members::update_key_member(&self.app, ctx, request.into_inner())).await
    }

    async fn delete_key_member(
        &self,
        request: Request<pb::DeleteKeyMemberRequest>,
    ) -> Reply<pb::DeleteKeyMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.delete_key_member", members::delete_key_member(&self.app, ctx, request.into_inner())).await
    }

    async fn add_key_member(&self, request: Request<pb::AddKeyMemberRequest>) -> Reply<pb::AddKeyMemberResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.add_key_member", members::add_key_member(&self.app, ctx, request.into_inner())).await
    }

    async fn list_shared_keys(&self, request: Request<pb::ListSharedKeysRequest>) -> Reply<pb::ListSharedKeysResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.list_shared_keys", keys::list_shared_keys(&self.app, ctx, request.into_inner())).await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Reply<pb::ListAuditEventsResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.list_audit_events", audit::list_audit_events(&self.app, ctx, request.into_inner())).await
    }

    async fn test_permissions(
        &self,
        request: Request<pb::TestPermissionsRequest>,
    ) -> Reply<pb::TestPermissionsResponse> {
        let ctx = Ctx::of(&request)?;
        handle("keyring.test_permissions", access::test_permissions(&self.app, ctx, request.into_inner())).await
    }

    type WatchKeysStream = feed::WatchKeysStream;

    async fn watch_keys(&self, request: Request<pb::WatchKeysRequest>) -> Reply<Self::WatchKeysStream> {
        feed::watch_keys(self, request)
    }

    async fn end_organization_membership(
        &self,
        request: Request<pb::EndOrganizationMembershipRequest>,
    ) -> Reply<pb::EndOrganizationMembershipResponse> {
        let ctx = Ctx::of(&request)?;
        // Who may ask comes before what is asked (AIP-211).
        ctx.require(auth::Scope::MembershipsEnd)?;
        handle(
            "keyring.end_organization_membership",
            members::end_organization_membership(&self.app, ctx, request.into_inner()),
        )
        .await
    }
}
