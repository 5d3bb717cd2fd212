//! The REST surface: routes, request/response shapes and the mapping of every failure to
//! problem+json.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use chrono::Utc;
use events::{AggregateKind, Event, EventMetadata, TraceContext};
use serde::Deserialize;
use serde_json::json;
use service_kit::auth::{ScopeGuard, require_scope};
use service_kit::json::JsonBody;
use service_kit::{ApiKeys, FieldError, Problem, Scope, health, problem};
use uuid::Uuid;

use crate::domain::{self, DomainError, InvalidField, NewStudent, StudentCommand, StudentState};
use crate::event_store::{AppendError, EventStore};

/// Header carrying the stream position a read may wait for.
pub const CONSISTENCY_TOKEN_HEADER: &str = "x-consistency-token";
/// Header a client may send to tie its requests together in logs and traces.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: EventStore,
    pub nats: async_nats::Client,
}

/// Builds the whole router: authenticated API routes plus open health routes.
pub fn router(state: AppState, keys: ApiKeys, body_limit_bytes: usize) -> Router {
    let writes = Router::new()
        .route("/api/students", post(register_student))
        .route_layer(middleware::from_fn_with_state(
            ScopeGuard {
                keys,
                needed: Scope::Write,
            },
            require_scope,
        ));
    Router::new()
        .merge(writes)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("nats connection is {other}")),
    };
    let stream = state.store.check().await;
    health::readiness(vec![("nats", nats), ("event_stream", stream)])
}

/// Body of `POST /api/students`. Fields are optional here so a missing one is a `422`
/// naming it, not a deserialization `400`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterStudentBody {
    name: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    #[serde(default)]
    course_ids: Vec<String>,
}

async fn register_student(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterStudentBody>,
) -> Result<Response, ApiError> {
    let new_student = NewStudent::parse(
        body.name.as_deref(),
        body.first_name.as_deref(),
        body.last_name.as_deref(),
        &body.course_ids,
    )
    .map_err(ApiError::Invalid)?;
    if !new_student.course_ids.is_empty() {
        // Enrollment spans two aggregates and needs the atomic multi-subject append of the
        // command-side issue; until then, refuse rather than half-apply.
        return Err(ApiError::Invalid(vec![InvalidField {
            field: "course_ids".into(),
            reason: "enrolling at registration is not supported yet; register without course_ids"
                .into(),
        }]));
    }

    let command_id = Uuid::now_v7();
    let student_id = Uuid::now_v7();
    let state_before = StudentState::Absent;
    let payloads = domain::student::decide(&state_before, &StudentCommand::Register(new_student))
        .map_err(ApiError::Rule)?;

    let context = CommandContext::from_headers(&headers, command_id);
    let mut position = 0;
    for payload in payloads {
        let event = context.event(AggregateKind::Student, student_id, payload);
        position = state
            .store
            .append(&event, position)
            .await
            .map_err(ApiError::Append)?;
    }

    let mut response = (
        StatusCode::CREATED,
        Json(json!({ "data": { "id": student_id } })),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/students/{student_id}")) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(header::ETAG, etag(position));
    headers.insert(CONSISTENCY_TOKEN_HEADER, HeaderValue::from(position));
    Ok(response)
}

/// The aggregate version as a strong entity tag.
fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Ids and trace context shared by every event one command produces.
struct CommandContext {
    command_id: Uuid,
    correlation_id: Uuid,
    trace: TraceContext,
}

impl CommandContext {
    fn from_headers(headers: &HeaderMap, command_id: Uuid) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let correlation_id = text(CORRELATION_ID_HEADER)
            .and_then(|v| Uuid::parse_str(v).ok())
            .unwrap_or(command_id);
        // Keep only a well-formed traceparent; a malformed one must not reach the events.
        let traceparent = text("traceparent")
            .filter(|v| is_traceparent(v))
            .unwrap_or_default()
            .to_owned();
        let tracestate = if traceparent.is_empty() {
            String::new()
        } else {
            text("tracestate")
                .unwrap_or_default()
                .chars()
                .take(512)
                .collect()
        };
        CommandContext {
            command_id,
            correlation_id,
            trace: TraceContext {
                traceparent,
                tracestate,
            },
        }
    }

    fn event(
        &self,
        kind: AggregateKind,
        aggregate_id: Uuid,
        payload: events::EventPayload,
    ) -> Event {
        Event {
            metadata: EventMetadata {
                event_id: Uuid::now_v7(),
                aggregate_kind: kind,
                aggregate_id,
                occurred_at: Utc::now(),
                correlation_id: self.correlation_id,
                causation_id: self.command_id,
                trace: self.trace.clone(),
            },
            payload,
        }
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>` (W3C trace context, version 00).
fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// Every way a command can fail, mapped to problem+json in one place.
#[derive(Debug)]
pub enum ApiError {
    Invalid(Vec<InvalidField>),
    Rule(DomainError),
    Append(AppendError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = match self {
            ApiError::Invalid(fields) => Problem::validation(
                fields
                    .into_iter()
                    .map(|f| FieldError::new(f.field, f.reason))
                    .collect(),
            ),
            ApiError::Rule(rule @ DomainError::StudentAlreadyExists) => Problem::new(
                StatusCode::CONFLICT,
                "student-exists",
                "Student already exists",
            )
            .with_detail(rule.to_string()),
            ApiError::Append(AppendError::Conflict { .. }) => Problem::new(
                StatusCode::CONFLICT,
                "concurrent-modification",
                "The aggregate was changed concurrently",
            )
            .with_detail("retry the command"),
            ApiError::Append(AppendError::Unavailable(error)) => {
                tracing::error!(%error, "append failed");
                Problem::unavailable("the event store did not confirm the write; retry")
            }
        };
        problem.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_kept() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
        ));
        assert!(!is_traceparent(
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent(""));
    }
}
