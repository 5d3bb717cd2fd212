//! The REST read surface: `{"data": ...}` envelopes, keyset pagination, ETags, problem+json.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use service_kit::auth::{ScopeGuard, require_scope};
use service_kit::{ApiKeys, FieldError, Problem, Scope, health, problem};
use uuid::Uuid;

use crate::pg_students::PgStudents;

/// Page size when the client names none.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: u32 = 100;

#[derive(Clone)]
pub struct AppState {
    pub students: PgStudents,
}

pub fn router(state: AppState, keys: ApiKeys) -> Router {
    let reads = Router::new()
        .route("/api/students", get(list_students))
        .route("/api/students/{id}", get(get_student))
        .route_layer(middleware::from_fn_with_state(
            ScopeGuard {
                keys,
                needed: Scope::Read,
            },
            require_scope,
        ));
    Router::new()
        .merge(reads)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let postgres = sqlx::query("SELECT 1 FROM students LIMIT 1")
        .execute(state.students.pool())
        .await
        .map(|_| ())
        .map_err(|e| format!("postgres: {e}"));
    health::readiness(vec![("postgres", postgres)])
}

async fn get_student(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let not_found = || Problem::not_found(format!("no student with id {id}"));
    let student_id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let student = state
        .students
        .get(student_id)
        .await
        .map_err(read_model_unavailable)?
        .ok_or_else(not_found)?;
    let etag = format!("\"{}\"", student.version);
    if if_none_match(&headers, &etag) {
        return Ok(with_etag(StatusCode::NOT_MODIFIED.into_response(), &etag));
    }
    Ok(with_etag(
        Json(Data { data: student }).into_response(),
        &etag,
    ))
}

/// The `{"data": ...}` envelope of the replaced system.
#[derive(Serialize)]
struct Data<T> {
    data: T,
}

/// A page of a list: `data` stays an array, the next page is named beside it.
#[derive(Serialize)]
struct Page<T> {
    data: Vec<T>,
    next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_students(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(params) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    let limit = parse_limit(params.limit.as_deref())?;
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    // One extra row tells whether a next page exists.
    let mut students = state
        .students
        .list(after, limit + 1)
        .await
        .map_err(read_model_unavailable)?;
    let next_cursor = if students.len() > limit as usize {
        students.truncate(limit as usize);
        students.last().map(|s| encode_cursor(s.id))
    } else {
        None
    };
    Ok(Json(Page {
        data: students,
        next_cursor,
    })
    .into_response())
}

fn parse_limit(raw: Option<&str>) -> Result<u32, Problem> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_PAGE_SIZE);
    };
    match raw.parse::<u32>() {
        Ok(limit) if (1..=MAX_PAGE_SIZE).contains(&limit) => Ok(limit),
        _ => Err(Problem::validation(vec![FieldError::new(
            "limit",
            format!("must be an integer from 1 to {MAX_PAGE_SIZE}"),
        )])),
    }
}

/// Cursors are opaque to clients: a versioned, base64url-encoded position.
fn encode_cursor(last_id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{last_id}"))
}

fn decode_cursor(cursor: &str) -> Result<Uuid, Problem> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            text.strip_prefix("v1:")
                .and_then(|id| Uuid::parse_str(id).ok())
        })
        .ok_or_else(|| {
            Problem::validation(vec![FieldError::new(
                "cursor",
                "is not a cursor this API issued",
            )])
        })
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

fn with_etag(mut response: Response, etag: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn read_model_unavailable(error: sqlx::Error) -> Problem {
    tracing::error!(%error, "read model query failed");
    Problem::unavailable("the read model is unavailable; retry")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).expect("ours"), id);
        for bad in [
            "",
            "abc",
            "djE6bm90LWEtdXVpZA",
            &URL_SAFE_NO_PAD.encode(id.to_string()),
        ] {
            let problem = decode_cursor(bad).expect_err("foreign");
            assert_eq!(problem.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
    }

    #[test]
    fn limit_defaults_and_is_bounded() {
        assert_eq!(parse_limit(None).expect("default"), DEFAULT_PAGE_SIZE);
        assert_eq!(parse_limit(Some("100")).expect("max"), 100);
        for bad in ["0", "101", "-1", "ten", ""] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"1\", W/\"7\""),
        );
        assert!(if_none_match(&headers, "\"7\""));
        assert!(!if_none_match(&headers, "\"8\""));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&headers, "\"8\""));
    }
}
