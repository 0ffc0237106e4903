//! The gRPC adapter: parse the request into domain input, call the use case, map the result.
//! The only module that knows protobuf types.

use std::sync::Arc;

use keyshare_proto::invitation::v1 as pb;
use keyshare_runtime::auth::Authentication;
use keyshare_runtime::email::Email;
use keyshare_runtime::error::{FieldViolation, InvalidInput, Reply};
use keyshare_runtime::page::PageRequest;
use keyshare_runtime::wire::timestamp;
use tonic::{Request, Status as GrpcStatus};

use crate::app::{self, Ctx, Invitations, InviteeInput};
use crate::domain::{self, Delivery, Invitation, NotInvited, Role, Status, Target};
use crate::error::Error;

/// Implements `keyshare.invitation.v1.InvitationService`.
pub struct InvitationGrpc {
    app: Arc<Invitations>,
}

impl InvitationGrpc {
    pub fn new(app: Arc<Invitations>) -> Self {
        Self { app }
    }
}

/// [`keyshare_runtime::error::handle`] for this service's errors.
async fn handle<T>(name: &'static str, body: impl std::future::Future<Output = Result<T, Error>>) -> Reply<T> {
    keyshare_runtime::error::handle(name, body).await
}

/// The caller if the request carried a valid token; `None` without one.
fn optional_ctx<T>(request: &Request<T>) -> Result<Option<Ctx>, GrpcStatus> {
    match request.extensions().get::<Authentication>() {
        None => Ok(None),
        Some(_) => Ctx::of(request).map(Some),
    }
}

#[tonic::async_trait]
impl pb::invitation_service_server::InvitationService for InvitationGrpc {
    async fn create_invitations(
        &self,
        request: Request<pb::CreateInvitationsRequest>,
    ) -> Reply<pb::CreateInvitationsResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.create_invitations", async {
            let mut errors = InvalidInput::default();
            let target = errors.check(Target::parse(&r.parent, "parent"));
            if r.invitees.is_empty() {
                errors.0.push(FieldViolation::new("invitees", "must name at least one email"));
            }
            if r.invitees.len() > app::MAX_INVITEES {
                errors.0.push(FieldViolation::new(
                    "invitees",
                    format!("must name at most {} emails per call", app::MAX_INVITEES),
                ));
            }
            let mut invitees = Vec::with_capacity(r.invitees.len().min(app::MAX_INVITEES));
            if r.invitees.len() <= app::MAX_INVITEES {
                for (index, invitee) in r.invitees.into_iter().enumerate() {
                    let role = role_domain(invitee.role);
                    match (role, target) {
                        (Some(role), Some(target)) if role.fits(&target) => {
                            let email = Email::parse(&invitee.email, "email")
                                .map_err(|e| e.0.first().map(|v| v.description.clone()).unwrap_or_default());
                            invitees.push(InviteeInput { raw_email: invitee.email, email, role });
                        }
                        (_, Some(target)) => errors.0.push(FieldViolation::new(
                            format!("invitees[{index}].role"),
                            format!("is not a role of a {} invitation", target.kind()),
                        )),
                        (_, None) => {}
                    }
                }
            }
            errors.finish()?;
            let target = target.ok_or_else(|| Error::Internal("parsed target missing".into()))?;
            let results = self.app.create(&ctx, target, invitees).await?;
            Ok(pb::CreateInvitationsResponse {
                results: results
                    .into_iter()
                    .map(|(email, result)| match result {
                        Ok(invitation) => pb::InviteResult {
                            email,
                            invitation: Some(invitation_pb(invitation)),
                            ..Default::default()
                        },
                        Err(why) => {
                            let (reason, message, existing) = match why {
                                NotInvited::MalformedEmail(why) => {
                                    ("MALFORMED_EMAIL", format!("the email {why}"), String::new())
                                }
                                NotInvited::AlreadyMember => {
                                    ("ALREADY_MEMBER", "already a member".into(), String::new())
                                }
                                NotInvited::AlreadyPending(id) => (
                                    "ALREADY_PENDING",
                                    "already has a pending invitation; resend that one instead".into(),
                                    format!("invitations/{id}"),
                                ),
                                NotInvited::DuplicateInRequest => {
                                    ("DUPLICATE_IN_REQUEST", "listed twice in this request".into(), String::new())
                                }
                            };
                            pb::InviteResult {
                                email,
                                invitation: None,
                                error_reason: reason.into(),
                                error_message: message,
                                existing_invitation: existing,
                            }
                        }
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn get_invitation(&self, request: Request<pb::GetInvitationRequest>) -> Reply<pb::GetInvitationResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.get_invitation", async {
            let invitation = self.app.get(&ctx, domain::parse_invitation(&r.name, "name")?).await?;
            Ok(pb::GetInvitationResponse { invitation: Some(invitation_pb(invitation)) })
        })
        .await
    }

    async fn list_invitations(
        &self,
        request: Request<pb::ListInvitationsRequest>,
    ) -> Reply<pb::ListInvitationsResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.list_invitations", async {
            let mut errors = InvalidInput::default();
            let target = errors.check(Target::parse(&r.parent, "parent"));
            let status = match pb::InvitationStatus::try_from(r.status) {
                Ok(pb::InvitationStatus::Unspecified) => None,
                Ok(pb::InvitationStatus::Pending) => Some(Status::Pending),
                Ok(pb::InvitationStatus::Accepted) => Some(Status::Accepted),
                Ok(pb::InvitationStatus::Expired) => Some(Status::Expired),
                Ok(pb::InvitationStatus::Revoked) => Some(Status::Revoked),
                Err(_) => {
                    errors.0.push(FieldViolation::new("status", "is not an invitation status"));
                    None
                }
            };
            let page = target.and_then(|t| {
                errors.check(PageRequest::parse(r.page_size, &r.page_token, &app::list_scope(&t, status)))
            });
            errors.finish()?;
            let (target, page) = target.zip(page).ok_or_else(|| Error::Internal("parsed input missing".into()))?;
            let (invitations, next_page_token) = self.app.list(&ctx, target, status, page).await?;
            Ok(pb::ListInvitationsResponse {
                invitations: invitations.into_iter().map(invitation_pb).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn list_my_invitations(
        &self,
        request: Request<pb::ListMyInvitationsRequest>,
    ) -> Reply<pb::ListMyInvitationsResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.list_my_invitations", async {
            let (invitations, next_page_token) = self.app.list_mine(&ctx, r.page_size, &r.page_token).await?;
            Ok(pb::ListMyInvitationsResponse {
                invitations: invitations.into_iter().map(invitation_pb).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn lookup_invitation(
        &self,
        request: Request<pb::LookupInvitationRequest>,
    ) -> Reply<pb::LookupInvitationResponse> {
        let r = request.into_inner();
        handle("invitation.lookup_invitation", async {
            let token = domain::parse_token(&r.token, "token")?;
            let (invitation, invitee_has_account) = self.app.lookup(&token).await?;
            Ok(pb::LookupInvitationResponse { invitation: Some(invitation_pb(invitation)), invitee_has_account })
        })
        .await
    }

    async fn accept_invitation(
        &self,
        request: Request<pb::AcceptInvitationRequest>,
    ) -> Reply<pb::AcceptInvitationResponse> {
        let ctx = optional_ctx(&request)?;
        let r = request.into_inner();
        handle("invitation.accept_invitation", async {
            let token = domain::parse_token(&r.token, "token")?;
            let invitation = self.app.accept(ctx.as_ref(), &token).await?;
            Ok(pb::AcceptInvitationResponse { invitation: Some(invitation_pb(invitation)) })
        })
        .await
    }

    async fn resend_invitation(
        &self,
        request: Request<pb::ResendInvitationRequest>,
    ) -> Reply<pb::ResendInvitationResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.resend_invitation", async {
            let invitation = self.app.resend(&ctx, domain::parse_invitation(&r.name, "name")?).await?;
            Ok(pb::ResendInvitationResponse { invitation: Some(invitation_pb(invitation)) })
        })
        .await
    }

    async fn revoke_invitation(
        &self,
        request: Request<pb::RevokeInvitationRequest>,
    ) -> Reply<pb::RevokeInvitationResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.revoke_invitation", async {
            let invitation = self.app.revoke(&ctx, domain::parse_invitation(&r.name, "name")?).await?;
            Ok(pb::RevokeInvitationResponse { invitation: Some(invitation_pb(invitation)) })
        })
        .await
    }

    async fn revoke_access(&self, request: Request<pb::RevokeAccessRequest>) -> Reply<pb::RevokeAccessResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.revoke_access", async {
            let invitation = self.app.revoke_access(&ctx, domain::parse_invitation(&r.name, "name")?).await?;
            Ok(pb::RevokeAccessResponse { invitation: Some(invitation_pb(invitation)) })
        })
        .await
    }

    async fn count_invitations(
        &self,
        request: Request<pb::CountInvitationsRequest>,
    ) -> Reply<pb::CountInvitationsResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.count_invitations", async {
            if r.targets.len() > 1000 {
                return Err(InvalidInput::field("targets", "must name at most 1000 targets").into());
            }
            let counts = self.app.counts(&ctx, r.targets).await?;
            Ok(pb::CountInvitationsResponse {
                counts: counts
                    .into_iter()
                    .map(|(target, accepted, pending)| pb::InvitationCount {
                        target,
                        accepted: i32::try_from(accepted).unwrap_or(i32::MAX),
                        pending: i32::try_from(pending).unwrap_or(i32::MAX),
                    })
                    .collect(),
            })
        })
        .await
    }

    async fn revoke_target_invitations(
        &self,
        request: Request<pb::RevokeTargetInvitationsRequest>,
    ) -> Reply<pb::RevokeTargetInvitationsResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.revoke_target_invitations", async {
            let revoked = self.app.revoke_target(&ctx, Target::parse(&r.target, "target")?).await?;
            Ok(pb::RevokeTargetInvitationsResponse { revoked: i32::try_from(revoked).unwrap_or(i32::MAX) })
        })
        .await
    }

    async fn end_accepted_invitations(
        &self,
        request: Request<pb::EndAcceptedInvitationsRequest>,
    ) -> Reply<pb::EndAcceptedInvitationsResponse> {
        let ctx = Ctx::of(&request)?;
        let r = request.into_inner();
        handle("invitation.end_accepted_invitations", async {
            let mut errors = InvalidInput::default();
            let target = errors.check(Target::parse(&r.target, "target"));
            let account = errors.check(
                r.account
                    .strip_prefix("accounts/")
                    .and_then(|id| uuid::Uuid::parse_str(id).ok())
                    .ok_or_else(|| InvalidInput::field("account", "must look like accounts/{id}")),
            );
            errors.finish()?;
            let (Some(target), Some(account)) = (target, account) else {
                return Err(Error::Internal("parsed input missing".into()));
            };
            let ended = self.app.end_accepted(&ctx, target, account).await?;
            Ok(pb::EndAcceptedInvitationsResponse { ended: i32::try_from(ended).unwrap_or(i32::MAX) })
        })
        .await
    }
}

fn role_domain(value: i32) -> Option<Role> {
    Some(match pb::InvitationRole::try_from(value).ok()? {
        pb::InvitationRole::OrganizationOwner => Role::OrganizationOwner,
        pb::InvitationRole::OrganizationReader => Role::OrganizationReader,
        pb::InvitationRole::ProjectOwner => Role::ProjectOwner,
        pb::InvitationRole::ProjectMember => Role::ProjectMember,
        pb::InvitationRole::KeyAdmin => Role::KeyAdmin,
        pb::InvitationRole::KeyContributor => Role::KeyContributor,
        pb::InvitationRole::Unspecified => return None,
    })
}

fn role_pb(role: Role) -> i32 {
    (match role {
        Role::OrganizationOwner => pb::InvitationRole::OrganizationOwner,
        Role::OrganizationReader => pb::InvitationRole::OrganizationReader,
        Role::ProjectOwner => pb::InvitationRole::ProjectOwner,
        Role::ProjectMember => pb::InvitationRole::ProjectMember,
        Role::KeyAdmin => pb::InvitationRole::KeyAdmin,
        Role::KeyContributor => pb::InvitationRole::KeyContributor,
    }) as i32
}

fn invitation_pb(i: Invitation) -> pb::Invitation {
    let (delivery_status, delivery_error) = match i.delivery {
        Delivery::Unknown => (pb::DeliveryStatus::Unspecified, None),
        Delivery::Pending { last_error } => (pb::DeliveryStatus::Pending, last_error),
        Delivery::Delivered => (pb::DeliveryStatus::Delivered, None),
        Delivery::Failed { last_error } => (pb::DeliveryStatus::Failed, last_error),
    };
    pb::Invitation {
        name: format!("invitations/{}", i.id),
        target: i.target.name(),
        email: i.email,
        role: role_pb(i.role),
        status: (match i.status {
            Status::Pending => pb::InvitationStatus::Pending,
            Status::Accepted => pb::InvitationStatus::Accepted,
            Status::Expired => pb::InvitationStatus::Expired,
            Status::Revoked => pb::InvitationStatus::Revoked,
        }) as i32,
        inviter: format!("accounts/{}", i.inviter),
        create_time: Some(timestamp(i.created_at)),
        send_time: Some(timestamp(i.sent_at)),
        expire_time: Some(timestamp(i.expires_at)),
        accept_time: i.accepted_at.map(timestamp),
        accepted_by: i.accepted_by.map(|a| format!("accounts/{a}")).unwrap_or_default(),
        delivery_status: delivery_status as i32,
        delivery_error: delivery_error.unwrap_or_default(),
    }
}
