//! The Ed25519 keys that sign access tokens: created on first start, rotated by an operator
//! command, published through `ListPublicKeys`.
//!
//! Exactly one key signs at a time (a unique partial index enforces it). Rotation makes a new key
//! the signer and gives the old one a `retire_at` far enough ahead that every token it signed has
//! expired by then, and every replica has picked up the new signer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use keyshare_runtime::auth::{CLOCK_SKEW, KeySource, PublicKeyMaterial, TokenSigner};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::crypto::{Sealer, random_token};
use keyshare_runtime::db::GenericClient;
use keyshare_runtime::in_transaction;
use rand::rngs::OsRng;

use crate::error::{Error, Result};
use crate::store;

/// How long a replica keeps using the signer it loaded before looking again.
pub const SIGNER_CACHE: Duration = Duration::from_secs(30);

/// The current signing key, cached.
pub struct SigningKeys {
    pool: Pool,
    sealer: Sealer,
    cached: RwLock<Option<(TokenSigner, Instant)>>,
}

impl SigningKeys {
    pub fn new(pool: Pool, sealer: Sealer) -> Self {
        Self { pool, sealer, cached: RwLock::new(None) }
    }

    /// Creates the first signing key if there is none. Safe when replicas start together.
    pub async fn ensure_initial(&self, clock: &SharedClock) -> Result<()> {
        let created = in_transaction!(self.pool, |tx| -> Result<Option<String>> {
            store::lock_signing_keys(&tx).await?;
            if store::has_signing_key(&tx).await? {
                return Ok(None);
            }
            Ok(Some(insert_new_key(&tx, &self.sealer, clock.now()).await?))
        })?;
        if let Some(kid) = created {
            tracing::info!(kid = %kid, "created the first token signing key");
        }
        Ok(())
    }

    /// The signer for new tokens.
    pub async fn signer(&self) -> Result<TokenSigner> {
        if let Some((signer, loaded)) = &*self.cached.read().unwrap_or_else(|p| p.into_inner())
            && loaded.elapsed() < SIGNER_CACHE
        {
            return Ok(signer.clone());
        }
        let client = self.pool.get().await?;
        let (kid, sealed) =
            store::signing_key(&client).await?.ok_or_else(|| Error::Internal("no active signing key".into()))?;
        let der = self
            .sealer
            .open(&sealed, kid.as_bytes())
            .map_err(|e| Error::Internal(format!("signing key {kid}: {e}")))?;
        let signer = TokenSigner::from_pkcs8(kid, &der);
        *self.cached.write().unwrap_or_else(|p| p.into_inner()) = Some((signer.clone(), Instant::now()));
        Ok(signer)
    }
}

/// Makes a new key the signer; the previous one keeps verifying for `access_token_ttl` plus the
/// time replicas may still sign with it. Returns the new key id.
pub async fn rotate(pool: &Pool, sealer: &Sealer, clock: &SharedClock, access_token_ttl: Duration) -> Result<String> {
    let now = clock.now();
    let overlap = access_token_ttl + SIGNER_CACHE + CLOCK_SKEW * 2;
    let retire_at = now + chrono::Duration::from_std(overlap).map_err(|e| Error::Internal(e.to_string()))?;
    in_transaction!(pool, |tx| -> Result<String> {
        store::lock_signing_keys(&tx).await?;
        store::retire_signing_key(&tx, retire_at).await?;
        let kid = insert_new_key(&tx, sealer, now).await?;
        store::delete_retired_signing_keys(&tx, now).await?;
        Ok(kid)
    })
}

async fn insert_new_key(client: &impl GenericClient, sealer: &Sealer, now: DateTime<Utc>) -> Result<String> {
    let key = SigningKey::generate(&mut OsRng);
    let der = key.to_pkcs8_der().map_err(|e| Error::Internal(e.to_string()))?;
    let kid = format!("{}-{}", now.format("%Y%m%d"), random_token(6));
    let sealed = sealer.seal(der.as_bytes(), kid.as_bytes());
    store::insert_signing_key(client, &kid, &key.verifying_key().to_bytes(), &sealed, now).await?;
    Ok(kid)
}

/// The listing scope of `ListPublicKeys` page tokens.
pub const PAGE_SCOPE: &str = "publicKeys";

/// Where a key sits in `ListPublicKeys`' order: the signing key (no retirement) first, then
/// the retiring ones, latest retirement first; the kid breaks ties.
type KeyPosition = (bool, std::cmp::Reverse<Option<i64>>, String);

fn position(key: &PublicKeyMaterial) -> KeyPosition {
    let retire = key.retire_at.map(|t| t.timestamp_micros());
    (retire.is_some(), std::cmp::Reverse(retire), key.kid.clone())
}

fn cursor(key: &PublicKeyMaterial) -> String {
    let retire = key.retire_at.map_or_else(|| "-".to_owned(), |t| t.timestamp_micros().to_string());
    format!("{retire}|{}", key.kid)
}

fn parse_cursor(cursor: &str) -> Option<KeyPosition> {
    let (retire, kid) = cursor.split_once('|')?;
    let retire = if retire == "-" { None } else { Some(retire.parse::<i64>().ok()?) };
    Some((retire.is_some(), std::cmp::Reverse(retire), kid.to_owned()))
}

/// One page of `keys` (in [`public_keys`]' order): the keys after the page's cursor, and the
/// token of the next page (empty on the last). A key added or retired between two pages moves
/// without a key being listed twice.
pub fn page(
    mut keys: Vec<PublicKeyMaterial>,
    page: &keyshare_runtime::page::PageRequest,
) -> std::result::Result<(Vec<PublicKeyMaterial>, String), keyshare_runtime::error::InvalidInput> {
    keys.sort_by_cached_key(position);
    if let Some(after) = &page.after {
        let after = parse_cursor(after).ok_or_else(|| {
            keyshare_runtime::error::InvalidInput::field("page_token", "is not a page token of this listing")
        })?;
        keys.retain(|key| position(key) > after);
    }
    keys.truncate(page.size + 1);
    let next = keyshare_runtime::page::next_token(&mut keys, page.size, PAGE_SCOPE, cursor);
    Ok((keys, next))
}

/// Identity verifies its own tokens from its database.
pub struct DbKeySource {
    pub pool: Pool,
    pub clock: SharedClock,
}

impl KeySource for DbKeySource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = std::result::Result<Vec<PublicKeyMaterial>, String>> + Send + '_>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(|e| e.to_string())?;
            store::public_keys(&client, self.clock.now()).await.map_err(|e| e.to_string())
        })
    }
}

/// Shared handle used by the use cases.
pub type SharedSigningKeys = Arc<SigningKeys>;

#[cfg(test)]
mod page_tests {
    use keyshare_runtime::page::PageRequest;

    use super::*;

    fn key(kid: &str, retire_in_secs: Option<i64>) -> PublicKeyMaterial {
        let retire_at = retire_in_secs.map(|s| DateTime::<Utc>::from_timestamp(1_900_000_000 + s, 0).unwrap());
        PublicKeyMaterial { kid: kid.into(), public_key: [0; 32], retire_at }
    }

    #[test]
    fn public_keys_page_in_order_without_repeats() {
        let keys = vec![key("old", Some(10)), key("signing", None), key("older", Some(5)), key("newer", Some(20))];
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let request = PageRequest::parse(1, &token, PAGE_SCOPE).unwrap();
            let (page, next) = page(keys.clone(), &request).unwrap();
            assert_eq!(page.len(), 1);
            seen.push(page[0].kid.clone());
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, ["signing", "newer", "old", "older"]);

        // A key that retires between two pages is not listed twice.
        let first = PageRequest::parse(2, "", PAGE_SCOPE).unwrap();
        let (_, next) = page(keys.clone(), &first).unwrap();
        let mut rotated = keys;
        rotated.push(key("new-signing", None));
        rotated.retain(|k| k.kid != "signing");
        rotated.push(key("signing", Some(30)));
        let (rest, _) = page(rotated, &PageRequest::parse(10, &next, PAGE_SCOPE).unwrap()).unwrap();
        let rest: Vec<_> = rest.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(rest, ["old", "older"]);
    }
}
