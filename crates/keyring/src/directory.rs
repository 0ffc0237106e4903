//! What keyring asks identity: a person's role in an organization, and whether a service
//! account exists. Asked on demand and not cached, so a role change in identity applies to the
//! very next keyring call.

use std::sync::Arc;

use keyshare_proto::identity::v1 as pb;
use keyshare_runtime::client::ServiceToken;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrgRole {
    Owner,
    Reader,
}

/// Identity, as keyring's own internal client.
#[derive(Clone, Debug)]
pub struct Directory {
    channel: Channel,
    token: Arc<ServiceToken>,
}

impl Directory {
    pub fn new(channel: Channel, token: Arc<ServiceToken>) -> Self {
        Self { channel, token }
    }

    /// The account's role in the organization, `None` if not a member.
    pub async fn org_role(&self, org: Uuid, account: Uuid) -> Result<Option<OrgRole>> {
        let request = self
            .token
            .request(pb::GetOrganizationMemberRequest { name: format!("organizations/{org}/members/{account}") })
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let mut client = pb::identity_service_client::IdentityServiceClient::new(self.channel.clone());
        match client.get_organization_member(request).await {
            Ok(response) => {
                let role = response.into_inner().member.map(|m| m.role).unwrap_or_default();
                Ok(Some(if role == pb::OrganizationRole::Owner as i32 { OrgRole::Owner } else { OrgRole::Reader }))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(Error::Unavailable(format!("identity GetOrganizationMember: {:?}", status.code()))),
        }
    }

    /// Whether `id` is a live service account of `org`.
    pub async fn service_account_exists(&self, org: Uuid, id: Uuid) -> Result<bool> {
        let name = format!("organizations/{org}/serviceAccounts/{id}");
        let request = self
            .token
            .request(pb::GetServiceAccountRequest { name })
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let mut client = pb::identity_service_client::IdentityServiceClient::new(self.channel.clone());
        match client.get_service_account(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(Error::Unavailable(format!("identity GetServiceAccount: {:?}", status.code()))),
        }
    }
}
