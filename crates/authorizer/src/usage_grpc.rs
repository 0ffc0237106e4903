//! The gRPC adapter of `keyshare.authorizer.v1.UsageService`: parse the request into domain
//! input, call [`Stats`], map the result. With [`crate::grpc`], the only modules that know
//! protobuf types.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use keyshare_proto::authorizer::v1 as pb;
use keyshare_runtime::auth;
use keyshare_runtime::credential::Environment;
use keyshare_runtime::error::{FieldViolation, InvalidInput, Reply};
use keyshare_runtime::page::PageRequest;
use keyshare_runtime::wire::timestamp;
use prost_types::Timestamp;
use tonic::{Request, Status};

use crate::error::Error;
use crate::model::Outcome;
use crate::stats::{self, Buckets, CallLog, Filter, Granularity, LogFilter, Series, Stats};

/// Fully qualified gRPC service name.
pub const GRPC_SERVICE: &str = pb::usage_service_server::SERVICE_NAME;

/// Implements `keyshare.authorizer.v1.UsageService`.
#[derive(Clone, Debug)]
pub struct UsageGrpc {
    stats: Arc<Stats>,
}

impl UsageGrpc {
    pub fn new(stats: Stats) -> Self {
        Self { stats: Arc::new(stats) }
    }

    /// The tonic service to add to the server's routes.
    pub fn into_server(self) -> pb::usage_service_server::UsageServiceServer<Self> {
        pb::usage_service_server::UsageServiceServer::new(self)
    }
}

/// [`keyshare_runtime::error::handle`] for this service's errors.
async fn handle<T>(name: &'static str, body: impl std::future::Future<Output = Result<T, Error>>) -> Reply<T> {
    keyshare_runtime::error::handle(name, body).await
}

/// `Ok` with the parsed input when no violation was recorded.
fn finish<T>(errors: InvalidInput, value: Option<T>) -> Result<T, Error> {
    errors.finish()?;
    value.ok_or_else(|| Error::Internal("parsed input missing".into()))
}

/// The caller's verified bearer token, to forward to keyring (UNAUTHENTICATED without one).
fn caller_token<T>(request: &Request<T>) -> Result<String, Status> {
    Ok(auth::CallContext::of(request)?.token)
}

#[tonic::async_trait]
impl pb::usage_service_server::UsageService for UsageGrpc {
    async fn query_key_usage(&self, request: Request<pb::QueryKeyUsageRequest>) -> Reply<pb::QueryKeyUsageResponse> {
        let token = caller_token(&request)?;
        let r = request.into_inner();
        handle("authorizer.query_key_usage", async {
            let mut errors = InvalidInput::default();
            let key = errors.check(crate::model::parse_key(&r.name, "name"));
            let query = SeriesInput {
                granularity: r.granularity,
                start_time: r.start_time,
                end_time: r.end_time,
                environment: r.environment,
                method: &r.method,
                outcome: r.outcome,
            }
            .parse(&mut errors, self.stats.now());
            let (key, (buckets, filter)) = finish(errors, key.zip(query))?;
            let series = self.stats.key_usage(&token, key, buckets, filter).await?;
            let (granularity, start_time, end_time, points, totals, total_calls) = series_pb(series);
            Ok(pb::QueryKeyUsageResponse { granularity, start_time, end_time, points, totals, total_calls })
        })
        .await
    }

    async fn query_project_usage(
        &self,
        request: Request<pb::QueryProjectUsageRequest>,
    ) -> Reply<pb::QueryProjectUsageResponse> {
        let token = caller_token(&request)?;
        let r = request.into_inner();
        handle("authorizer.query_project_usage", async {
            let mut errors = InvalidInput::default();
            let project = errors.check(crate::model::parse_project(&r.name, "name"));
            let query = SeriesInput {
                granularity: r.granularity,
                start_time: r.start_time,
                end_time: r.end_time,
                environment: r.environment,
                method: &r.method,
                outcome: r.outcome,
            }
            .parse(&mut errors, self.stats.now());
            let (project, (buckets, filter)) = finish(errors, project.zip(query))?;
            let series = self.stats.project_usage(&token, project, buckets, filter, r.per_key).await?;
            let (granularity, start_time, end_time, points, totals, total_calls) = series_pb(series);
            Ok(pb::QueryProjectUsageResponse { granularity, start_time, end_time, points, totals, total_calls })
        })
        .await
    }

    async fn list_call_logs(&self, request: Request<pb::ListCallLogsRequest>) -> Reply<pb::ListCallLogsResponse> {
        let token = caller_token(&request)?;
        let r = request.into_inner();
        handle("authorizer.list_call_logs", async {
            let mut errors = InvalidInput::default();
            let key = errors.check(crate::model::parse_key(&r.parent, "parent"));
            let environment = errors.check(environment(r.environment, "environment"));
            let outcome = errors.check(outcome(r.outcome, "outcome"));
            let filter = LogFilter { environment: environment.flatten(), outcome: outcome.flatten() };
            // Without a key there is no scope to check the token against; its violation is enough.
            let page = key.and_then(|key| {
                errors.check(PageRequest::parse(r.page_size, &r.page_token, &stats::call_log_scope(key, filter)))
            });
            let (key, page) = finish(errors, key.zip(page))?;
            let page = self.stats.call_logs(&token, key, filter, page).await?;
            Ok(pb::ListCallLogsResponse {
                call_logs: page.items.into_iter().map(call_log_pb).collect(),
                next_page_token: page.next_page_token,
            })
        })
        .await
    }
}

/// The series fields QueryKeyUsage and QueryProjectUsage share.
struct SeriesInput<'a> {
    granularity: i32,
    start_time: Option<Timestamp>,
    end_time: Option<Timestamp>,
    environment: i32,
    method: &'a str,
    outcome: i32,
}

impl SeriesInput<'_> {
    /// Records every violation in `errors`; `Some` when all of it parsed.
    fn parse(self, errors: &mut InvalidInput, now: DateTime<Utc>) -> Option<(Buckets, Filter)> {
        let granularity = errors.check(granularity(self.granularity));
        let start = errors.check(parse_timestamp(self.start_time, "start_time"));
        let end = errors.check(parse_timestamp(self.end_time, "end_time"));
        let environment = errors.check(environment(self.environment, "environment"));
        let method = errors.check(stats::parse_method(self.method, "method"));
        let outcome = errors.check(outcome(self.outcome, "outcome"));
        // The range is judged only once its parts parsed.
        let buckets = match (granularity, start, end) {
            (Some(granularity), Some(start), Some(end)) => errors.check(Buckets::parse(granularity, start, end, now)),
            _ => None,
        };
        Some((buckets?, Filter { environment: environment?, method: method?, outcome: outcome? }))
    }
}

fn granularity(raw: i32) -> Result<Option<Granularity>, InvalidInput> {
    match pb::Granularity::try_from(raw) {
        Ok(pb::Granularity::Unspecified) => Ok(None),
        Ok(pb::Granularity::Minute) => Ok(Some(Granularity::Minute)),
        Ok(pb::Granularity::Hour) => Ok(Some(Granularity::Hour)),
        Ok(pb::Granularity::Day) => Ok(Some(Granularity::Day)),
        Err(_) => {
            Err(InvalidInput::field("granularity", "must be GRANULARITY_MINUTE, GRANULARITY_HOUR or GRANULARITY_DAY"))
        }
    }
}

/// An optional filter: unspecified means every environment.
fn environment(raw: i32, field: &str) -> Result<Option<Environment>, InvalidInput> {
    match raw {
        0 => Ok(None),
        n => Environment::from_number(n)
            .map(Some)
            .ok_or_else(|| InvalidInput::field(field, "is not a known environment")),
    }
}

/// An optional filter: unspecified means every outcome.
fn outcome(raw: i32, field: &str) -> Result<Option<Outcome>, InvalidInput> {
    if raw == pb::Outcome::Unspecified as i32 {
        return Ok(None);
    }
    i16::try_from(raw)
        .ok()
        .and_then(Outcome::from_number)
        .map(Some)
        .ok_or_else(|| InvalidInput::field(field, "is not a known outcome"))
}

/// Earliest and latest seconds a `google.protobuf.Timestamp` may hold (years 1 to 9999).
const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

fn parse_timestamp(raw: Option<Timestamp>, field: &str) -> Result<Option<DateTime<Utc>>, InvalidInput> {
    let Some(raw) = raw else { return Ok(None) };
    let valid = TIMESTAMP_SECONDS.contains(&raw.seconds) && (0..1_000_000_000).contains(&raw.nanos);
    valid
        .then(|| DateTime::from_timestamp(raw.seconds, raw.nanos as u32))
        .flatten()
        .map(Some)
        .ok_or_else(|| InvalidInput(vec![FieldViolation::new(field, "is not a valid timestamp (years 1 to 9999)")]))
}

type SeriesPb = (i32, Option<Timestamp>, Option<Timestamp>, Vec<pb::UsagePoint>, Vec<pb::UsageTotal>, i64);

fn series_pb(series: Series) -> SeriesPb {
    let granularity = match series.buckets.granularity {
        Granularity::Minute => pb::Granularity::Minute,
        Granularity::Hour => pb::Granularity::Hour,
        Granularity::Day => pb::Granularity::Day,
    };
    let points = series
        .points
        .into_iter()
        .map(|point| pb::UsagePoint {
            start_time: Some(timestamp(point.start)),
            environment: point.environment.number(),
            outcome: crate::grpc::outcome_pb(point.outcome) as i32,
            calls: point.calls,
            key: point.key.map(|key| key.to_string()).unwrap_or_default(),
        })
        .collect();
    let totals = series
        .totals
        .into_iter()
        .map(|(outcome, calls)| pb::UsageTotal { outcome: crate::grpc::outcome_pb(outcome) as i32, calls })
        .collect();
    (
        granularity as i32,
        Some(timestamp(series.buckets.start)),
        Some(timestamp(series.buckets.end)),
        points,
        totals,
        series.total_calls,
    )
}

fn call_log_pb(log: CallLog) -> pb::CallLog {
    pb::CallLog {
        name: format!("{}/callLogs/{}", log.key, log.id),
        key: log.key.to_string(),
        call_time: Some(timestamp(log.at)),
        environment: log.environment.number(),
        method: log.method,
        path: log.path,
        client_ip: log.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        outcome: crate::grpc::outcome_pb(log.outcome) as i32,
        http_status: i32::from(log.http_status),
    }
}
