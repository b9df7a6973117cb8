//! `GET|HEAD /modules/sha256/<hex>.wasm`: the module bytes, with a strong ETag (the sha256),
//! `If-None-Match`, byte ranges and immutable caching, since a name can never change content.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::{ModuleCache, is_sha256_hex};

/// Routes serving the cache's modules.
pub fn router(cache: ModuleCache) -> Router {
    Router::new()
        .route("/modules/sha256/{file}", get(serve_module))
        .with_state(cache)
}

async fn serve_module(
    State(cache): State<ModuleCache>,
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
    if !cache.contains(sha) {
        return (
            StatusCode::NOT_FOUND,
            format!("module sha256:{sha} is not in this cache\n"),
        )
            .into_response();
    }
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
