//! Deciding one check, from memory, in the order PRODUCT §5 fixes: format and checksum, known
//! credential, expiry and grace, active switch, project, expected environment, method, source
//! address, the key's and the project's rate limits, then the key's daily and the project's
//! monthly quota. Every limit is checked before any is charged for good: a call refused by one
//! gives back what the others took.

use keyshare_runtime::credential;
use uuid::Uuid;

use crate::index::{self, Index};
use crate::limits::{self, Bucket, Period, Sharing};
use crate::model::{CheckInput, Decision, KeyName, Outcome};
use crate::state::Shared;
use crate::usage::{CallRecord, Recorder};

/// Whether the gateway's `projects/{project}` names `project`, compared without allocating.
fn same_project(gateway: &str, project: Uuid) -> bool {
    gateway.strip_prefix("projects/").and_then(|id| Uuid::try_parse(id).ok()) == Some(project)
}

/// Decides a check at `now_nanos` (Unix nanoseconds on the service clock). Touches only memory;
/// allocates nothing. A valid call is charged to every rate bucket and quota, or to none.
pub fn check(index: &Index, sharing: &Sharing, input: &CheckInput<'_>, now_nanos: i64) -> Decision {
    let now = now_nanos.div_euclid(1_000_000_000);
    let reject = |outcome| Decision { outcome, key: None, environment: None, retry_after: 0 };
    // Cheap rejections first: a mistyped or forged credential never reaches a lookup.
    if credential::parse(input.credential).is_err() {
        return reject(Outcome::Malformed);
    }
    let Some(found) = index.lookup(&credential::hash_presented(input.credential)) else {
        return reject(Outcome::NotFound);
    };
    let known = |outcome| Decision {
        outcome,
        key: Some(KeyName { project: found.project.id, key: found.key.id }),
        environment: Some(found.environment),
        retry_after: 0,
    };
    let settings = found.settings;
    if settings.expired(now) || found.grace_end.is_some_and(|end| now >= end) {
        return known(Outcome::Expired);
    }
    if !settings.active() {
        return known(Outcome::Disabled);
    }
    if !input.project.is_empty() && !same_project(input.project, found.project.id) {
        // Another project's key is, to this gateway, no key at all.
        return reject(Outcome::NotFound);
    }
    if input.environment.is_some_and(|expected| expected != found.environment) {
        return known(Outcome::WrongEnvironment);
    }
    if !settings.methods.allow(input.method) {
        return known(Outcome::MethodNotAllowed);
    }
    if !index.allows_source(&found, input.client_ip) {
        return known(Outcome::SourceNotAllowed);
    }
    let slot = index::slot(found.environment);
    let (key, project, key_limits) = (found.key, found.project, found.limits);
    let (key_rate, project_rate) = (i64::from(key_limits.rate_limit[slot]), project.limits[slot].rate_limit);
    let rates = [(&key_limits.rates[slot], key_rate), (&project.rates[slot], project_rate)];
    if let Err(retry_after) = limits::take_all(&rates, now_nanos) {
        return Decision { retry_after, ..known(Outcome::RateLimited) };
    }
    // With limits shared across replicas, each limit also takes one call from this replica's
    // lease of the fleet's budget (a count-down in memory; the leases are kept by a task).
    let environment = slot as u8;
    let second = now.clamp(0, i64::from(u32::MAX)) as u32;
    let (key_lease, project_lease) = (&key_limits.rates[slot].lease, &project.rates[slot].lease);
    if !sharing.take(key_lease, Bucket::KeyRate(key.id, environment), second, key_rate) {
        limits::give_back_all(&rates);
        return Decision { retry_after: 1, ..known(Outcome::RateLimited) };
    }
    if !sharing.take(project_lease, Bucket::ProjectRate(project.id, environment), second, project_rate) {
        sharing.give_back(key_lease, second, key_rate);
        limits::give_back_all(&rates);
        return Decision { retry_after: 1, ..known(Outcome::RateLimited) };
    }
    let give_back_rates = || {
        sharing.give_back(key_lease, second, key_rate);
        sharing.give_back(project_lease, second, project_rate);
        limits::give_back_all(&rates);
    };
    let (day, month) = (Period::day(now), Period::month(now));
    let (daily_quota, monthly_quota) = (i64::from(key_limits.daily_quota[slot]), project.limits[slot].monthly_quota);
    let (daily, monthly) = (&key.daily[slot], &project.monthly[slot]);
    let (daily_lease, monthly_lease) = (&key_limits.daily_leases[slot], &project.monthly_leases[slot]);
    let over_day = || Decision { retry_after: Period::seconds_to_next_day(now), ..known(Outcome::QuotaExceeded) };
    let over_month = || Decision { retry_after: Period::seconds_to_next_month(now), ..known(Outcome::QuotaExceeded) };
    if !daily.try_charge(day, daily_quota) {
        give_back_rates();
        return over_day();
    }
    if !sharing.take(daily_lease, Bucket::KeyDay(key.id, environment), day.number(), daily_quota) {
        daily.add(day, -1);
        give_back_rates();
        return over_day();
    }
    let give_back_day = || {
        daily.add(day, -1);
        sharing.give_back(daily_lease, day.number(), daily_quota);
        give_back_rates();
    };
    if !monthly.try_charge(month, monthly_quota) {
        give_back_day();
        return over_month();
    }
    if !sharing.take(monthly_lease, Bucket::ProjectMonth(project.id, environment), month.number(), monthly_quota) {
        monthly.add(month, -1);
        give_back_day();
        return over_month();
    }
    known(Outcome::Valid)
}

/// Decides checks against the shared index at the service clock's time, counts them and hands
/// checks of known keys to the usage recorder: what both the CheckKey and the Envoy adapters
/// call.
#[derive(Clone)]
pub struct Checker {
    shared: std::sync::Arc<Shared>,
    clock: keyshare_runtime::clock::SharedClock,
    usage: Recorder,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker").finish_non_exhaustive()
    }
}

impl Checker {
    pub fn new(shared: std::sync::Arc<Shared>, clock: keyshare_runtime::clock::SharedClock, usage: Recorder) -> Self {
        Self { shared, clock, usage }
    }

    /// Decides a check; `path` (the request path, moved in rather than copied) goes to the
    /// call log.
    pub fn decide(&self, input: &CheckInput<'_>, path: String) -> Decision {
        let now = self.clock.now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let decision = {
            // The read lock covers only the decision; nothing awaits while it is held.
            let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
            check(&index, &self.shared.sharing, input, now)
        };
        self.shared.count(decision.outcome);
        if let (Some(key), Some(environment)) = (decision.key, decision.environment) {
            self.usage.record(CallRecord {
                at_nanos: now,
                key,
                environment,
                method: crate::model::method_label(input.method),
                path: crate::model::log_path(path),
                client_ip: input.client_ip,
                outcome: decision.outcome,
                // The recorder decides, against its budget.
                logged: false,
            });
        }
        decision
    }
}
