//! Pre-flight: run the real module, with the filter's real configuration, in a sandbox before
//! any proxy does. The module is instantiated in wasmtime (a memory cap and a wall-clock cap
//! on the whole run) against a proxy-wasm host of our own ([`host`]), then started the way
//! Envoy starts a plugin: `_initialize` (or `_start`), `proxy_on_context_create` for the root
//! context, `proxy_on_vm_start`, `proxy_on_configure`. A trap, `proc_exit`, the time running
//! out, or `configure` returning false fails it, with the module's own log lines. Optionally
//! one request and its response then go through the HTTP callbacks.

pub mod host;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use wasmtime::{
    Cache, CacheConfig, Config, Engine, Func, InstancePre, Module, Store, StoreLimitsBuilder, Trap,
    Val, ValType, WasmBacktrace,
};

pub use host::{HeaderChange, LocalResponse, LogLine};
use host::{Host, Maps};

/// How long one epoch tick is: the wall-clock cap's granularity.
const TICK: Duration = Duration::from_millis(10);

/// Entries one table may hold, at most.
const TABLE_ELEMENTS: usize = 1 << 20;

/// The root context's id, and the request's (as Envoy numbers them: the root context first).
const ROOT_CONTEXT: i32 = 1;
const HTTP_CONTEXT: i32 = 2;

/// The sandbox's bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The whole run (start, configure, and the request when there is one), at most.
    pub timeout: Duration,
    /// The module's linear memory, at most.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            memory_bytes: 256 << 20,
        }
    }
}

/// What to run: the configuration the proxy would hand the plugin, and optionally a request.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The plugin configuration bytes (`proxy_on_configure`'s buffer).
    pub configuration: Vec<u8>,
    /// The VM configuration bytes (`proxy_on_vm_start`'s buffer).
    pub vm_configuration: Vec<u8>,
    pub root_id: String,
    /// The plugin's name (`plugin_name` property).
    pub name: String,
    /// A request to send through the HTTP callbacks once configured.
    pub request: Option<Request>,
}

/// One request and its response, as headers (pseudo-headers included).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
}

/// Which step of the run failed, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The export being called (`proxy_on_configure`, ...) or `compile` / `instantiate`.
    pub step: String,
    /// What happened, in words.
    pub message: String,
    /// Whether the wall-clock cap cut the run (worth running again: a busy machine is slow).
    pub timed_out: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

/// What the request's callbacks did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Exchange {
    /// What `proxy_on_request_headers` / `proxy_on_response_headers` returned: `Continue`
    /// or `Pause`.
    pub request_action: Option<&'static str>,
    pub response_action: Option<&'static str>,
    pub changes: Vec<HeaderChange>,
    pub local_response: Option<LocalResponse>,
    /// The headers as the filter left them.
    pub request_headers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `None` when every step passed.
    pub failure: Option<Failure>,
    /// The module's log lines, in order.
    pub logs: Vec<LogLine>,
    /// Host calls the module made that the sandbox does not implement (they returned what
    /// Envoy returns for a feature that is not there).
    pub unimplemented: Vec<String>,
    pub exchange: Option<Exchange>,
}

impl Report {
    /// A run that never started (the module did not compile).
    pub fn failed(failure: Failure) -> Self {
        Report {
            failure: Some(failure),
            logs: Vec::new(),
            unimplemented: Vec::new(),
            exchange: None,
        }
    }

    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }

    /// The report for a person: the outcome, the module's log, what the request saw.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        match &self.failure {
            None => out.push_str("pre-flight: passed\n"),
            Some(f) => {
                let _ = writeln!(out, "pre-flight: FAILED in {f}");
            }
        }
        if !self.logs.is_empty() {
            out.push_str("module log:\n");
            for line in &self.logs {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(x) = &self.exchange {
            let action = |a: Option<&str>| a.unwrap_or("not called").to_string();
            let _ = writeln!(
                out,
                "request headers: {}\nresponse headers: {}",
                action(x.request_action),
                action(x.response_action)
            );
            if x.changes.is_empty() {
                out.push_str("header changes: none\n");
            } else {
                out.push_str("header changes:\n");
                for c in &x.changes {
                    let _ = writeln!(out, "  {c}");
                }
            }
            if let Some(r) = &x.local_response {
                let _ = writeln!(
                    out,
                    "local response: {} {:?} (details {:?})",
                    r.status, r.body, r.details
                );
                for (k, v) in &r.headers {
                    let _ = writeln!(out, "  {k}: {v}");
                }
            }
        }
        if !self.unimplemented.is_empty() {
            let _ = writeln!(
                out,
                "host calls the sandbox does not implement: {}",
                self.unimplemented.join(", ")
            );
        }
        out
    }

    /// The failure and the module's first log lines at warn or above (its own words about
    /// what went wrong; all lines when it logged none that high), bounded, for a condition
    /// message.
    pub fn summary(&self, max_lines: usize) -> String {
        let mut out = match &self.failure {
            Some(f) => f.to_string(),
            None => "passed".to_string(),
        };
        let serious: Vec<&LogLine> = self
            .logs
            .iter()
            .filter(|l| matches!(l.level, "warn" | "error" | "critical"))
            .collect();
        let lines: Vec<&LogLine> = if serious.is_empty() {
            self.logs.iter().collect()
        } else {
            serious
        };
        let lines: Vec<&LogLine> = lines
            .into_iter()
            .filter(|l| !l.message.trim().is_empty())
            .collect();
        if !lines.is_empty() {
            out.push_str("; module log:");
            for line in lines.iter().take(max_lines) {
                out.push_str(&format!(" {};", line.to_string().trim_end()));
            }
            out.pop();
            if lines.len() > max_lines {
                out.push_str(&format!(" (and {} more lines)", lines.len() - max_lines));
            }
        }
        if !self.unimplemented.is_empty() {
            out.push_str(&format!(
                "; host calls the sandbox does not implement: {}",
                self.unimplemented.join(", ")
            ));
        }
        out
    }
}

/// A module compiled and linked to the sandbox's host, ready to run any number of times.
#[derive(Clone)]
pub struct Compiled {
    pre: InstancePre<Host>,
}

/// A wasmtime engine with the sandbox's settings and its epoch clock.
pub struct Sandbox {
    engine: Engine,
    limits: Limits,
}

impl Sandbox {
    /// A sandbox; with `cache_dir`, compiled modules are kept there (wasmtime's compilation
    /// cache), so a module is compiled once per machine, not once per run.
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> anyhow::Result<Arc<Self>> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        if let Some(dir) = cache_dir {
            let mut cache = CacheConfig::new();
            cache.with_directory(dir);
            config.cache(Some(Cache::new(cache)?));
        }
        let engine = Engine::new(&config)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("preflight-clock".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(Arc::new(Sandbox { engine, limits }))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles `wasm` (or finds it in the compilation cache) and links it to the host, once
    /// for any number of runs.
    pub fn compile(&self, wasm: &[u8]) -> Result<Compiled, Failure> {
        let module = Module::new(&self.engine, wasm).map_err(|e| Failure {
            step: "compile".into(),
            message: format!("{e:#}"),
            timed_out: false,
        })?;
        host::linker(&module)
            .and_then(|linker| linker.instantiate_pre(&module))
            .map(|pre| Compiled { pre })
            .map_err(|e| failure("instantiate", &e))
    }

    /// Runs `plan` against a compiled module. Blocking: call it off the async threads.
    pub fn run(&self, compiled: &Compiled, plan: &Plan) -> Report {
        // Tables hold function references: a module's own are a few thousand entries; growing
        // one without bound would take the operator's memory instead of the module's.
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .table_elements(TABLE_ELEMENTS)
            .instances(1)
            .build();
        let mut host = Host::new(limits);
        host.plugin_configuration.clone_from(&plan.configuration);
        host.vm_configuration.clone_from(&plan.vm_configuration);
        host.root_id.clone_from(&plan.root_id);
        host.plugin_name.clone_from(&plan.name);
        if let Some(r) = &plan.request {
            host.maps = Maps {
                request_headers: r.request_headers.clone(),
                response_headers: r.response_headers.clone(),
                ..Maps::default()
            };
        }
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limits);
        let ticks = (self.limits.timeout.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        let mut run = Run {
            store,
            timeout: self.limits.timeout,
            started: Instant::now(),
        };
        let result = run.steps(&compiled.pre, plan);
        let host = run.store.data_mut();
        host.flush_output();
        Report {
            failure: result.err(),
            logs: std::mem::take(&mut host.logs),
            unimplemented: host.unimplemented.iter().cloned().collect(),
            exchange: plan.request.as_ref().map(|_| Exchange {
                request_action: host.request_action,
                response_action: host.response_action,
                changes: std::mem::take(&mut host.changes),
                local_response: host.local_response.take(),
                request_headers: std::mem::take(&mut host.maps.request_headers),
                response_headers: std::mem::take(&mut host.maps.response_headers),
            }),
        }
    }
}

struct Run {
    store: Store<Host>,
    timeout: Duration,
    started: Instant,
}

impl Run {
    fn steps(&mut self, pre: &InstancePre<Host>, plan: &Plan) -> Result<(), Failure> {
        let instance = pre
            .instantiate(&mut self.store)
            .map_err(|e| self.explain("instantiate", e))?;
        let export = |store: &mut Store<Host>, name: &str| instance.get_func(&mut *store, name);
        for start in ["_initialize", "_start"] {
            if let Some(f) = export(&mut self.store, start) {
                self.call(start, &f, &[])?;
                break;
            }
        }
        let call_if = |run: &mut Run, name: &str, args: &[i32]| -> Result<Option<i32>, Failure> {
            match export(&mut run.store, name) {
                Some(f) => run.call(name, &f, args),
                None => Ok(None),
            }
        };
        call_if(self, "proxy_on_context_create", &[ROOT_CONTEXT, 0])?;
        let vm_size = len_i32(&plan.vm_configuration);
        if call_if(self, "proxy_on_vm_start", &[ROOT_CONTEXT, vm_size])? == Some(0) {
            return Err(refused("proxy_on_vm_start"));
        }
        let size = len_i32(&plan.configuration);
        if call_if(self, "proxy_on_configure", &[ROOT_CONTEXT, size])? == Some(0) {
            return Err(refused("proxy_on_configure"));
        }
        let Some(request) = &plan.request else {
            return Ok(());
        };
        call_if(
            self,
            "proxy_on_context_create",
            &[HTTP_CONTEXT, ROOT_CONTEXT],
        )?;
        let n = len_i32(&request.request_headers);
        let action = call_if(self, "proxy_on_request_headers", &[HTTP_CONTEXT, n, 1])?;
        self.store.data_mut().request_action = action.map(action_name);
        if self.store.data().local_response.is_none() {
            let n = len_i32(&request.response_headers);
            let action = call_if(self, "proxy_on_response_headers", &[HTTP_CONTEXT, n, 1])?;
            self.store.data_mut().response_action = action.map(action_name);
        }
        call_if(self, "proxy_on_log", &[HTTP_CONTEXT])?;
        call_if(self, "proxy_on_done", &[HTTP_CONTEXT])?;
        call_if(self, "proxy_on_delete", &[HTTP_CONTEXT])?;
        Ok(())
    }

    /// Calls an export with as many of `args` as it takes (ABI 0.1.0's callbacks take fewer
    /// than 0.2's), returning its i32 result if it has one.
    fn call(&mut self, name: &str, f: &Func, args: &[i32]) -> Result<Option<i32>, Failure> {
        let ty = f.ty(&self.store);
        let params: Vec<Val> = ty
            .params()
            .enumerate()
            .map(|(i, t)| {
                let v = args.get(i).copied().unwrap_or(0);
                match t {
                    ValType::I64 => Val::I64(i64::from(v)),
                    _ => Val::I32(v),
                }
            })
            .collect();
        let mut results: Vec<Val> = ty.results().map(|_| Val::I32(0)).collect();
        f.call(&mut self.store, &params, &mut results)
            .map_err(|e| self.explain(name, e))?;
        Ok(results.first().and_then(Val::i32))
    }

    fn explain(&mut self, step: &str, e: wasmtime::Error) -> Failure {
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return Failure {
                step: step.into(),
                message: format!(
                    "did not return within the pre-flight's {} ms ({} ms elapsed)",
                    self.timeout.as_millis(),
                    self.started.elapsed().as_millis()
                ),
                timed_out: true,
            };
        }
        failure(step, &e)
    }
}

/// What went wrong (the trap, or the error's root cause) and where: the innermost named
/// functions of the wasm backtrace, when there is one.
fn failure(step: &str, e: &wasmtime::Error) -> Failure {
    let what = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    let frames: Vec<String> = e
        .downcast_ref::<WasmBacktrace>()
        .map(|bt| {
            bt.frames()
                .iter()
                .filter_map(|f| f.func_name().map(str::to_string))
                .take(3)
                .collect()
        })
        .unwrap_or_default();
    let message = if frames.is_empty() {
        what
    } else {
        format!("{what} (in {})", frames.join(" < "))
    };
    Failure {
        step: step.into(),
        message,
        timed_out: false,
    }
}

fn refused(step: &str) -> Failure {
    Failure {
        step: step.into(),
        message: "returned false: the module refused to start with this configuration".into(),
        timed_out: false,
    }
}

fn action_name(action: i32) -> &'static str {
    match action {
        0 => "Continue",
        _ => "Pause",
    }
}

fn len_i32<T>(v: &[T]) -> i32 {
    i32::try_from(v.len()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(timeout_ms: u64) -> Arc<Sandbox> {
        Sandbox::new(
            Limits {
                timeout: Duration::from_millis(timeout_ms),
                memory_bytes: 16 << 20,
            },
            None,
        )
        .expect("sandbox")
    }

    fn run(src: &str, plan: &Plan) -> Report {
        let s = sandbox(500);
        let module = s
            .compile(&wat::parse_str(src).expect("wat"))
            .expect("compile");
        s.run(&module, plan)
    }

    const LOGS_CONFIG: &str = r#"(module
      (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
      (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
      (import "env" "proxy_http_call" (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $next (mut i32) (i32.const 1024))
      (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
        (local $p i32) global.get $next local.set $p
        global.get $next local.get $n i32.add global.set $next local.get $p)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_context_create") (param i32 i32))
      (func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 1)
      (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
        ;; log the configuration, then refuse it unless it is "ok"
        (drop (call $buf (i32.const 7) (i32.const 0) (local.get $size) (i32.const 0) (i32.const 4)))
        (drop (call $log (i32.const 3) (i32.load (i32.const 0)) (i32.load (i32.const 4))))
        (drop (call $call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                          (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
        (i32.eq (i32.load8_u (i32.load (i32.const 0))) (i32.const 111))))"#;

    fn plan(config: &str) -> Plan {
        Plan {
            configuration: config.as_bytes().to_vec(),
            ..Plan::default()
        }
    }

    #[test]
    fn configure_sees_the_configuration_and_its_answer_decides() {
        let ok = run(LOGS_CONFIG, &plan("ok"));
        assert!(ok.passed(), "{ok:?}");
        assert_eq!(ok.logs[0].to_string(), "[warn] ok");
        assert_eq!(ok.unimplemented, ["env.proxy_http_call"]);
        let bad = run(LOGS_CONFIG, &plan("nope"));
        let failure = bad.failure.clone().expect("refused");
        assert_eq!(failure.step, "proxy_on_configure");
        assert!(!failure.timed_out);
        assert!(
            bad.summary(5).contains("module log: [warn] nope"),
            "{}",
            bad.summary(5)
        );
    }

    #[test]
    fn a_trap_and_a_loop_fail_with_the_step_and_a_loop_is_cut_at_the_cap() {
        let trap = r#"(module (memory (export "memory") 1)
          (func (export "proxy_on_configure") (param i32 i32) (result i32) unreachable))"#;
        let r = run(trap, &Plan::default());
        let f = r.failure.expect("trap");
        assert_eq!(f.step, "proxy_on_configure");
        assert!(f.message.contains("unreachable"), "{}", f.message);

        let spin = r#"(module (memory (export "memory") 1)
          (func (export "_initialize") (loop br 0)))"#;
        let started = Instant::now();
        let r = run(spin, &Plan::default());
        let f = r.failure.expect("cut");
        assert_eq!(f.step, "_initialize");
        assert!(f.timed_out, "{f:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn memory_beyond_the_cap_fails_instantiation() {
        // 512 pages = 32 MiB against a 16 MiB cap.
        let big = r#"(module (memory (export "memory") 512))"#;
        let f = run(big, &Plan::default()).failure.expect("too big");
        assert_eq!(f.step, "instantiate");
    }

    #[test]
    fn proc_exit_is_logged_and_the_module_carries_on_as_in_envoy() {
        let exit = r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (func (export "proxy_on_configure") (param i32 i32) (result i32)
            (call $exit (i32.const 2)) i32.const 1))"#;
        let r = run(exit, &Plan::default());
        assert!(r.passed(), "{r:?}");
        assert_eq!(r.logs[0].to_string(), "[error] wasi_unstable proc_exit");
    }

    #[test]
    fn start_runs_when_there_is_no_initialize_and_other_wasi_calls_get_enosys() {
        let m = r#"(module
          (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_pread"
            (func $pread (param i32 i32 i32 i64 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "started")
          (func (export "_start")
            (drop (call $log (i32.const 2) (i32.const 0) (i32.const 7))))
          (func (export "proxy_on_configure") (param i32 i32) (result i32)
            ;; configure passes only if fd_pread answered ENOSYS (52)
            (i32.eq (call $pread (i32.const 3) (i32.const 0) (i32.const 0) (i64.const 0)
                                 (i32.const 0))
                    (i32.const 52))))"#;
        let r = run(m, &Plan::default());
        assert!(r.passed(), "{r:?}");
        assert_eq!(r.logs[0].to_string(), "[info] started");
        assert_eq!(r.unimplemented, ["wasi_snapshot_preview1.fd_pread"]);
    }

    #[test]
    fn a_table_grown_past_its_bound_fails_the_run() {
        let grow = r#"(module (memory (export "memory") 1) (table $t 1 funcref)
          (func (export "proxy_on_configure") (param i32 i32) (result i32)
            ;; table.grow answers -1 when refused; trap then, as a module would on failure
            (if (i32.eq (table.grow $t (ref.null func) (i32.const 2000000)) (i32.const -1))
              (then unreachable))
            i32.const 1))"#;
        let f = run(grow, &Plan::default()).failure.expect("bounded");
        assert_eq!(f.step, "proxy_on_configure");
    }
}
