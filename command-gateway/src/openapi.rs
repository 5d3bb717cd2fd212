//! The OpenAPI document of the command API (`/openapi.json`, Swagger UI at `/docs`).

use serde::Serialize;
use service_kit::openapi::{ApiKeySecurity, ProblemDoc};
use utoipa::openapi::schema::{Object, Type};
use utoipa::{IntoResponses, OpenApi, ToSchema};

use crate::domain::fields::{DESCRIPTION_MAX, SHORT_TEXT_MAX, SHORT_TEXT_MIN};

/// What `str::trim` removes: Unicode `White_Space`, as a regex class.
const WHITE_SPACE: &str = r"[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// A character that is neither white space nor a control character: the first and last
/// character of a trimmed text.
const VISIBLE: &str =
    r"[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";
/// Any character but a control character (general category `Cc`).
const NOT_CONTROL: &str = r"[^\u0000-\u001f\u007f-\u009f]";

/// The rule of `BoundedText` as a pattern: after trimming white space, `SHORT_TEXT_MIN..=max`
/// characters and no control character. (`minLength`/`maxLength` would count the white
/// space the server trims.)
fn bounded_text(max: usize, description: &str) -> Object {
    let pattern = format!(
        "^{WHITE_SPACE}*{VISIBLE}{NOT_CONTROL}{{{},{}}}{VISIBLE}{WHITE_SPACE}*$",
        SHORT_TEXT_MIN - 2,
        max - 2
    );
    Object::builder()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
        .build()
}

/// A name-like field: 3 to 20 characters once trimmed.
pub fn short_text() -> Object {
    bounded_text(
        SHORT_TEXT_MAX,
        "3 to 20 characters (Unicode scalar values), counted after trimming white space; \
         no control characters",
    )
}

/// A course description: 3 to 200 characters once trimmed.
pub fn description_text() -> Object {
    bounded_text(
        DESCRIPTION_MAX,
        "3 to 200 characters (Unicode scalar values), counted after trimming white space; \
         no control characters",
    )
}

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

/// Answers every command can give besides its success (`401`, `403` and `429` are added to
/// every operation by [`ApiKeySecurity`]).
#[derive(IntoResponses)]
#[allow(dead_code)] // a description of responses, never built
pub enum CommandErrors {
    /// Malformed JSON, unknown fields, wrong types, or a bad header.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(ProblemDoc),
    /// The addressed student, course or enrollment does not exist.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(ProblemDoc),
    /// A rule: `course-full`, `student-course-limit`, `already-exists`,
    /// `concurrent-modification` (with `Retry-After`), `idempotency-key-in-use`.
    #[response(
        status = 409,
        content_type = "application/problem+json",
        headers(("retry-after" = u64, description = "Seconds to wait before retrying"))
    )]
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
    /// The event store did not answer; retry after `Retry-After` seconds.
    #[response(
        status = 503,
        content_type = "application/problem+json",
        headers(("retry-after" = u64, description = "Seconds to wait before retrying"))
    )]
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
        crate::http::erase_student,
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
