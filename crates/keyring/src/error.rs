//! Keyring's errors, each mapped to one gRPC code with an `ErrorInfo` reason.

use keyshare_runtime::db::DbError;
use keyshare_runtime::error::{self, InvalidInput};
use tonic::{Code, Status};

/// `ErrorInfo.domain` of keyring's errors.
pub const DOMAIN: &str = "keyring.keyshare.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("a key with this name already exists in the project")]
    KeyNameTaken,
    #[error("the service account is a member of the project already")]
    AlreadyMember,
    #[error("the key changed since it was read; get it again and retry")]
    EtagMismatch { field: &'static str },
    #[error("the project still has keys; delete them first or pass force")]
    ProjectHasKeys,
    #[error("the key owner's role cannot be changed and the owner cannot be removed")]
    OwnerImmutable,
    #[error("the project must keep at least one owner")]
    LastProjectOwner,
    #[error("the membership this invitation granted has since been removed")]
    GrantRevoked,
    #[error("invitation {0} already granted a different membership")]
    InvitationConflict(String),
    #[error("the environment has no credential to reveal")]
    NoCredential,
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
            Error::NotFound(_) => simple(Code::NotFound, "NOT_FOUND", &e),
            Error::PermissionDenied(_) => simple(Code::PermissionDenied, "PERMISSION_DENIED", &e),
            Error::KeyNameTaken => error::status_for_field(
                Code::AlreadyExists,
                DOMAIN,
                "KEY_NAME_TAKEN",
                e.to_string(),
                "key.display_name",
            ),
            Error::AlreadyMember => simple(Code::AlreadyExists, "ALREADY_MEMBER", &e),
            Error::EtagMismatch { field } => {
                error::status_for_field(Code::Aborted, DOMAIN, "ETAG_MISMATCH", e.to_string(), field)
            }
            Error::ProjectHasKeys => simple(Code::FailedPrecondition, "PROJECT_HAS_KEYS", &e),
            Error::OwnerImmutable => simple(Code::FailedPrecondition, "KEY_OWNER_IMMUTABLE", &e),
            Error::LastProjectOwner => simple(Code::FailedPrecondition, "LAST_PROJECT_OWNER", &e),
            Error::GrantRevoked => simple(Code::FailedPrecondition, "GRANT_REVOKED", &e),
            Error::InvitationConflict(_) => simple(Code::FailedPrecondition, "INVITATION_CONFLICT", &e),
            Error::NoCredential => simple(Code::FailedPrecondition, "NO_CREDENTIAL", &e),
            Error::Unavailable(cause) => error::unavailable(DOMAIN, &cause),
            Error::Contended(cause) => error::contended(DOMAIN, &cause),
            Error::Internal(cause) => error::internal(DOMAIN, &cause),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
