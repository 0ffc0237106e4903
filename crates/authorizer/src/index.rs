//! The authorizer's in-memory copy of what keyring's feed says: every live credential by its
//! SHA-256, and every project's limits. Replaced whole by a snapshot, changed key by key by the
//! events after it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use keyshare_runtime::credential::Environment;

use crate::limits::Rate;

/// A key as checks see it: its name, its project's name and its rate buckets, shared by its
/// credentials and kept across changes to the key.
#[derive(Debug)]
pub struct KeyMeta {
    /// `projects/{project}/keys/{key}`.
    pub name: Arc<str>,
    /// `projects/{project}`.
    pub project: Arc<str>,
    /// Rate buckets: sandbox, production.
    pub rates: [Rate; 2],
}

impl KeyMeta {
    pub fn new(name: Arc<str>, project: Arc<str>) -> Self {
        Self { name, project, rates: Default::default() }
    }
}

/// Index of an environment in two-element arrays: sandbox first.
pub fn slot(environment: Environment) -> usize {
    match environment {
        Environment::Sandbox => 0,
        Environment::Production => 1,
    }
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

/// One credential and the settings of its environment.
#[derive(Debug)]
pub struct CredentialEntry {
    pub key: Arc<KeyMeta>,
    pub environment: Environment,
    pub active: bool,
    pub methods: Methods,
    pub rate_limit: i64,
    pub daily_quota: i64,
    pub allowlist: Box<[IpNet]>,
    /// Unix seconds after which the environment's credentials are expired.
    pub expire_at: Option<i64>,
    /// Unix seconds after which this (regenerated) credential stops working.
    pub grace_end: Option<i64>,
}

impl CredentialEntry {
    pub fn allows_source(&self, client_ip: Option<IpAddr>) -> bool {
        self.allowlist.is_empty() || client_ip.is_some_and(|ip| self.allowlist.iter().any(|net| net.contains(&ip)))
    }
}

/// A project's limits for one environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub rate_limit: i64,
    pub monthly_quota: i64,
}

/// A project's limits and rate buckets, per environment (sandbox first).
#[derive(Debug, Default)]
pub struct ProjectEntry {
    pub limits: [Limits; 2],
    pub rates: [Rate; 2],
}

#[derive(Debug, Default)]
pub struct Index {
    credentials: HashMap<[u8; 32], CredentialEntry>,
    by_key: HashMap<Arc<str>, Vec<[u8; 32]>>,
    projects: HashMap<Arc<str>, Arc<ProjectEntry>>,
}

impl Index {
    pub fn credential(&self, sha256: &[u8; 32]) -> Option<&CredentialEntry> {
        self.credentials.get(sha256)
    }

    pub fn project(&self, project: &str) -> Option<&ProjectEntry> {
        self.projects.get(project).map(|p| &**p)
    }

    /// The key's shared part, if known, so a change to the key keeps its rate buckets.
    pub fn key_meta(&self, name: &str) -> Option<Arc<KeyMeta>> {
        let hash = self.by_key.get(name)?.first()?;
        self.credentials.get(hash).map(|entry| entry.key.clone())
    }

    pub fn credentials(&self) -> usize {
        self.credentials.len()
    }

    /// Replaces what is known of a key with `entries`.
    pub fn upsert_key(&mut self, key: Arc<KeyMeta>, entries: Vec<([u8; 32], CredentialEntry)>) {
        self.remove_key(&key.name);
        let hashes = entries.iter().map(|(hash, _)| *hash).collect();
        self.credentials.extend(entries);
        self.by_key.insert(key.name.clone(), hashes);
    }

    pub fn remove_key(&mut self, name: &str) {
        if let Some(hashes) = self.by_key.remove(name) {
            for hash in hashes {
                self.credentials.remove(&hash);
            }
        }
    }

    /// Sets a project's limits. New limits start fresh buckets: debt run up under the old limit
    /// does not carry over. (keyring sends a project only when its limits change.)
    pub fn upsert_project(&mut self, project: Arc<str>, sandbox: Limits, production: Limits) {
        self.projects
            .insert(project, Arc::new(ProjectEntry { limits: [sandbox, production], rates: Default::default() }));
    }

    /// The key's current rate limits (sandbox, production), if it is known.
    pub fn key_rate_limits(&self, name: &str) -> Option<[i64; 2]> {
        let mut limits = [0; 2];
        for hash in self.by_key.get(name)? {
            if let Some(entry) = self.credentials.get(hash) {
                limits[slot(entry.environment)] = entry.rate_limit;
            }
        }
        Some(limits)
    }

    pub fn remove_project(&mut self, project: &str) {
        self.projects.remove(project);
        let keys: Vec<Arc<str>> = self
            .by_key
            .keys()
            .filter(|k| k.strip_prefix(project).is_some_and(|rest| rest.starts_with("/keys/")))
            .cloned()
            .collect();
        for key in keys {
            self.remove_key(&key);
        }
    }
}
