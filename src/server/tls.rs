//! Serving certificate: loaded from PEM files, served through a hot-swappable resolver, and reloaded
//! by polling the files' contents. Polling (rather than inotify on the files) survives the kubelet's
//! Secret-volume update, which swaps a `..data` symlink in the mounted folder.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Why a certificate/key pair could not be loaded. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the certificates in {path}: {source}")]
    CertPem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    // The PEM error's text is left out on purpose: it may quote bytes of the key file.
    #[error("{path} holds no readable PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    KeyPem { path: PathBuf },
    #[error("the key in {key} does not belong to the certificate in {cert}: {source}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Where the serving certificate chain and key live.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate/key pair ready to serve, with what the reloader needs to know about it.
pub struct LoadedPair {
    pub certified: Arc<CertifiedKey>,
    /// The leaf's notAfter as Unix seconds, when it could be parsed.
    pub not_after: Option<i64>,
    /// Digest of the two files as read, to notice changes.
    digest: [u8; 32],
}

/// Reads and checks both files.
pub async fn load_pair(paths: &CertPaths) -> Result<LoadedPair, TlsError> {
    let (cert_pem, key_pem) = read_files(paths).await?;
    parse_pair(paths, &cert_pem, &key_pem)
}

async fn read_files(paths: &CertPaths) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|source| TlsError::Read { path, source })
    };
    Ok((
        read(paths.cert.clone()).await?,
        read(paths.key.clone()).await?,
    ))
}

fn digest(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((cert_pem.len() as u64).to_be_bytes());
    hasher.update(cert_pem);
    hasher.update(key_pem);
    hasher.finalize().into()
}

fn parse_pair(paths: &CertPaths, cert_pem: &[u8], key_pem: &[u8]) -> Result<LoadedPair, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::CertPem {
            path: paths.cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: paths.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::KeyPem {
        path: paths.key.clone(),
    })?;
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp());
    let certified = CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|source| TlsError::Key {
        cert: paths.cert.clone(),
        key: paths.key.clone(),
        source,
    })?;
    Ok(LoadedPair {
        certified: Arc::new(certified),
        not_after,
        digest: digest(cert_pem, key_pem),
    })
}

/// Hands every new TLS connection the current certificate; [`CertResolver::replace`] swaps it
/// without touching connections already established.
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl CertResolver {
    pub fn new(certified: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(certified),
        }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a complete Arc: the writer only ever assigns.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, certified: Arc<CertifiedKey>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = certified;
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// TLS 1.3 and 1.2 only (ring), ALPN h2 and http/1.1, certificate from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<ServerConfig, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Seconds from now until `not_after` (Unix seconds); negative once past.
pub(crate) fn seconds_until(not_after: i64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    not_after as f64 - now
}

/// Keeps `resolver` in step with the files until `stop` turns true. A pair that fails to load is
/// reported once (without key material) and the last good pair stays in service.
pub struct Reloader {
    pub paths: CertPaths,
    pub resolver: Arc<CertResolver>,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
}

impl Reloader {
    pub async fn run(self, initial: &LoadedPair, mut stop: watch::Receiver<bool>) {
        let mut seen = initial.digest;
        let mut not_after = initial.not_after;
        let mut last_read_error = None::<String>;
        loop {
            if let Some(at) = not_after {
                self.metrics.cert_expiry(seconds_until(at));
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = super::conn::stopped(&mut stop) => return,
            }
            let (cert_pem, key_pem) = match read_files(&self.paths).await {
                Ok(files) => files,
                Err(e) => {
                    let text = e.to_string();
                    if last_read_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %text, "cannot read the serving certificate; keeping the current one");
                        last_read_error = Some(text);
                    }
                    continue;
                }
            };
            last_read_error = None;
            let now_seen = digest(&cert_pem, &key_pem);
            if now_seen == seen {
                continue;
            }
            // Remember the attempt either way, so a bad pair is reported once, not every poll.
            seen = now_seen;
            match parse_pair(&self.paths, &cert_pem, &key_pem) {
                Ok(pair) => {
                    self.resolver.replace(pair.certified);
                    not_after = pair.not_after;
                    tracing::info!(
                        cert = %self.paths.cert.display(),
                        not_after = ?pair.not_after,
                        "serving certificate reloaded"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "new serving certificate rejected; keeping the previous one");
                }
            }
        }
    }
}
