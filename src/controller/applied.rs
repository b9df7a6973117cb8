//! What this process last applied to each child (WasmPlugin, EnvoyFilter, TrafficExtension):
//! - the watch event of that very version is the operator's own write echoing back, not a
//!   reason to reconcile;
//! - a reconcile whose child comes out the same as last time, with nothing else known to have
//!   touched the child since, leaves it alone: a resync or a pod event that changes nothing
//!   costs the API server no write.
//!
//! Anything else the child watch reports (a change by someone else, a deletion, a new list after
//! the watch broke) makes the next reconcile apply again. So does a restart: the memo lives in
//! this process only.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use kube::ResourceExt;
use kube::api::DynamicObject;

/// Past this many children the memo starts over (everything is applied once more).
const MAX_REMEMBERED: usize = 100_000;

/// kind, namespace, name.
type Key = (String, String, String);

#[derive(Default)]
struct Applied {
    /// The resourceVersion our last apply of the child came back with.
    version: Option<String>,
    /// A fingerprint of the body of that apply; none once anything else was seen.
    body: Option<u64>,
    /// How many watch events for the child were not our own applies echoing back.
    others: u64,
}

#[derive(Default)]
pub(super) struct AppliedChildren {
    by_key: Mutex<HashMap<Key, Applied>>,
}

/// What [`AppliedChildren::needs_apply`] hands out for an apply to go ahead.
pub(super) struct Ticket {
    key: Key,
    body: Option<u64>,
    /// [`Applied::others`] when the apply was decided on: an event in between may be someone
    /// else's change landing after ours, so that apply's body is not remembered.
    others: u64,
}

/// The body's JSON, hashed (the renderer writes equal children as equal text).
fn fingerprint(body: &impl serde::Serialize) -> Option<u64> {
    let text = serde_json::to_vec(body).ok()?;
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    Some(h.finish())
}

impl AppliedChildren {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Applied>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` when the child named `kind`/`ns`/`name` holds exactly `body` from our last
    /// apply and nothing else touched it since; otherwise the ticket for
    /// [`AppliedChildren::applied`].
    pub(super) fn needs_apply(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        body: &impl serde::Serialize,
    ) -> Option<Ticket> {
        let key = (kind.to_string(), ns.to_string(), name.to_string());
        let body = fingerprint(body);
        let by_key = self.lock();
        let known = by_key.get(&key);
        if body.is_some() && known.is_some_and(|a| a.body == body) {
            return None;
        }
        let others = known.map_or(0, |a| a.others);
        Some(Ticket { key, body, others })
    }

    /// The apply `ticket` was for came back as `child`.
    pub(super) fn applied(&self, ticket: Ticket, child: &DynamicObject) {
        let mut by_key = self.lock();
        if by_key.len() >= MAX_REMEMBERED {
            by_key.clear();
        }
        let entry = by_key.entry(ticket.key).or_default();
        entry.version = child.resource_version();
        entry.body = ticket.body.filter(|_| entry.others == ticket.others);
    }

    /// Whether the watch's `child` of `kind` is exactly what this process last applied. When
    /// it is not, the next reconcile applies again whatever it finds.
    pub(super) fn is_own(&self, kind: &str, child: &DynamicObject) -> bool {
        let Some(ns) = child.namespace() else {
            return false;
        };
        let version = child.resource_version();
        let key = (kind.to_string(), ns, child.name_any());
        let mut by_key = self.lock();
        if let Some(a) = by_key.get(&key)
            && version.is_some()
            && a.version == version
        {
            return true;
        }
        if by_key.len() >= MAX_REMEMBERED {
            by_key.clear();
        }
        let entry = by_key.entry(key).or_default();
        entry.others += 1;
        entry.body = None;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn child(version: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"name": "f", "namespace": "ns", "resourceVersion": version},
        }))
        .unwrap()
    }

    #[test]
    fn the_same_body_again_is_not_applied_until_something_else_touches_the_child() {
        let memo = AppliedChildren::default();
        let body = json!({"spec": {"url": "http://a"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        memo.applied(ticket, &child("5"));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_none());
        // A new body is applied.
        let other = json!({"spec": {"url": "http://b"}});
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &other).is_some());
        // Our own apply echoing back changes nothing.
        assert!(memo.is_own("WasmPlugin", &child("5")));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_none());
        // Someone else's change: the same body is applied again.
        assert!(!memo.is_own("WasmPlugin", &child("6")));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_some());
    }

    #[test]
    fn an_event_while_applying_leaves_that_apply_unremembered() {
        let memo = AppliedChildren::default();
        let body = json!({"spec": {"url": "http://a"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        // Before our apply's answer: an event (someone else's change after ours, or our own
        // echo arriving first; the two cannot be told apart).
        assert!(!memo.is_own("WasmPlugin", &child("6")));
        memo.applied(ticket, &child("5"));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_some());
        // Applied again with nothing in between: remembered.
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        memo.applied(ticket, &child("7"));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_none());
    }

    #[test]
    fn other_children_and_kinds_are_apart() {
        let memo = AppliedChildren::default();
        let body = json!({"spec": {}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        memo.applied(ticket, &child("5"));
        assert!(memo.needs_apply("EnvoyFilter", "ns", "f", &body).is_some());
        assert!(memo.needs_apply("WasmPlugin", "ns", "g", &body).is_some());
        assert!(
            memo.needs_apply("WasmPlugin", "other", "f", &body)
                .is_some()
        );
    }
}
