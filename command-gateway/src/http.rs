//! The REST surface: routes, request bodies, responses, and the mapping of every failure to
//! problem+json. Commands run in their own task, so a client that disconnects cannot cancel
//! a command halfway.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Router, middleware};
use events::TraceContext;
use serde::{Deserialize, Serialize};
use serde_json::json;
use service_kit::auth::{API_KEY_HEADER, ScopeGuard, require_scope};
use service_kit::json::JsonBody;
use service_kit::observe::ObserveLayer;
use service_kit::trace::{self, SpanContext};
use service_kit::{ApiKeys, FieldError, Problem, Scope, health, metrics, problem};
use sha2::{Digest, Sha256};
use tracing::Instrument;
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;
use uuid::Uuid;

use crate::commands::{
    Accepted, AppendJournal, CommandContext, CommandError, CommandService, SentAppend,
};
use crate::domain::{AggregateId, Command, CourseDraft, DomainError, InvalidField, StudentDraft};
use crate::idempotency::{self, Attempt, Begin, Claim, IDEMPOTENCY_KEY_HEADER, IdempotencyStore};
use crate::openapi::{ApiDoc, CommandErrors, CourseDataDoc, CreatedDoc, StudentDataDoc};
use crate::outcome::Outcome;

/// Header carrying the stream position a read may wait for.
pub const CONSISTENCY_TOKEN_HEADER: &str = "x-consistency-token";
/// Header a client may send to tie its requests together in logs and traces.
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";
/// Set on a response replayed for an `Idempotency-Key`.
pub const IDEMPOTENT_REPLAY_HEADER: &str = "idempotent-replayed";

/// Shared state of the handlers. Cloned for every request (axum's `State`), so each part
/// is cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub commands: Arc<CommandService>,
    pub idempotency: IdempotencyStore,
    /// Only `/readyz` asks it; a client's own clone touches several shared counters.
    pub nats: Arc<async_nats::Client>,
}

/// Builds the whole router: authenticated API routes plus open health routes.
pub fn router(state: AppState, keys: ApiKeys, body_limit_bytes: usize) -> Router {
    let writes = Router::new()
        .route("/api/students", post(register_student))
        .route(
            "/api/students/{id}",
            put(replace_student).delete(delete_student),
        )
        .route(
            "/api/students/{id}/courses/{course_id}",
            put(enroll).delete(unenroll),
        )
        .route("/api/courses", post(create_course))
        .route(
            "/api/courses/{id}",
            put(replace_course).delete(delete_course),
        )
        .route_layer(middleware::from_fn_with_state(
            ScopeGuard {
                keys: keys.clone(),
                needed: Scope::Write,
            },
            require_scope,
        ));
    // Erasure cannot be undone: it takes a key of its own scope, not any write key.
    let erasures = Router::new()
        .route("/api/students/{id}/erasure", post(erase_student))
        .route_layer(middleware::from_fn_with_state(
            ScopeGuard {
                keys,
                needed: Scope::Erase,
            },
            require_scope,
        ));
    Router::new()
        .merge(writes)
        .merge(erasures)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics_handler))
        // Before the layers, so unknown routes and wrong methods are counted and traced too.
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(ObserveLayer)
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .layer(axum::Extension(service_kit::json::BodyLimit(
            body_limit_bytes,
        )))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => Err(format!("nats connection is {other}")),
    };
    // Without a connection the broker checks would only wait out their request timeout.
    let (stream, bucket) = if nats.is_ok() {
        tokio::join!(
            state.commands.aggregates().store().check(),
            state.idempotency.check()
        )
    } else {
        let unchecked = || Err("not checked: NATS is not connected".to_owned());
        (unchecked(), unchecked())
    };
    health::readiness(vec![
        ("nats", nats),
        ("event_stream", stream),
        ("idempotency_bucket", bucket),
    ])
}

// ---------------------------------------------------------------- request bodies

/// Body of `POST` and `PUT /api/students`. Fields are optional here so a missing one is a
/// `422` naming it, not a deserialization `400`. `PUT` replaces everything: an omitted
/// `course_ids` means no courses.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace", "course_ids": []}))]
pub struct StudentBody {
    #[schema(required = true, schema_with = crate::openapi::short_text)]
    name: Option<String>,
    #[schema(required = true, schema_with = crate::openapi::short_text)]
    first_name: Option<String>,
    #[schema(required = true, schema_with = crate::openapi::short_text)]
    last_name: Option<String>,
    /// At most 15 distinct ids of existing courses.
    #[serde(default)]
    #[schema(value_type = Vec<uuid::Uuid>, max_items = 15)]
    course_ids: Vec<String>,
}

impl StudentBody {
    /// The same request with its ids in one order, for the fingerprint: a set is a set.
    fn sorted(&self) -> StudentBody {
        let mut body = self.clone();
        body.course_ids.sort_unstable();
        body
    }

    fn parse(&self) -> Result<StudentDraft, Outcome> {
        StudentDraft::parse(
            self.name.as_deref(),
            self.first_name.as_deref(),
            self.last_name.as_deref(),
            &self.course_ids,
        )
        .map_err(invalid)
    }
}

/// Body of `POST` and `PUT /api/courses`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "Algebra",
    "description": "Groups, rings, fields",
    "discipline": "Mathematics",
    "teacher": "Noether",
    "student_ids": []
}))]
pub struct CourseBody {
    #[schema(required = true, schema_with = crate::openapi::short_text)]
    name: Option<String>,
    #[schema(required = true, schema_with = crate::openapi::description_text)]
    description: Option<String>,
    #[schema(required = true, schema_with = crate::openapi::short_text)]
    discipline: Option<String>,
    #[schema(required = true, schema_with = crate::openapi::short_text)]
    teacher: Option<String>,
    /// At most 60 distinct ids of existing students.
    #[serde(default)]
    #[schema(value_type = Vec<uuid::Uuid>, max_items = 60)]
    student_ids: Vec<String>,
}

impl CourseBody {
    /// The same request with its ids in one order, for the fingerprint: a set is a set.
    fn sorted(&self) -> CourseBody {
        let mut body = self.clone();
        body.student_ids.sort_unstable();
        body
    }

    fn parse(&self) -> Result<CourseDraft, Outcome> {
        CourseDraft::parse(
            self.name.as_deref(),
            self.description.as_deref(),
            self.discipline.as_deref(),
            self.teacher.as_deref(),
            &self.student_ids,
        )
        .map_err(invalid)
    }
}

fn invalid(fields: Vec<InvalidField>) -> Outcome {
    Problem::validation(
        fields
            .into_iter()
            .map(|f| FieldError::new(f.field, f.reason))
            .collect(),
    )
    .into()
}

/// A path id that is not a UUID names no resource.
fn path_id(raw: &str, kind: &str) -> Result<Uuid, Outcome> {
    Uuid::parse_str(raw).map_err(|_| Problem::not_found(format!("no {kind} with id {raw}")).into())
}

// ---------------------------------------------------------------- handlers

#[utoipa::path(
    post,
    path = "/api/students",
    tag = "students",
    request_body = StudentBody,
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 201, description = "Registered", body = CreatedDoc, headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn register_student(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<StudentBody>,
) -> Response {
    let fingerprint = fingerprint("POST /api/students", &body.sorted(), &headers);
    let new_id = NewId::for_request(&headers, &fingerprint);
    run(state, headers, fingerprint, move || {
        let draft = body.parse()?;
        let command = Command::RegisterStudent {
            student_id: new_id.id,
            draft,
        };
        let answer = Answer::Created {
            collection: "students",
            new_id,
        };
        Ok((command, answer))
    })
    .await
}

#[utoipa::path(
    put,
    path = "/api/students/{id}",
    tag = "students",
    request_body = StudentBody,
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the student"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Only if the aggregate is at this version (an `ETag`, a list of them, or `*`); any other value never matches"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 200, description = "Replaced, with course_ids", body = StudentDataDoc, headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn replace_student(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<StudentBody>,
) -> Response {
    let route = format!("PUT /api/students/{id}");
    let fingerprint = fingerprint(&route, &body.sorted(), &headers);
    run(state, headers, fingerprint, move || {
        let student_id = path_id(&id, "student")?;
        let draft = body.parse()?;
        let command = Command::ReplaceStudent { student_id, draft };
        Ok((command, Answer::Student(student_id)))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/api/students/{id}",
    tag = "students",
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the student"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Only if the aggregate is at this version (an `ETag`, a list of them, or `*`); any other value never matches"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 204, description = "Deleted; its courses forget it", headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn delete_student(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fingerprint = fingerprint(&format!("DELETE /api/students/{id}"), &(), &headers);
    run(state, headers, fingerprint, move || {
        let student_id = path_id(&id, "student")?;
        Ok((Command::DeleteStudent { student_id }, Answer::NoContent))
    })
    .await
}

#[utoipa::path(
    post,
    path = "/api/students/{id}/erasure",
    tag = "students",
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the student"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 204, description = "Erased for good: deleted (its courses forget it) if it was not, its data key destroyed, so no replay, redrive or tool can show its names again. Erasing an erased student answers the same", headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
/// Needs an API key of the `erase` scope.
pub async fn erase_student(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fingerprint = fingerprint(&format!("POST /api/students/{id}/erasure"), &(), &headers);
    run(state, headers, fingerprint, move || {
        let student_id = path_id(&id, "student")?;
        Ok((Command::EraseStudent { student_id }, Answer::NoContent))
    })
    .await
}

#[utoipa::path(
    put,
    path = "/api/students/{id}/courses/{course_id}",
    tag = "enrollments",
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the student"),
        ("course_id" = uuid::Uuid, Path, description = "Id of the course"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Only if the aggregate is at this version (an `ETag`, a list of them, or `*`); any other value never matches"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 204, description = "Enrolled (or already was)", headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn enroll(
    State(state): State<AppState>,
    Path((id, course)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let route = format!("PUT /api/students/{id}/courses/{course}");
    let fingerprint = fingerprint(&route, &(), &headers);
    run(state, headers, fingerprint, move || {
        let student_id = path_id(&id, "student")?;
        let course_id = path_id(&course, "course")?;
        let command = Command::Enroll {
            student_id,
            course_id,
        };
        Ok((command, Answer::NoContent))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/api/students/{id}/courses/{course_id}",
    tag = "enrollments",
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the student"),
        ("course_id" = uuid::Uuid, Path, description = "Id of the course"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Only if the aggregate is at this version (an `ETag`, a list of them, or `*`); any other value never matches"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 204, description = "Unenrolled", headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn unenroll(
    State(state): State<AppState>,
    Path((id, course)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let route = format!("DELETE /api/students/{id}/courses/{course}");
    let fingerprint = fingerprint(&route, &(), &headers);
    run(state, headers, fingerprint, move || {
        let student_id = path_id(&id, "student")?;
        let course_id = path_id(&course, "course")?;
        let command = Command::Unenroll {
            student_id,
            course_id,
        };
        Ok((command, Answer::NoContent))
    })
    .await
}

#[utoipa::path(
    post,
    path = "/api/courses",
    tag = "courses",
    request_body = CourseBody,
    params(
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 201, description = "Created", body = CreatedDoc, headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn create_course(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CourseBody>,
) -> Response {
    let fingerprint = fingerprint("POST /api/courses", &body.sorted(), &headers);
    let new_id = NewId::for_request(&headers, &fingerprint);
    run(state, headers, fingerprint, move || {
        let draft = body.parse()?;
        let command = Command::CreateCourse {
            course_id: new_id.id,
            draft,
        };
        let answer = Answer::Created {
            collection: "courses",
            new_id,
        };
        Ok((command, answer))
    })
    .await
}

#[utoipa::path(
    put,
    path = "/api/courses/{id}",
    tag = "courses",
    request_body = CourseBody,
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the course"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Only if the aggregate is at this version (an `ETag`, a list of them, or `*`); any other value never matches"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 200, description = "Replaced, with student_ids", body = CourseDataDoc, headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn replace_course(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CourseBody>,
) -> Response {
    let route = format!("PUT /api/courses/{id}");
    let fingerprint = fingerprint(&route, &body.sorted(), &headers);
    run(state, headers, fingerprint, move || {
        let course_id = path_id(&id, "course")?;
        let draft = body.parse()?;
        let command = Command::ReplaceCourse { course_id, draft };
        Ok((command, Answer::Course(course_id)))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/api/courses/{id}",
    tag = "courses",
    params(
        ("id" = uuid::Uuid, Path, description = "Id of the course"),
        ("If-Match" = Option<String>, Header, nullable = false, description = "Only if the aggregate is at this version (an `ETag`, a list of them, or `*`); any other value never matches"),
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = "^[!-~]+$", description = "Retries with this key get the first outcome: 1 to 128 visible ASCII characters"),
    ),
    responses((status = 204, description = "Deleted; its students forget it", headers(("etag" = String, description = "Aggregate version"), ("x-consistency-token" = String, description = "Stream position to wait for on reads"))), CommandErrors)
)]
pub async fn delete_course(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let fingerprint = fingerprint(&format!("DELETE /api/courses/{id}"), &(), &headers);
    run(state, headers, fingerprint, move || {
        let course_id = path_id(&id, "course")?;
        Ok((Command::DeleteCourse { course_id }, Answer::NoContent))
    })
    .await
}

// ---------------------------------------------------------------- the common path

/// Runs a command in its own task, under the request's `Idempotency-Key` if any. `plan`
/// parses the request into the command and how its success is answered; it runs after the
/// key is claimed, so a request refused as invalid keeps its `422` under the key too.
async fn run<F>(state: AppState, headers: HeaderMap, fingerprint: String, plan: F) -> Response
where
    F: FnOnce() -> Result<(Command, Answer), Outcome> + Send + 'static,
{
    let if_match = match parse_if_match(&headers) {
        Ok(if_match) => if_match,
        Err(problem) => return problem.into_response(),
    };
    let context = CommandContext::from_headers(&headers);
    let task = tokio::spawn(
        async move {
            let mut claim = match headers.get(IDEMPOTENCY_KEY_HEADER) {
                None => None,
                Some(raw) => {
                    let key = idempotency::parse_key(raw.as_bytes()).map_err(Outcome::from)?;
                    let client = headers
                        .get(API_KEY_HEADER)
                        .map(|v| v.as_bytes())
                        .unwrap_or_default();
                    match state.idempotency.begin(client, key, fingerprint).await {
                        Ok(Begin::Replay(outcome)) => {
                            let outcome = with_personal_fields(&state, outcome).await;
                            return Ok(outcome.with_header(IDEMPOTENT_REPLAY_HEADER, "true"));
                        }
                        Ok(Begin::Claimed(claim)) => Some(claim),
                        Err(problem) => return Err(problem.into()),
                    }
                }
            };
            let (outcome, earlier) = match plan() {
                Ok((command, answer)) => {
                    decide(
                        &state,
                        &command,
                        &context,
                        if_match.as_deref(),
                        answer,
                        claim.as_mut(),
                    )
                    .await
                }
                Err(outcome) => (outcome, false),
            };
            if let Some(claim) = claim {
                state.idempotency.finish(claim, &outcome).await;
            }
            if earlier {
                // Not this request's doing: the answer an earlier one never got.
                return Ok(outcome.with_header(IDEMPOTENT_REPLAY_HEADER, "true"));
            }
            Ok::<Outcome, Outcome>(outcome)
        }
        .in_current_span(),
    );
    match task.await {
        Ok(Ok(outcome) | Err(outcome)) => outcome.into_response(),
        Err(error) => {
            tracing::error!(%error, "command task failed");
            Problem::internal().into_response()
        }
    }
}

/// How a command's success is answered.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// `201` with the new resource's id and location.
    Created {
        collection: &'static str,
        new_id: NewId,
    },
    /// `200` with the student as the command left it.
    Student(Uuid),
    /// `200` with the course as the command left it.
    Course(Uuid),
    NoContent,
}

impl Answer {
    fn render(self, accepted: &Accepted) -> Outcome {
        match self {
            Answer::Created { collection, new_id } => created(collection, new_id.id, accepted),
            Answer::Student(student_id) => {
                let student = accepted.snapshot.student(student_id).active().map(|s| {
                    json!({
                        "id": student_id,
                        "name": s.details.name,
                        "first_name": s.details.first_name,
                        "last_name": s.details.last_name,
                        "course_ids": s.course_ids,
                    })
                });
                with_positions(
                    Outcome::json(StatusCode::OK, &json!({ "data": student })),
                    accepted,
                )
                .with_personal(student_id)
            }
            Answer::Course(course_id) => {
                let course = accepted.snapshot.course(course_id).active().map(|c| {
                    json!({
                        "id": course_id,
                        "name": c.details.name,
                        "description": c.details.description,
                        "discipline": c.details.discipline,
                        "teacher": c.details.teacher,
                        "student_ids": c.student_ids,
                    })
                });
                with_positions(
                    Outcome::json(StatusCode::OK, &json!({ "data": course })),
                    accepted,
                )
            }
            Answer::NoContent => with_positions(Outcome::empty(StatusCode::NO_CONTENT), accepted),
        }
    }
}

/// Records a keyed command's appends in its claim, each with the answer it makes if stored.
struct ClaimJournal<'a> {
    store: &'a IdempotencyStore,
    claim: &'a mut Claim,
    answer: Answer,
}

impl AppendJournal for ClaimJournal<'_> {
    fn earlier(&self) -> Vec<SentAppend> {
        self.claim
            .earlier()
            .iter()
            .map(|attempt| attempt.append.clone())
            .collect()
    }

    async fn before_append(
        &mut self,
        append: SentAppend,
        accepted: &Accepted,
    ) -> Result<(), String> {
        let outcome = self.answer.render(accepted);
        self.store
            .record_attempt(self.claim, Attempt { append, outcome })
            .await
    }
}

/// Executes `command` and answers it. Under a claimed key every append is recorded in the
/// claim before it is sent, and when an earlier request's append for the key turns out to
/// be stored, its answer is this one too (`true`). A derived create that finds its
/// aggregate made (its attempt's record lost) answers what is there.
async fn decide(
    state: &AppState,
    command: &Command,
    context: &CommandContext,
    if_match: Option<&[u64]>,
    answer: Answer,
    claim: Option<&mut Claim>,
) -> (Outcome, bool) {
    // A create has no version to match yet.
    let if_match = if matches!(answer, Answer::Created { .. }) {
        None
    } else {
        if_match
    };
    let result = match claim {
        None => state.commands.execute(command, context, if_match).await,
        Some(claim) => {
            let mut journal = ClaimJournal {
                store: &state.idempotency,
                claim: &mut *claim,
                answer,
            };
            let result = state
                .commands
                .execute_recorded(command, context, if_match, &mut journal)
                .await;
            if let Err(CommandError::EarlierAttemptStored(stored)) = &result {
                return match claim.earlier().get(stored.index) {
                    Some(attempt) => {
                        tracing::info!(
                            sequence = stored.first_sequence,
                            "an earlier attempt of this request is stored; answering it"
                        );
                        let answer = earlier_answer(attempt, stored.first_sequence);
                        (with_personal_fields(state, answer).await, true)
                    }
                    None => (Problem::internal().into(), false),
                };
            }
            result
        }
    };
    let result = match (result, answer) {
        (
            Err(CommandError::Rule(DomainError::AlreadyExists(existing))),
            Answer::Created { new_id, .. },
        ) if new_id.derived && existing == command.target() => {
            tracing::info!(aggregate = %existing.id, "a retried create found what its first attempt made");
            state.commands.made_earlier(existing).await
        }
        (result, _) => result,
    };
    match result {
        Ok(accepted) => (answer.render(&accepted), false),
        Err(error) => (command_error(error).into(), false),
    }
}

/// A stored outcome with the student's personal fields it left out filled in again, as
/// they were at the version its `ETag` names (`null` once the student is erased).
async fn with_personal_fields(state: &AppState, outcome: Outcome) -> Outcome {
    let (Some(student), Some(version)) = (outcome.personal, outcome.etag_version()) else {
        return outcome;
    };
    match state
        .commands
        .aggregates()
        .student_details_at(student, version)
        .await
    {
        Ok(details) => outcome.with_personal_fields(details.as_ref()),
        Err(error) => {
            tracing::warn!(%error, "reading a student for a stored answer failed");
            Problem::unavailable("the event store is unavailable; retry").into()
        }
    }
}

/// The answer `attempt` made, its append found with its first event at `first_sequence`.
fn earlier_answer(attempt: &Attempt, first_sequence: u64) -> Outcome {
    let (target_version, position) = attempt.append.versions_at(first_sequence);
    set_positions(attempt.outcome.clone(), target_version, position)
}

/// The id of the aggregate a create makes. With an `Idempotency-Key` it is derived from the
/// client's API key, the idempotency key and the request (SHA-256, as a version 8 UUID), so
/// a retry after an outcome that was never recorded (a `503` for an append the broker did
/// store) names the same aggregate and finds it, instead of making a second one. Without
/// one, a fresh time-ordered id.
#[derive(Debug, Clone, Copy)]
struct NewId {
    id: Uuid,
    derived: bool,
}

impl NewId {
    fn for_request(headers: &HeaderMap, fingerprint: &str) -> NewId {
        let Some(key) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
            return NewId {
                id: Uuid::now_v7(),
                derived: false,
            };
        };
        let client = headers
            .get(API_KEY_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let mut hash = Sha256::new();
        for part in [client, key.as_bytes(), fingerprint.as_bytes()] {
            // Length-prefixed, so no two different triples hash the same bytes.
            hash.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_le_bytes());
            hash.update(part);
        }
        let digest = hash.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        NewId {
            id: uuid::Builder::from_custom_bytes(bytes).into_uuid(),
            derived: true,
        }
    }
}

/// `201` with the new resource's id and location.
fn created(collection: &str, id: Uuid, accepted: &Accepted) -> Outcome {
    with_positions(
        Outcome::json(StatusCode::CREATED, &json!({ "data": { "id": id } })),
        accepted,
    )
    .with_header(header::LOCATION.as_str(), format!("/api/{collection}/{id}"))
}

/// The aggregate version as `ETag` and the stream position as consistency token.
fn with_positions(outcome: Outcome, accepted: &Accepted) -> Outcome {
    set_positions(outcome, accepted.target_version, accepted.position)
}

fn set_positions(outcome: Outcome, target_version: u64, position: u64) -> Outcome {
    outcome
        .set_header(header::ETAG.as_str(), etag(target_version))
        .set_header(CONSISTENCY_TOKEN_HEADER, position.to_string())
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// A stable digest of what a request asks for, to tell a retry from a different request
/// that reuses an `Idempotency-Key`: the route, the body (id lists sorted, see `sorted`) and
/// `If-Match` as the set of versions it accepts. Without `If-Match` it is the digest of route
/// and body alone, as before `If-Match` counted, so keys claimed then still match.
fn fingerprint(route: &str, body: &impl Serialize, headers: &HeaderMap) -> String {
    let body = serde_json::to_string(body).unwrap_or_default();
    let mut text = format!("{route}\n{body}");
    if let Ok(Some(mut versions)) = parse_if_match(headers) {
        versions.sort_unstable();
        versions.dedup();
        let versions: Vec<String> = versions.iter().map(u64::to_string).collect();
        text.push_str("\nif-match:");
        text.push_str(&versions.join(","));
    }
    format!("{:016x}", idempotency::fnv1a(text.as_bytes()))
}

/// `If-Match: "12"` (or a list of such) → the versions the client accepts; `*` → any.
/// An entity tag that is not one of ours can never match: `412`.
fn parse_if_match(headers: &HeaderMap) -> Result<Option<Vec<u64>>, Problem> {
    let mut values = headers.get_all(header::IF_MATCH).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let mut versions = Vec::new();
    for value in values {
        let text = value
            .to_str()
            .map_err(|_| Problem::bad_request("`If-Match` is not ASCII"))?;
        for tag in text.split(',').map(str::trim) {
            if tag == "*" {
                return Ok(None);
            }
            if let Some(version) = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .and_then(|t| t.parse::<u64>().ok())
            {
                versions.push(version);
            }
        }
    }
    Ok(Some(versions))
}

impl CommandContext {
    fn from_headers(headers: &HeaderMap) -> Self {
        let command_id = Uuid::now_v7();
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let correlation_id = text(CORRELATION_ID_HEADER)
            .and_then(|v| Uuid::parse_str(v).ok())
            .unwrap_or(command_id);
        // The trace middleware put this service's own span here (a malformed incoming
        // value never reaches the events: it started a new trace instead).
        let traceparent = text(trace::TRACEPARENT)
            .and_then(SpanContext::parse)
            .map(|span| span.traceparent())
            .unwrap_or_default();
        let tracestate = if traceparent.is_empty() {
            String::new()
        } else {
            text(trace::TRACESTATE)
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
}

fn aggregate_name(aggregate: AggregateId) -> String {
    format!("{} {}", aggregate.kind.as_str(), aggregate.id)
}

/// Every command failure as a problem, in one place.
fn command_error(error: CommandError) -> Problem {
    match error {
        CommandError::Rule(rule) => {
            let detail = rule.to_string();
            match rule {
                DomainError::NotFound(aggregate) => {
                    Problem::not_found(format!("{} does not exist", aggregate_name(aggregate)))
                }
                DomainError::AlreadyExists(_) => {
                    Problem::new(StatusCode::CONFLICT, "already-exists", "Already exists")
                        .with_detail(detail)
                }
                DomainError::UnknownReference { field, .. } => {
                    Problem::validation(vec![FieldError::new(field, detail)])
                }
                DomainError::StudentCourseLimit { .. } => Problem::new(
                    StatusCode::CONFLICT,
                    "student-course-limit",
                    "A student is enrolled in at most 15 courses",
                )
                .with_detail(detail),
                DomainError::CourseFull { .. } => Problem::new(
                    StatusCode::CONFLICT,
                    "course-full",
                    "A course has at most 60 students",
                )
                .with_detail(detail),
                DomainError::NotEnrolled { .. } => {
                    Problem::new(StatusCode::NOT_FOUND, "not-enrolled", "Not enrolled")
                        .with_detail(detail)
                }
            }
        }
        CommandError::PreconditionFailed { current, .. } => Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            "The resource changed",
        )
        .with_detail(format!(
            "If-Match does not match the current version {}",
            etag(current)
        )),
        CommandError::Contention => Problem::new(
            StatusCode::CONFLICT,
            "concurrent-modification",
            "Too many concurrent changes",
        )
        .with_detail("other commands kept changing the same records; retry")
        .with_retry_after(1),
        CommandError::Load(crate::event_store::LoadError::Undecodable { .. }) => {
            tracing::error!(%error, "stored event cannot be decoded");
            Problem::internal()
        }
        CommandError::EarlierAttemptStored(_) => {
            // Answered from the claim before it gets here (`decide`).
            tracing::error!(%error, "an earlier attempt's answer was not found");
            Problem::internal()
        }
        CommandError::Load(_) | CommandError::Unavailable(_) => {
            tracing::error!(%error, "command failed on the event store");
            Problem::unavailable("the event store did not answer; retry")
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn if_match_parses_lists_and_star_and_never_matches_foreign_tags() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_if_match(&headers).expect("absent"), None);
        headers.insert(header::IF_MATCH, HeaderValue::from_static("\"3\", \"7\""));
        assert_eq!(parse_if_match(&headers).expect("list"), Some(vec![3, 7]));
        headers.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(parse_if_match(&headers).expect("star"), None);
        headers.insert(
            header::IF_MATCH,
            HeaderValue::from_static("W/\"3\", \"abc\""),
        );
        assert_eq!(parse_if_match(&headers).expect("foreign"), Some(vec![]));
    }

    #[test]
    fn the_fingerprint_normalises_if_match_and_keeps_the_old_digest_without_it() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_MATCH, HeaderValue::from_static(value));
            fingerprint("PUT /x", &(), &headers)
        };
        assert_eq!(with("\"3\", \"7\""), with("\"7\",\"3\",\"3\""));
        assert_ne!(with("\"3\""), with("\"7\""));
        assert_ne!(with("\"3\""), fingerprint("PUT /x", &(), &HeaderMap::new()));
        // `*` asks for nothing more than no header does.
        assert_eq!(with("*"), fingerprint("PUT /x", &(), &HeaderMap::new()));
        assert_eq!(
            fingerprint("PUT /x", &(), &HeaderMap::new()),
            format!("{:016x}", idempotency::fnv1a(b"PUT /x\nnull"))
        );
    }
}
