//! Step 1b, pre-flight: the resolved module runs in the sandbox with the filter's real
//! configuration before any proxy gets it. A module that traps, runs out of time or refuses
//! its configuration is not deployed; what was deployed before stays.
//!
//! A run is remembered per module, root id and configuration, so a resync or a pod change
//! does not run it again; a timeout is not remembered (a busy machine is slow, not the
//! module wrong).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;

use super::{Context, Error};
use crate::api::WasmFilter;
use crate::cache::ModuleCache;
use crate::oci::Artifact;
use crate::preflight::{Compiled, Limits, Plan, Report, Sandbox};

/// Runs at once, at most (each takes a core while it runs).
const PARALLEL_RUNS: usize = 2;
/// Compiled modules kept in memory (the compilation cache on disk keeps more).
const COMPILED_KEPT: usize = 16;
/// Remembered outcomes.
const OUTCOMES_KEPT: usize = 10_000;
/// Module log lines a failure's condition message carries.
const LOG_LINES_IN_MESSAGE: usize = 8;

/// The operator's sandbox, with what it compiled and what each run found.
pub struct Preflight {
    sandbox: Arc<Sandbox>,
    permits: tokio::sync::Semaphore,
    compiled: Mutex<HashMap<String, Compiled>>,
    outcomes: Mutex<HashMap<Key, Arc<Report>>>,
}

/// A module with a root id and a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    sha256: String,
    root_id: String,
    configuration: Vec<u8>,
}

impl Key {
    /// sha256 (hex) of the module, root id and configuration, as `status.artifact` records a
    /// pass.
    fn digest(&self) -> String {
        let mut bytes = Vec::with_capacity(self.configuration.len() + 128);
        for part in [
            self.sha256.as_bytes(),
            self.root_id.as_bytes(),
            &self.configuration,
        ] {
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part);
        }
        crate::cache::sha256_hex(&bytes)
    }
}

impl Preflight {
    /// A sandbox with `limits`, keeping compiled modules under `compiled_dir`.
    pub fn new(limits: Limits, compiled_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        Ok(Preflight {
            sandbox: Sandbox::new(limits, compiled_dir)?,
            permits: tokio::sync::Semaphore::new(PARALLEL_RUNS),
            compiled: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(HashMap::new()),
        })
    }

    fn remembered(&self, key: &Key) -> Option<Arc<Report>> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn remember(&self, key: Key, report: Arc<Report>) {
        if report.failure.as_ref().is_some_and(|f| f.timed_out) {
            return;
        }
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        if outcomes.len() >= OUTCOMES_KEPT {
            outcomes.clear();
        }
        outcomes.insert(key, report);
    }

    /// Runs `plan` on the module, compiling it first unless it is in memory (only then are its
    /// bytes read from `cache`). Blocking.
    fn run_blocking(
        &self,
        sha256: &str,
        cache: &ModuleCache,
        plan: &Plan,
    ) -> Result<Report, crate::cache::Error> {
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned();
        let compiled = match cached {
            Some(c) => c,
            None => {
                let wasm = cache
                    .read_verified(sha256)
                    .map_err(|source| crate::cache::Error::Read {
                        sha256: sha256.to_string(),
                        source,
                    })?
                    .ok_or_else(|| crate::cache::Error::Missing {
                        sha256: sha256.to_string(),
                    })?;
                match self.sandbox.compile(&wasm) {
                    Ok(c) => {
                        let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
                        if compiled.len() >= COMPILED_KEPT {
                            compiled.clear();
                        }
                        compiled.insert(sha256.to_string(), c.clone());
                        c
                    }
                    Err(failure) => return Ok(Report::failed(failure)),
                }
            }
        };
        Ok(self.sandbox.run(&compiled, plan))
    }
}

/// The configuration bytes a proxy hands the plugin: the spec's `config` as JSON (what the
/// rendered children carry), or nothing.
pub fn configuration(wf: &WasmFilter) -> Vec<u8> {
    wf.spec
        .config
        .as_ref()
        .map(|c| {
            serde_json::Value::Object(c.clone())
                .to_string()
                .into_bytes()
        })
        .unwrap_or_default()
}

/// Runs the filter's module in the sandbox unless this module, root id and configuration
/// passed before; a failure is [`Error::PreflightFailed`] with the module's own words.
pub(super) async fn check(
    wf: &WasmFilter,
    artifact: &mut Artifact,
    ctx: &Context,
) -> Result<(), Error> {
    let Some(preflight) = ctx.preflight.clone() else {
        return Ok(());
    };
    let key = Key {
        sha256: artifact.module_sha256.clone(),
        root_id: wf.spec.root_id.clone().unwrap_or_default(),
        configuration: configuration(wf),
    };
    let passed = key.digest();
    // What this filter's status says passed before (a restarted operator has no memory).
    let recorded = wf
        .status
        .as_ref()
        .and_then(|s| s.artifact.as_ref())
        .and_then(|a| a.preflight_passed.as_deref());
    if recorded == Some(passed.as_str()) {
        artifact.preflight_passed = Some(passed);
        return Ok(());
    }
    let report = match preflight.remembered(&key) {
        Some(report) => report,
        None => {
            let _permit = preflight.permits.acquire().await;
            let plan = Plan {
                configuration: key.configuration.clone(),
                vm_configuration: Vec::new(),
                root_id: key.root_id.clone(),
                name: format!("{}.{}", wf.namespace().unwrap_or_default(), wf.name_any()),
                request: None,
            };
            let (runner, cache, sha256) =
                (preflight.clone(), ctx.cache.clone(), key.sha256.clone());
            let mut report =
                tokio::task::spawn_blocking(move || runner.run_blocking(&sha256, &cache, &plan))
                    .await
                    .map_err(|e| Error::PreflightCrashed(e.to_string()))??;
            if report.passed() {
                // Only the verdict is kept of a run that passed.
                report.logs.clear();
            }
            let report = Arc::new(report);
            ctx.metrics.preflight_ran(report.passed());
            preflight.remember(key.clone(), report.clone());
            report
        }
    };
    if report.passed() {
        artifact.preflight_passed = Some(passed);
        return Ok(());
    }
    Err(Error::PreflightFailed {
        sha256: key.sha256,
        summary: report.summary(LOG_LINES_IN_MESSAGE),
        timed_out: report.failure.as_ref().is_some_and(|f| f.timed_out),
    })
}
