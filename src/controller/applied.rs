//! What this process last applied to each child (WasmPlugin, EnvoyFilter, TrafficExtension):
//! - the watch event of that very version is the operator's own write echoing back, not a
//!   reason to reconcile; one that arrives while the apply is still on its way is held until
//!   the apply's answer says whether it was ours;
//! - a reconcile whose child comes out the same as last time, with nothing else known to have
//!   touched the child since, leaves it alone: a resync or a pod event that changes nothing
//!   costs the API server no write.
//!
//! Anything else the child watch reports (a change by someone else, a deletion, a new list after
//! the watch broke) makes the next reconcile apply again, and reconciles the owner. So does a
//! restart: the memo lives in this process only.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;

use crate::api::WasmFilter;

/// Past this many children the memo starts over (everything is applied once more).
const MAX_REMEMBERED: usize = 100_000;
/// Events held for one apply in flight; past this many, it counts as touched by someone else.
const MAX_HELD: usize = 16;

/// kind, namespace, name (a child is named after its WasmFilter).
type Key = (String, String, String);

#[derive(Default)]
struct Applied {
    /// The resourceVersion our last apply of the child came back with.
    version: Option<String>,
    /// A fingerprint of the body of that apply; none once anything else was seen.
    body: Option<u64>,
    /// An apply is on its way: the versions its child's watch reported meanwhile.
    in_flight: Option<Vec<String>>,
}

/// The memo, and where a child touched by someone else during an apply sends its owner to be
/// reconciled again.
pub(super) struct AppliedChildren {
    by_key: Mutex<HashMap<Key, Applied>>,
    again: tokio::sync::mpsc::UnboundedSender<ObjectRef<WasmFilter>>,
}

/// What [`AppliedChildren::needs_apply`] hands out for an apply to go ahead; dropped without
/// [`AppliedChildren::applied`] (the apply failed), whatever its child's watch reported
/// meanwhile counts as someone else's.
pub(super) struct Ticket<'a> {
    memo: &'a AppliedChildren,
    key: Option<Key>,
    body: Option<u64>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.memo.landed(key, None, None);
        }
    }
}

/// The body's JSON, hashed (the renderer writes equal children as equal text).
fn fingerprint(body: &impl serde::Serialize) -> Option<u64> {
    let text = serde_json::to_vec(body).ok()?;
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    Some(h.finish())
}

impl AppliedChildren {
    /// A memo whose owners to reconcile again go to `again`.
    pub(super) fn new(again: tokio::sync::mpsc::UnboundedSender<ObjectRef<WasmFilter>>) -> Self {
        AppliedChildren {
            by_key: Mutex::default(),
            again,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Applied>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` when the child named `kind`/`ns`/`name` holds exactly `body` from our last
    /// apply and nothing else touched it since; otherwise the ticket for
    /// [`AppliedChildren::applied`] (one apply of a child at a time: the controller never
    /// reconciles one filter twice at once).
    pub(super) fn needs_apply(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        body: &impl serde::Serialize,
    ) -> Option<Ticket<'_>> {
        let key = (kind.to_string(), ns.to_string(), name.to_string());
        let body = fingerprint(body);
        let mut by_key = self.lock();
        if body.is_some() && by_key.get(&key).is_some_and(|a| a.body == body) {
            return None;
        }
        if by_key.len() >= MAX_REMEMBERED {
            by_key.clear();
        }
        by_key.entry(key.clone()).or_default().in_flight = Some(Vec::new());
        Some(Ticket {
            memo: self,
            key: Some(key),
            body,
        })
    }

    /// The apply `ticket` was for came back as `child`.
    pub(super) fn applied(&self, mut ticket: Ticket<'_>, child: &DynamicObject) {
        if let Some(key) = ticket.key.take() {
            self.landed(key, child.resource_version(), ticket.body);
        }
    }

    /// An apply ended: with the version it came back with, or none if it failed. An event held
    /// meanwhile of another version was someone else's: the owner is reconciled again, and the
    /// body not remembered.
    fn landed(&self, key: Key, version: Option<String>, body: Option<u64>) {
        let mut by_key = self.lock();
        let entry = by_key.entry(key.clone()).or_default();
        let held = entry.in_flight.take().unwrap_or_default();
        let others = held.len() >= MAX_HELD
            || held
                .iter()
                .any(|v| version.is_none() || Some(v) != version.as_ref());
        entry.body = match version {
            Some(v) => {
                entry.version = Some(v);
                body.filter(|_| !others)
            }
            None => None,
        };
        drop(by_key);
        if others {
            let (_, ns, name) = key;
            let _ = self.again.send(ObjectRef::new(&name).within(&ns));
        }
    }

    /// Whether the watch's `child` of `kind` is no reason to reconcile: exactly what this
    /// process last applied, or held until the apply on its way says whose it is. Otherwise
    /// the next reconcile applies again whatever it finds.
    pub(super) fn is_own(&self, kind: &str, child: &DynamicObject) -> bool {
        let (Some(ns), Some(version)) = (child.namespace(), child.resource_version()) else {
            return false;
        };
        let key = (kind.to_string(), ns, child.name_any());
        let mut by_key = self.lock();
        if let Some(a) = by_key.get_mut(&key) {
            if a.version.as_ref() == Some(&version) {
                return true;
            }
            if let Some(held) = &mut a.in_flight {
                if held.len() < MAX_HELD {
                    held.push(version);
                } else {
                    // Too many to hold: reconcile on this one.
                    a.body = None;
                    return false;
                }
                return true;
            }
            a.body = None;
        }
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

    fn memo() -> (
        AppliedChildren,
        tokio::sync::mpsc::UnboundedReceiver<ObjectRef<WasmFilter>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (AppliedChildren::new(tx), rx)
    }

    #[test]
    fn the_same_body_again_is_not_applied_until_something_else_touches_the_child() {
        let (memo, mut again) = memo();
        let body = json!({"spec": {"url": "http://a"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        memo.applied(ticket, &child("5"));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_none());
        // Our own apply echoing back changes nothing.
        assert!(memo.is_own("WasmPlugin", &child("5")));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_none());
        // Someone else's change: the same body is applied again.
        assert!(!memo.is_own("WasmPlugin", &child("6")));
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_some());
        // Nothing was held, so nothing asked for another reconcile.
        assert!(again.try_recv().is_err());
        // A new body is applied, and an apply that fails leaves nothing remembered.
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        memo.applied(ticket, &child("7"));
        let other = json!({"spec": {"url": "http://b"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &other).unwrap();
        drop(ticket);
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_some());
    }

    #[test]
    fn our_own_echo_before_the_answer_is_no_reason_to_reconcile() {
        let (memo, mut again) = memo();
        let body = json!({"spec": {"url": "http://a"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        // The watch reports our apply before its answer comes back: held.
        assert!(memo.is_own("WasmPlugin", &child("5")));
        memo.applied(ticket, &child("5"));
        assert!(again.try_recv().is_err());
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_none());
    }

    #[test]
    fn someone_elses_change_while_applying_reconciles_the_owner_again() {
        let (memo, mut again) = memo();
        let body = json!({"spec": {"url": "http://a"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        assert!(memo.is_own("WasmPlugin", &child("5")));
        assert!(memo.is_own("WasmPlugin", &child("6")));
        memo.applied(ticket, &child("5"));
        assert_eq!(again.try_recv().unwrap(), ObjectRef::new("f").within("ns"));
        // And that reconcile applies again.
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_some());
    }

    #[test]
    fn a_failed_apply_remembers_nothing_and_reconciles_on_what_it_held() {
        let (memo, mut again) = memo();
        let body = json!({"spec": {"url": "http://a"}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        drop(ticket);
        assert!(again.try_recv().is_err());
        assert!(memo.needs_apply("WasmPlugin", "ns", "f", &body).is_some());
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        assert!(memo.is_own("WasmPlugin", &child("9")));
        drop(ticket);
        assert_eq!(again.try_recv().unwrap(), ObjectRef::new("f").within("ns"));
    }

    #[test]
    fn other_children_and_kinds_are_apart() {
        let (memo, _again) = memo();
        let body = json!({"spec": {}});
        let ticket = memo.needs_apply("WasmPlugin", "ns", "f", &body).unwrap();
        memo.applied(ticket, &child("5"));
        for (kind, ns, name) in [
            ("EnvoyFilter", "ns", "f"),
            ("WasmPlugin", "ns", "g"),
            ("WasmPlugin", "other", "f"),
        ] {
            assert!(memo.needs_apply(kind, ns, name, &body).is_some());
        }
        // A child never applied here is every time a reason to reconcile.
        assert!(!memo.is_own("WasmPlugin", &child("1")));
    }
}
