//! `/healthz` (the process is alive) and the shape of `/readyz` answers.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Liveness: answers while the process can serve HTTP at all.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness from named dependency checks: `200` when all pass, else `503` naming the failures.
pub fn readiness(checks: Vec<(&'static str, Result<(), String>)>) -> Response {
    let ready = checks.iter().all(|(_, result)| result.is_ok());
    let details: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(name, result)| {
            let value = match result {
                Ok(()) => json!("ok"),
                Err(error) => json!(error),
            };
            (name.to_owned(), value)
        })
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if ready { "ready" } else { "not ready" }, "checks": details });
    (status, Json(body)).into_response()
}
