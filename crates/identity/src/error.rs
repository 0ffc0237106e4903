//! Identity's errors, each mapped to one gRPC code with an `ErrorInfo` reason.

use std::time::Duration;

use keyshare_runtime::db::DbError;
use keyshare_runtime::error::{self, InvalidInput};
use tonic::{Code, Status};

/// `ErrorInfo.domain` of identity's errors.
pub const DOMAIN: &str = "identity.keyshare.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("authentication required")]
    Unauthenticated,
    #[error("email or password is incorrect")]
    InvalidCredentials,
    #[error("client id or secret is incorrect")]
    InvalidClientCredentials,
    #[error("too many failed logins; try again later")]
    Throttled { retry_after: Duration },
    #[error("too many mails to this address; try again later")]
    MailThrottled { retry_after: Duration },
    #[error("too many password checks at once; try again shortly")]
    HashingBusy,
    #[error("the password reset token is invalid, used or expired; ask for a new one")]
    PasswordResetTokenInvalid,
    #[error("verify your email address before logging in")]
    EmailNotVerified,
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("the verification token is invalid, used or expired; ask for a new verification email")]
    VerificationTokenInvalid,
    #[error("the refresh token is invalid or expired; log in again")]
    RefreshTokenInvalid,
    #[error("the refresh token was already used; the session has been ended, log in again")]
    RefreshTokenReused,
    #[error("the session has ended; log in again")]
    SessionEnded,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("the organization must keep at least one owner")]
    LastOwner,
    #[error("invitation {0} already granted a different membership")]
    InvitationConflict(String),
    #[error("the membership this invitation granted has since been removed")]
    GrantRevoked,
    #[error("the current password is incorrect")]
    WrongPassword,
    #[error("database unavailable: {0}")]
    Unavailable(DbError),
    #[error("rolled back for a concurrent change: {0}")]
    Contended(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            Error::Unavailable(e)
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
            Error::InvalidCredentials => simple(Code::Unauthenticated, "INVALID_CREDENTIALS", &e),
            Error::InvalidClientCredentials => simple(Code::Unauthenticated, "INVALID_CLIENT_CREDENTIALS", &e),
            Error::Throttled { retry_after } => {
                error::retry_later(Code::ResourceExhausted, DOMAIN, "LOGIN_THROTTLED", e.to_string(), retry_after)
            }
            Error::MailThrottled { retry_after } => {
                error::retry_later(Code::ResourceExhausted, DOMAIN, "MAIL_THROTTLED", e.to_string(), retry_after)
            }
            Error::HashingBusy => error::retry_later(
                Code::Unavailable,
                DOMAIN,
                "PASSWORD_CHECKS_BUSY",
                e.to_string(),
                Duration::from_secs(1),
            ),
            Error::PasswordResetTokenInvalid => simple(Code::FailedPrecondition, "PASSWORD_RESET_TOKEN_INVALID", &e),
            Error::EmailNotVerified => simple(Code::FailedPrecondition, "EMAIL_NOT_VERIFIED", &e),
            Error::EmailTaken => simple(Code::AlreadyExists, "EMAIL_TAKEN", &e),
            Error::VerificationTokenInvalid => simple(Code::FailedPrecondition, "VERIFICATION_TOKEN_INVALID", &e),
            Error::RefreshTokenInvalid => simple(Code::Unauthenticated, "REFRESH_TOKEN_INVALID", &e),
            Error::RefreshTokenReused => simple(Code::Unauthenticated, "REFRESH_TOKEN_REUSED", &e),
            Error::SessionEnded => simple(Code::Unauthenticated, "SESSION_ENDED", &e),
            Error::NotFound(_) => simple(Code::NotFound, "NOT_FOUND", &e),
            Error::PermissionDenied(_) => simple(Code::PermissionDenied, "PERMISSION_DENIED", &e),
            Error::LastOwner => simple(Code::FailedPrecondition, "LAST_OWNER", &e),
            Error::InvitationConflict(_) => simple(Code::FailedPrecondition, "INVITATION_CONFLICT", &e),
            Error::GrantRevoked => simple(Code::FailedPrecondition, "GRANT_REVOKED", &e),
            Error::WrongPassword => simple(Code::PermissionDenied, "WRONG_PASSWORD", &e),
            Error::Unavailable(cause) => error::unavailable(DOMAIN, &cause),
            Error::Contended(cause) => error::contended(DOMAIN, &cause),
            Error::Internal(cause) => error::internal(DOMAIN, &cause),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
