//! The webhook's signing keys (HMAC-SHA256). The current key signs; a previous key still verifies,
//! so a key can be rotated without invalidating what was signed before (docs/operations.md).
//!
//! In a cluster the keys come from a Secret mounted as files (`current`, optionally `previous`),
//! polled for changes like the serving certificate. Without one the webhook is not ready and
//! refuses to sign: there is no default key. `serve --dev` and `review` take them from the local
//! config file, or generate a key for the process.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Shortest key accepted: 32 bytes (`head -c 32 /dev/urandom | base64` gives 44 characters).
pub const MIN_KEY_BYTES: usize = 32;
/// File (Secret key) holding the key that signs.
pub const CURRENT_FILE: &str = "current";
/// File (Secret key) holding the key that only verifies, during a rotation.
pub const PREVIOUS_FILE: &str = "previous";

/// The keys in the local config file (`signingKeys:`), for `serve --dev` and `review` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningKeysConfig {
    pub current: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// Why keys could not be loaded. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the {which} signing key is {len} bytes; at least {MIN_KEY_BYTES} are needed (generate one with `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort { which: &'static str, len: usize },
    #[error("the system's random number generator failed; cannot generate a signing key")]
    Random,
    #[error("cannot read the signing key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a signature does not verify. `Display` is part of a denial text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("its signature is not in the webhook's format")]
    Malformed,
    #[error(
        "it was signed with a key this webhook no longer holds (key id {0}); the key was rotated out"
    )]
    UnknownKey(String),
    #[error("its signature does not match: it was changed after the webhook signed it")]
    Mismatch,
}

struct SigningKey {
    id: String,
    key: hmac::Key,
}

impl SigningKey {
    fn new(which: &'static str, material: &[u8]) -> Result<Self, KeyError> {
        let material = material.trim_ascii();
        if material.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                which,
                len: material.len(),
            });
        }
        // The id names the key in signatures; a digest of the key says nothing usable about it.
        let mut hasher = Sha256::new();
        hasher.update(b"secrets-webhook signing key id\0");
        hasher.update(material);
        let id = hasher.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            id,
            key: hmac::Key::new(hmac::HMAC_SHA256, material),
        })
    }
}

/// The current key and, during a rotation, the previous one.
pub struct KeyRing {
    current: SigningKey,
    previous: Option<SigningKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current.id)
            .field("previous", &self.previous.as_ref().map(|k| &k.id))
            .finish()
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

impl KeyRing {
    pub fn new(current: &[u8], previous: Option<&[u8]>) -> Result<Self, KeyError> {
        let previous = previous.filter(|p| !p.trim_ascii().is_empty());
        Ok(Self {
            current: SigningKey::new("current", current)?,
            previous: previous
                .map(|p| SigningKey::new("previous", p))
                .transpose()?,
        })
    }

    /// A random key for this process only (`serve --dev` and `review` without configured keys).
    pub fn generate() -> Result<Self, KeyError> {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        Self::new(B64.encode(bytes).as_bytes(), None)
    }

    /// Id of the key that signs.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Id of the key that only verifies, if any.
    pub fn previous_id(&self) -> Option<&str> {
        self.previous.as_ref().map(|k| k.id.as_str())
    }

    /// `<key id>.<base64url MAC>` of `message` under the current key.
    pub fn sign(&self, message: &[u8]) -> String {
        let tag = hmac::sign(&self.current.key, message);
        format!("{}.{}", self.current.id, B64.encode(tag.as_ref()))
    }

    /// Checks a [`KeyRing::sign`] output against `message`, with the current or the previous key.
    pub fn verify(&self, signature: &str, message: &[u8]) -> Result<(), SignatureError> {
        let (id, mac) = signature.split_once('.').ok_or(SignatureError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| SignatureError::Malformed)?;
        let key = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or_else(|| {
                if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    SignatureError::UnknownKey(id.to_string())
                } else {
                    SignatureError::Malformed
                }
            })?;
        // Constant time.
        hmac::verify(&key.key, message, &mac).map_err(|_| SignatureError::Mismatch)
    }
}

/// The keys in force, replaced as a whole when the mounted Secret changes. Empty until loaded:
/// then nothing is signed or verified (fail closed).
#[derive(Debug, Default)]
pub struct Keys {
    ring: RwLock<Option<Arc<KeyRing>>>,
}

impl Keys {
    /// Keys that never change (`serve --dev`, `review`, tests).
    pub fn fixed(ring: KeyRing) -> Arc<Self> {
        Arc::new(Self {
            ring: RwLock::new(Some(Arc::new(ring))),
        })
    }

    /// No keys yet.
    pub fn empty() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// From the local config file's `signingKeys`, or a key generated for this process.
    pub fn local(config: Option<&SigningKeysConfig>) -> Result<Arc<Self>, KeyError> {
        let ring = match config {
            Some(c) => KeyRing::new(
                c.current.as_bytes(),
                c.previous.as_deref().map(str::as_bytes),
            )?,
            None => KeyRing::generate()?,
        };
        Ok(Self::fixed(ring))
    }

    /// The keys in force, `None` while none are loaded.
    pub fn get(&self) -> Option<Arc<KeyRing>> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn ready(&self) -> bool {
        self.get().is_some()
    }

    fn replace(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ring));
    }
}

/// Reads `dir/current` (required) and `dir/previous` (optional).
pub async fn load_dir(dir: &Path) -> Result<KeyRing, KeyError> {
    let read = |name: &str| {
        let path = dir.join(name);
        async move {
            match tokio::fs::read(&path).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(KeyError::Read { path, source }),
            }
        }
    };
    let current = read(CURRENT_FILE).await?.ok_or_else(|| KeyError::Read {
        path: dir.join(CURRENT_FILE),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let previous = read(PREVIOUS_FILE).await?;
    KeyRing::new(&current, previous.as_deref())
}

/// Keeps `keys` in step with the files in `dir`: loads them now and then every `interval`. A key
/// set that fails to load is reported once and the last good one stays in force; until a first
/// good load the webhook is not ready. Runs until the runtime stops.
pub fn watch_dir(keys: Arc<Keys>, dir: PathBuf, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Option<Result<(String, Option<String>), String>> = None;
        loop {
            let outcome = load_dir(&dir).await;
            let seen = match &outcome {
                Ok(ring) => Ok((
                    ring.current_id().to_string(),
                    ring.previous_id().map(str::to_string),
                )),
                Err(e) => Err(e.to_string()),
            };
            if last.as_ref() != Some(&seen) {
                match outcome {
                    Ok(ring) => {
                        tracing::info!(
                            dir = %dir.display(),
                            current = ring.current_id(),
                            previous = ring.previous_id().unwrap_or(""),
                            "signing keys loaded"
                        );
                        keys.replace(ring);
                    }
                    Err(e) if keys.ready() => tracing::error!(
                        error = %e,
                        "signing keys could not be reloaded; keeping the keys in force"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "no signing key: not ready, nothing is admitted that needs one (docs/operations.md)"
                    ),
                }
                last = Some(seen);
            }
            tokio::time::sleep(interval).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &[u8] = b"0123456789abcdef0123456789abcdef-one";
    const K2: &[u8] = b"0123456789abcdef0123456789abcdef-two";

    #[test]
    fn short_keys_are_refused_without_showing_them() {
        let e = KeyRing::new(b"short-key", None).unwrap_err();
        assert!(e.to_string().contains("9 bytes"), "{e}");
        assert!(!e.to_string().contains("short-key"));
        let e = KeyRing::new(K1, Some(b"also-short")).unwrap_err();
        assert!(e.to_string().starts_with("the previous signing key"), "{e}");
        // Surrounding whitespace (a trailing newline in a file) is not key material.
        let a = KeyRing::new(K1, None).unwrap();
        let b = KeyRing::new(&[K1, b"\n"].concat(), None).unwrap();
        assert_eq!(a.current_id(), b.current_id());
    }

    #[test]
    fn signatures_from_unknown_keys_are_told_from_malformed_ones() {
        let ring = KeyRing::new(K1, None).unwrap();
        let mac = ring.sign(b"m").split_once('.').unwrap().1.to_string();
        // A key id is 16 hex digits: only such an id is an unknown key (a rotation's leftover);
        // anything else is malformed.
        let unknown = "0123456789abcdef";
        assert_eq!(
            ring.verify(&format!("{unknown}.{mac}"), b"m"),
            Err(SignatureError::UnknownKey(unknown.into()))
        );
        for id in ["0123456789abcdeZ", "abcd", "zz", ""] {
            assert_eq!(
                ring.verify(&format!("{id}.{mac}"), b"m"),
                Err(SignatureError::Malformed),
                "{id}"
            );
        }
    }

    #[test]
    fn local_keys_are_the_configured_ones_or_a_generated_one() {
        let config = SigningKeysConfig {
            current: String::from_utf8(K2.to_vec()).unwrap(),
            previous: Some(String::from_utf8(K1.to_vec()).unwrap()),
        };
        let expected = KeyRing::new(K2, Some(K1)).unwrap();
        let ring = Keys::local(Some(&config)).unwrap().get().unwrap();
        assert_eq!(ring.current_id(), expected.current_id());
        assert_eq!(ring.previous_id(), expected.previous_id());
        let generated = Keys::local(None).unwrap().get().unwrap();
        assert_eq!(generated.previous_id(), None);
        assert_ne!(generated.current_id(), expected.current_id());
        assert!(
            Keys::local(Some(&SigningKeysConfig {
                current: "short".into(),
                previous: None
            }))
            .is_err()
        );
    }

    #[tokio::test]
    async fn an_unreadable_key_file_is_an_error_not_an_absent_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CURRENT_FILE), K1).unwrap();
        assert_eq!(load_dir(dir.path()).await.unwrap().previous_id(), None);
        // `previous` that cannot be read (here a directory) must not be taken as "no previous
        // key": the load fails and the keys in force stay.
        std::fs::create_dir(dir.path().join(PREVIOUS_FILE)).unwrap();
        assert!(matches!(
            load_dir(dir.path()).await,
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn a_key_ring_debugs_as_its_ids_never_its_keys() {
        let ring = KeyRing::new(K2, Some(K1)).unwrap();
        let shown = format!("{ring:?}");
        let ids = format!(
            "KeyRing {{ current: {:?}, previous: Some({:?}) }}",
            ring.current_id(),
            ring.previous_id().unwrap()
        );
        assert_eq!(shown, ids);
        for key in [K1, K2] {
            assert!(!shown.contains(std::str::from_utf8(&key[..16]).unwrap()));
        }
    }

    #[test]
    fn previous_key_verifies_current_key_signs() {
        let old = KeyRing::new(K1, None).unwrap();
        let signed_before = old.sign(b"message");
        let rotated = KeyRing::new(K2, Some(K1)).unwrap();
        assert_eq!(rotated.verify(&signed_before, b"message"), Ok(()));
        let signed_after = rotated.sign(b"message");
        assert!(signed_after.starts_with(rotated.current_id()));
        assert_ne!(signed_after, signed_before);
        // The old ring does not know the new key: a rolling update must add it as previous first.
        assert_eq!(
            old.verify(&signed_after, b"message"),
            Err(SignatureError::UnknownKey(rotated.current_id().into()))
        );
        // After the previous key is dropped, what it signed no longer verifies.
        let done = KeyRing::new(K2, None).unwrap();
        assert!(matches!(
            done.verify(&signed_before, b"message"),
            Err(SignatureError::UnknownKey(_))
        ));
    }

    #[test]
    fn tampering_is_detected() {
        let ring = KeyRing::new(K1, None).unwrap();
        let sig = ring.sign(b"message");
        assert_eq!(ring.verify(&sig, b"messagE"), Err(SignatureError::Mismatch));
        let (id, mac) = sig.split_once('.').unwrap();
        let mut flipped = B64.decode(mac).unwrap();
        flipped[0] ^= 1;
        let forged = format!("{id}.{}", B64.encode(flipped));
        assert_eq!(
            ring.verify(&forged, b"message"),
            Err(SignatureError::Mismatch)
        );
        for bad in ["", "nodot", "x.y", &format!("{id}.!!")] {
            assert_eq!(
                ring.verify(bad, b"message"),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        // A MAC made with a guessed key under the real key's id does not verify.
        let guess = KeyRing::new(K2, None).unwrap().sign(b"message");
        let (_, guessed_mac) = guess.split_once('.').unwrap();
        assert_eq!(
            ring.verify(&format!("{id}.{guessed_mac}"), b"message"),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn generated_keys_differ_and_work() {
        let a = KeyRing::generate().unwrap();
        let b = KeyRing::generate().unwrap();
        assert_ne!(a.current_id(), b.current_id());
        assert_eq!(a.current_id().len(), 16);
        assert_eq!(a.verify(&a.sign(b"m"), b"m"), Ok(()));
        assert!(b.verify(&a.sign(b"m"), b"m").is_err());
    }

    #[tokio::test]
    async fn directory_keys_load_reload_and_fail_closed() {
        // The production log, to tell "not ready" from "keeping the keys in force" (the test
        // runtime has one thread, so the watch task logs to this subscriber).
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let _log = tracing::subscriber::set_default(crate::server::logs::json_subscriber(
            tracing_subscriber::EnvFilter::new("info"),
            move || sink.clone(),
        ));
        let logged = || String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::empty();
        let task = watch_dir(keys.clone(), dir.path().into(), Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!keys.ready(), "no key file: not ready");
        assert!(
            logged().contains("no signing key: not ready"),
            "{}",
            logged()
        );
        assert!(!logged().contains("keeping the keys in force"));

        std::fs::write(dir.path().join(CURRENT_FILE), K1).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !keys.ready() {
            assert!(std::time::Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let first = keys.get().unwrap().current_id().to_string();

        // A broken update keeps the keys in force.
        std::fs::write(dir.path().join(CURRENT_FILE), b"short").unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(keys.get().unwrap().current_id(), first);
        assert!(
            logged().contains("keeping the keys in force"),
            "{}",
            logged()
        );
        assert_eq!(logged().matches("no signing key").count(), 1);

        // A rotation is picked up.
        std::fs::write(dir.path().join(CURRENT_FILE), K2).unwrap();
        std::fs::write(dir.path().join(PREVIOUS_FILE), K1).unwrap();
        while keys.get().unwrap().current_id() == first {
            assert!(std::time::Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(keys.get().unwrap().previous_id(), Some(first.as_str()));
        task.abort();
    }
}
