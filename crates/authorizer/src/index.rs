//! The authorizer's in-memory copy of what keyring's feed says: every live credential, every
//! key's per-environment settings and every project's limits, with the rate and quota counters
//! checks charge. Replaced whole by a snapshot, changed key by key by the events after it.
//!
//! It is laid out for a million keys in well under 300 bytes each: keys and projects live in
//! slot vectors and are referred to by `u32` slots; identifiers are UUIDs (names are formatted
//! only in answers); a credential is found by the first 128 bits of its SHA-256, which map to
//! its key's slot and environment. Settings shared by an environment's credentials are stored
//! once per key; the rare credential in a regeneration grace period lives in a side map, and so
//! do IP allowlists.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use keyshare_runtime::credential::Environment;
use uuid::Uuid;

use crate::limits::{Quota, Rate};

/// A credential as the index knows it: the first 128 bits of its SHA-256. Finding another
/// credential with the same 128 bits is a second-preimage search, so the prefix identifies it.
pub type CredentialId = [u8; 16];

/// The [`CredentialId`] of a SHA-256.
pub fn credential_id(sha256: &[u8; 32]) -> CredentialId {
    let mut id = [0; 16];
    id.copy_from_slice(&sha256[..16]);
    id
}

/// Index of an environment in two-element arrays: sandbox first.
pub fn slot(environment: Environment) -> usize {
    match environment {
        Environment::Sandbox => 0,
        Environment::Production => 1,
    }
}

fn environment_of(slot: usize) -> Environment {
    if slot == 0 { Environment::Sandbox } else { Environment::Production }
}

/// Hashes a credential id by its first eight bytes: they are already uniformly random, and
/// only keyring's CSPRNG-made credentials are ever inserted, so nobody can crowd a bucket.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }

    fn write_usize(&mut self, _: usize) {
        // The length prefix of a fixed-size array says nothing.
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type CredentialMap<V> = HashMap<CredentialId, V, BuildHasherDefault<PrefixHasher>>;

/// Methods a credential may call, one bit each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Methods(u8);

impl Methods {
    pub const CREATE: u8 = 1;
    pub const READ: u8 = 2;
    pub const UPDATE: u8 = 4;
    pub const DELETE: u8 = 8;

    pub fn new(create: bool, read: bool, update: bool, delete: bool) -> Self {
        let bit = |on: bool, flag: u8| if on { flag } else { 0 };
        Self(bit(create, Self::CREATE) | bit(read, Self::READ) | bit(update, Self::UPDATE) | bit(delete, Self::DELETE))
    }

    /// Whether an HTTP method is allowed: POST needs create, GET/HEAD read, PUT/PATCH update,
    /// DELETE delete. Any other method is refused. Compares without allocating.
    pub fn allow(self, method: &str) -> bool {
        let needed = if method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD") {
            Self::READ
        } else if method.eq_ignore_ascii_case("POST") {
            Self::CREATE
        } else if method.eq_ignore_ascii_case("PUT") || method.eq_ignore_ascii_case("PATCH") {
            Self::UPDATE
        } else if method.eq_ignore_ascii_case("DELETE") {
            Self::DELETE
        } else {
            return false;
        };
        self.0 & needed != 0
    }
}

/// Settings of one environment of a key: 16 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvSettings {
    flags: u8,
    pub methods: Methods,
    /// Requests per second; 0 means none.
    pub rate_limit: u32,
    /// Calls per UTC day; 0 means none. (Quotas above `u32::MAX` a day are held as that.)
    pub daily_quota: u32,
    /// Unix seconds after which the environment's credentials are expired; 0 means never.
    expire_at: u32,
}

impl EnvSettings {
    const PRESENT: u8 = 1;
    const ACTIVE: u8 = 2;
    const ALLOWLIST: u8 = 4;

    pub fn active(&self) -> bool {
        self.flags & Self::ACTIVE != 0
    }

    fn present(&self) -> bool {
        self.flags & Self::PRESENT != 0
    }

    fn has_allowlist(&self) -> bool {
        self.flags & Self::ALLOWLIST != 0
    }

    /// Whether the environment's expiry has passed at Unix second `now`.
    pub fn expired(&self, now: i64) -> bool {
        self.expire_at != 0 && now >= i64::from(self.expire_at)
    }
}

/// A key: its identity, its settings per environment and the counters checks charge.
#[derive(Debug, Default)]
pub struct KeyRecord {
    pub id: Uuid,
    /// Slot of the key's project.
    project: u32,
    pub environments: [EnvSettings; 2],
    /// The current credential of each environment (all zero: none), to remove it on change.
    current: [CredentialId; 2],
    /// Rate buckets per environment.
    pub rates: [Rate; 2],
    /// Calls charged to the daily quota, per environment.
    pub daily: [Quota; 2],
}

/// A project's limits for one environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub rate_limit: i64,
    pub monthly_quota: i64,
}

/// A project: its limits and counters per environment (sandbox first).
#[derive(Debug, Default)]
pub struct ProjectRecord {
    pub id: Uuid,
    pub limits: [Limits; 2],
    pub rates: [Rate; 2],
    /// Calls charged to the monthly quota, per environment.
    pub monthly: [Quota; 2],
    keys: u32,
}

/// A credential as the feed describes it, before it goes into the index.
#[derive(Clone, Debug)]
pub struct NewCredential {
    pub sha256: [u8; 32],
    pub environment: Environment,
    pub active: bool,
    pub methods: Methods,
    pub rate_limit: i64,
    pub daily_quota: i64,
    pub allowlist: Vec<IpNet>,
    /// Unix seconds.
    pub expire_at: Option<i64>,
    /// Unix seconds after which this regenerated credential stops working.
    pub grace_end: Option<i64>,
}

impl NewCredential {
    /// An active credential with every permission and no limits, allowlist, expiry or grace:
    /// what keyring issues by default.
    pub fn unrestricted(sha256: [u8; 32], environment: Environment) -> Self {
        Self {
            sha256,
            environment,
            active: true,
            methods: Methods::new(true, true, true, true),
            rate_limit: 0,
            daily_quota: 0,
            allowlist: Vec::new(),
            expire_at: None,
            grace_end: None,
        }
    }
}

/// What a lookup found: the credential's key, project and environment.
#[derive(Clone, Copy, Debug)]
pub struct Found<'a> {
    pub key: &'a KeyRecord,
    pub project: &'a ProjectRecord,
    pub environment: Environment,
    pub settings: &'a EnvSettings,
    /// For a regenerated credential in its grace period: Unix seconds when it stops working.
    pub grace_end: Option<i64>,
    reference: u32,
}

/// Key slot and environment in one `u32`: `slot << 1 | environment`.
fn reference(slot: u32, environment: usize) -> u32 {
    slot << 1 | environment as u32
}

/// Puts `record` into a free slot of `records` (or a new one at the end); returns the slot.
fn place<T>(records: &mut Vec<T>, free: &mut Vec<u32>, record: T) -> u32 {
    match free.pop() {
        Some(slot) => {
            records[slot as usize] = record;
            slot
        }
        None => {
            records.push(record);
            (records.len() - 1) as u32
        }
    }
}

fn clamp_u32(value: i64) -> u32 {
    value.clamp(0, i64::from(u32::MAX)) as u32
}

#[derive(Debug, Default)]
pub struct Index {
    /// Current credentials → key slot and environment.
    credentials: CredentialMap<u32>,
    /// Regenerated credentials in their grace period → (key slot and environment, grace end).
    grace: CredentialMap<(u32, u32)>,
    /// Allowlists by key slot and environment, for environments that have one.
    allowlists: HashMap<u32, Box<[IpNet]>>,
    keys: Vec<KeyRecord>,
    free_keys: Vec<u32>,
    key_slots: HashMap<Uuid, u32>,
    projects: Vec<ProjectRecord>,
    free_projects: Vec<u32>,
    project_slots: HashMap<Uuid, u32>,
}

impl Index {
    /// Finds a credential by its SHA-256. Allocates nothing.
    pub fn lookup(&self, sha256: &[u8; 32]) -> Option<Found<'_>> {
        let id = credential_id(sha256);
        let (reference, grace_end) = match self.credentials.get(&id) {
            Some(&reference) => (reference, None),
            None => self.grace.get(&id).map(|&(reference, end)| (reference, Some(i64::from(end))))?,
        };
        let key = self.keys.get((reference >> 1) as usize)?;
        let environment = (reference & 1) as usize;
        Some(Found {
            key,
            project: self.projects.get(key.project as usize)?,
            environment: environment_of(environment),
            settings: &key.environments[environment],
            grace_end,
            reference,
        })
    }

    /// Whether `client_ip` may use the credential found.
    pub fn allows_source(&self, found: &Found<'_>, client_ip: Option<IpAddr>) -> bool {
        if !found.settings.has_allowlist() {
            return true;
        }
        let Some(allowlist) = self.allowlists.get(&found.reference) else { return true };
        client_ip.is_some_and(|ip| allowlist.iter().any(|net| net.contains(&ip)))
    }

    /// Credentials held, including those in a grace period.
    pub fn credentials(&self) -> usize {
        self.credentials.len() + self.grace.len()
    }

    /// Keys held.
    pub fn keys(&self) -> usize {
        self.key_slots.len()
    }

    pub fn key(&self, id: Uuid) -> Option<&KeyRecord> {
        self.key_slots.get(&id).map(|&slot| &self.keys[slot as usize])
    }

    pub fn project(&self, id: Uuid) -> Option<&ProjectRecord> {
        self.project_slots.get(&id).map(|&slot| &self.projects[slot as usize])
    }

    /// The project of a key.
    pub fn project_of(&self, key: &KeyRecord) -> Option<&ProjectRecord> {
        self.projects.get(key.project as usize)
    }

    fn project_slot(&mut self, id: Uuid) -> u32 {
        if let Some(&slot) = self.project_slots.get(&id) {
            return slot;
        }
        let slot = place(&mut self.projects, &mut self.free_projects, ProjectRecord { id, ..Default::default() });
        self.project_slots.insert(id, slot);
        slot
    }

    /// Replaces what is known of a key with `credentials`. The key keeps its counters, except
    /// that a changed rate limit starts a fresh bucket.
    pub fn upsert_key(&mut self, id: Uuid, project: Uuid, credentials: Vec<NewCredential>) {
        let project = self.project_slot(project);
        let slot = match self.key_slots.get(&id) {
            Some(&slot) => {
                self.forget_credentials(slot);
                slot
            }
            None => {
                let slot = place(&mut self.keys, &mut self.free_keys, KeyRecord { id, project, ..Default::default() });
                self.key_slots.insert(id, slot);
                self.projects[project as usize].keys += 1;
                slot
            }
        };
        let mut environments = [EnvSettings::default(); 2];
        let mut current = [[0; 16]; 2];
        for credential in credentials {
            let environment = self::slot(credential.environment);
            let reference = reference(slot, environment);
            let mut settings = EnvSettings {
                flags: EnvSettings::PRESENT,
                methods: credential.methods,
                rate_limit: clamp_u32(credential.rate_limit),
                daily_quota: clamp_u32(credential.daily_quota),
                expire_at: credential.expire_at.map_or(0, |at| clamp_u32(at).max(1)),
            };
            if credential.active {
                settings.flags |= EnvSettings::ACTIVE;
            }
            if !credential.allowlist.is_empty() {
                settings.flags |= EnvSettings::ALLOWLIST;
                self.allowlists.insert(reference, credential.allowlist.into_boxed_slice());
            }
            let credential_id = credential_id(&credential.sha256);
            match credential.grace_end {
                None => {
                    current[environment] = credential_id;
                    environments[environment] = settings;
                    self.credentials.insert(credential_id, reference);
                }
                Some(end) => {
                    if !environments[environment].present() {
                        environments[environment] = settings;
                    }
                    self.grace.insert(credential_id, (reference, clamp_u32(end)));
                }
            }
        }
        let record = &mut self.keys[slot as usize];
        for (environment, settings) in environments.iter().enumerate() {
            if record.environments[environment].rate_limit != settings.rate_limit {
                record.rates[environment].reset();
            }
        }
        record.environments = environments;
        record.current = current;
    }

    /// Removes a key's credentials and allowlists from the maps, keeping its record.
    fn forget_credentials(&mut self, slot: u32) {
        let record = &self.keys[slot as usize];
        for (environment, settings) in record.environments.iter().enumerate() {
            if record.current[environment] != [0; 16] {
                self.credentials.remove(&record.current[environment]);
            }
            if settings.has_allowlist() {
                self.allowlists.remove(&reference(slot, environment));
            }
        }
        // Grace credentials are few (only regenerations within their grace period): a scan is
        // cheaper than keeping a per-key list of them.
        self.grace.retain(|_, (reference, _)| *reference >> 1 != slot);
    }

    pub fn remove_key(&mut self, id: Uuid) {
        let Some(slot) = self.key_slots.remove(&id) else { return };
        self.forget_credentials(slot);
        let project = self.keys[slot as usize].project as usize;
        self.keys[slot as usize] = KeyRecord::default();
        self.free_keys.push(slot);
        if let Some(project) = self.projects.get_mut(project) {
            project.keys = project.keys.saturating_sub(1);
        }
    }

    /// Sets a project's limits. A changed rate limit starts a fresh bucket (debt run up under
    /// the old limit does not carry over); quota counts carry on.
    pub fn upsert_project(&mut self, id: Uuid, sandbox: Limits, production: Limits) {
        let slot = self.project_slot(id) as usize;
        let record = &mut self.projects[slot];
        for (environment, limits) in [sandbox, production].into_iter().enumerate() {
            if record.limits[environment].rate_limit != limits.rate_limit {
                record.rates[environment].reset();
            }
            record.limits[environment] = limits;
        }
    }

    /// Removes a project and every key in it.
    pub fn remove_project(&mut self, id: Uuid) {
        let Some(&slot) = self.project_slots.get(&id) else { return };
        if self.projects[slot as usize].keys > 0 {
            let keys: Vec<Uuid> =
                self.keys.iter().filter(|k| k.project == slot && !k.id.is_nil()).map(|k| k.id).collect();
            for key in keys {
                self.remove_key(key);
            }
        }
        self.project_slots.remove(&id);
        self.projects[slot as usize] = ProjectRecord::default();
        self.free_projects.push(slot);
    }

    /// Carries rate and quota counters over from the index this one replaces, so a fresh
    /// snapshot does not hand out a new budget.
    pub fn carry_counters_from(&self, old: &Index) {
        for (id, &slot) in &self.key_slots {
            if let Some(previous) = old.key(*id) {
                let record = &self.keys[slot as usize];
                for environment in 0..2 {
                    if record.environments[environment].rate_limit == previous.environments[environment].rate_limit {
                        record.rates[environment].copy_from(&previous.rates[environment]);
                    }
                    record.daily[environment].copy_from(&previous.daily[environment]);
                }
            }
        }
        for (id, &slot) in &self.project_slots {
            if let Some(previous) = old.project(*id) {
                let record = &self.projects[slot as usize];
                for environment in 0..2 {
                    if record.limits[environment].rate_limit == previous.limits[environment].rate_limit {
                        record.rates[environment].copy_from(&previous.rates[environment]);
                    }
                    record.monthly[environment].copy_from(&previous.monthly[environment]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(byte: u8, environment: Environment) -> NewCredential {
        NewCredential::unrestricted([byte; 32], environment)
    }

    #[test]
    fn upsert_replace_and_remove() {
        let (project, key) = (Uuid::now_v7(), Uuid::now_v7());
        let mut index = Index::default();
        index.upsert_key(
            key,
            project,
            vec![credential(1, Environment::Sandbox), credential(2, Environment::Production)],
        );
        assert_eq!(index.credentials(), 2);
        let found = index.lookup(&[2; 32]).unwrap();
        assert_eq!((found.key.id, found.project.id, found.environment), (key, project, Environment::Production));

        // Regenerated with grace: the old production credential works until its grace ends.
        let mut old = credential(2, Environment::Production);
        old.grace_end = Some(100);
        let mut sandbox = credential(1, Environment::Sandbox);
        sandbox.allowlist = vec!["10.0.0.0/8".parse().unwrap()];
        index.upsert_key(key, project, vec![sandbox, credential(3, Environment::Production), old]);
        assert_eq!(index.lookup(&[2; 32]).unwrap().grace_end, Some(100));
        assert!(index.lookup(&[3; 32]).unwrap().grace_end.is_none());
        let found = index.lookup(&[1; 32]).unwrap();
        assert!(index.allows_source(&found, "10.1.2.3".parse().ok()));
        assert!(!index.allows_source(&found, "192.0.2.1".parse().ok()));
        assert!(!index.allows_source(&found, None));

        // Grace over: only the current credentials remain.
        index.upsert_key(
            key,
            project,
            vec![credential(1, Environment::Sandbox), credential(3, Environment::Production)],
        );
        assert!(index.lookup(&[2; 32]).is_none());
        assert_eq!(index.credentials(), 2);
        assert!(index.allowlists.is_empty());

        index.remove_project(project);
        assert_eq!((index.credentials(), index.keys()), (0, 0));
        // Slots are reused.
        index.upsert_key(Uuid::now_v7(), project, vec![credential(4, Environment::Sandbox)]);
        assert_eq!(index.keys.len(), 1);
        assert_eq!(index.projects.len(), 1);
    }

    #[test]
    fn compact_records() {
        assert_eq!(std::mem::size_of::<EnvSettings>(), 16);
        // 120 bytes, plus 16 per rate bucket and quota for the leases of shared limits.
        assert!(std::mem::size_of::<KeyRecord>() <= 184, "{}", std::mem::size_of::<KeyRecord>());
    }
}
