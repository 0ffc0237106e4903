//! The authorizer's in-memory copy of what keyring's feed says: every live credential, every
//! key's per-environment settings and every project's limits, with the rate and quota counters
//! checks charge. Replaced whole by a snapshot, changed key by key by the events after it.
//!
//! It is laid out for ten million keys in under 150 bytes each: keys and projects live in slot
//! vectors and are referred to by `u32` slots; identifiers are UUIDs (names are formatted only
//! in answers). A credential is known by the first 128 bits of its SHA-256, held once, in its
//! key's record; the tables that find a credential or a key hold only a `u32` reference (5
//! bytes a bucket with hashbrown's control byte) and compare against the record. Settings
//! shared by an environment's credentials are stored once per key; a key's rate buckets and
//! shared-limit leases exist only for a key with a rate limit or a daily quota. The rare
//! credential in a regeneration grace period lives in a side map, and so do IP allowlists.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::net::IpAddr;

use hashbrown::HashTable;
use ipnet::IpNet;
use keyshare_runtime::credential::Environment;
use uuid::Uuid;

use crate::limits::{Lease, Quota, Rate};

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

/// The table hash of a credential id: its first eight bytes (see [`PrefixHasher`]).
fn credential_hash(id: &CredentialId) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&id[..8]);
    u64::from_le_bytes(first)
}

/// The current credential a reference names: the id its key's record holds.
fn current_of(keys: &[KeyRecord], reference: u32) -> &CredentialId {
    &keys[(reference >> 1) as usize].current[(reference & 1) as usize]
}

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

/// Settings of one environment of a key: 8 bytes. Its limits are in [`KeyLimits`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvSettings {
    flags: u8,
    pub methods: Methods,
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

/// A key's limits per environment (sandbox first), with the counters only a limit needs: held
/// only by a key with a rate limit or a daily quota.
#[derive(Debug, Default)]
pub struct KeyLimits {
    /// Requests per second; 0 means none.
    pub rate_limit: [u32; 2],
    /// Calls per UTC day; 0 means none. (Quotas above `u32::MAX` a day are held as that.)
    pub daily_quota: [u32; 2],
    /// Rate buckets.
    pub rates: [Rate; 2],
    /// This replica's share of the fleet's daily quota (with shared limits).
    pub daily_leases: [Lease; 2],
}

impl KeyLimits {
    fn is_unlimited(&self) -> bool {
        self.rate_limit == [0; 2] && self.daily_quota == [0; 2]
    }
}

/// No limit: what a key without a [`KeyLimits`] of its own reads. Nothing charges it (a limit
/// of 0 touches no counter, and the shared-limits task finds no lease for such a key), so one
/// shared value serves every such key.
static NO_LIMITS: KeyLimits = KeyLimits {
    rate_limit: [0; 2],
    daily_quota: [0; 2],
    rates: [Rate::new(), Rate::new()],
    daily_leases: [Lease::new(), Lease::new()],
};

/// A key: its identity, its settings per environment and the counters checks charge.
#[derive(Debug, Default)]
pub struct KeyRecord {
    pub id: Uuid,
    /// Slot of the key's project.
    project: u32,
    pub environments: [EnvSettings; 2],
    /// The current credential of each environment (all zero: none): what the credential table's
    /// references point at.
    current: [CredentialId; 2],
    /// Calls charged to the day, per environment: counted with or without a daily quota, so a
    /// quota set later in the day sees the calls before it.
    pub daily: [Quota; 2],
    limits: Option<Box<KeyLimits>>,
}

impl KeyRecord {
    /// The key's limits and their counters, if it has any.
    pub fn limits(&self) -> Option<&KeyLimits> {
        self.limits.as_deref()
    }
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
    /// This replica's share of the fleet's monthly quota (with shared limits).
    pub monthly_leases: [Lease; 2],
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
    /// The key's limits (none at all, for a key without any).
    pub limits: &'a KeyLimits,
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

/// Bytes of a hashbrown table of `u32` that holds `capacity` items: its buckets (7 in 8 used
/// at most, a power of two) of 4 bytes and a control byte each.
fn table_bytes(capacity: usize) -> usize {
    if capacity == 0 { 0 } else { (capacity * 8).div_ceil(7).next_power_of_two() * 5 }
}

fn clamp_u32(value: i64) -> u32 {
    value.clamp(0, i64::from(u32::MAX)) as u32
}

#[derive(Debug, Default)]
pub struct Index {
    /// Current credentials, as references (key slot and environment) hashed by
    /// [`credential_hash`] of the id the key's record holds.
    credentials: HashTable<u32>,
    /// Regenerated credentials in their grace period → (key slot and environment, grace end).
    grace: CredentialMap<(u32, u32)>,
    /// Allowlists by key slot and environment, for environments that have one.
    allowlists: HashMap<u32, Box<[IpNet]>>,
    keys: Vec<KeyRecord>,
    free_keys: Vec<u32>,
    /// Live keys, as slots hashed by `key_hasher` of the id their record holds.
    key_slots: HashTable<u32>,
    key_hasher: RandomState,
    projects: Vec<ProjectRecord>,
    free_projects: Vec<u32>,
    project_slots: HashMap<Uuid, u32>,
}

/// The most keys [`Index::with_capacity`] sizes for up front; past it the tables grow as keys come.
const MAX_PRESIZED_KEYS: usize = 50_000_000;

impl Index {
    /// An empty index with room for about `keys` keys and their two credentials each, so that
    /// loading a snapshot of that size never rehashes its tables nor moves its records.
    pub fn with_capacity(keys: usize) -> Index {
        let keys = keys.min(MAX_PRESIZED_KEYS);
        Index {
            credentials: HashTable::with_capacity(2 * keys),
            keys: Vec::with_capacity(keys),
            key_slots: HashTable::with_capacity(keys),
            ..Index::default()
        }
    }

    /// Finds a credential by its SHA-256. Allocates nothing.
    pub fn lookup(&self, sha256: &[u8; 32]) -> Option<Found<'_>> {
        let id = credential_id(sha256);
        let current = self.credentials.find(credential_hash(&id), |&r| *current_of(&self.keys, r) == id);
        let (reference, grace_end) = match current {
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
            limits: key.limits().unwrap_or(&NO_LIMITS),
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

    fn key_slot(&self, id: Uuid) -> Option<u32> {
        let keys = &self.keys;
        self.key_slots.find(self.key_hasher.hash_one(id), |&slot| keys[slot as usize].id == id).copied()
    }

    pub fn key(&self, id: Uuid) -> Option<&KeyRecord> {
        self.key_slot(id).map(|slot| &self.keys[slot as usize])
    }

    /// Bytes the index holds for its keys and credentials, by the capacity of its vectors and
    /// tables (what an allocator hands out, before its own overhead). Projects, allowlists and
    /// grace credentials are left out: they are few.
    pub fn key_bytes(&self) -> usize {
        let limited = self.keys.iter().filter(|k| k.limits.is_some()).count();
        self.keys.capacity() * std::mem::size_of::<KeyRecord>()
            + limited * std::mem::size_of::<KeyLimits>()
            + self.free_keys.capacity() * 4
            + table_bytes(self.credentials.capacity())
            + table_bytes(self.key_slots.capacity())
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
        let slot = match self.key_slot(id) {
            Some(slot) => {
                self.forget_credentials(slot);
                slot
            }
            None => {
                let slot = place(&mut self.keys, &mut self.free_keys, KeyRecord { id, project, ..Default::default() });
                let keys = &self.keys;
                let hasher = &self.key_hasher;
                self.key_slots.insert_unique(hasher.hash_one(id), slot, |&s| hasher.hash_one(keys[s as usize].id));
                self.projects[project as usize].keys += 1;
                slot
            }
        };
        let mut environments = [EnvSettings::default(); 2];
        let mut current = [[0; 16]; 2];
        let (mut rate_limit, mut daily_quota) = ([0u32; 2], [0u32; 2]);
        for credential in credentials {
            let environment = self::slot(credential.environment);
            let reference = reference(slot, environment);
            let mut settings = EnvSettings {
                flags: EnvSettings::PRESENT,
                methods: credential.methods,
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
            if credential.grace_end.is_none() || !environments[environment].present() {
                environments[environment] = settings;
                rate_limit[environment] = clamp_u32(credential.rate_limit);
                daily_quota[environment] = clamp_u32(credential.daily_quota);
            }
            match credential.grace_end {
                None => current[environment] = credential_id,
                Some(end) => {
                    self.grace.insert(credential_id, (reference, clamp_u32(end)));
                }
            }
        }
        let record = &mut self.keys[slot as usize];
        record.environments = environments;
        record.current = current;
        let wanted = KeyLimits { rate_limit, daily_quota, ..KeyLimits::default() };
        record.limits = match record.limits.take() {
            _ if wanted.is_unlimited() => None,
            None => Some(Box::new(wanted)),
            Some(mut limits) => {
                for ((rate, before), after) in limits.rates.iter().zip(limits.rate_limit).zip(rate_limit) {
                    if before != after {
                        rate.reset();
                    }
                }
                limits.rate_limit = rate_limit;
                limits.daily_quota = daily_quota;
                Some(limits)
            }
        };
        // The record names its current credentials before the table refers to them.
        for (environment, id) in current.iter().enumerate() {
            if *id != [0; 16] {
                self.insert_credential(*id, reference(slot, environment));
            }
        }
    }

    /// Points the credential table at `reference` for `id`, which the record `reference` names
    /// already holds. Another key's reference for the same id is replaced (the last one written
    /// wins, as keyring's unique credential hashes make moot).
    fn insert_credential(&mut self, id: CredentialId, reference: u32) {
        let keys = &self.keys;
        let hash = |&r: &u32| credential_hash(current_of(keys, r));
        match self.credentials.entry(credential_hash(&id), |&r| *current_of(keys, r) == id, hash) {
            hashbrown::hash_table::Entry::Occupied(mut entry) => *entry.get_mut() = reference,
            hashbrown::hash_table::Entry::Vacant(entry) => {
                entry.insert(reference);
            }
        }
    }

    /// Removes a key's credentials and allowlists from the tables, keeping its record.
    fn forget_credentials(&mut self, slot: u32) {
        let record = &self.keys[slot as usize];
        for (environment, settings) in record.environments.iter().enumerate() {
            let reference = reference(slot, environment);
            let id = record.current[environment];
            if id != [0; 16]
                && let Ok(entry) = self.credentials.find_entry(credential_hash(&id), |&r| r == reference)
            {
                entry.remove();
            }
            if settings.has_allowlist() {
                self.allowlists.remove(&reference);
            }
        }
        // Grace credentials are few (only regenerations within their grace period): a scan is
        // cheaper than keeping a per-key list of them.
        self.grace.retain(|_, (reference, _)| *reference >> 1 != slot);
    }

    pub fn remove_key(&mut self, id: Uuid) {
        let Some(slot) = self.key_slot(id) else { return };
        self.forget_credentials(slot);
        if let Ok(entry) = self.key_slots.find_entry(self.key_hasher.hash_one(id), |&s| s == slot) {
            entry.remove();
        }
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
        // A first snapshot has nothing to carry: skip a million lookups that would find nothing.
        if !old.key_slots.is_empty() {
            for &slot in self.key_slots.iter() {
                let record = &self.keys[slot as usize];
                let Some(previous) = old.key(record.id) else { continue };
                for environment in 0..2 {
                    record.daily[environment].copy_from(&previous.daily[environment]);
                }
                let (Some(limits), Some(before)) = (record.limits(), previous.limits()) else { continue };
                for environment in 0..2 {
                    if limits.rate_limit[environment] == before.rate_limit[environment] {
                        limits.rates[environment].copy_from(&before.rates[environment]);
                    }
                    limits.daily_leases[environment].copy_from(&before.daily_leases[environment]);
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
                    record.monthly_leases[environment].copy_from(&previous.monthly_leases[environment]);
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
        assert_eq!(std::mem::size_of::<EnvSettings>(), 8);
        // id 16, project 4, settings 16, current credentials 32, day counts 16, limits 8.
        assert_eq!(std::mem::size_of::<KeyRecord>(), 96);
    }

    #[test]
    fn limits_are_held_only_by_keys_that_have_them() {
        let (project, key) = (Uuid::now_v7(), Uuid::now_v7());
        let mut index = Index::default();
        index.upsert_key(key, project, vec![credential(1, Environment::Production)]);
        assert!(index.key(key).unwrap().limits().is_none());
        let found = index.lookup(&[1; 32]).unwrap();
        assert_eq!((found.limits.rate_limit, found.limits.daily_quota), ([0; 2], [0; 2]));
        // The day's count is kept without a quota, and stays when one is set.
        assert!(found.key.daily[1].try_charge(crate::limits::Period::day(0), 0));

        let limited = NewCredential { rate_limit: 5, daily_quota: 7, ..credential(1, Environment::Production) };
        index.upsert_key(key, project, vec![limited.clone()]);
        let found = index.lookup(&[1; 32]).unwrap();
        assert_eq!((found.limits.rate_limit, found.limits.daily_quota), ([0, 5], [0, 7]));
        assert_eq!(found.key.daily[1].used(crate::limits::Period::day(0)), 1);
        // A rate bucket in use keeps its state while the rate stays, and starts afresh when it
        // changes.
        let now = 1_000_000_000;
        assert!((0..5).all(|_| found.limits.rates[1].take(now, 5).is_ok()));
        index.upsert_key(key, project, vec![limited.clone()]);
        assert!(index.lookup(&[1; 32]).unwrap().limits.rates[1].take(now, 5).is_err());
        index.upsert_key(key, project, vec![NewCredential { rate_limit: 6, ..limited }]);
        assert!(index.lookup(&[1; 32]).unwrap().limits.rates[1].take(now, 6).is_ok());

        index.upsert_key(key, project, vec![credential(1, Environment::Production)]);
        assert!(index.key(key).unwrap().limits().is_none());
    }

    #[test]
    fn an_index_sized_for_a_snapshot_loads_it_without_growing() {
        let project = Uuid::now_v7();
        let mut index = Index::with_capacity(3_000);
        let sized = index.key_bytes();
        assert!(sized > 3_000 * std::mem::size_of::<KeyRecord>(), "room for the records: {sized} B");
        for n in 0u64..3_000 {
            let mut sandbox = [1; 32];
            sandbox[..8].copy_from_slice(&n.to_le_bytes());
            let mut production = [2; 32];
            production[..8].copy_from_slice(&n.to_le_bytes());
            index.upsert_key(
                Uuid::new_v4(),
                project,
                vec![
                    NewCredential::unrestricted(sandbox, Environment::Sandbox),
                    NewCredential::unrestricted(production, Environment::Production),
                ],
            );
        }
        assert_eq!((index.keys(), index.credentials()), (3_000, 6_000));
        assert_eq!(index.key_bytes(), sized, "the tables and the records grew");
        assert!(index.lookup(&[2; 32]).is_none());
        let mut last = [2; 32];
        last[..8].copy_from_slice(&2_999u64.to_le_bytes());
        assert!(index.lookup(&last).is_some());
    }

    #[test]
    fn tables_find_every_key_and_credential_after_growing_and_shrinking() {
        let project = Uuid::now_v7();
        let mut index = Index::default();
        let ids: Vec<Uuid> = (0..5_000).map(|_| Uuid::new_v4()).collect();
        let sha = |n: usize, env: u8| {
            let mut sha = [env; 32];
            sha[..8].copy_from_slice(&(n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            sha
        };
        for (n, id) in ids.iter().enumerate() {
            index.upsert_key(
                *id,
                project,
                vec![
                    NewCredential::unrestricted(sha(n, 1), Environment::Sandbox),
                    NewCredential::unrestricted(sha(n, 2), Environment::Production),
                ],
            );
        }
        for (n, id) in ids.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
            if n % 4 == 0 {
                index.remove_key(*id);
            } else {
                // Regenerated: new credentials replace the old ones.
                index.upsert_key(
                    *id,
                    project,
                    vec![NewCredential::unrestricted(sha(n + 100_000, 2), Environment::Production)],
                );
            }
        }
        for (n, id) in ids.iter().enumerate() {
            let found = |sha: [u8; 32]| index.lookup(&sha).map(|f| f.key.id);
            match n % 4 {
                0 => assert!(index.key(*id).is_none() && found(sha(n, 1)).is_none() && found(sha(n, 2)).is_none()),
                2 => {
                    assert_eq!(found(sha(n + 100_000, 2)), Some(*id));
                    assert!(found(sha(n, 1)).is_none() && found(sha(n, 2)).is_none());
                }
                _ => assert!(found(sha(n, 1)) == Some(*id) && found(sha(n, 2)) == Some(*id)),
            }
        }
        assert_eq!(index.keys(), 3_750);
        assert_eq!(index.credentials(), 2 * 2_500 + 1_250);
    }
}
