//! The OpenAPI document of the command API (`/openapi.json`, Swagger UI at `/docs`).

use serde::Serialize;
use service_kit::openapi::{ApiKeySecurity, ProblemDoc};
use utoipa::{IntoResponses, OpenApi, ToSchema};

/// `{"data": {"id": "…"}}`
#[derive(Serialize, ToSchema)]
pub struct CreatedDoc {
    pub data: IdDoc,
}

#[derive(Serialize, ToSchema)]
pub struct IdDoc {
    pub id: uuid::Uuid,
}

#[derive(Serialize, ToSchema)]
pub struct StudentDoc {
    pub id: uuid::Uuid,
    pub name: String,
    pub first_name: String,
    pub last_name: String,
    pub course_ids: Vec<uuid::Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct StudentDataDoc {
    pub data: StudentDoc,
}

#[derive(Serialize, ToSchema)]
pub struct CourseDoc {
    pub id: uuid::Uuid,
    pub name: String,
    pub description: String,
    pub discipline: String,
    pub teacher: String,
    pub student_ids: Vec<uuid::Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct CourseDataDoc {
    pub data: CourseDoc,
}

/// Answers every command can give besides its success.
#[derive(IntoResponses)]
#[allow(dead_code)] // a description of responses, never built
pub enum CommandErrors {
    /// Malformed JSON, unknown fields, wrong types, or a bad header.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(ProblemDoc),
    /// No or unknown `x-api-key`.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(ProblemDoc),
    /// A read-only key.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(ProblemDoc),
    /// The addressed student, course or enrollment does not exist.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(ProblemDoc),
    /// A rule: `course-full`, `student-course-limit`, `already-exists`,
    /// `concurrent-modification`, `idempotency-key-in-use`.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(ProblemDoc),
    /// `If-Match` names another version.
    #[response(status = 412, content_type = "application/problem+json")]
    PreconditionFailed(ProblemDoc),
    /// The body is larger than the configured limit.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(ProblemDoc),
    /// The body is not `application/json`.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(ProblemDoc),
    /// Invalid fields (every one is named), or a reused `Idempotency-Key`.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(ProblemDoc),
    /// The event store did not answer; retry.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(ProblemDoc),
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "School command API",
        description = "Commands on students, courses and enrollments. Every accepted command \
                       answers its aggregate version as `ETag` and the stream position of its \
                       last event as `X-Consistency-Token`."
    ),
    paths(
        crate::http::register_student,
        crate::http::replace_student,
        crate::http::delete_student,
        crate::http::enroll,
        crate::http::unenroll,
        crate::http::create_course,
        crate::http::replace_course,
        crate::http::delete_course,
    ),
    modifiers(&ApiKeySecurity),
    security(("api_key" = [])),
    tags((name = "students"), (name = "courses"), (name = "enrollments"))
)]
pub struct ApiDoc;
