//! The proxy-wasm host the sandbox offers a module: the calls a filter makes while it starts,
//! configures and handles one request, answered the way Envoy answers them. Calls it does not
//! implement return what Envoy returns for a feature that is not there (`Unimplemented`, or
//! `ENOSYS` for WASI) and are listed in the report.

use std::collections::{BTreeSet, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use serde::Serialize;
use wasmtime::{Caller, Extern, ExternType, Linker, Module, StoreLimits, Val, ValType};

/// proxy-wasm `WasmResult` codes.
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// WASI errno values.
mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const NOSYS: i32 = 52;
    pub const NOTSUP: i32 = 58;
}

const WASI: &str = "wasi_snapshot_preview1";
const WASI_UNSTABLE: &str = "wasi_unstable";
const ENV: &str = "env";

/// One line the module logged (`proxy_log`, or a line it wrote to stdout/stderr).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.level, self.message)
    }
}

/// A change the filter made to a header map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderChange {
    /// `request headers`, `response headers`, ...
    pub map: &'static str,
    /// `add`, `replace`, `remove`, `set all`.
    pub op: &'static str,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl std::fmt::Display for HeaderChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} {}: {}: {v}", self.map, self.op, self.name),
            None => write!(f, "{} {}: {}", self.map, self.op, self.name),
        }
    }
}

/// A response the filter sent in place of the upstream's (`proxy_send_local_response`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

/// The header maps a request offers, by proxy-wasm map type.
#[derive(Debug, Default, Clone)]
pub struct Maps {
    pub request_headers: Vec<(String, String)>,
    pub request_trailers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub response_trailers: Vec<(String, String)>,
}

impl Maps {
    fn get(&self, map: i32) -> Option<(&'static str, &Vec<(String, String)>)> {
        match map {
            0 => Some(("request headers", &self.request_headers)),
            1 => Some(("request trailers", &self.request_trailers)),
            2 => Some(("response headers", &self.response_headers)),
            3 => Some(("response trailers", &self.response_trailers)),
            _ => None,
        }
    }

    fn get_mut(&mut self, map: i32) -> Option<(&'static str, &mut Vec<(String, String)>)> {
        match map {
            0 => Some(("request headers", &mut self.request_headers)),
            1 => Some(("request trailers", &mut self.request_trailers)),
            2 => Some(("response headers", &mut self.response_headers)),
            3 => Some(("response trailers", &mut self.response_trailers)),
            _ => None,
        }
    }
}

/// What the host holds for one run: the configuration it hands out, what the module said and
/// changed, and the store's limits.
pub struct Host {
    pub limits: StoreLimits,
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub root_id: String,
    pub plugin_name: String,
    pub maps: Maps,
    pub logs: Vec<LogLine>,
    pub changes: Vec<HeaderChange>,
    pub local_response: Option<LocalResponse>,
    /// Host calls the module made that this host does not implement.
    pub unimplemented: BTreeSet<String>,
    /// What the request's header callbacks returned.
    pub request_action: Option<&'static str>,
    pub response_action: Option<&'static str>,
    /// Partial lines written to stdout (1) and stderr (2).
    pending: HashMap<i32, Vec<u8>>,
    shared_data: HashMap<String, (Vec<u8>, u32)>,
    metrics: u32,
}

impl Host {
    pub fn new(limits: StoreLimits) -> Self {
        Host {
            limits,
            plugin_configuration: Vec::new(),
            vm_configuration: Vec::new(),
            root_id: String::new(),
            plugin_name: String::new(),
            maps: Maps::default(),
            logs: Vec::new(),
            changes: Vec::new(),
            local_response: None,
            unimplemented: BTreeSet::new(),
            request_action: None,
            response_action: None,
            pending: HashMap::new(),
            shared_data: HashMap::new(),
            metrics: 0,
        }
    }

    fn log(&mut self, level: i32, message: String) {
        self.logs.push(LogLine {
            level: level_name(level),
            message,
        });
    }

    /// Lines written to stdout/stderr are logged at info and error, as Envoy logs them;
    /// the sandbox logs a line once it is complete (Envoy logs each write, which splits a Go
    /// panic into fragments).
    fn write_output(&mut self, fd: i32, bytes: &[u8]) {
        let buf = self.pending.entry(fd).or_default();
        buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        for line in lines {
            self.log(if fd == 1 { 2 } else { 4 }, line);
        }
    }

    /// What is left of a line written without its newline, logged at the end of the run.
    pub fn flush_output(&mut self) {
        for fd in [1, 2] {
            if let Some(rest) = self.pending.remove(&fd)
                && !rest.is_empty()
            {
                let line = String::from_utf8_lossy(&rest).into_owned();
                self.log(if fd == 1 { 2 } else { 4 }, line);
            }
        }
    }
}

/// Nanoseconds on a monotonic clock that starts with the process.
fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

fn level_name(level: i32) -> &'static str {
    match level {
        0 => "trace",
        1 => "debug",
        2 => "info",
        3 => "warn",
        4 => "error",
        _ => "critical",
    }
}

/// The module's memory, or an error that becomes `InvalidMemoryAccess`.
fn memory(caller: &mut Caller<'_, Host>) -> Option<wasmtime::Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

fn read_bytes(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(caller)?;
    let start = u32::try_from(ptr).ok()? as usize;
    let end = start.checked_add(u32::try_from(len).ok()? as usize)?;
    mem.data(&*caller).get(start..end).map(<[u8]>::to_vec)
}

fn read_string(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> Option<String> {
    read_bytes(caller, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn write_bytes(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(mem) = memory(caller) else {
        return false;
    };
    let Ok(start) = u32::try_from(ptr) else {
        return false;
    };
    mem.write(&mut *caller, start as usize, bytes).is_ok()
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: i32, value: u32) -> bool {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

/// A proxy-wasm call's answer once it wrote its result: `Ok`, or `InvalidMemoryAccess` when
/// the module's pointer led outside its memory.
fn written(ok: bool) -> i32 {
    if ok {
        status::OK
    } else {
        status::INVALID_MEMORY_ACCESS
    }
}

/// The same for a WASI call: success, or `EFAULT`.
fn wasi_written(ok: bool) -> i32 {
    if ok { errno::SUCCESS } else { errno::FAULT }
}

/// Copies `bytes` into memory the module allocates, and writes where and how long: what
/// Envoy does for every call that returns a buffer.
fn hand_over(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> anyhow::Result<i32> {
    let alloc = ["proxy_on_memory_allocate", "malloc"]
        .iter()
        .find_map(|name| caller.get_export(name).and_then(Extern::into_func));
    let Some(alloc) = alloc else {
        bail!("the module exports neither proxy_on_memory_allocate nor malloc");
    };
    let size = i32::try_from(bytes.len()).map_err(|_| anyhow::anyhow!("buffer too large"))?;
    let ptr = alloc
        .typed::<i32, i32>(&*caller)?
        .call(&mut *caller, size)?;
    if ptr == 0 && size > 0 {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    if !write_bytes(caller, ptr, bytes)
        || !write_u32(caller, ptr_ptr, ptr as u32)
        || !write_u32(caller, size_ptr, size as u32)
    {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    Ok(status::OK)
}

/// proxy-wasm's header-map serialization: count, then (key length, value length) pairs, then
/// each key and value followed by a NUL.
pub fn serialize_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The inverse of [`serialize_pairs`]; `None` when the bytes do not hold what they claim.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let n = word(0)?;
    let mut sizes = Vec::new();
    for i in 0..n {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4usize.checked_add(n.checked_mul(8)?)?;
    let mut pairs = Vec::with_capacity(n);
    for (kl, vl) in sizes {
        let key = bytes.get(at..at.checked_add(kl)?)?;
        at += kl + 1;
        let value = bytes.get(at..at.checked_add(vl)?)?;
        at += vl + 1;
        pairs.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(pairs)
}

fn header_value(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.clone())
}

/// A linker with every host call this sandbox implements, and, for each other import of
/// `module`, a stand-in that records the call and returns what Envoy returns for a feature
/// that is not there.
pub fn linker(module: &Module) -> anyhow::Result<Linker<Host>> {
    let mut l: Linker<Host> = Linker::new(module.engine());
    // Stand-ins first, for every function the module imports; the implemented calls below
    // then replace theirs.
    l.allow_shadowing(true);
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let (m, n) = (import.module(), import.name());
        let label = format!("{m}.{n}");
        let result = if m == WASI || m == WASI_UNSTABLE {
            errno::NOSYS
        } else {
            status::UNIMPLEMENTED
        };
        let results: Vec<ValType> = ty.results().collect();
        l.func_new(m, n, ty.clone(), move |mut caller, _params, out| {
            caller.data_mut().unimplemented.insert(label.clone());
            for (slot, ty) in out.iter_mut().zip(&results) {
                *slot = match ty {
                    ValType::I32 => Val::I32(result),
                    ValType::I64 => Val::I64(i64::from(result)),
                    ValType::F32 => Val::F32(0),
                    ValType::F64 => Val::F64(0),
                    ValType::V128 => Val::V128(0u128.into()),
                    ValType::Ref(_) => Val::FuncRef(None),
                };
            }
            Ok(())
        })?;
    }
    proxy_calls(&mut l)?;
    wasi_calls(&mut l)?;
    Ok(l)
}

fn proxy_calls(l: &mut Linker<Host>) -> anyhow::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_log",
        |mut c: Caller<'_, Host>, level: i32, ptr: i32, len: i32| -> i32 {
            match read_string(&mut c, ptr, len) {
                Some(message) => {
                    c.data_mut().log(level, message);
                    status::OK
                }
                None => status::INVALID_MEMORY_ACCESS,
            }
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_log_level",
        |mut c: Caller<'_, Host>, ptr: i32| -> i32 {
            // Trace: every line the module would log reaches the report.
            written(write_u32(&mut c, ptr, 0))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, Host>, ptr: i32| -> i32 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            written(write_bytes(&mut c, ptr, &now.to_le_bytes()))
        },
    )?;
    for name in [
        "proxy_set_tick_period_milliseconds",
        "proxy_set_effective_context",
        "proxy_continue_stream",
        "proxy_close_stream",
        "proxy_continue_request",
        "proxy_continue_response",
        "proxy_clear_route_cache",
    ] {
        l.func_wrap(ENV, name, |_: Caller<'_, Host>, _: i32| -> i32 {
            status::OK
        })?;
    }
    l.func_wrap(ENV, "proxy_done", |_: Caller<'_, Host>| -> i32 {
        status::OK
    })?;
    l.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, Host>,
         kind: i32,
         start: i32,
         max: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> anyhow::Result<i32> {
            let buffer = match kind {
                6 => c.data().vm_configuration.clone(),
                7 => c.data().plugin_configuration.clone(),
                // Bodies, connection data, call responses: none in this run.
                0..=5 | 8 => return Ok(status::NOT_FOUND),
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let (Ok(start), Ok(max)) = (usize::try_from(start), usize::try_from(max)) else {
                return Ok(status::BAD_ARGUMENT);
            };
            if start > buffer.len() {
                return Ok(status::BAD_ARGUMENT);
            }
            let end = start.saturating_add(max).min(buffer.len());
            if end == start {
                return Ok(status::OK);
            }
            hand_over(&mut c, &buffer[start..end], ptr_ptr, size_ptr)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: Caller<'_, Host>,
         ptr: i32,
         len: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> anyhow::Result<i32> {
            let Some(path) = read_bytes(&mut c, ptr, len) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let path: Vec<String> = path
                .split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let value = match path.join(".").as_str() {
                "plugin_root_id" => c.data().root_id.clone(),
                "plugin_name" => c.data().plugin_name.clone(),
                "plugin_vm_id" => String::new(),
                other => {
                    c.data_mut()
                        .unimplemented
                        .insert(format!("{ENV}.proxy_get_property({other})"));
                    return Ok(status::NOT_FOUND);
                }
            };
            hand_over(&mut c, value.as_bytes(), ptr_ptr, size_ptr)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, Host>, map: i32, ptr_ptr: i32, size_ptr: i32| -> anyhow::Result<i32> {
            let Some((_, pairs)) = c.data().maps.get(map) else {
                return Ok(status::NOT_FOUND);
            };
            let bytes = serialize_pairs(pairs);
            hand_over(&mut c, &bytes, ptr_ptr, size_ptr)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, Host>, map: i32, ptr: i32, len: i32| -> i32 {
            let Some(pairs) = read_bytes(&mut c, ptr, len).and_then(|b| deserialize_pairs(&b))
            else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let host = c.data_mut();
            let Some((name, target)) = host.maps.get_mut(map) else {
                return status::BAD_ARGUMENT;
            };
            target.clone_from(&pairs);
            for (k, v) in pairs {
                host.changes.push(HeaderChange {
                    map: name,
                    op: "set all",
                    name: k,
                    value: Some(v),
                });
            }
            status::OK
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_header_map_size",
        |mut c: Caller<'_, Host>, map: i32, size_ptr: i32| -> i32 {
            let Some((_, pairs)) = c.data().maps.get(map) else {
                return status::NOT_FOUND;
            };
            let size = serialize_pairs(pairs).len() as u32;
            written(write_u32(&mut c, size_ptr, size))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Caller<'_, Host>,
         map: i32,
         kp: i32,
         kl: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> anyhow::Result<i32> {
            let Some(key) = read_string(&mut c, kp, kl) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some((_, pairs)) = c.data().maps.get(map) else {
                return Ok(status::NOT_FOUND);
            };
            match header_value(pairs, &key) {
                Some(v) => hand_over(&mut c, v.as_bytes(), ptr_ptr, size_ptr),
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    for (name, op) in [
        ("proxy_add_header_map_value", "add"),
        ("proxy_replace_header_map_value", "replace"),
    ] {
        l.func_wrap(
            ENV,
            name,
            move |mut c: Caller<'_, Host>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
                let (Some(key), Some(value)) =
                    (read_string(&mut c, kp, kl), read_string(&mut c, vp, vl))
                else {
                    return status::INVALID_MEMORY_ACCESS;
                };
                let host = c.data_mut();
                let Some((map_name, pairs)) = host.maps.get_mut(map) else {
                    return status::BAD_ARGUMENT;
                };
                let key = key.to_ascii_lowercase();
                if op == "replace" {
                    pairs.retain(|(k, _)| *k != key);
                }
                pairs.push((key.clone(), value.clone()));
                host.changes.push(HeaderChange {
                    map: map_name,
                    op,
                    name: key,
                    value: Some(value),
                });
                status::OK
            },
        )?;
    }
    l.func_wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, Host>, map: i32, kp: i32, kl: i32| -> i32 {
            let Some(key) = read_string(&mut c, kp, kl) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let host = c.data_mut();
            let Some((map_name, pairs)) = host.maps.get_mut(map) else {
                return status::BAD_ARGUMENT;
            };
            let key = key.to_ascii_lowercase();
            pairs.retain(|(k, _)| *k != key);
            host.changes.push(HeaderChange {
                map: map_name,
                op: "remove",
                name: key,
                value: None,
            });
            status::OK
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Caller<'_, Host>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> i32 {
            let (Some(details), Some(body), Some(headers)) = (
                read_string(&mut c, dp, dl),
                read_string(&mut c, bp, bl),
                read_bytes(&mut c, hp, hl).and_then(|b| deserialize_pairs(&b)),
            ) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            c.data_mut().local_response = Some(LocalResponse {
                status: code as u32,
                details,
                body,
                headers,
            });
            status::OK
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Caller<'_, Host>, _kind: i32, _np: i32, _nl: i32, id_ptr: i32| -> i32 {
            let host = c.data_mut();
            host.metrics += 1;
            let id = host.metrics;
            written(write_u32(&mut c, id_ptr, id))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_increment_metric",
        |_: Caller<'_, Host>, _id: i32, _by: i64| -> i32 { status::OK },
    )?;
    l.func_wrap(
        ENV,
        "proxy_record_metric",
        |_: Caller<'_, Host>, _id: i32, _value: i64| -> i32 { status::OK },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Caller<'_, Host>, _id: i32, ptr: i32| -> i32 {
            written(write_bytes(&mut c, ptr, &0u64.to_le_bytes()))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Caller<'_, Host>,
         kp: i32,
         kl: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> anyhow::Result<i32> {
            let Some(key) = read_string(&mut c, kp, kl) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let Some((value, cas)) = c.data().shared_data.get(&key).cloned() else {
                return Ok(status::NOT_FOUND);
            };
            if !write_u32(&mut c, cas_ptr, cas) {
                return Ok(status::INVALID_MEMORY_ACCESS);
            }
            hand_over(&mut c, &value, ptr_ptr, size_ptr)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Caller<'_, Host>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> i32 {
            let (Some(key), Some(value)) =
                (read_string(&mut c, kp, kl), read_bytes(&mut c, vp, vl))
            else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let data = &mut c.data_mut().shared_data;
            let current = data.get(&key).map_or(0, |(_, cas)| *cas);
            if cas != 0 && cas as u32 != current {
                return 8; // CasMismatch
            }
            data.insert(key, (value, current + 1));
            status::OK
        },
    )?;
    Ok(())
}

/// WASI as Envoy offers it, under both of its module names.
fn wasi_calls(l: &mut Linker<Host>) -> anyhow::Result<()> {
    for module in [WASI, WASI_UNSTABLE] {
        wasi_calls_as(l, module)?;
    }
    Ok(())
}

fn wasi_calls_as(l: &mut Linker<Host>, wasi: &str) -> anyhow::Result<()> {
    l.func_wrap(
        wasi,
        "fd_write",
        |mut c: Caller<'_, Host>, fd: i32, iovs: i32, iovs_len: i32, written_ptr: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return errno::BADF;
            }
            let Some(vecs) = read_bytes(&mut c, iovs, iovs_len.saturating_mul(8)) else {
                return errno::FAULT;
            };
            let mut total = 0u32;
            for iov in vecs.chunks_exact(8) {
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let Some(bytes) = read_bytes(&mut c, ptr, len) else {
                    return errno::FAULT;
                };
                total = total.saturating_add(bytes.len() as u32);
                c.data_mut().write_output(fd, &bytes);
            }
            wasi_written(write_u32(&mut c, written_ptr, total))
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(
            wasi,
            name,
            |mut c: Caller<'_, Host>, count_ptr: i32, size_ptr: i32| -> i32 {
                wasi_written(write_u32(&mut c, count_ptr, 0) && write_u32(&mut c, size_ptr, 0))
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(wasi, name, |_: Caller<'_, Host>, _: i32, _: i32| -> i32 {
            errno::SUCCESS
        })?;
    }
    l.func_wrap(
        wasi,
        "clock_time_get",
        |mut c: Caller<'_, Host>, clock: i32, _precision: i64, ptr: i32| -> i32 {
            let now = match clock {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
                1 => monotonic_nanos(),
                _ => return errno::NOTSUP,
            };
            wasi_written(write_bytes(&mut c, ptr, &now.to_le_bytes()))
        },
    )?;
    // Clock subscriptions fire at once (the sandbox does not wait); any other kind gets
    // ENOTSUP in its event.
    l.func_wrap(
        wasi,
        "poll_oneoff",
        |mut c: Caller<'_, Host>, input: i32, output: i32, n: i32, nevents_ptr: i32| -> i32 {
            let Some(subs) = read_bytes(&mut c, input, n.saturating_mul(48)) else {
                return errno::FAULT;
            };
            let mut events = Vec::with_capacity(subs.len() / 48 * 32);
            for sub in subs.chunks_exact(48) {
                let mut event = [0u8; 32];
                event[..8].copy_from_slice(&sub[..8]);
                let tag = sub[8];
                if tag != 0 {
                    event[8..10].copy_from_slice(&(errno::NOTSUP as u16).to_le_bytes());
                }
                event[10] = tag;
                events.extend_from_slice(&event);
            }
            if write_bytes(&mut c, output, &events)
                && write_u32(&mut c, nevents_ptr, (events.len() / 32) as u32)
            {
                errno::SUCCESS
            } else {
                errno::FAULT
            }
        },
    )?;
    l.func_wrap(
        wasi,
        "fd_read",
        |_: Caller<'_, Host>, _: i32, _: i32, _: i32, _: i32| -> i32 { errno::NOSYS },
    )?;
    // Envoy logs these at error and reports success.
    l.func_wrap(
        wasi,
        "fd_close",
        |mut c: Caller<'_, Host>, _fd: i32| -> i32 {
            c.data_mut().log(4, "wasi_unstable fd_close".into());
            errno::SUCCESS
        },
    )?;
    l.func_wrap(
        wasi,
        "fd_seek",
        |mut c: Caller<'_, Host>, _fd: i32, _offset: i64, _whence: i32, _ptr: i32| -> i32 {
            c.data_mut().log(4, "wasi_unstable fd_seek".into());
            errno::SUCCESS
        },
    )?;
    l.func_wrap(
        wasi,
        "random_get",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
            let Ok(len) = usize::try_from(len) else {
                return errno::FAULT;
            };
            let bytes: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
                .take(len)
                .collect();
            wasi_written(write_bytes(&mut c, ptr, &bytes))
        },
    )?;
    // Envoy logs it and carries on: the module keeps running (a Go panic traps by itself).
    l.func_wrap(wasi, "proc_exit", |mut c: Caller<'_, Host>, _code: i32| {
        c.data_mut().log(4, "wasi_unstable proc_exit".into());
    })?;
    l.func_wrap(wasi, "sched_yield", |_: Caller<'_, Host>| -> i32 {
        errno::SUCCESS
    })?;
    l.func_wrap(
        wasi,
        "fd_fdstat_get",
        |mut c: Caller<'_, Host>, fd: i32, ptr: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return errno::BADF;
            }
            // All zero but the rights: FD_WRITE (64).
            let mut stat = [0u8; 24];
            stat[8] = 64;
            wasi_written(write_bytes(&mut c, ptr, &stat))
        },
    )?;
    // No preopened directories: the module's search for them ends at the first descriptor.
    l.func_wrap(
        wasi,
        "fd_prestat_get",
        |_: Caller<'_, Host>, _fd: i32, _ptr: i32| -> i32 { errno::BADF },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pairs_round_trip() {
        let pairs = vec![
            (":path".to_string(), "/".to_string()),
            ("x-a".to_string(), String::new()),
        ];
        let bytes = serialize_pairs(&pairs);
        assert_eq!(bytes.len(), 4 + 2 * 8 + (5 + 1 + 1 + 1) + (3 + 1 + 1));
        assert_eq!(deserialize_pairs(&bytes), Some(pairs));
        assert_eq!(deserialize_pairs(&bytes[..bytes.len() - 3]), None);
        assert_eq!(deserialize_pairs(&[]), Some(vec![]));
        assert_eq!(deserialize_pairs(&[9, 0, 0, 0]), None);
    }

    #[test]
    fn output_is_logged_by_line_at_envoys_levels() {
        let mut h = Host::new(StoreLimits::default());
        h.write_output(1, b"hello\nwor");
        h.write_output(2, b"panic: ");
        h.write_output(2, b"boom\n");
        h.write_output(1, b"ld");
        h.flush_output();
        let lines: Vec<String> = h.logs.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            ["[info] hello", "[error] panic: boom", "[info] world"]
        );
    }
}
