//! What invitation asks identity and keyring. Questions about what the caller may do are asked
//! with the caller's own token (the owning service applies its roles matrix); grants, removals
//! and lookups are made as invitation's internal client.

use std::sync::Arc;

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use keyshare_runtime::client::{PeerError, ServiceToken};
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::domain::{Role, Target};
use crate::error::{Error, Result};

/// The calling person, as identity knows them.
#[derive(Clone, Debug)]
pub struct Person {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub email_verified: bool,
}

/// What the caller may do with a target's invitations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// May invite and manage invitations.
    Manager,
    /// Sees the target but may not manage its sharing.
    Viewer,
    /// Does not see the target at all.
    Stranger,
}

/// Whether an invitation may still be accepted, as its target's service sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grantable {
    Yes,
    /// The organization, project or key is gone.
    TargetGone,
    /// The inviter no longer holds the right to grant the invitation's role.
    InviterLostRole,
}

#[derive(Clone, Debug)]
pub struct Peers {
    identity: Channel,
    keyring: Channel,
    token: Arc<ServiceToken>,
}

fn bearer<T>(token: &str, message: T) -> Result<tonic::Request<T>> {
    keyshare_runtime::client::with_bearer(token, message).ok_or(Error::Unauthenticated)
}

fn unavailable(what: &str, status: &tonic::Status) -> Error {
    Error::Unavailable(format!("{what}: {:?}", status.code()))
}

impl Peers {
    pub fn new(identity: Channel, keyring: Channel, token: Arc<ServiceToken>) -> Self {
        Self { identity, keyring, token }
    }

    async fn internal<T>(&self, message: T) -> Result<tonic::Request<T>> {
        self.token.request(message).await.map_err(|e| Error::Unavailable(e.to_string()))
    }

    fn identity(&self) -> IdentityServiceClient<Channel> {
        IdentityServiceClient::new(self.identity.clone())
    }

    fn keyring(&self) -> KeyringServiceClient<Channel> {
        KeyringServiceClient::new(self.keyring.clone())
    }

    /// The caller's account, asked with the caller's token.
    pub async fn person(&self, caller_token: &str) -> Result<Person> {
        let request = bearer(caller_token, idpb::GetAccountRequest { name: "accounts/me".into() })?;
        let account = match self.identity().get_account(request).await {
            Ok(response) => response.into_inner().account.ok_or_else(|| Error::Internal("no account".into()))?,
            Err(status) if status.code() == Code::Unauthenticated => return Err(Error::Unauthenticated),
            Err(status) => return Err(unavailable("identity GetAccount", &status)),
        };
        let id = account
            .name
            .strip_prefix("accounts/")
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| Error::Internal("identity returned a malformed account name".into()))?;
        Ok(Person {
            id,
            email: account.email,
            display_name: account.display_name,
            email_verified: account.email_verified,
        })
    }

    /// What the caller may do with `target`'s sharing.
    pub async fn standing(&self, caller_token: &str, caller: Uuid, target: &Target) -> Result<Standing> {
        match target {
            Target::Organization(org) => {
                let request = self
                    .internal(idpb::GetOrganizationMemberRequest {
                        name: format!("organizations/{org}/members/{caller}"),
                    })
                    .await?;
                match self.identity().get_organization_member(request).await {
                    Ok(response) => {
                        let role = response.into_inner().member.map(|m| m.role).unwrap_or_default();
                        Ok(if role == idpb::OrganizationRole::Owner as i32 {
                            Standing::Manager
                        } else {
                            Standing::Viewer
                        })
                    }
                    Err(status) if status.code() == Code::NotFound => Ok(Standing::Stranger),
                    Err(status) => Err(unavailable("identity GetOrganizationMember", &status)),
                }
            }
            Target::Project(_) | Target::Key { .. } => {
                let (see, manage) = match target {
                    Target::Project(_) => ("projects.get", "projects.manage"),
                    _ => ("keys.get", "keys.manage"),
                };
                let request = bearer(
                    caller_token,
                    krpb::TestPermissionsRequest {
                        resource: target.name(),
                        permissions: vec![see.into(), manage.into()],
                        account: String::new(),
                    },
                )?;
                let held = self
                    .keyring()
                    .test_permissions(request)
                    .await
                    .map_err(|status| unavailable("keyring TestPermissions", &status))?
                    .into_inner()
                    .permissions;
                Ok(if held.iter().any(|p| p == manage) {
                    Standing::Manager
                } else if held.iter().any(|p| p == see) {
                    Standing::Viewer
                } else {
                    Standing::Stranger
                })
            }
        }
    }

    /// How an invitation email names `target`: its display name (a key's with its project's),
    /// read with the inviter's token. `None` when it cannot be read now; the email then says
    /// what kind of thing it is without naming it, rather than failing the invitation.
    pub async fn title(&self, caller_token: &str, target: &Target) -> Option<String> {
        async fn project(peers: &Peers, token: &str, project: Uuid) -> Option<String> {
            let request = bearer(token, krpb::GetProjectRequest { name: format!("projects/{project}") }).ok()?;
            let project = peers.keyring().get_project(request).await.ok()?.into_inner().project?;
            Some(project.display_name)
        }
        // A name is one line of text in the mail and its subject, whatever it was stored as.
        let quoted = |name: String| {
            let name: String = name.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            (!name.trim().is_empty()).then(|| format!("\"{}\"", name.trim()))
        };
        match target {
            Target::Organization(_) => {
                let request = bearer(caller_token, idpb::GetOrganizationRequest { name: target.name() }).ok()?;
                let org = self.identity().get_organization(request).await.ok()?.into_inner().organization?;
                Some(format!("the organization {}", quoted(org.display_name)?))
            }
            Target::Project(id) => Some(format!("the project {}", quoted(project(self, caller_token, *id).await?)?)),
            Target::Key { project: project_id, .. } => {
                let request = bearer(caller_token, krpb::GetKeyRequest { name: target.name() }).ok()?;
                let key = self.keyring().get_key(request).await.ok()?.into_inner().key?;
                let key = format!("the API key {}", quoted(key.display_name)?);
                Some(match project(self, caller_token, *project_id).await.and_then(quoted) {
                    Some(project) => format!("{key} in the project {project}"),
                    None => key,
                })
            }
        }
    }

    /// Whether `inviter` may still grant a role on `target` (organization owner; manager of the
    /// project or key), and whether the target still exists. Asked as invitation's internal
    /// client, for the inviter, at the moment of acceptance.
    pub async fn grantable(&self, target: &Target, inviter: Uuid) -> Result<Grantable> {
        match target {
            Target::Organization(org) => {
                let request = self.internal(idpb::GetOrganizationRequest { name: target.name() }).await?;
                match self.identity().get_organization(request).await {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::NotFound => return Ok(Grantable::TargetGone),
                    Err(status) => return Err(unavailable("identity GetOrganization", &status)),
                }
                let request = self
                    .internal(idpb::GetOrganizationMemberRequest {
                        name: format!("organizations/{org}/members/{inviter}"),
                    })
                    .await?;
                match self.identity().get_organization_member(request).await {
                    Ok(response) => {
                        let role = response.into_inner().member.map(|m| m.role).unwrap_or_default();
                        Ok(if role == idpb::OrganizationRole::Owner as i32 {
                            Grantable::Yes
                        } else {
                            Grantable::InviterLostRole
                        })
                    }
                    Err(status) if status.code() == Code::NotFound => Ok(Grantable::InviterLostRole),
                    Err(status) => Err(unavailable("identity GetOrganizationMember", &status)),
                }
            }
            Target::Project(_) | Target::Key { .. } => {
                let manage = if matches!(target, Target::Project(_)) { "projects.manage" } else { "keys.manage" };
                let request = self
                    .internal(krpb::TestPermissionsRequest {
                        resource: target.name(),
                        permissions: vec![manage.into()],
                        account: format!("accounts/{inviter}"),
                    })
                    .await?;
                match self.keyring().test_permissions(request).await {
                    Ok(response) if response.get_ref().permissions.iter().any(|p| p == manage) => Ok(Grantable::Yes),
                    Ok(_) => Ok(Grantable::InviterLostRole),
                    Err(status) if status.code() == Code::NotFound => Ok(Grantable::TargetGone),
                    Err(status) => Err(unavailable("keyring TestPermissions", &status)),
                }
            }
        }
    }

    /// The account whose verified email this is, if any.
    pub async fn verified_account(&self, email: &str) -> Result<Option<Uuid>> {
        let request = self.internal(idpb::LookupAccountRequest { email: email.into() }).await?;
        match self.identity().lookup_account(request).await {
            Ok(response) => Ok(response
                .into_inner()
                .account
                .and_then(|a| a.name.strip_prefix("accounts/").and_then(|id| Uuid::parse_str(id).ok()))),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(unavailable("identity LookupAccount", &status)),
        }
    }

    /// Whether the account already belongs to the target.
    pub async fn is_member(&self, target: &Target, account: Uuid) -> Result<bool> {
        match target {
            Target::Organization(org) => {
                let request = self
                    .internal(idpb::GetOrganizationMemberRequest {
                        name: format!("organizations/{org}/members/{account}"),
                    })
                    .await?;
                match self.identity().get_organization_member(request).await {
                    Ok(_) => Ok(true),
                    Err(status) if status.code() == Code::NotFound => Ok(false),
                    Err(status) => Err(unavailable("identity GetOrganizationMember", &status)),
                }
            }
            Target::Project(project) => {
                let wanted = format!("accounts/{account}");
                let mut page_token = String::new();
                loop {
                    let request = self
                        .internal(krpb::ListProjectMembersRequest {
                            parent: format!("projects/{project}"),
                            page_size: 1000,
                            page_token: page_token.clone(),
                        })
                        .await?;
                    let page = match self.keyring().list_project_members(request).await {
                        Ok(response) => response.into_inner(),
                        Err(status) if status.code() == Code::NotFound => return Ok(false),
                        Err(status) => return Err(unavailable("keyring ListProjectMembers", &status)),
                    };
                    if page.members.iter().any(|m| m.account == wanted) {
                        return Ok(true);
                    }
                    if page.next_page_token.is_empty() {
                        return Ok(false);
                    }
                    page_token = page.next_page_token;
                }
            }
            Target::Key { .. } => {
                let wanted = format!("accounts/{account}");
                let mut page_token = String::new();
                loop {
                    let request = self
                        .internal(krpb::ListKeyMembersRequest {
                            parent: target.name(),
                            page_size: 1000,
                            page_token: page_token.clone(),
                        })
                        .await?;
                    let page = match self.keyring().list_key_members(request).await {
                        Ok(response) => response.into_inner(),
                        Err(status) if status.code() == Code::NotFound => return Ok(false),
                        Err(status) => return Err(unavailable("keyring ListKeyMembers", &status)),
                    };
                    if page.members.iter().any(|m| m.account == wanted) {
                        return Ok(true);
                    }
                    if page.next_page_token.is_empty() {
                        return Ok(false);
                    }
                    page_token = page.next_page_token;
                }
            }
        }
    }

    /// Grants the membership an accepted invitation promises; idempotent per invitation.
    pub async fn grant(&self, invitation: Uuid, target: &Target, account: Uuid, role: Role) -> Result<(), PeerError> {
        let invitation_id = invitation.to_string();
        let account = format!("accounts/{account}");
        let result = match target {
            Target::Organization(org) => {
                let role = if role == Role::OrganizationOwner {
                    idpb::OrganizationRole::Owner
                } else {
                    idpb::OrganizationRole::Reader
                };
                let request = self
                    .internal(idpb::AddOrganizationMemberRequest {
                        parent: format!("organizations/{org}"),
                        account,
                        role: role as i32,
                        invitation_id,
                    })
                    .await
                    .map_err(|e| PeerError::Retry(e.to_string()))?;
                self.identity().add_organization_member(request).await.map(|_| ())
            }
            Target::Project(project) => {
                let role =
                    if role == Role::ProjectOwner { krpb::ProjectRole::Owner } else { krpb::ProjectRole::Member };
                let request = self
                    .internal(krpb::AddProjectMemberRequest {
                        parent: format!("projects/{project}"),
                        account,
                        role: role as i32,
                        invitation_id,
                    })
                    .await
                    .map_err(|e| PeerError::Retry(e.to_string()))?;
                self.keyring().add_project_member(request).await.map(|_| ())
            }
            Target::Key { .. } => {
                let role = if role == Role::KeyAdmin { krpb::KeyRole::Admin } else { krpb::KeyRole::Contributor };
                let request = self
                    .internal(krpb::AddKeyMemberRequest {
                        parent: target.name(),
                        account,
                        role: role as i32,
                        invitation_id,
                    })
                    .await
                    .map_err(|e| PeerError::Retry(e.to_string()))?;
                self.keyring().add_key_member(request).await.map(|_| ())
            }
        };
        classify(result)
    }

    /// Removes the membership an invitation granted (only if the invitation made it); a
    /// membership already gone counts as done.
    pub async fn remove(&self, invitation: Uuid, target: &Target, account: Uuid) -> Result<(), PeerError> {
        let invitation_id = invitation.to_string();
        let result = match target {
            Target::Organization(org) => {
                let request = self
                    .internal(idpb::DeleteOrganizationMemberRequest {
                        name: format!("organizations/{org}/members/{account}"),
                        invitation_id,
                    })
                    .await
                    .map_err(|e| PeerError::Retry(e.to_string()))?;
                self.identity().delete_organization_member(request).await.map(|_| ())
            }
            Target::Project(project) => {
                let request = self
                    .internal(krpb::DeleteProjectMemberRequest {
                        name: format!("projects/{project}/members/{account}"),
                        invitation_id,
                    })
                    .await
                    .map_err(|e| PeerError::Retry(e.to_string()))?;
                self.keyring().delete_project_member(request).await.map(|_| ())
            }
            Target::Key { .. } => {
                let request = self
                    .internal(krpb::DeleteKeyMemberRequest {
                        name: format!("{}/members/{account}", target.name()),
                        invitation_id,
                    })
                    .await
                    .map_err(|e| PeerError::Retry(e.to_string()))?;
                self.keyring().delete_key_member(request).await.map(|_| ())
            }
        };
        match result {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => classify(other),
        }
    }
}

fn classify(result: std::result::Result<(), tonic::Status>) -> Result<(), PeerError> {
    result.map_err(|status| PeerError::from_status(&status))
}
