//! One at a time per key: callers with the same key take turns, callers with different keys
//! run at once. What makes concurrent fetches of one module a single download: the callers
//! after the first find, on their turn, what the first one stored.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Turns {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Turns {
    /// Runs `f` once every earlier caller with `key` is done.
    pub async fn run<F: Future>(&self, key: &str, f: F) -> F::Output {
        let entry = Entry {
            turns: self,
            key,
            lock: self
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.to_string())
                .or_default()
                .clone(),
        };
        let _turn = entry.lock.lock().await;
        f.await
    }

    /// Keys with a caller running or waiting.
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A caller's hold on its key; the last one to let go (done or cancelled) removes the key.
struct Entry<'a> {
    turns: &'a Turns,
    key: &'a str,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut keys = self.turns.keys.lock().unwrap_or_else(|p| p.into_inner());
        // The map holds one reference and this caller the other.
        if Arc::strong_count(&self.lock) <= 2 {
            keys.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_key_takes_turns_and_other_keys_run_at_once() {
        let turns = Turns::default();
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let task = |key: &'static str| {
            let (turns, running, most) = (&turns, &running, &most);
            async move {
                turns
                    .run(key, async {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            }
        };
        tokio::join!(task("a"), task("a"), task("a"));
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(turns.is_empty());
        most.store(0, Ordering::SeqCst);
        tokio::join!(task("a"), task("b"), task("c"));
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn a_caller_dropped_while_waiting_leaves_no_entry_behind() {
        let turns = Turns::default();
        let first = turns.run("a", tokio::time::sleep(Duration::from_millis(50)));
        let second = turns.run("a", async {});
        tokio::select! {
            _ = first => {}
            // Dropped while it waits for its turn.
            _ = async { second.await; std::future::pending::<()>().await } => {}
        }
        assert!(turns.is_empty(), "{}", turns.len());
    }
}
