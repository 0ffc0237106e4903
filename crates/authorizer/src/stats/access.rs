//! What a caller may read, asked of keyring's `TestPermissions` with the caller's own token, so
//! the roles matrix lives in keyring alone. Nothing is cached: a member who is removed, or a key
//! that is deleted, changes the answer of the very next call.

use keyshare_proto::keyring::v1 as krpb;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::KeyName;

/// Where a caller stands with a project's usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectStanding {
    /// A project or organization owner: sees the project's usage.
    Manager,
    /// Sees the project but not its usage.
    Member,
    /// Does not see the project at all.
    Stranger,
}

#[derive(Clone, Debug)]
pub struct Access {
    keyring: Channel,
}

impl Access {
    pub fn new(keyring: Channel) -> Self {
        Self { keyring }
    }

    /// Whether the caller may read the key's usage and call log: they may see the key
    /// (`keys.get`), or they own its project (`projects.manage`), which also covers a deleted
    /// key, on which keyring grants nothing.
    pub async fn may_read_key(&self, caller_token: &str, key: KeyName) -> Result<bool> {
        if !self.test(caller_token, key.to_string(), &["keys.get"]).await?.is_empty() {
            return Ok(true);
        }
        Ok(!self.test(caller_token, format!("projects/{}", key.project), &["projects.manage"]).await?.is_empty())
    }

    /// Where the caller stands with the project's usage.
    pub async fn project_standing(&self, caller_token: &str, project: Uuid) -> Result<ProjectStanding> {
        let held = self.test(caller_token, format!("projects/{project}"), &["projects.get", "projects.manage"]).await?;
        Ok(if held.iter().any(|p| p == "projects.manage") {
            ProjectStanding::Manager
        } else if held.iter().any(|p| p == "projects.get") {
            ProjectStanding::Member
        } else {
            ProjectStanding::Stranger
        })
    }

    /// The subset of `permissions` the caller holds on `resource`.
    async fn test(&self, caller_token: &str, resource: String, permissions: &[&str]) -> Result<Vec<String>> {
        let permissions = permissions.iter().map(|p| (*p).to_owned()).collect();
        let request = keyshare_runtime::client::with_bearer(
            caller_token,
            krpb::TestPermissionsRequest { resource, permissions, account: String::new() },
        )
        .ok_or(Error::Unauthenticated)?;
        match KeyringServiceClient::new(self.keyring.clone()).test_permissions(request).await {
            Ok(response) => Ok(response.into_inner().permissions),
            Err(status) if status.code() == Code::Unauthenticated => Err(Error::Unauthenticated),
            Err(status) => Err(Error::Unavailable(format!("keyring TestPermissions: {:?}", status.code()))),
        }
    }
}
