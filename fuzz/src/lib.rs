//! What the fuzz targets share: an authorizer with a few keys in memory, checked through its
//! real [`Checker`] with no database and no feed.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use ipnet::IpNet;
use keyshare_authorizer::check::Checker;
use keyshare_authorizer::state::Shared;
use keyshare_authorizer::index::{Methods, NewCredential};
use keyshare_authorizer::usage::{self, UsageConfig};
use keyshare_runtime::clock::FrozenClock;
use keyshare_runtime::credential::{Credential, Environment};
use uuid::Uuid;

/// The project every fixture key belongs to.
pub const PROJECT: Uuid = Uuid::from_u128(0x0193_f7e2_0000_7000_8000_0000_0000_0001);

/// The networks the allowlisted key may be called from.
pub const ALLOWLIST: [&str; 2] = ["198.51.100.0/24", "2001:db8::/32"];

/// What a fixture key is set up to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Active, every method, no limits: any matching request is allowed.
    Valid,
    /// Switched off.
    Inactive,
    /// Its expiry is long past.
    Expired,
    /// Callable only from [`ALLOWLIST`].
    Allowlisted,
    /// One call a second; the clock stands still, so after the first call every call is over.
    RateLimited,
    /// One call a day.
    DailyQuota,
    /// Reads only (GET, HEAD).
    ReadOnly,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Valid,
        Kind::Inactive,
        Kind::Expired,
        Kind::Allowlisted,
        Kind::RateLimited,
        Kind::DailyQuota,
        Kind::ReadOnly,
    ];
}

/// A key of the fixture and its credential.
#[derive(Debug)]
pub struct Key {
    pub kind: Kind,
    pub id: Uuid,
    pub environment: Environment,
    pub credential: String,
}

impl Key {
    /// `projects/{project}/keys/{key}`, as answers name it.
    pub fn name(&self) -> String {
        format!("projects/{PROJECT}/keys/{}", self.id)
    }
}

pub struct Fixture {
    pub checker: Checker,
    pub shared: Arc<Shared>,
    pub keys: Vec<Key>,
}

impl Fixture {
    pub fn key(&self, kind: Kind) -> &Key {
        self.keys.iter().find(|key| key.kind == kind).expect("every kind has a key")
    }

    /// The fixture key whose credential is `credential`.
    pub fn by_credential(&self, credential: &str) -> Option<&Key> {
        self.keys.iter().find(|key| key.credential == credential)
    }

    pub fn allowlist() -> Vec<IpNet> {
        ALLOWLIST.iter().map(|net| net.parse().expect("a network")).collect()
    }
}

/// The fixture, built once per process: one key of each [`Kind`] (sandbox for even positions,
/// production for odd), loaded the way the feed loads keys, and a checker whose usage recorder
/// has no writer behind it (its records are dropped and counted, as with a full channel).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let shared = Arc::new(Shared::default());
        let mut keys = Vec::new();
        {
            let mut index = shared.index.write().unwrap_or_else(|p| p.into_inner());
            for (n, kind) in Kind::ALL.into_iter().enumerate() {
                let environment = if n % 2 == 0 { Environment::Sandbox } else { Environment::Production };
                let credential = Credential::from_random_bytes(environment, [n as u8 + 1; 32]);
                let mut new = NewCredential::unrestricted(credential.hash(), environment);
                match kind {
                    Kind::Valid => {}
                    Kind::Inactive => new.active = false,
                    Kind::Expired => new.expire_at = Some(1),
                    Kind::Allowlisted => new.allowlist = Fixture::allowlist(),
                    Kind::RateLimited => new.rate_limit = 1,
                    Kind::DailyQuota => new.daily_quota = 1,
                    Kind::ReadOnly => new.methods = Methods::new(false, true, false, false),
                }
                let id = Uuid::from_u128(0x0193_f7e2_0000_7000_8000_0000_0001_0000 + n as u128);
                index.upsert_key(id, PROJECT, vec![new]);
                keys.push(Key { kind, id, environment, credential: credential.expose().to_owned() });
            }
        }
        // A pool that never connects: nothing here reaches a database.
        let pool = keyshare_runtime::db::pool("postgres://unused@127.0.0.1:1/unused", 1).expect("a lazy pool");
        let clock = FrozenClock::new();
        let (recorder, writer) =
            usage::channel(pool, String::new(), shared.clone(), clock.clone(), UsageConfig::default());
        drop(writer);
        Fixture { checker: Checker::new(shared.clone(), clock, recorder), shared, keys }
    })
}

/// Runs a future that must finish without waiting (a check awaits nothing); panics if it waits.
pub fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a check waited"),
    }
}
