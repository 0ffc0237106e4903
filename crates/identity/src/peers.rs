//! What identity asks other services: keyring ends the project and key roles of a person who
//! leaves an organization. The only module of identity that speaks keyring's wire types.

use chrono::{DateTime, Utc};
use keyshare_proto::keyring::v1 as kpb;
use keyshare_runtime::client::PeerError;
use tonic::transport::Channel;
use uuid::Uuid;

/// keyring, as identity calls it.
#[derive(Clone, Debug)]
pub struct Keyring {
    channel: Channel,
}

impl Keyring {
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// Ends `account`'s roles in `org`'s projects and keys as of `removed_at`, with `token`
    /// (identity's own internal client). Idempotent; the error says whether to try again.
    pub async fn end_membership(
        &self,
        token: &str,
        org: Uuid,
        account: Uuid,
        removed_at: DateTime<Utc>,
    ) -> Result<(), PeerError> {
        let message = kpb::EndOrganizationMembershipRequest {
            name: format!("organizations/{org}/members/{account}"),
            remove_time: Some(keyshare_runtime::wire::timestamp(removed_at)),
        };
        let request = keyshare_runtime::client::with_bearer(token, message)
            .ok_or_else(|| PeerError::Retry("token is no header value".into()))?;
        kpb::keyring_service_client::KeyringServiceClient::new(self.channel.clone())
            .end_organization_membership(request)
            .await
            .map(|_| ())
            .map_err(|status| PeerError::from_status(&status))
    }
}
