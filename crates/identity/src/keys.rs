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
use keyshare_runtime::crypto::{Sealed, Sealer, random_token};
use keyshare_runtime::db::{DbError, GenericClient, advisory_key};
use rand::rngs::OsRng;

use crate::error::{Error, Result};

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
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&advisory_key("identity.signing_keys")]).await?;
        let exists = tx.query_opt("SELECT 1 FROM identity.signing_keys WHERE retire_at IS NULL", &[]).await?;
        if exists.is_none() {
            let kid = insert_new_key(&tx, &self.sealer, clock.now()).await?;
            tracing::info!(kid = %kid, "created the first token signing key");
        }
        tx.commit().await?;
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
        let row = client
            .query_opt("SELECT kid, private_key_sealed, kek_id FROM identity.signing_keys WHERE retire_at IS NULL", &[])
            .await?
            .ok_or_else(|| Error::Internal("no active signing key".into()))?;
        let kid: String = row.get(0);
        let sealed = Sealed { key_id: row.get(2), blob: row.get(1) };
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
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&advisory_key("identity.signing_keys")]).await?;
    let now = clock.now();
    let overlap = access_token_ttl + SIGNER_CACHE + CLOCK_SKEW * 2;
    let retire_at = now + chrono::Duration::from_std(overlap).map_err(|e| Error::Internal(e.to_string()))?;
    tx.execute("UPDATE identity.signing_keys SET retire_at = $1 WHERE retire_at IS NULL", &[&retire_at]).await?;
    let kid = insert_new_key(&tx, sealer, now).await?;
    tx.execute("DELETE FROM identity.signing_keys WHERE retire_at < $1", &[&now]).await?;
    tx.commit().await?;
    Ok(kid)
}

async fn insert_new_key(client: &impl GenericClient, sealer: &Sealer, now: DateTime<Utc>) -> Result<String> {
    let key = SigningKey::generate(&mut OsRng);
    let der = key.to_pkcs8_der().map_err(|e| Error::Internal(e.to_string()))?;
    let kid = format!("{}-{}", now.format("%Y%m%d"), random_token(6));
    let sealed = sealer.seal(der.as_bytes(), kid.as_bytes());
    client
        .execute(
            "INSERT INTO identity.signing_keys (kid, public_key, private_key_sealed, kek_id, created_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[&kid, &key.verifying_key().to_bytes().as_slice(), &sealed.blob, &sealed.key_id, &now],
        )
        .await?;
    Ok(kid)
}

/// Every key whose tokens may still be valid, the signer first.
pub async fn public_keys(client: &impl GenericClient, now: DateTime<Utc>) -> Result<Vec<PublicKeyMaterial>, DbError> {
    let rows = client
        .query(
            "SELECT kid, public_key, retire_at FROM identity.signing_keys
             WHERE retire_at IS NULL OR retire_at > $1
             ORDER BY retire_at DESC NULLS FIRST",
            &[&now],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let public: Vec<u8> = row.get(1);
            Some(PublicKeyMaterial { kid: row.get(0), public_key: public.try_into().ok()?, retire_at: row.get(2) })
        })
        .collect())
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
            public_keys(&client, self.clock.now()).await.map_err(|e| e.to_string())
        })
    }
}

/// Shared handle used by the use cases.
pub type SharedSigningKeys = Arc<SigningKeys>;
