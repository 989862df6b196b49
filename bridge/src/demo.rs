//! The demo page (demo/ in the repository, built into demo/dist): served at `/` from
//! the directory named by `LIVESYNC_DEMO_DIR` / `--demo-dir`. Without one, `/` answers
//! with a short text pointing to the docs.

use std::path::Path;

use axum::routing::get;
use axum::Router;
use tower_http::services::ServeDir;

use crate::state::AppState;

const NO_DEMO: &str = "livesync bridge: WebSocket at /ws (docs/protocol.md), health at /health.\n\
The demo page is served here when the bridge runs with LIVESYNC_DEMO_DIR=demo/dist \
(`make up` builds it; see demo/ in the repository).\n";

/// `/` and the demo's assets; every path no other route takes falls through to the
/// directory (missing files are 404s).
pub fn routes(dir: Option<&Path>) -> Router<AppState> {
    match dir {
        Some(dir) => Router::new().fallback_service(ServeDir::new(dir)),
        None => Router::new().route("/", get(|| async { NO_DEMO })),
    }
}
