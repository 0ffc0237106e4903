//! The errors of the authorizer's usage API, each mapped to one gRPC code with an `ErrorInfo`
//! reason. (CheckKey and Envoy's check never fail: a rejected key is an answer.)

use keyshare_runtime::db::DbError;
use keyshare_runtime::error::{self, InvalidInput};
use tokio_postgres::error::SqlState;
use tonic::{Code, Status};

/// `ErrorInfo.domain` of the authorizer's errors.
pub const DOMAIN: &str = "authorizer.keyshare.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("authentication required")]
    Unauthenticated,
    /// The resource does not exist, or the caller may not see it (the two are not told apart).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller sees the resource but may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    #[error("a dependency is unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        // The usage tables are created by the usage writer shortly after start; until then the
        // statistics are as unavailable as the database itself.
        let not_migrated_yet = matches!(e.sql_state(), Some(state) if *state == SqlState::UNDEFINED_TABLE || *state == SqlState::INVALID_SCHEMA_NAME);
        if e.is_unavailable() || not_migrated_yet {
            Error::Unavailable(e.to_string())
        } else {
            Error::Internal(e.to_string())
        }
    }
}

keyshare_runtime::from_database_errors!(Error);

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let simple = |code: Code, reason: &str, e: &Error| error::status(code, DOMAIN, reason, e.to_string());
        match e {
            Error::InvalidInput(ref input) => error::invalid_argument(DOMAIN, input),
            Error::Unauthenticated => error::status(
                Code::Unauthenticated,
                keyshare_runtime::auth::AUTH_DOMAIN,
                "UNAUTHENTICATED",
                e.to_string(),
            ),
            Error::NotFound(_) => simple(Code::NotFound, "NOT_FOUND", &e),
            Error::PermissionDenied(_) => simple(Code::PermissionDenied, "PERMISSION_DENIED", &e),
            Error::Unavailable(cause) => error::unavailable(DOMAIN, &cause),
            Error::Internal(cause) => error::internal(DOMAIN, &cause),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
