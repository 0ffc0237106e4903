//! Small cryptographic building blocks: random tokens, hashing for lookup, constant-time
//! comparison, and sealing secrets at rest with AES-256-GCM under rotatable key-encryption keys.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::env::{ConfigError, Env};

/// `len` bytes from the operating system's CSPRNG, as unpadded base64url.
pub fn random_token(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of `data`. High-entropy secrets (tokens, client secrets) are stored as this hash:
/// a slow password hash adds nothing when the input cannot be guessed.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A secret sealed at rest: which key sealed it, and nonce followed by ciphertext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub blob: Vec<u8>,
}

/// Sealing failed or a sealed value could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no key-encryption key with id {0}")]
    UnknownKey(String),
    #[error("sealed value is corrupt or was sealed for something else")]
    Corrupt,
}

/// AES-256-GCM under a set of key-encryption keys (KEKs). The first key seals; every key opens,
/// so a KEK can be rotated by putting the new key first and keeping the old one until all values
/// sealed under it have been re-sealed or deleted.
#[derive(Clone)]
pub struct Sealer {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

/// The variable that holds the key-encryption keys.
pub const KEK_VAR: &str = "KEYSHARE_KEY_ENCRYPTION_KEYS";

impl Sealer {
    /// Reads `KEYSHARE_KEY_ENCRYPTION_KEYS`: `id:base64key[,id:base64key…]`, 32-byte keys, the
    /// sealing key first.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Self::parse(&env.required(KEK_VAR)?).map_err(|reason| ConfigError::new(KEK_VAR, reason))
    }

    /// Parses `id:base64key[,id:base64key…]`. Errors never echo key material.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (index, entry) in spec.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
            let (id, encoded) =
                entry.split_once(':').ok_or_else(|| format!("entry {} must look like id:base64key", index + 1))?;
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("entry {}: key id must be letters, digits, - or _", index + 1));
            }
            let bytes = STANDARD
                .decode(encoded.trim())
                .or_else(|_| URL_SAFE_NO_PAD.decode(encoded.trim()))
                .map_err(|_| format!("entry {} ({id}): key is not base64", index + 1))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| format!("entry {} ({id}): key must be 32 bytes", index + 1))?;
            if keys.iter().any(|(existing, _)| existing == id) {
                return Err(format!("key id {id} appears twice"));
            }
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            return Err("at least one key is required".into());
        }
        Ok(Self { keys })
    }

    /// A sealer with one fresh random key, for tests and first-run development setups.
    pub fn generate(key_id: &str) -> (Self, String) {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let spec = format!("{key_id}:{}", STANDARD.encode(key));
        let sealer = Self::parse(&spec).unwrap_or_else(|_| unreachable!("generated spec parses"));
        (sealer, spec)
    }

    /// The id of the key that seals.
    pub fn sealing_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plaintext`; `context` (e.g. the owning row's id) must be given again to open it,
    /// so a sealed value cannot be moved to another row.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Sealed {
        let (key_id, cipher) = &self.keys[0];
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext, aad: context })
            .unwrap_or_else(|_| unreachable!("AES-GCM encryption of in-memory data cannot fail"));
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        Sealed { key_id: key_id.clone(), blob }
    }

    /// Opens a sealed value with whichever key sealed it.
    pub fn open(&self, sealed: &Sealed, context: &[u8]) -> Result<Vec<u8>, SealError> {
        let cipher = self
            .keys
            .iter()
            .find(|(id, _)| *id == sealed.key_id)
            .map(|(_, cipher)| cipher)
            .ok_or_else(|| SealError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.blob.len() < 12 {
            return Err(SealError::Corrupt);
        }
        let (nonce, ciphertext) = sealed.blob.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SealError::Corrupt)?;
        cipher.decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: context }).map_err(|_| SealError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_after_rotation() {
        let (old, old_spec) = Sealer::generate("k1");
        let sealed = old.seal(b"secret", b"row-1");
        let (_, new_spec) = Sealer::generate("k2");
        let rotated = Sealer::parse(&format!("{},{}", new_spec, old_spec)).unwrap();
        assert_eq!(rotated.sealing_key_id(), "k2");
        assert_eq!(rotated.open(&sealed, b"row-1").unwrap(), b"secret");
        assert_eq!(rotated.seal(b"x", b"c").key_id, "k2");
        assert!(matches!(rotated.open(&sealed, b"row-2"), Err(SealError::Corrupt)));
        let only_new = Sealer::parse(&new_spec).unwrap();
        assert!(matches!(only_new.open(&sealed, b"row-1"), Err(SealError::UnknownKey(_))));
    }

    #[test]
    fn bad_specs_do_not_echo_keys() {
        for spec in ["", "nokey", "k1:!!!", "k1:c2hvcnQ=", "k 1:AAAA"] {
            let err = Sealer::parse(spec).unwrap_err();
            assert!(!err.contains("c2hvcnQ"), "{err}");
        }
    }
}
