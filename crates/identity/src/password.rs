//! Password hashing (argon2id) on a pool of its own: a fixed number of blocking threads and a
//! bounded queue in front of them. A login flood fills the queue and is answered "busy" at once,
//! instead of taking the server's call slots, database connections and every core from the
//! calls other services depend on.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::rngs::OsRng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// The hashing pool.
pub struct Passwords {
    /// Hashes waiting or running; a caller that finds none free is told to come back later.
    slots: Arc<Semaphore>,
    /// Hashes running at once: one per hashing thread.
    workers: Arc<Semaphore>,
    /// A real argon2 hash verified when the email is unknown, so a login for an unknown email
    /// takes as long as one with a wrong password.
    dummy_hash: String,
}

/// A place in the hashing queue, taken before any other work for the call is done.
pub struct Reservation {
    slot: OwnedSemaphorePermit,
    workers: Arc<Semaphore>,
}

impl Passwords {
    /// `threads` hashes at once, and up to `queue` more waiting.
    pub fn new(threads: usize, queue: usize) -> Self {
        let threads = threads.max(1);
        let dummy_hash = hash_blocking("keyshare-timing-equaliser").unwrap_or_default();
        Self {
            slots: Arc::new(Semaphore::new(threads + queue)),
            workers: Arc::new(Semaphore::new(threads)),
            dummy_hash,
        }
    }

    /// A place in the queue, or [`Error::HashingBusy`] when the queue is full.
    pub fn reserve(&self) -> Result<Reservation> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| Error::HashingBusy)?;
        Ok(Reservation { slot, workers: self.workers.clone() })
    }

    pub fn dummy_hash(&self) -> &str {
        &self.dummy_hash
    }
}

impl Reservation {
    /// A new argon2id hash of `password`.
    pub async fn hash(self, password: String) -> Result<String> {
        self.run(move || hash_blocking(&password)).await?
    }

    /// Whether `password` matches the PHC string `hash`.
    pub async fn verify(self, password: String, hash: String) -> Result<bool> {
        self.run(move || {
            PasswordHash::new(&hash)
                .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
    }

    /// Runs `work` on a blocking thread once a worker is free. The permits move into the
    /// thread, so a caller that gives up does not free a worker that is still hashing.
    async fn run<T: Send + 'static>(self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let worker = self.workers.clone().acquire_owned().await.map_err(|e| Error::Internal(e.to_string()))?;
        let slot = self.slot;
        tokio::task::spawn_blocking(move || {
            let result = work();
            drop((worker, slot));
            result
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))
    }
}

/// argon2id with the crate's defaults (19 MiB, 2 passes).
fn hash_blocking(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| Error::Internal(format!("hashing password: {e}")))
}
