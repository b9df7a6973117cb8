//! Keeping the cache within `--cache-max-bytes`: one pass, run after pulls and once a minute.

use std::collections::HashSet;
use std::time::Duration;

use super::ModuleCache;
use crate::metrics::Metrics;

/// Modules written or used this recently are never evicted: one may be on its way into a
/// status that does not reference it yet.
pub const EVICTION_GRACE: Duration = Duration::from_secs(600);

/// Trims `cache` to `max` bytes, keeping every module in `referenced` (`None`: the full list
/// of filters is not known yet, so nothing is evicted), and reports the size either way.
/// Walks the cache directory: call it off the async threads.
pub fn evict_unused(
    cache: &ModuleCache,
    max: Option<u64>,
    referenced: impl FnOnce() -> Option<HashSet<String>>,
    metrics: &Metrics,
) {
    let Some(max) = max else {
        // Unbounded: nothing to evict, but the size is still reported.
        match cache.total_bytes() {
            Ok(bytes) => metrics.evicted(0, bytes),
            Err(e) => tracing::warn!(error = %e, "could not size the module cache"),
        }
        return;
    };
    // What is in use is only worked out when something may have to go.
    let Some(referenced) = referenced() else {
        return;
    };
    match cache.evict(max, &referenced, EVICTION_GRACE) {
        Ok(r) => {
            for (sha, len) in &r.removed {
                tracing::info!(sha256 = %sha, bytes = len, "evicted unused module from the cache");
            }
            metrics.evicted(r.removed.len() as u64, r.remaining_bytes);
            if r.remaining_bytes > max {
                tracing::warn!(
                    remaining = r.remaining_bytes,
                    max,
                    in_use = r.pinned_bytes,
                    "modules in use exceed --cache-max-bytes; keeping them"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cache eviction failed"),
    }
}
