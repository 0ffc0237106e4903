//! CheckKey end to end: any bytes, decoded as a `CheckKeyRequest`, answered by the authorizer's
//! real gRPC adapter and checker against an index holding one key of each kind (see
//! `keyshare_fuzz::Kind`).
//!
//! Properties: no panic, and the check finishes without waiting; a credential that does not
//! parse is refused as malformed, before any lookup, naming no key; a well-formed credential
//! the index does not hold is not found; a fixture credential gets the outcome its key is set
//! up for, in the order the checks run (expiry, switch, project, environment, method, source,
//! rate, quota); and the valid key, in a request that matches it (whatever its path and client
//! address), is allowed and named. Each input is checked as decoded and again with its
//! credential replaced by a fixture key's, so every key's checks are reached.
#![no_main]

use std::net::IpAddr;

use keyshare_authorizer::grpc::AuthorizerGrpc;
use keyshare_fuzz::{Fixture, Key, Kind, PROJECT, fixture, now};
use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::authorizer::v1::authorizer_service_server::AuthorizerService;
use keyshare_runtime::credential::{self, Environment};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use uuid::Uuid;

const METHODS: [&str; 6] = ["GET", "post", "Put", "PATCH", "delete", "HEAD"];

fn answer(grpc: &AuthorizerGrpc, request: pb::CheckKeyRequest) -> pb::CheckKeyResponse {
    now(grpc.check_key(tonic::Request::new(request))).expect("a check is an answer, never an error").into_inner()
}

fn environment_number(environment: Environment) -> i32 {
    match environment {
        Environment::Sandbox => pb::Environment::Sandbox as i32,
        Environment::Production => pb::Environment::Production as i32,
    }
}

/// The method `method` needs, if it is one a key can be allowed.
fn needs_read(method: &str) -> Option<bool> {
    let known = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
    let upper = method.to_ascii_uppercase();
    known.contains(&upper.as_str()).then(|| upper == "GET" || upper == "HEAD")
}

/// What a fixture key must answer to `request`: one outcome, or valid-or-this one (a limit
/// that the calls before may have used up).
fn expected(key: &Key, request: &pb::CheckKeyRequest) -> (pb::Outcome, bool) {
    let exactly = |outcome| (outcome, false);
    match key.kind {
        Kind::Expired => return exactly(pb::Outcome::Expired),
        Kind::Inactive => return exactly(pb::Outcome::Disabled),
        _ => {}
    }
    let project = request.project.strip_prefix("projects/").and_then(|id| Uuid::try_parse(id).ok());
    if !request.project.is_empty() && project != Some(PROJECT) {
        return exactly(pb::Outcome::NotFound);
    }
    let asked = pb::Environment::try_from(request.environment).unwrap_or(pb::Environment::Unspecified);
    if asked != pb::Environment::Unspecified && asked as i32 != environment_number(key.environment) {
        return exactly(pb::Outcome::WrongEnvironment);
    }
    match needs_read(&request.method) {
        None => return exactly(pb::Outcome::MethodNotAllowed),
        Some(false) if key.kind == Kind::ReadOnly => return exactly(pb::Outcome::MethodNotAllowed),
        Some(_) => {}
    }
    if key.kind == Kind::Allowlisted {
        let from = request.client_ip.parse::<IpAddr>().ok();
        if !from.is_some_and(|ip| Fixture::allowlist().iter().any(|net| net.contains(&ip))) {
            return exactly(pb::Outcome::SourceNotAllowed);
        }
    }
    match key.kind {
        Kind::RateLimited => (pb::Outcome::RateLimited, true),
        Kind::DailyQuota => (pb::Outcome::QuotaExceeded, true),
        _ => exactly(pb::Outcome::Valid),
    }
}

fn check(fixture: &Fixture, grpc: &AuthorizerGrpc, request: pb::CheckKeyRequest) {
    let key = fixture.by_credential(&request.key);
    let parses = credential::parse(&request.key).is_ok();
    let answer = answer(grpc, request.clone());
    let outcome = pb::Outcome::try_from(answer.outcome).expect("a known outcome");
    assert_eq!(answer.allowed, outcome == pb::Outcome::Valid, "{answer:?}");
    if outcome == pb::Outcome::RateLimited || outcome == pb::Outcome::QuotaExceeded {
        assert!(answer.retry_after_seconds > 0, "{answer:?}");
    } else {
        assert_eq!(answer.retry_after_seconds, 0, "{answer:?}");
    }
    let Some(key) = key else {
        let refusal = if parses { pb::Outcome::NotFound } else { pb::Outcome::Malformed };
        assert_eq!(outcome, refusal, "{request:?} -> {answer:?}");
        assert_eq!((answer.key.as_str(), answer.environment, answer.http_status), ("", 0, 401), "{answer:?}");
        return;
    };
    let (want, or_valid) = expected(key, &request);
    assert!(outcome == want || (or_valid && outcome == pb::Outcome::Valid), "{key:?} {request:?} -> {answer:?}");
    if outcome == pb::Outcome::NotFound {
        assert_eq!((answer.key.as_str(), answer.environment), ("", 0), "{answer:?}");
    } else {
        assert_eq!(answer.key, key.name(), "{answer:?}");
        assert_eq!(answer.environment, environment_number(key.environment), "{answer:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let grpc = AuthorizerGrpc::new(fixture.checker.clone());
    let Ok(request) = pb::CheckKeyRequest::decode(data) else {
        return;
    };
    check(fixture, &grpc, request.clone());

    // The same request with a fixture key's credential.
    let pick = data.iter().fold(0usize, |sum, &byte| sum.wrapping_add(usize::from(byte)));
    let key = &fixture.keys[pick % fixture.keys.len()];
    check(fixture, &grpc, pb::CheckKeyRequest { key: key.credential.clone(), ..request.clone() });

    // Round trip: the valid key in a request that matches it is allowed, whatever else it says.
    let valid = fixture.key(Kind::Valid);
    let matching = pb::CheckKeyRequest {
        key: valid.credential.clone(),
        project: if pick & 1 == 0 { String::new() } else { format!("projects/{PROJECT}") },
        method: METHODS[pick % METHODS.len()].to_owned(),
        environment: if pick & 2 == 0 { 0 } else { environment_number(valid.environment) },
        ..request
    };
    let answer = answer(&grpc, matching.clone());
    assert!(answer.allowed, "{matching:?} -> {answer:?}");
    assert_eq!(answer.outcome, pb::Outcome::Valid as i32);
    assert_eq!((answer.http_status, answer.key, answer.retry_after_seconds), (200, valid.name(), 0));
});
