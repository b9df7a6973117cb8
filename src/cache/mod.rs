//! Content-addressed module store: `<dir>/sha256/<hex>.wasm`, written atomically, and the HTTP
//! server that hands those bytes to proxies.

mod evict;
mod ondemand;
mod server;
mod turns;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use evict::{EVICTION_GRACE, evict_unused};
pub use ondemand::Singleflight;
pub use server::{FetchFailure, OnDemand, router};
pub use turns::Turns;

/// What can go wrong with the cache itself (disk, not content: corrupt files are dropped and
/// read as absent).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing module to the cache: {0}")]
    Write(#[source] std::io::Error),

    #[error("reading module sha256:{sha256} back from the cache: {source}")]
    Read {
        sha256: String,
        #[source]
        source: std::io::Error,
    },

    #[error("reading module sha256:{sha256} back from the cache: not in the cache")]
    Missing { sha256: String },
}

impl Error {
    /// Stable, CamelCase reason (condition, Event, metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Write(_) => "CacheWrite",
            Error::Read { .. } | Error::Missing { .. } => "ReadModule",
        }
    }
}

/// What identifies a file's content without reading it: if none of these changed since the
/// file was hashed, it still holds the bytes that were verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    ino: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            ino: std::os::unix::fs::MetadataExt::ino(meta),
        }
    }
}

/// On-disk store of verified modules, keyed by the sha256 of their bytes.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
    /// Files hashed since they last changed.
    verified: Arc<Mutex<HashMap<String, Stamp>>>,
    /// When this process last used each module (file times cannot say: reads move atime).
    used: Arc<Mutex<HashMap<String, SystemTime>>>,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Modules removed, with their sizes.
    pub removed: Vec<(String, u64)>,
    /// Bytes left in the cache.
    pub remaining_bytes: u64,
    /// Bytes held by modules that could not be evicted (referenced or recently written).
    pub pinned_bytes: u64,
}

/// One module file in the cache.
#[derive(Debug, Clone)]
struct Entry {
    sha256: String,
    len: u64,
    /// When the file was written.
    written: SystemTime,
    /// Last write or use: the least recently used go first.
    touched: SystemTime,
}

/// `true` for a 64-character lowercase hex string, the only key the cache accepts.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

impl ModuleCache {
    /// Opens (creating if needed) the store under `dir`, dropping temporary files a crash may
    /// have left behind. Nothing is hashed yet: see [`ModuleCache::verify_all`].
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        let modules = dir.join("sha256");
        std::fs::create_dir_all(&modules)?;
        for entry in std::fs::read_dir(&modules)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(ModuleCache {
            dir,
            verified: Arc::new(Mutex::new(HashMap::new())),
            used: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Hashes every module in the store, removing each file whose bytes no longer match its
    /// name (and anything that is not named like a module). Returns the names removed.
    pub fn verify_all(&self) -> std::io::Result<Vec<String>> {
        let mut dropped = Vec::new();
        for entry in std::fs::read_dir(self.dir.join("sha256"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.strip_suffix(".wasm").filter(|s| is_sha256_hex(s)) {
                Some(sha) => {
                    if !self.verify(sha)? {
                        dropped.push(name);
                    }
                }
                None => {
                    tracing::warn!(file = %name, "unexpected file in the module cache; removing it");
                    let _ = std::fs::remove_file(entry.path());
                    dropped.push(name);
                }
            }
        }
        Ok(dropped)
    }

    fn stamps(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stamp>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the module file is present and holds the bytes its name promises; hashes it
    /// only when it changed since it was last hashed. A corrupt file is removed.
    pub fn verify(&self, sha256: &str) -> std::io::Result<bool> {
        if !is_sha256_hex(sha256) {
            return Ok(false);
        }
        let path = self.path(sha256);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.stamps().remove(sha256);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let stamp = Stamp::of(&meta);
        if self.stamps().get(sha256) == Some(&stamp) {
            return Ok(true);
        }
        Ok(self.read_verified(sha256)?.is_some())
    }

    /// Where the module with this sha256 lives (whether or not it is there).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(format!("{sha256}.wasm"))
    }

    pub fn contains(&self, sha256: &str) -> bool {
        is_sha256_hex(sha256) && self.path(sha256).is_file()
    }

    /// Stores `bytes` under their sha256 and returns it. The file appears under its final name
    /// only once complete and synced, so a reader never sees a partial module.
    pub fn insert(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha = sha256_hex(bytes);
        let path = self.path(&sha);
        if path.is_file() {
            return Ok(sha);
        }
        let dir = self.dir.join("sha256");
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        let file = tmp.persist(&path).map_err(|e| e.error)?;
        if let Ok(meta) = file.metadata() {
            self.stamps().insert(sha.clone(), Stamp::of(&meta));
        }
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(sha)
    }

    /// Reads a module back, verifying its bytes still hash to its name. A file that does not is
    /// removed and reported as absent, so it is fetched again rather than served.
    pub fn read_verified(&self, sha256: &str) -> std::io::Result<Option<Vec<u8>>> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        let path = self.path(sha256);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let before = Stamp::of(&file.metadata()?);
        let bytes = std::fs::read(&path)?;
        if sha256_hex(&bytes) == sha256 {
            self.stamps().insert(sha256.to_string(), before);
            Ok(Some(bytes))
        } else {
            tracing::warn!(sha256, "cached module is corrupt; dropping it");
            self.stamps().remove(sha256);
            std::fs::remove_file(&path)?;
            Ok(None)
        }
    }

    /// [`ModuleCache::insert`] on a blocking thread (it writes, syncs and hashes).
    pub async fn insert_off_thread(&self, bytes: Vec<u8>) -> std::io::Result<String> {
        let cache = self.clone();
        tokio::task::spawn_blocking(move || cache.insert(&bytes))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The verified bytes of a module that must be in the cache, read on a blocking thread.
    pub async fn read_off_thread(&self, sha256: &str) -> Result<Vec<u8>, Error> {
        self.read_verified_off_thread(sha256)
            .await
            .map_err(|source| Error::Read {
                sha256: sha256.to_string(),
                source,
            })?
            .ok_or_else(|| Error::Missing {
                sha256: sha256.to_string(),
            })
    }

    /// [`ModuleCache::read_verified`] on a blocking thread.
    pub async fn read_verified_off_thread(&self, sha256: &str) -> std::io::Result<Option<Vec<u8>>> {
        let (cache, sha) = (self.clone(), sha256.to_string());
        tokio::task::spawn_blocking(move || cache.read_verified(&sha))
            .await
            .map_err(std::io::Error::other)?
    }

    /// [`ModuleCache::verify`] on a blocking thread (it may read and hash the whole module).
    pub async fn verify_off_thread(&self, sha256: &str) -> std::io::Result<bool> {
        let (cache, sha256) = (self.clone(), sha256.to_string());
        tokio::task::spawn_blocking(move || cache.verify(&sha256))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Marks a module as just used (served, or reused by a reconcile), so eviction takes least
    /// recently used modules first.
    pub fn touch(&self, sha256: &str) {
        if !is_sha256_hex(sha256) {
            return;
        }
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha256.to_string(), SystemTime::now());
    }

    fn entries(&self) -> std::io::Result<Vec<Entry>> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir.join("sha256"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".wasm").filter(|s| is_sha256_hex(s)) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let touched = used.get(sha).map_or(modified, |u| modified.max(*u));
            out.push(Entry {
                sha256: sha.to_string(),
                len: meta.len(),
                written: modified,
                touched,
            });
        }
        Ok(out)
    }

    /// Total bytes of the modules in the store.
    pub fn total_bytes(&self) -> std::io::Result<u64> {
        Ok(self.entries()?.iter().map(|e| e.len).sum())
    }

    /// Removes least recently used modules until the store holds at most `max_bytes`, never
    /// one in `referenced` (modules some WasmFilter deploys) nor one written within `grace`
    /// (a module being deployed right now, not yet in any status).
    pub fn evict(
        &self,
        max_bytes: u64,
        referenced: &HashSet<String>,
        grace: Duration,
    ) -> std::io::Result<Eviction> {
        let mut entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.len).sum();
        let mut result = Eviction::default();
        let now = SystemTime::now();
        entries.sort_by_key(|e| e.touched);
        for e in entries {
            let young = now
                .duration_since(e.written)
                .map(|age| age < grace)
                .unwrap_or(true);
            if referenced.contains(&e.sha256) || young {
                result.pinned_bytes += e.len;
                continue;
            }
            if total <= max_bytes {
                continue;
            }
            match std::fs::remove_file(self.path(&e.sha256)) {
                Ok(()) => {
                    self.stamps().remove(&e.sha256);
                    self.used
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&e.sha256);
                    total = total.saturating_sub(e.len);
                    result.removed.push((e.sha256, e.len));
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    total = total.saturating_sub(e.len);
                }
                Err(err) => return Err(err),
            }
        }
        result.remaining_bytes = total;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let sha = cache.insert(b"\0asm\x01\0\0\0").unwrap();
        assert_eq!(sha, sha256_hex(b"\0asm\x01\0\0\0"));
        assert!(cache.contains(&sha));
        assert_eq!(cache.insert(b"\0asm\x01\0\0\0").unwrap(), sha);
        assert_eq!(
            cache.read_verified(&sha).unwrap().as_deref(),
            Some(&b"\0asm\x01\0\0\0"[..])
        );
    }

    #[test]
    fn corrupt_file_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let sha = cache.insert(b"module").unwrap();
        std::fs::write(cache.path(&sha), b"tampered").unwrap();
        assert_eq!(cache.read_verified(&sha).unwrap(), None);
        assert!(!cache.contains(&sha));
    }

    #[test]
    fn verify_all_drops_corrupt_and_stray_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let good = cache.insert(b"good").unwrap();
        let bad = cache.insert(b"bad").unwrap();
        std::fs::write(cache.path(&bad), b"rotten").unwrap();
        std::fs::write(dir.path().join("sha256/notes.txt"), b"?").unwrap();
        // A fresh process knows nothing about what was verified before.
        let reopened = ModuleCache::open(dir.path()).unwrap();
        let mut dropped = reopened.verify_all().unwrap();
        dropped.sort();
        assert_eq!(
            dropped,
            vec![format!("{bad}.wasm"), "notes.txt".to_string()]
        );
        assert!(reopened.verify(&good).unwrap());
        assert!(!reopened.contains(&bad));
    }

    #[test]
    fn a_file_changed_after_verification_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let sha = cache.insert(b"original").unwrap();
        assert!(cache.verify(&sha).unwrap());
        std::fs::write(cache.path(&sha), b"tampered, longer").unwrap();
        assert!(!cache.verify(&sha).unwrap());
        assert!(!cache.contains(&sha));
    }

    #[test]
    fn eviction_removes_least_recently_used_but_never_referenced_or_young_modules() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        let age = |sha: &str, t: SystemTime| {
            let f = std::fs::File::options()
                .append(true)
                .open(cache.path(sha))
                .unwrap();
            f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
                .unwrap();
        };
        let a = cache.insert(&[1u8; 100]).unwrap(); // oldest, in use
        let b = cache.insert(&[2u8; 100]).unwrap(); // old, unused
        let c = cache.insert(&[3u8; 100]).unwrap(); // newer, unused
        let d = cache.insert(&[4u8; 100]).unwrap(); // just written
        age(&a, old - Duration::from_secs(60));
        age(&b, old);
        age(&c, old + Duration::from_secs(60));
        let referenced = HashSet::from([a.clone()]);
        let r = cache
            .evict(250, &referenced, Duration::from_secs(600))
            .unwrap();
        assert_eq!(r.removed, vec![(b.clone(), 100), (c.clone(), 100)]);
        assert_eq!(r.remaining_bytes, 200);
        assert_eq!(r.pinned_bytes, 200);
        assert!(cache.contains(&a) && cache.contains(&d));
        // Under the limit: nothing more goes, even with nothing referenced.
        let r = cache.evict(1000, &HashSet::new(), Duration::ZERO).unwrap();
        assert!(r.removed.is_empty());
    }

    #[test]
    fn a_module_used_lately_outlives_one_written_later_but_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let written = |sha: &str, t: SystemTime| {
            let f = std::fs::File::options()
                .append(true)
                .open(cache.path(sha))
                .unwrap();
            f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
                .unwrap();
        };
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        let used = cache.insert(&[5u8; 100]).unwrap();
        let unused = cache.insert(&[6u8; 100]).unwrap();
        written(&used, hour_ago);
        written(&unused, hour_ago + Duration::from_secs(60));
        cache.touch(&used);
        let r = cache.evict(100, &HashSet::new(), Duration::ZERO).unwrap();
        assert_eq!(r.removed, vec![(unused, 100)]);
        assert!(cache.contains(&used));
    }

    #[test]
    fn leftover_temporaries_are_cleaned_on_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sha256")).unwrap();
        std::fs::write(dir.path().join("sha256/.tmp-abc"), b"partial").unwrap();
        ModuleCache::open(dir.path()).unwrap();
        assert!(!dir.path().join("sha256/.tmp-abc").exists());
    }

    #[test]
    fn only_sha256_hex_names_are_keys() {
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex("../../etc/passwd"));
        assert!(!is_sha256_hex(&"a".repeat(63)));
    }
}
