//! Events (`events.k8s.io/v1`) about filters, published as client-go's event recorder does: a
//! repeat of the same event (object, type, reason, action and note) within six minutes becomes
//! a series on the first one (its count grows) instead of a new object. Of each recent event only
//! its name and count are kept: kube's `Recorder`, used before, kept every Event object it
//! published for six minutes (megabytes at thousands of filters) and walked all of them on
//! every publish, and it made a repeat with a new note a series of the old note.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{EventType, Reporter};

/// How long a published event is remembered to make a series of its repeats (client-go's and
/// kube's window).
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);
/// Bound on the events remembered; past it the oldest are forgotten first.
const MAX_REMEMBERED: usize = 10_000;

/// What makes two events the same one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The object's uid, or its kind, namespace and name when it has none.
    regarding: String,
    type_: &'static str,
    reason: String,
    action: String,
    note: Option<String>,
}

/// A recent event: its object's name and namespace, how often it happened, when last.
#[derive(Debug, Clone)]
struct Recent {
    name: String,
    namespace: String,
    count: i32,
    last: Timestamp,
}

/// The recent events by key, and the keys in the order they were published (a key published
/// again appears again; the older entry is skipped when it comes up).
#[derive(Default)]
struct Memory {
    by_key: HashMap<Key, Recent>,
    order: VecDeque<(Timestamp, Key)>,
}

impl Memory {
    /// Forgets events last seen before `now - SERIES_WINDOW`, and the oldest beyond the bound.
    fn expire(&mut self, now: Timestamp) {
        while let Some((at, key)) = self.order.front() {
            let stale = *at + SERIES_WINDOW <= now || self.order.len() > 2 * MAX_REMEMBERED;
            let over = self.by_key.len() > MAX_REMEMBERED;
            if !stale && !over {
                break;
            }
            // A key published again since has a newer record further on.
            if self.by_key.get(key).is_some_and(|r| r.last == *at) {
                self.by_key.remove(key);
            }
            self.order.pop_front();
        }
    }

    fn remember(&mut self, key: Key, recent: Recent) {
        self.order.push_back((recent.last, key.clone()));
        self.by_key.insert(key, recent);
    }
}

/// Publishes Events for the operator.
pub struct Events {
    client: Client,
    reporter: Reporter,
    memory: Mutex<Memory>,
}

/// One event to publish.
pub struct Event<'a> {
    pub type_: EventType,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: Option<String>,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Events {
            client,
            reporter,
            memory: Mutex::new(Memory::default()),
        }
    }

    /// Publishes `ev` about `regarding`: a new Event, or the next count of the same one
    /// published within six minutes.
    pub async fn publish(
        &self,
        ev: &Event<'_>,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = key(ev, regarding);
        let repeat = {
            let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
            memory.expire(now);
            memory.by_key.get(&key).cloned()
        };
        let recent = match repeat {
            Some(mut recent) => {
                recent.count += 1;
                recent.last = now;
                let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &recent.namespace);
                let series = serde_json::json!({"series": {
                    "count": recent.count,
                    "lastObservedTime": MicroTime(now),
                }});
                match api
                    .patch(
                        &recent.name,
                        &PatchParams::default(),
                        &Patch::Merge(&series),
                    )
                    .await
                {
                    Ok(_) => recent,
                    // Gone meanwhile (Events expire on the API server): a new one.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        self.create(ev, regarding, now).await?
                    }
                    Err(e) => return Err(e),
                }
            }
            None => self.create(ev, regarding, now).await?,
        };
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory.remember(key, recent);
        Ok(())
    }

    async fn create(
        &self,
        ev: &Event<'_>,
        regarding: &ObjectReference,
        now: Timestamp,
    ) -> Result<Recent, kube::Error> {
        let event = self.event(ev, regarding, now);
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let created = api.create(&PostParams::default(), &event).await?;
        Ok(Recent {
            name: created.metadata.name.unwrap_or_default(),
            namespace,
            count: 1,
            last: now,
        })
    }

    /// The Event object, named and filled as kube's recorder does.
    fn event(&self, ev: &Event<'_>, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            action: Some(ev.action.to_string()),
            reason: Some(ev.reason.to_string()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                namespace: Some(
                    regarding
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".to_string()),
                ),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(type_name(ev.type_).to_string()),
            ..Default::default()
        }
    }
}

fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

fn key(ev: &Event<'_>, regarding: &ObjectReference) -> Key {
    let object = regarding.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}/{}",
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default()
        )
    });
    Key {
        regarding: object,
        type_: type_name(ev.type_),
        reason: ev.reason.to_string(),
        action: ev.action.to_string(),
        note: ev.note.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(note: &str) -> Key {
        let regarding = ObjectReference {
            uid: Some("u1".into()),
            ..Default::default()
        };
        key(
            &Event {
                type_: EventType::Normal,
                reason: "Deployed",
                action: "Reconcile",
                note: Some(note.into()),
            },
            &regarding,
        )
    }

    fn recent(last: Timestamp) -> Recent {
        Recent {
            name: "f.1".into(),
            namespace: "shop".into(),
            count: 1,
            last,
        }
    }

    #[test]
    fn a_new_note_is_a_new_event() {
        assert_ne!(k("now at sha256:a"), k("now at sha256:b"));
        assert_eq!(k("now at sha256:a"), k("now at sha256:a"));
    }

    #[test]
    fn events_are_forgotten_six_minutes_after_they_last_happened() {
        let mut m = Memory::default();
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        m.remember(k("a"), recent(t0));
        m.remember(k("b"), recent(t0 + SignedDuration::from_mins(2)));
        // "a" again at 4 minutes: its window starts over.
        m.remember(k("a"), recent(t0 + SignedDuration::from_mins(4)));
        m.expire(t0 + SignedDuration::from_mins(7));
        assert!(m.by_key.contains_key(&k("a")));
        assert!(m.by_key.contains_key(&k("b")));
        m.expire(t0 + SignedDuration::from_mins(8));
        assert!(m.by_key.contains_key(&k("a")));
        assert!(!m.by_key.contains_key(&k("b")));
        m.expire(t0 + SignedDuration::from_mins(10));
        assert!(m.by_key.is_empty());
        assert!(m.order.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut m = Memory::default();
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        for i in 0..MAX_REMEMBERED + 10 {
            m.remember(k(&i.to_string()), recent(t0));
            m.expire(t0);
        }
        assert!(m.by_key.len() <= MAX_REMEMBERED);
        assert!(m.order.len() <= MAX_REMEMBERED);
        // The newest stay.
        assert!(m.by_key.contains_key(&k(&(MAX_REMEMBERED + 9).to_string())));
    }
}
