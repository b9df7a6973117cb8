//! One on-demand fetch per module at a time: proxies asking at once for a module this replica
//! lacks wait for the same fetch.

use std::future::Future;

use super::{FetchFailure, ModuleCache, Turns};

#[derive(Default)]
pub struct Singleflight {
    turns: Turns,
}

impl Singleflight {
    /// Runs `fetch` for `sha256` unless the cache holds the verified module once this caller's
    /// turn comes (an earlier caller fetched it).
    pub async fn fetch<F>(
        &self,
        cache: &ModuleCache,
        sha256: &str,
        fetch: F,
    ) -> Result<(), FetchFailure>
    where
        F: Future<Output = Result<(), FetchFailure>>,
    {
        self.turns
            .run(sha256, async {
                if cache.verify_off_thread(sha256).await.unwrap_or(false) {
                    Ok(())
                } else {
                    fetch.await
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn callers_at_once_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::open(dir.path()).unwrap();
        let module = b"\0asm\x01\0\0\0".to_vec();
        let sha = crate::cache::sha256_hex(&module);
        let flight = Singleflight::default();
        let fetches = AtomicUsize::new(0);
        let one = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            cache
                .insert(&module)
                .map(|_| ())
                .map_err(|e| FetchFailure::Unavailable(e.to_string()))
        };
        let (a, b, c) = tokio::join!(
            flight.fetch(&cache, &sha, one()),
            flight.fetch(&cache, &sha, one()),
            flight.fetch(&cache, &sha, one()),
        );
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(flight.turns.is_empty());
    }
}
