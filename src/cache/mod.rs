//! Content-addressed module store: `<dir>/sha256/<hex>.wasm`, written atomically, and the HTTP
//! server that hands those bytes to proxies.

mod server;

use std::io::Write;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

pub use server::router;

/// On-disk store of verified modules, keyed by the sha256 of their bytes.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

/// `true` for a 64-character lowercase hex string, the only key the cache accepts.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl ModuleCache {
    /// Opens (creating if needed) the store under `dir`, dropping temporary files a crash may
    /// have left behind.
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
        Ok(ModuleCache { dir })
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
        tmp.persist(&path).map_err(|e| e.error)?;
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
        match std::fs::read(self.path(sha256)) {
            Ok(bytes) if sha256_hex(&bytes) == sha256 => Ok(Some(bytes)),
            Ok(_) => {
                tracing::warn!(sha256, "cached module is corrupt; dropping it");
                std::fs::remove_file(self.path(sha256))?;
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
