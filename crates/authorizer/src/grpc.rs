//! The gRPC adapter for CheckKey. The only module that knows protobuf types.

use keyshare_proto::authorizer::v1 as pb;
use keyshare_runtime::credential::Environment;
use std::net::IpAddr;
use tonic::{Request, Response, Status};

use crate::check::Checker;
use crate::model::{CheckInput, Outcome};

/// Implements `keyshare.authorizer.v1.AuthorizerService`.
pub struct AuthorizerGrpc {
    checker: Checker,
}

impl AuthorizerGrpc {
    pub fn new(checker: Checker) -> Self {
        Self { checker }
    }
}

pub(crate) fn outcome_pb(outcome: Outcome) -> pb::Outcome {
    match outcome {
        Outcome::Valid => pb::Outcome::Valid,
        Outcome::Malformed => pb::Outcome::Malformed,
        Outcome::NotFound => pb::Outcome::NotFound,
        Outcome::Expired => pb::Outcome::Expired,
        Outcome::Disabled => pb::Outcome::Disabled,
        Outcome::WrongEnvironment => pb::Outcome::WrongEnvironment,
        Outcome::MethodNotAllowed => pb::Outcome::MethodNotAllowed,
        Outcome::SourceNotAllowed => pb::Outcome::SourceNotAllowed,
        Outcome::RateLimited => pb::Outcome::RateLimited,
        Outcome::QuotaExceeded => pb::Outcome::QuotaExceeded,
    }
}

#[tonic::async_trait]
impl pb::authorizer_service_server::AuthorizerService for AuthorizerGrpc {
    /// A rejected key is an answer, never an error: gateways read RPC errors as "authorizer down".
    async fn check_key(&self, request: Request<pb::CheckKeyRequest>) -> Result<Response<pb::CheckKeyResponse>, Status> {
        let r = request.into_inner();
        let input = CheckInput {
            credential: &r.key,
            project: &r.project,
            method: &r.method,
            client_ip: r.client_ip.parse::<IpAddr>().ok(),
            environment: Environment::from_number(r.environment),
        };
        let decision = self.checker.decide(&input, r.path);
        Ok(Response::new(pb::CheckKeyResponse {
            allowed: decision.outcome == Outcome::Valid,
            outcome: outcome_pb(decision.outcome) as i32,
            http_status: decision.outcome.http_status(),
            key: decision.key.map(|k| k.to_string()).unwrap_or_default(),
            environment: decision.environment.map_or(0, Environment::number),
            retry_after_seconds: i32::try_from(decision.retry_after).unwrap_or(i32::MAX),
        }))
    }
}
