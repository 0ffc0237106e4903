//! Invitation's errors, each mapped to one gRPC code with an `ErrorInfo` reason.

use keyshare_runtime::db::DbError;
use keyshare_runtime::error::{self, InvalidInput};
use tonic::{Code, Status};

/// `ErrorInfo.domain` of invitation's errors.
pub const DOMAIN: &str = "invitation.keyshare.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("authentication required")]
    Unauthenticated,
    #[error("log in to accept; if you have no account yet, sign up with the invited email address first")]
    LoginToAccept,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("this invitation is for another email address; log in with the invited one")]
    WrongAccount,
    #[error("verify your email address first, then accept again")]
    EmailNotVerified,
    #[error("this invitation has expired; ask for it to be sent again")]
    Expired,
    #[error("this invitation was revoked")]
    Revoked,
    #[error("this invitation was already accepted")]
    AlreadyAccepted,
    #[error("this link was replaced by a newer invitation email; use the latest one")]
    Superseded,
    #[error("only a {expected} invitation can be {action}")]
    WrongStatus { expected: &'static str, action: &'static str },
    #[error("what this invitation leads to no longer exists")]
    TargetGone,
    #[error("the person who sent this invitation may no longer grant this role; ask for a new invitation")]
    InviterLostRole,
    #[error("a dependency is unavailable: {0}")]
    Unavailable(String),
    #[error("rolled back for a concurrent change: {0}")]
    Contended(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            Error::Unavailable(e.to_string())
        } else if e.is_contention() {
            Error::Contended(e.to_string())
        } else {
            Error::Internal(e.to_string())
        }
    }
}

keyshare_runtime::from_database_errors!(Error, contended: Contended);

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let simple = |code: Code, reason: &str, e: &Error| error::status(code, DOMAIN, reason, e.to_string());
        match e {
            Error::InvalidInput(ref input) => error::invalid_argument(DOMAIN, input),
            Error::Unauthenticated => simple(Code::Unauthenticated, "UNAUTHENTICATED", &e),
            Error::LoginToAccept => simple(Code::Unauthenticated, "LOGIN_TO_ACCEPT", &e),
            Error::NotFound(_) => simple(Code::NotFound, "NOT_FOUND", &e),
            Error::PermissionDenied(_) => simple(Code::PermissionDenied, "PERMISSION_DENIED", &e),
            Error::WrongAccount => simple(Code::PermissionDenied, "WRONG_ACCOUNT", &e),
            Error::EmailNotVerified => simple(Code::FailedPrecondition, "EMAIL_NOT_VERIFIED", &e),
            Error::Expired => simple(Code::FailedPrecondition, "INVITATION_EXPIRED", &e),
            Error::Revoked => simple(Code::FailedPrecondition, "INVITATION_REVOKED", &e),
            Error::AlreadyAccepted => simple(Code::FailedPrecondition, "INVITATION_ALREADY_ACCEPTED", &e),
            Error::Superseded => simple(Code::FailedPrecondition, "INVITATION_LINK_REPLACED", &e),
            Error::WrongStatus { .. } => simple(Code::FailedPrecondition, "INVITATION_WRONG_STATUS", &e),
            Error::TargetGone => simple(Code::FailedPrecondition, "INVITATION_TARGET_GONE", &e),
            Error::InviterLostRole => simple(Code::FailedPrecondition, "INVITER_LOST_ROLE", &e),
            Error::Unavailable(cause) => error::unavailable(DOMAIN, &cause),
            Error::Contended(cause) => error::contended(DOMAIN, &cause),
            Error::Internal(cause) => error::internal(DOMAIN, &cause),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
