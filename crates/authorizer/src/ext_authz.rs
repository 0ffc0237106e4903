//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`) on the same
//! port: the same check, read from the HTTP request Envoy describes.
//!
//! - The credential comes from `x-api-key` or `authorization: Bearer …` (the header is
//!   configurable; the scheme is case-insensitive, RFC 9110 §11.1); the method and path from the HTTP attributes; the project and the expected
//!   environment from the route's `context_extensions` (`project`, `environment`); the client
//!   address from the source peer, or from the last `x-forwarded-for` entry when told to trust
//!   the load balancer in front of Envoy.
//! - Allowed: `x-keyshare-key` and `x-keyshare-environment` are added for the upstream and the
//!   credential header is removed. Denied: the outcome's HTTP status with a small JSON body
//!   `{"outcome": …, "message": …}`, and `retry-after` on 429. A denial is a normal response
//!   (non-OK `status` inside it), never an RPC error, which Envoy would read as "authorizer down".

use std::net::IpAddr;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse, HttpStatusCode};
use envoy_types::ext_authz::v3::{CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use keyshare_runtime::credential::Environment;
use tonic::{Request, Response, Status};

use crate::check::Checker;
use crate::model::{CheckInput, Outcome};

/// Where the credential and the client address are read from.
#[derive(Clone, Debug)]
pub struct ExtAuthzConfig {
    /// Lowercase header carrying the credential (`KEYSHARE_CREDENTIAL_HEADER`, default
    /// `x-api-key`); `authorization: Bearer` is always accepted too.
    pub credential_header: String,
    /// Take the client address from `x-forwarded-for` (`KEYSHARE_TRUST_FORWARDED_FOR`): only
    /// behind a load balancer that appends the address it saw. See [`forwarded_client`].
    pub trust_forwarded_for: bool,
}

pub struct ExtAuthz {
    checker: Checker,
    config: ExtAuthzConfig,
}

impl ExtAuthz {
    pub fn new(checker: Checker, config: ExtAuthzConfig) -> Self {
        Self { checker, config }
    }
}

fn message(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Valid => "ok",
        Outcome::Malformed => "the API key is malformed",
        Outcome::NotFound => "the API key is not valid for this API",
        Outcome::Expired => "the API key has expired",
        Outcome::Disabled => "the API key is disabled for this environment",
        Outcome::WrongEnvironment => "the API key belongs to another environment",
        Outcome::MethodNotAllowed => "the API key may not use this method",
        Outcome::SourceNotAllowed => "calls from this address are not allowed for this API key",
        Outcome::RateLimited => "rate limit reached",
        Outcome::QuotaExceeded => "quota used up",
    }
}

/// The credentials of an `authorization` value with the `Bearer` scheme, in any case (RFC 9110
/// §11.1: the scheme is case-insensitive); `None` for another scheme.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(credentials)
}

/// The client address in an `x-forwarded-for` value: its last entry, the one the trusted load
/// balancer appended. Everything before it came from the caller, who could write any address
/// there (and so slip past an allowlist); an unreadable last entry is no address at all, which
/// an allowlist refuses.
fn forwarded_client(value: &str) -> Option<IpAddr> {
    value.rsplit(',').next()?.trim().parse().ok()
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let mut request = request.into_inner();
        let path = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .map(|h| std::mem::take(&mut h.path))
            .unwrap_or_default();
        let empty = Default::default();
        let headers = request.get_client_headers().unwrap_or(&empty);
        let http = request.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        let extensions = request.attributes.as_ref().map(|a| &a.context_extensions);
        let from_header = headers.get(&self.config.credential_header).map(String::as_str);
        let (credential, header) = match from_header {
            Some(value) => (value, self.config.credential_header.as_str()),
            None => (headers.get("authorization").and_then(|v| bearer(v)).unwrap_or_default(), "authorization"),
        };
        let client_ip = if self.config.trust_forwarded_for {
            headers.get("x-forwarded-for").and_then(|v| forwarded_client(v))
        } else {
            request.get_client_address().and_then(|a| a.parse::<IpAddr>().ok())
        };
        let input = CheckInput {
            credential: credential.trim(),
            project: extensions.and_then(|e| e.get("project")).map_or("", String::as_str),
            method: http.map_or("", |h| h.method.as_str()),
            client_ip,
            environment: extensions.and_then(|e| e.get("environment")).and_then(|e| Environment::parse(e)),
        };
        let decision = self.checker.decide(&input, path);

        let mut response = CheckResponse::new();
        if decision.outcome == Outcome::Valid {
            let mut ok = OkHttpResponseBuilder::new();
            ok.add_header("x-keyshare-key", decision.key.map(|k| k.to_string()).unwrap_or_default(), None, false);
            ok.add_header("x-keyshare-environment", decision.environment.map_or("", |e| e.as_str()), None, false);
            ok.remove_header(header);
            response.set_status(Status::ok("")).set_http_response(ok.build());
        } else {
            let status = decision.outcome.http_status();
            let code = HttpStatusCode::try_from(status).unwrap_or(HttpStatusCode::Forbidden);
            let outcome_name = crate::grpc::outcome_pb(decision.outcome).as_str_name();
            let body = format!(r#"{{"outcome":"{outcome_name}","message":"{}"}}"#, message(decision.outcome));
            let mut denied = DeniedHttpResponseBuilder::new();
            denied.set_http_status(code).set_body(body).add_header("content-type", "application/json", None, false);
            if decision.retry_after > 0 {
                denied.add_header("retry-after", decision.retry_after.to_string(), None, false);
            }
            let status = match status {
                401 => Status::unauthenticated(message(decision.outcome)),
                429 => Status::resource_exhausted(message(decision.outcome)),
                _ => Status::permission_denied(message(decision.outcome)),
            };
            response.set_status(status).set_http_response(denied.build());
        }
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for (value, credentials) in [
            ("Bearer ks_live_x", Some("ks_live_x")),
            ("bearer ks_live_x", Some("ks_live_x")),
            ("BEARER ks_live_x", Some("ks_live_x")),
            ("bEaReR   ks_live_x", Some("  ks_live_x")),
            ("Basic a2V5", None),
            ("Bearerks_live_x", None),
            ("", None),
        ] {
            assert_eq!(bearer(value), credentials, "{value:?}");
        }
    }

    #[test]
    fn the_client_is_the_last_forwarded_address() {
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        for (header, client) in [
            ("198.51.100.7", ip("198.51.100.7")),
            // The caller wrote the first entry; the load balancer appended the second.
            ("10.0.0.1, 198.51.100.7", ip("198.51.100.7")),
            ("10.0.0.1,198.51.100.7", ip("198.51.100.7")),
            ("203.0.113.1, 10.0.0.1, 2001:db8::7", ip("2001:db8::7")),
            ("10.0.0.1, garbage", None),
            ("", None),
        ] {
            assert_eq!(forwarded_client(header), client, "{header:?}");
        }
    }
}
