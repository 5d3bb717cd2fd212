//! The REST read surface: `{"data": ...}` envelopes, keyset pagination, ETags,
//! read-your-writes with `X-Consistency-Token`, and problem+json for every failure.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use serde::{Deserialize, Serialize};
use service_kit::auth::{ScopeGuard, require_scope};
use service_kit::observe::ObserveLayer;
use service_kit::{ApiKeys, FieldError, Problem, Scope, health, metrics, problem};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;
use uuid::Uuid;

use crate::models::CourseView;
use crate::openapi::{ApiDoc, ReadErrors};
use crate::queries::{BadPageParameter, Page, PageRequest, Queries, QueryError};
use read_models::StudentView;

/// Header naming the stream position a read must reflect.
pub const CONSISTENCY_TOKEN_HEADER: &str = "x-consistency-token";

pub fn router(queries: Queries, keys: ApiKeys) -> Router {
    let reads = Router::new()
        .route("/api/students", get(list_students))
        .route("/api/students/{id}", get(get_student))
        .route("/api/students/{id}/courses", get(student_courses))
        .route("/api/courses", get(list_courses))
        .route("/api/courses/{id}", get(get_course))
        .route("/api/courses/{id}/students", get(course_students))
        .route_layer(middleware::from_fn_with_state(
            ScopeGuard {
                keys,
                needed: Scope::Read,
            },
            require_scope,
        ));
    Router::new()
        .merge(reads)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::metrics_handler))
        // Before the layers, so unknown routes and wrong methods are counted and traced too.
        .fallback(problem::route_not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(ObserveLayer)
        .with_state(queries)
}

async fn readyz(State(queries): State<Queries>) -> Response {
    health::readiness(queries.models().check().await)
}

// ---------------------------------------------------------------- the JSON the API shows

/// A student.
#[derive(Serialize, ToSchema)]
pub struct StudentJson {
    pub id: Uuid,
    pub name: String,
    pub first_name: String,
    pub last_name: String,
    /// The courses the student is enrolled in, in id order.
    pub course_ids: Vec<Uuid>,
}

impl From<StudentView> for StudentJson {
    fn from(view: StudentView) -> Self {
        StudentJson {
            id: view.id,
            name: view.name,
            first_name: view.first_name,
            last_name: view.last_name,
            course_ids: view.course_ids,
        }
    }
}

/// A course.
#[derive(Serialize, ToSchema)]
pub struct CourseJson {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub discipline: String,
    pub teacher: String,
    /// The students enrolled, in id order.
    pub student_ids: Vec<Uuid>,
}

impl From<CourseView> for CourseJson {
    fn from(view: CourseView) -> Self {
        CourseJson {
            id: view.id,
            name: view.name,
            description: view.description,
            discipline: view.discipline,
            teacher: view.teacher,
            student_ids: view.student_ids,
        }
    }
}

/// The `{"data": ...}` envelope of the replaced system.
#[derive(Serialize, ToSchema)]
pub struct Data<T> {
    pub data: T,
}

/// A page of a list: `data` stays an array, the next page is named beside it.
#[derive(Serialize, ToSchema)]
pub struct PageJson<T> {
    pub data: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<V, J: From<V>> From<Page<V>> for PageJson<J> {
    fn from(page: Page<V>) -> Self {
        PageJson {
            data: page.items.into_iter().map(J::from).collect(),
            next_cursor: page.next_cursor,
        }
    }
}

/// Paging of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page, 1 to 100 (default 20).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Read-your-writes.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documents the header; handlers read it from the HeaderMap
pub struct ConsistencyHeader {
    /// The `X-Consistency-Token` a command answered: the read waits (bounded) until the
    /// read models reflect that write, else answers `503` with `Retry-After`. A position
    /// past the end of the stream waits for the end of the stream.
    #[param(rename = "x-consistency-token", value_type = Option<u64>, nullable = false)]
    x_consistency_token: Option<String>,
}

// ---------------------------------------------------------------- handlers

/// List students in creation order.
#[utoipa::path(
    get, path = "/api/students", tag = "students",
    params(ListParams, ConsistencyHeader),
    responses((status = 200, description = "A page of students", body = PageJson<StudentJson>), ReadErrors)
)]
pub async fn list_students(
    State(queries): State<Queries>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let page = page_request(params)?;
    let students = queries.students(page, token(&headers)?).await;
    Ok(Json(PageJson::<StudentJson>::from(students.map_err(problem)?)).into_response())
}

/// List courses in creation order.
#[utoipa::path(
    get, path = "/api/courses", tag = "courses",
    params(ListParams, ConsistencyHeader),
    responses((status = 200, description = "A page of courses", body = PageJson<CourseJson>), ReadErrors)
)]
pub async fn list_courses(
    State(queries): State<Queries>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let page = page_request(params)?;
    let courses = queries.courses(page, token(&headers)?).await;
    Ok(Json(PageJson::<CourseJson>::from(courses.map_err(problem)?)).into_response())
}

/// One student with its course ids; `ETag` is its version.
#[utoipa::path(
    get, path = "/api/students/{id}", tag = "students",
    params(("id" = Uuid, Path), ConsistencyHeader),
    responses(
        (status = 200, description = "The student", body = Data<StudentJson>, headers(("ETag" = String, description = "The student's version"))),
        (status = 304, description = "`If-None-Match` names the current version"),
        ReadErrors
    )
)]
pub async fn get_student(
    State(queries): State<Queries>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = path_id(&id, "student")?;
    let student = queries
        .student(id, token(&headers)?)
        .await
        .map_err(problem)?
        .ok_or_else(|| Problem::not_found(format!("no student with id {id}")))?;
    let version = u64::try_from(student.version).unwrap_or(0);
    Ok(tagged(&headers, version, || Data {
        data: StudentJson::from(student),
    }))
}

/// One course with its student ids; `ETag` is its version.
#[utoipa::path(
    get, path = "/api/courses/{id}", tag = "courses",
    params(("id" = Uuid, Path), ConsistencyHeader),
    responses(
        (status = 200, description = "The course", body = Data<CourseJson>, headers(("ETag" = String, description = "The course's version"))),
        (status = 304, description = "`If-None-Match` names the current version"),
        ReadErrors
    )
)]
pub async fn get_course(
    State(queries): State<Queries>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = path_id(&id, "course")?;
    let course = queries
        .course(id, token(&headers)?)
        .await
        .map_err(problem)?
        .ok_or_else(|| Problem::not_found(format!("no course with id {id}")))?;
    let version = course.version;
    Ok(tagged(&headers, version, || Data {
        data: CourseJson::from(course),
    }))
}

/// The courses a student is enrolled in, in id order.
#[utoipa::path(
    get, path = "/api/students/{id}/courses", tag = "students",
    params(("id" = Uuid, Path), ListParams, ConsistencyHeader),
    responses((status = 200, description = "A page of the student's courses", body = PageJson<CourseJson>), ReadErrors)
)]
pub async fn student_courses(
    State(queries): State<Queries>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = path_id(&id, "student")?;
    let page = page_request(params)?;
    let courses = queries
        .student_courses(id, page, token(&headers)?)
        .await
        .map_err(problem)?
        .ok_or_else(|| Problem::not_found(format!("no student with id {id}")))?;
    Ok(Json(PageJson::<CourseJson>::from(courses)).into_response())
}

/// The students enrolled in a course, in id order.
#[utoipa::path(
    get, path = "/api/courses/{id}/students", tag = "courses",
    params(("id" = Uuid, Path), ListParams, ConsistencyHeader),
    responses((status = 200, description = "A page of the course's students", body = PageJson<StudentJson>), ReadErrors)
)]
pub async fn course_students(
    State(queries): State<Queries>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = path_id(&id, "course")?;
    let page = page_request(params)?;
    let students = queries
        .course_students(id, page, token(&headers)?)
        .await
        .map_err(problem)?
        .ok_or_else(|| Problem::not_found(format!("no course with id {id}")))?;
    Ok(Json(PageJson::<StudentJson>::from(students)).into_response())
}

// ---------------------------------------------------------------- edges

fn page_request(params: Result<Query<ListParams>, QueryRejection>) -> Result<PageRequest, Problem> {
    let Query(params) = params.map_err(|e| Problem::bad_request(e.body_text()))?;
    // A limit that is not a decimal number is out of range either way; PageRequest names
    // the rule.
    let limit = params
        .limit
        .as_deref()
        .map(|raw| decimal(raw).map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    PageRequest::parse(limit, params.cursor.as_deref()).map_err(bad_page)
}

fn bad_page(error: BadPageParameter) -> Problem {
    Problem::validation(vec![FieldError::new(error.field, error.detail)])
}

/// The `X-Consistency-Token` of the request, if any.
fn token(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let Some(raw) = headers.get(CONSISTENCY_TOKEN_HEADER) else {
        return Ok(None);
    };
    // Positions are stored as Postgres `bigint`s and documented as `int64`.
    raw.to_str()
        .ok()
        .and_then(|v| decimal(v.trim()))
        .filter(|position| i64::try_from(*position).is_ok())
        .map(Some)
        .ok_or_else(|| {
            Problem::bad_request(
                "`X-Consistency-Token` must be the decimal stream position a command returned",
            )
        })
}

/// Plain decimal digits, as the document's integers are written (no sign, no spaces).
fn decimal(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

fn problem(error: QueryError) -> Problem {
    match error {
        QueryError::Unavailable(_) => Problem::unavailable("the read model is unavailable; retry"),
        QueryError::NotReached(position) => Problem::unavailable(format!(
            "the read models have not reached position {position} yet; retry"
        )),
    }
}

/// A path id that is not a UUID names no resource.
fn path_id(raw: &str, kind: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| Problem::not_found(format!("no {kind} with id {raw}")))
}

/// A single item with its version as `ETag`, or `304` when the client has it.
fn tagged<T: Serialize>(headers: &HeaderMap, version: u64, body: impl FnOnce() -> T) -> Response {
    let etag = format!("\"{version}\"");
    let mut response = if if_none_match(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Json(body()).into_response()
    };
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn tokens_are_decimal_positions() {
        let mut headers = HeaderMap::new();
        assert_eq!(token(&headers).expect("none"), None);
        headers.insert(CONSISTENCY_TOKEN_HEADER, HeaderValue::from_static(" 42 "));
        assert_eq!(token(&headers).expect("decimal"), Some(42));
        headers.insert(CONSISTENCY_TOKEN_HEADER, HeaderValue::from_static("abc"));
        assert!(token(&headers).is_err());
        for bad in ["+42", "9223372036854775808"] {
            headers.insert(CONSISTENCY_TOKEN_HEADER, HeaderValue::from_static(bad));
            assert!(token(&headers).is_err(), "{bad}");
        }
    }
}
