//! The last status this process wrote for each filter, until the watch delivers it: only the
//! operator writes status, so it is the truth even before the store has it (a reconcile that
//! the child's creation triggers often runs first, and would otherwise resolve the tag again
//! and flap the status).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;

use crate::api::{WasmFilter, WasmFilterStatus};

/// Past this many remembered statuses the memo starts over (a bound, never reached while the
/// watch runs: each entry goes when the watch delivers it).
const MAX_REMEMBERED: usize = 100_000;

/// `status` as the API server stores it: condition times in whole seconds.
pub(super) fn as_stored(status: &WasmFilterStatus) -> WasmFilterStatus {
    let mut stored = status.clone();
    for c in &mut stored.conditions {
        let t = c.last_transition_time.0;
        if let Ok(whole) = jiff::Timestamp::from_second(t.as_second()) {
            c.last_transition_time.0 = whole;
        }
    }
    stored
}

/// Statuses written and not yet seen in the store, by object uid.
#[derive(Default)]
pub(super) struct WrittenStatuses {
    by_uid: Mutex<HashMap<String, WasmFilterStatus>>,
}

impl WrittenStatuses {
    /// Remembers `status` as the API server stores it (condition times in whole seconds), so
    /// that the store's copy compares equal once it catches up.
    pub(super) fn remember(&self, wf: &WasmFilter, status: &WasmFilterStatus) {
        let Some(uid) = wf.uid() else { return };
        let stored = as_stored(status);
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if by_uid.len() >= MAX_REMEMBERED {
            by_uid.clear();
        }
        by_uid.insert(uid, stored);
    }

    /// `wf` with the last status this process wrote for it, when the store has not caught up;
    /// once it has, the memo is dropped (the store holds the same).
    pub(super) fn apply_to(&self, wf: &Arc<WasmFilter>) -> Arc<WasmFilter> {
        let Some(uid) = wf.uid() else {
            return wf.clone();
        };
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        match by_uid.get(&uid) {
            Some(status) if wf.status.as_ref() == Some(status) => {
                by_uid.remove(&uid);
                wf.clone()
            }
            Some(status) => {
                let mut newer = (**wf).clone();
                newer.status = Some(status.clone());
                Arc::new(newer)
            }
            None => wf.clone(),
        }
    }

    /// The watch delivered `wf` (and the store holds it): a memo of that very status goes.
    /// Without this a memo stayed until the filter's next reconcile, a second copy of every
    /// status (megabytes at thousands of filters).
    pub(super) fn stored(&self, wf: &WasmFilter) {
        let (Some(uid), Some(status)) = (wf.uid(), wf.status.as_ref()) else {
            return;
        };
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if by_uid.get(&uid) == Some(status) {
            by_uid.remove(&uid);
        }
    }

    /// The filter is gone: so is its memo.
    pub(super) fn deleted(&self, wf: &WasmFilter) {
        if let Some(uid) = wf.uid() {
            let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
            by_uid.remove(&uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl WrittenStatuses {
        fn len(&self) -> usize {
            self.by_uid.lock().unwrap().len()
        }
    }
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn filter(uid: &str, status: Option<WasmFilterStatus>) -> WasmFilter {
        let mut wf: WasmFilter = serde_json::from_value(serde_json::json!({
            "apiVersion": "wasmfilter.dev/v1alpha1", "kind": "WasmFilter",
            "metadata": {"name": "f", "namespace": "shop", "uid": uid},
            "spec": {"module": {"image": "registry.example/f:1"}, "selector": {"matchLabels": {"app": "f"}}},
        }))
        .unwrap();
        wf.status = status;
        wf
    }

    fn status(reason: &str) -> WasmFilterStatus {
        WasmFilterStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: reason.into(),
                message: String::new(),
                last_transition_time: Time(
                    jiff::Timestamp::from_millisecond(1_700_000_000_250).unwrap(),
                ),
                observed_generation: None,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_written_status_is_seen_until_the_watch_delivers_it_then_forgotten() {
        let memo = WrittenStatuses::default();
        let old = Arc::new(filter("u1", None));
        memo.remember(&old, &status("Deployed"));
        // The store has not caught up: the reconcile sees what was written (whole seconds,
        // as the API server stores it).
        let seen = memo.apply_to(&old);
        let written = seen.status.clone().unwrap();
        assert_eq!(written.conditions[0].reason, "Deployed");
        assert_eq!(
            written.conditions[0]
                .last_transition_time
                .0
                .as_millisecond()
                % 1000,
            0
        );
        // Another status arriving (an older write) does not drop it; this one does.
        memo.stored(&filter("u1", Some(status("Other"))));
        assert_eq!(memo.len(), 1);
        memo.stored(&filter("u1", Some(written)));
        assert_eq!(memo.len(), 0);
        assert!(memo.apply_to(&old).status.is_none());
    }

    #[test]
    fn a_deleted_filter_leaves_no_memo() {
        let memo = WrittenStatuses::default();
        let wf = filter("u2", None);
        memo.remember(&wf, &status("Deployed"));
        memo.deleted(&wf);
        assert_eq!(memo.len(), 0);
    }
}
