//! Deciding one check, from memory, in the order PRODUCT §5 fixes: format and checksum, known
//! credential, expiry and grace, active switch, project, expected environment, method, source
//! address, then the key's and the project's rate limits. (Quotas are not counted yet.)

use std::net::IpAddr;
use std::sync::Arc;

use keyshare_runtime::credential::{self, Environment};

use crate::index::{self, Index};
use crate::limits;

/// Why a check passed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    Malformed,
    NotFound,
    Expired,
    Disabled,
    WrongEnvironment,
    MethodNotAllowed,
    SourceNotAllowed,
    RateLimited,
    QuotaExceeded,
}

impl Outcome {
    /// The HTTP status a gateway answers with.
    pub fn http_status(self) -> i32 {
        match self {
            Outcome::Valid => 200,
            Outcome::Malformed | Outcome::NotFound | Outcome::Expired | Outcome::WrongEnvironment => 401,
            Outcome::Disabled | Outcome::MethodNotAllowed | Outcome::SourceNotAllowed => 403,
            Outcome::RateLimited | Outcome::QuotaExceeded => 429,
        }
    }
}

/// What the gateway asks about.
#[derive(Clone, Copy, Debug)]
pub struct CheckInput<'a> {
    pub credential: &'a str,
    /// `projects/{project}` or empty for any.
    pub project: &'a str,
    pub method: &'a str,
    pub client_ip: Option<IpAddr>,
    /// The environment the gateway serves, if it says.
    pub environment: Option<Environment>,
}

/// The answer, with what is known of the credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub key: Option<Arc<str>>,
    pub environment: Option<Environment>,
    /// With a rate or quota refusal: seconds until a retry can succeed.
    pub retry_after: i64,
}

/// Decides a check at `now_nanos` (Unix nanoseconds on the service clock). Touches only memory;
/// allocates nothing. A valid call is charged to the key's and the project's rate buckets, or
/// to neither.
pub fn check(index: &Index, input: &CheckInput<'_>, now_nanos: i64) -> Decision {
    let now = now_nanos.div_euclid(1_000_000_000);
    let reject = |outcome| Decision { outcome, key: None, environment: None, retry_after: 0 };
    // Cheap rejections first: a mistyped or forged credential never reaches a lookup.
    if credential::parse(input.credential).is_err() {
        return reject(Outcome::Malformed);
    }
    let Some(entry) = index.credential(&credential::hash_presented(input.credential)) else {
        return reject(Outcome::NotFound);
    };
    let known = |outcome| Decision {
        outcome,
        key: Some(entry.key.name.clone()),
        environment: Some(entry.environment),
        retry_after: 0,
    };
    if entry.expire_at.is_some_and(|at| now >= at) || entry.grace_end.is_some_and(|end| now >= end) {
        return known(Outcome::Expired);
    }
    if !entry.active {
        return known(Outcome::Disabled);
    }
    if !input.project.is_empty() && *entry.key.project != *input.project {
        // Another project's key is, to this gateway, no key at all.
        return reject(Outcome::NotFound);
    }
    if input.environment.is_some_and(|expected| expected != entry.environment) {
        return known(Outcome::WrongEnvironment);
    }
    if !entry.methods.allow(input.method) {
        return known(Outcome::MethodNotAllowed);
    }
    if !entry.allows_source(input.client_ip) {
        return known(Outcome::SourceNotAllowed);
    }
    let slot = index::slot(entry.environment);
    let key_rate = (&entry.key.rates[slot], entry.rate_limit);
    let taken = match index.project(&entry.key.project) {
        Some(project) => {
            limits::take_all(&[key_rate, (&project.rates[slot], project.limits[slot].rate_limit)], now_nanos)
        }
        None => limits::take_all(&[key_rate], now_nanos),
    };
    if let Err(retry_after) = taken {
        return Decision { retry_after, ..known(Outcome::RateLimited) };
    }
    known(Outcome::Valid)
}

/// Decides checks against the shared index at the service clock's time: what both the
/// CheckKey and the Envoy adapters call.
#[derive(Clone)]
pub struct Checker {
    shared: std::sync::Arc<crate::follower::Shared>,
    clock: keyshare_runtime::clock::SharedClock,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker").finish_non_exhaustive()
    }
}

impl Checker {
    pub fn new(shared: std::sync::Arc<crate::follower::Shared>, clock: keyshare_runtime::clock::SharedClock) -> Self {
        Self { shared, clock }
    }

    pub fn decide(&self, input: &CheckInput<'_>) -> Decision {
        let now = self.clock.now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        // The read lock covers only the lookup; nothing awaits while it is held.
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        check(&index, input, now)
    }
}
