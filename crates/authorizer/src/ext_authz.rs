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
//! - The request is read with [`wire::CheckRequest`], which decodes only what the check reads;
//!   [`AuthorizationServer`] serves `Check` with it and answers Envoy's own `CheckResponse`.

pub mod wire;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::pb::{CheckResponse, HttpStatusCode};
use envoy_types::ext_authz::v3::{CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use keyshare_runtime::credential::Environment;
use tonic::Status;
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use wire::CheckRequest;

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

impl ExtAuthz {
    /// Decides the request Envoy describes. A denial is an answer too: this never fails.
    pub fn check(&self, mut request: CheckRequest) -> CheckResponse {
        let path = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .map(|h| std::mem::take(&mut h.path))
            .unwrap_or_default();
        let headers = request.headers();
        let from_header = wire::lookup(headers, &self.config.credential_header);
        let (credential, header) = match from_header {
            Some(value) => (value, self.config.credential_header.as_str()),
            None => (wire::lookup(headers, "authorization").and_then(bearer).unwrap_or_default(), "authorization"),
        };
        let client_ip = if self.config.trust_forwarded_for {
            wire::lookup(headers, "x-forwarded-for").and_then(forwarded_client)
        } else {
            request.source_address().and_then(|a| a.parse::<IpAddr>().ok())
        };
        let input = CheckInput {
            credential: credential.trim(),
            project: request.context_extension("project").unwrap_or_default(),
            method: request.http().map_or("", |h| h.method.as_str()),
            client_ip,
            environment: request.context_extension("environment").and_then(Environment::parse),
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
        response
    }
}

/// `envoy.service.auth.v3.Authorization`, answering `Check` with [`ExtAuthz::check`].
#[derive(Clone)]
pub struct AuthorizationServer(Arc<ExtAuthz>);

impl AuthorizationServer {
    pub fn new(adapter: ExtAuthz) -> Self {
        Self(Arc::new(adapter))
    }
}

impl NamedService for AuthorizationServer {
    const NAME: &'static str = crate::EXT_AUTHZ_SERVICE;
}

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

impl<B> tonic::codegen::Service<http::Request<B>> for AuthorizationServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            // Routes send this service every `/envoy.service.auth.v3.Authorization/…` path.
            let unknown = tonic::Status::unimplemented("envoy.service.auth.v3.Authorization serves only Check");
            return Box::pin(std::future::ready(Ok(unknown.into_http())));
        }
        let check = Check(self.0.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::<CheckResponse, CheckRequest>::default());
            Ok(grpc.unary(check, request).await)
        })
    }
}

struct Check(Arc<ExtAuthz>);

impl UnaryService<CheckRequest> for Check {
    type Response = CheckResponse;
    type Future = std::future::Ready<Result<tonic::Response<CheckResponse>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<CheckRequest>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(self.0.check(request.into_inner()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lean_request_reads_what_envoy_sends() {
        use envoy_types::pb::envoy::config::core::v3::{Address, Pipe, SocketAddress, address};
        use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
        use prost::Message;

        let peer = |address| Peer { address: Some(Address { address: Some(address) }), ..Default::default() };
        let socket =
            |ip: &str| address::Address::SocketAddress(SocketAddress { address: ip.into(), ..Default::default() });
        let map = |entries: &[(&str, &str)]| entries.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let envoy = |source| envoy_types::ext_authz::v3::pb::CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(source),
                destination: Some(peer(socket("10.0.0.5"))),
                request: Some(Request {
                    time: Some(Default::default()),
                    http: Some(HttpRequest {
                        id: "id-1".into(),
                        method: "POST".into(),
                        headers: map(&[("x-api-key", "ks_live_x"), ("accept", "*/*"), ("x-forwarded-for", "a, b")]),
                        path: "/v1/things?x=1".into(),
                        host: "api.example.com".into(),
                        ..Default::default()
                    }),
                }),
                context_extensions: map(&[("project", "projects/p"), ("environment", "sandbox")]),
                ..Default::default()
            }),
        };
        let lean = |request: &envoy_types::ext_authz::v3::pb::CheckRequest| {
            wire::CheckRequest::decode(request.encode_to_vec().as_slice()).unwrap()
        };

        let read = lean(&envoy(peer(socket("198.51.100.7"))));
        assert_eq!(read.source_address(), Some("198.51.100.7"));
        assert_eq!(read.http().map(|h| (h.method.as_str(), h.path.as_str())), Some(("POST", "/v1/things?x=1")));
        assert_eq!(wire::lookup(read.headers(), "x-api-key"), Some("ks_live_x"));
        assert_eq!(wire::lookup(read.headers(), "x-forwarded-for"), Some("a, b"));
        assert_eq!(wire::lookup(read.headers(), "authorization"), None);
        assert_eq!(read.context_extension("project"), Some("projects/p"));
        assert_eq!(read.context_extension("environment"), Some("sandbox"));
        // A pipe is no client address.
        let piped = lean(&envoy(peer(address::Address::Pipe(Pipe { path: "/run/envoy".into(), mode: 0 }))));
        assert_eq!(piped.source_address(), None);
        // A map entry given twice keeps its last value, as a decoded map does.
        let twice = [("x-api-key", "first"), ("x-api-key", "second")]
            .iter()
            .map(|(k, v)| wire::Entry { key: (*k).into(), value: (*v).into() })
            .collect::<Vec<_>>();
        assert_eq!(wire::lookup(&twice, "x-api-key"), Some("second"));
    }

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
