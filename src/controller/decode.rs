//! WasmFilters are read one by one: the watch delivers raw objects and each is decoded on its
//! own, so one the operator cannot read (stored under an earlier, looser schema, e.g. a
//! `priority` beyond 32 bits) is reported on its own and never stops the others. A typed watch
//! would fail its whole list on that one object and see nothing at all.

use std::collections::HashSet;
use std::sync::Arc;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::{Context, status};
use crate::api::{WasmFilter, WasmFilterStatus};
use crate::names::{self, reason};

/// A WasmFilter that did not decode, and why.
pub struct Undecodable {
    pub object: DynamicObject,
    pub error: String,
}

/// Decodes one watch event; an object that does not decode is handed to `bad` and left out
/// (a typed store cannot hold it; whatever was deployed for it stays as it is).
pub fn decode_event(
    event: Result<watcher::Event<DynamicObject>, watcher::Error>,
    bad: &mpsc::UnboundedSender<Undecodable>,
) -> Option<Result<watcher::Event<WasmFilter>, watcher::Error>> {
    let decode = |object: DynamicObject| match parse(&object) {
        Ok(wf) => Some(wf),
        Err(error) => {
            let _ = bad.send(Undecodable { object, error });
            None
        }
    };
    Some(Ok(match event {
        Err(e) => return Some(Err(e)),
        Ok(watcher::Event::Init) => watcher::Event::Init,
        Ok(watcher::Event::InitDone) => watcher::Event::InitDone,
        Ok(watcher::Event::InitApply(o)) => watcher::Event::InitApply(decode(o)?),
        Ok(watcher::Event::Apply(o)) => watcher::Event::Apply(decode(o)?),
        // A deleted object's spec no longer matters, but the store and the ECDS server need a
        // typed one; a bad one never reached either.
        Ok(watcher::Event::Delete(o)) => watcher::Event::Delete(o.try_parse().ok()?),
    }))
}

/// Decodes a WasmFilter; the error names the field (`spec.priority: invalid value: ...`).
fn parse(object: &DynamicObject) -> Result<WasmFilter, String> {
    let value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(value).map_err(|e| e.to_string())
}

/// Most distinct bad object generations remembered (so each is reported once).
const MAX_REMEMBERED: usize = 10_000;

/// Reports each undecodable object generation once (our own status write comes back as a new
/// version of the same generation): a log line, the `InvalidSpec` reconcile-error
/// metric, a Warning Event and a `Ready=False` condition with the decoder's words.
pub async fn report(mut bad: mpsc::UnboundedReceiver<Undecodable>, ctx: Arc<Context>) {
    let resource = ApiResource::erase::<WasmFilter>(&());
    let mut seen = HashSet::new();
    while let Some(Undecodable { object, error }) = bad.recv().await {
        let key = (object.uid(), object.metadata.generation);
        if seen.len() >= MAX_REMEMBERED {
            seen.clear();
        }
        if !seen.insert(key) {
            continue;
        }
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        tracing::warn!(namespace = %ns, filter = %name, %error, "cannot decode WasmFilter; skipping it");
        ctx.metrics
            .reconciled(Err(reason::INVALID_SPEC), std::time::Duration::ZERO);
        let old: WasmFilterStatus = object
            .data
            .get("status")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .unwrap_or_default();
        let new = status::undecodable(old, object.metadata.generation, &error);
        let message = new
            .conditions
            .iter()
            .find(|c| c.type_ == names::condition::READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
        let body = json!({
            "apiVersion": WasmFilter::api_version(&()),
            "kind": WasmFilter::kind(&()),
            "status": new,
        });
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::apply(names::FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            tracing::warn!(namespace = %ns, filter = %name, error = %e, "could not write status");
        }
        super::report::publish(
            &ctx.events,
            &object.object_ref(&resource),
            EventType::Warning,
            reason::INVALID_SPEC,
            message,
        )
        .await;
    }
}
