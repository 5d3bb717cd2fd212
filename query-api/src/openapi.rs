//! The OpenAPI document of the read API (`/openapi.json`, Swagger UI at `/docs`).

use service_kit::openapi::{ApiKeySecurity, ProblemDoc};
use utoipa::{IntoResponses, OpenApi};

use crate::http::{CourseJson, Data, PageJson, StudentJson};

/// Answers every read can give besides its success (`401`, `403` and `429` are added to
/// every operation by [`ApiKeySecurity`]).
#[derive(IntoResponses)]
#[allow(dead_code)] // a description of responses, never built
pub enum ReadErrors {
    /// A bad header, such as a non-numeric `X-Consistency-Token`.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(ProblemDoc),
    /// No such student or course (also for ids that are not UUIDs).
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(ProblemDoc),
    /// A bad `limit` or a `cursor` this API did not issue.
    #[response(status = 422, content_type = "application/problem+json")]
    Invalid(ProblemDoc),
    /// A read model is unreachable, or did not reach the consistency token in time;
    /// `Retry-After` says when to retry.
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
        title = "School read API",
        description = "Students and courses as the projections hold them. Send a command's \
                       `X-Consistency-Token` to read your own write."
    ),
    paths(
        crate::http::list_students,
        crate::http::get_student,
        crate::http::student_courses,
        crate::http::list_courses,
        crate::http::get_course,
        crate::http::course_students,
    ),
    components(schemas(
        StudentJson,
        CourseJson,
        Data<StudentJson>,
        Data<CourseJson>,
        PageJson<StudentJson>,
        PageJson<CourseJson>
    )),
    modifiers(&ApiKeySecurity),
    security(("api_key" = [])),
    tags((name = "students"), (name = "courses"))
)]
pub struct ApiDoc;
