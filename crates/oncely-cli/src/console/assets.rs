//! The console's static files, served from the binary: the vendored htmx
//! and uPlot (see `assets/vendor/README.md`) and the console's own CSS and
//! script. Nothing is fetched or built at install time.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const FILES: &[(&str, &str, &[u8])] = &[
    ("htmx.min.js", "text/javascript", include_bytes!("../../assets/vendor/htmx-2.0.11.min.js")),
    ("uPlot.iife.min.js", "text/javascript", include_bytes!("../../assets/vendor/uPlot-1.6.32.iife.min.js")),
    ("uPlot.min.css", "text/css", include_bytes!("../../assets/vendor/uPlot-1.6.32.min.css")),
    ("console.css", "text/css", include_bytes!("../../assets/console.css")),
    ("console.js", "text/javascript", include_bytes!("../../assets/console.js")),
];

/// `GET /assets/{name}`.
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => {
            ([(header::CONTENT_TYPE, *mime), (header::CACHE_CONTROL, "max-age=3600")], *body).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
