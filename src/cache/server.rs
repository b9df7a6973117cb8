//! `GET|HEAD /modules/sha256/<hex>.wasm`: the module bytes, with a strong ETag (the sha256),
//! `If-None-Match`, byte ranges and immutable caching, since a name can never change content.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::{ModuleCache, is_sha256_hex};

/// Fetches a module this replica lacks, so every replica can serve every module in use.
pub trait OnDemand: Send + Sync {
    /// Fetches the module with this sha256 into the cache; `Err` says why it could not.
    fn fetch<'a>(
        &'a self,
        sha256: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), FetchFailure>> + Send + 'a>>;
}

/// Why an on-demand fetch gave nothing.
#[derive(Debug, Clone)]
pub enum FetchFailure {
    /// No WasmFilter uses a module with this sha256.
    Unknown,
    /// It is in use, but the registry could not give it right now.
    Unavailable(String),
}

#[derive(Clone)]
struct ServerState {
    cache: ModuleCache,
    on_demand: Option<Arc<dyn OnDemand>>,
}

/// Routes serving the cache's modules; `on_demand` fills in modules this replica lacks.
pub fn router(cache: ModuleCache, on_demand: Option<Arc<dyn OnDemand>>) -> Router {
    Router::new()
        .route("/modules/sha256/{file}", get(serve_module))
        .with_state(ServerState { cache, on_demand })
}

async fn serve_module(
    State(ServerState { cache, on_demand }): State<ServerState>,
    Path(file): Path<String>,
    req: Request,
) -> Response {
    let Some(sha) = file.strip_suffix(".wasm").filter(|s| is_sha256_hex(s)) else {
        return (
            StatusCode::BAD_REQUEST,
            "expected /modules/sha256/<64 lowercase hex>.wasm\n",
        )
            .into_response();
    };
    // Never serve bytes that do not hash to their name (hashed again only if the file changed).
    let present = cache.verify_off_thread(sha).await.unwrap_or(false);
    if !present {
        let fetched = match &on_demand {
            Some(f) => f.fetch(sha).await,
            None => Err(FetchFailure::Unknown),
        };
        match fetched {
            Ok(()) => {}
            Err(FetchFailure::Unknown) => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("module sha256:{sha} is not in this cache and no WasmFilter uses it\n"),
                )
                    .into_response();
            }
            Err(FetchFailure::Unavailable(why)) => {
                let mut resp = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "module sha256:{sha} is being fetched and is not available yet: {why}\n"
                    ),
                )
                    .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return resp;
            }
        }
    }
    cache.touch(sha);
    let etag = format!("\"sha256:{sha}\"");
    let not_modified = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let mut resp = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        // ServeFile does HEAD, Range and the content type (application/wasm, from the name).
        match ServeFile::new(cache.path(sha)).oneshot(req).await {
            Ok(r) => r.map(Body::new),
            Err(e) => match e {},
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    resp
}
