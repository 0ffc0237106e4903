//! The one error model every service maps onto: a gRPC code with `google.rpc.ErrorInfo`
//! (reason, domain) and, for bad input, `google.rpc.BadRequest` field violations.
//!
//! Each service keeps its own `thiserror` enum and one `From<Error> for tonic::Status` built from
//! these helpers. A status message never carries SQL, causes or secrets.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One field of a request that is not acceptable, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request, e.g. `account.display_name`.
    pub field: String,
    /// What is wrong, for the person who sent it.
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// What a gRPC handler answers.
pub type Reply<T> = Result<tonic::Response<T>, Status>;

/// Runs a handler's body in a span named after its use case (`otel.name`, e.g.
/// `keyring.create_key`) and answers its value, or its error as the service's status.
pub async fn handle<T, E: Into<Status>>(name: &'static str, body: impl Future<Output = Result<T, E>>) -> Reply<T> {
    use tracing::Instrument as _;
    body.instrument(tracing::info_span!("rpc", otel.name = name)).await.map(tonic::Response::new).map_err(Into::into)
}

/// Bad input: one or more field violations. Collects every problem of a request, not just the
/// first, so a caller can fix them all at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
#[error("invalid argument: {}", describe(.0))]
pub struct InvalidInput(pub Vec<FieldViolation>);

fn describe(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

impl InvalidInput {
    /// A single violation.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self(vec![FieldViolation::new(field, description)])
    }

    /// Records a violation from a parse result and returns the value if it parsed.
    pub fn check<T>(&mut self, result: Result<T, InvalidInput>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(InvalidInput(mut violations)) => {
                self.0.append(&mut violations);
                None
            }
        }
    }

    /// `Ok(())` when nothing was recorded.
    pub fn finish(self) -> Result<(), InvalidInput> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    /// The same violations with their field paths put under `prefix` (e.g. `account`).
    pub fn under(self, prefix: &str) -> Self {
        Self(self.0.into_iter().map(|v| FieldViolation::new(format!("{prefix}.{}", v.field), v.description)).collect())
    }
}

/// The paths of an AIP-134 update mask, each one of `allowed`. An absent or empty mask means
/// the fields the request populates (`populated`, those with a non-default value), so what the
/// caller did not send is never reset; `*` means every allowed path (a full replacement).
pub fn update_paths(
    mask: Option<prost_types::FieldMask>,
    allowed: &[&str],
    populated: &[&str],
) -> Result<Vec<String>, InvalidInput> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Ok(populated.iter().filter(|p| allowed.contains(p)).map(|p| (*p).to_owned()).collect());
    }
    if paths.len() == 1 && paths[0] == "*" {
        return Ok(allowed.iter().map(|p| (*p).to_owned()).collect());
    }
    match paths.iter().find(|p| !allowed.contains(&p.as_str())) {
        Some(bad) => {
            Err(InvalidInput::field("update_mask", format!("{bad} cannot be updated; allowed: {}", allowed.join(", "))))
        }
        None => Ok(paths),
    }
}

/// A status with `ErrorInfo { reason, domain }`.
pub fn status(code: Code, domain: &str, reason: &str, message: impl Into<String>) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, domain, HashMap::<String, String>::new());
    Status::with_error_details(code, message, details)
}

/// INVALID_ARGUMENT with a `BadRequest` naming every field at fault.
pub fn invalid_argument(domain: &str, input: &InvalidInput) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info("INVALID_ARGUMENT", domain, HashMap::<String, String>::new());
    for violation in &input.0 {
        details.add_bad_request_violation(violation.field.clone(), violation.description.clone());
    }
    Status::with_error_details(Code::InvalidArgument, input.to_string(), details)
}

/// A status with `ErrorInfo` and a `BadRequest` naming the field the conflict is about, for
/// codes other than INVALID_ARGUMENT (a name already taken, a stale etag).
pub fn status_for_field(code: Code, domain: &str, reason: &str, message: impl Into<String>, field: &str) -> Status {
    let message = message.into();
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, domain, HashMap::<String, String>::new());
    details.add_bad_request_violation(field, message.clone());
    Status::with_error_details(code, message, details)
}

/// A status that tells the caller when to try again (`RetryInfo`).
pub fn retry_later(
    code: Code,
    domain: &str,
    reason: &str,
    message: impl Into<String>,
    retry_after: Duration,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, domain, HashMap::<String, String>::new());
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(code, message, details)
}

/// INTERNAL for a failure the caller cannot act on. The cause is logged here, where it is
/// handled; the caller gets only a generic message.
pub fn internal(domain: &str, cause: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %cause, "internal error");
    status(Code::Internal, domain, "INTERNAL", "internal error")
}

/// UNAVAILABLE for a dependency that is down; callers may retry.
pub fn unavailable(domain: &str, cause: &dyn std::fmt::Display) -> Status {
    tracing::warn!(error = %cause, "dependency unavailable");
    status(Code::Unavailable, domain, "UNAVAILABLE", "service temporarily unavailable, retry")
}

/// ABORTED for a change the database rolled back because a concurrent one won, after it was run
/// again as often as [`crate::db::in_transaction`] runs it: the caller may retry the call.
pub fn contended(domain: &str, cause: &dyn std::fmt::Display) -> Status {
    tracing::warn!(error = %cause, "transaction kept losing races with concurrent ones");
    status(Code::Aborted, domain, "CONTENDED", "the change met concurrent changes and was rolled back; retry")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_field() {
        let mut input = InvalidInput::default();
        input.check::<()>(Err(InvalidInput::field("email", "is not an email address")));
        input.check::<()>(Err(InvalidInput::field("password", "is too short")));
        let err = input.finish().unwrap_err();
        let status = invalid_argument("identity.keyshare.dev", &err);
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().unwrap();
        let fields: Vec<_> = bad.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["email", "password"]);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_ARGUMENT");
    }

    #[test]
    fn update_masks_follow_aip_134() {
        let mask = |paths: &[&str]| Some(prost_types::FieldMask { paths: paths.iter().map(|p| (*p).into()).collect() });
        let allowed = ["a", "b", "c"];
        assert_eq!(update_paths(None, &allowed, &["b"]).unwrap(), ["b"]);
        assert_eq!(update_paths(mask(&[]), &allowed, &[]).unwrap(), Vec::<String>::new());
        assert_eq!(update_paths(mask(&["*"]), &allowed, &["b"]).unwrap(), ["a", "b", "c"]);
        assert_eq!(update_paths(mask(&["c"]), &allowed, &["b"]).unwrap(), ["c"]);
        assert_eq!(update_paths(mask(&["d"]), &allowed, &[]).unwrap_err().0[0].field, "update_mask");
    }
}
