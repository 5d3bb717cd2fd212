//! The read API over gRPC (`proto/school/query/v1/query.proto`): the same lookups as REST,
//! standard health checking that follows readiness, and server reflection.

use std::future::Future;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use service_kit::trace;
use service_kit::{ApiKeys, Scope, metrics};
use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::Instrument;
use uuid::Uuid;

use crate::models::CourseView;
use crate::queries::{BadPageParameter, Page, PageRequest, Queries, QueryError};
use read_models::StudentView;

/// Generated from `proto/school/query/v1/query.proto`.
pub mod pb {
    tonic::include_proto!("school.query.v1");

    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/query_descriptor.bin"));
}

use pb::school_query_server::{SchoolQuery, SchoolQueryServer};

/// The fully qualified service name, as health checks and reflection know it.
pub const SERVICE_NAME: &str = "school.query.v1.SchoolQuery";
/// Metadata key of the API key (as the REST header).
pub const API_KEY_METADATA: &str = "x-api-key";
/// Metadata key of the read-your-writes token (as the REST header).
pub const CONSISTENCY_TOKEN_METADATA: &str = "x-consistency-token";
/// How often readiness is re-evaluated for the health service.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Serves gRPC on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    queries: Queries,
    keys: ApiKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let readiness = tokio::spawn(follow_readiness(health, queries.clone()));
    let metrics = GrpcMetrics::new();
    let service = SchoolQueryServer::new(GrpcQueries {
        queries,
        metrics,
        keys,
    });
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    readiness.abort();
    served.map_err(Into::into)
}

/// Keeps the health service's answer equal to `/readyz`: SERVING while both read models
/// answer, NOT_SERVING otherwise (for the whole server and for the query service).
async fn follow_readiness(health: tonic_health::server::HealthReporter, queries: Queries) {
    let mut last = None;
    loop {
        let ready = queries
            .models()
            .check()
            .await
            .iter()
            .all(|(_, check)| check.is_ok());
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE_NAME, status).await;
            last = Some(status);
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

// ---------------------------------------------------------------- auth and metrics

#[derive(Clone)]
struct GrpcMetrics {
    requests: Counter<u64>,
    duration: Histogram<f64>,
}

impl GrpcMetrics {
    fn new() -> Self {
        GrpcMetrics {
            requests: metrics::meter()
                .u64_counter("rpc.server.requests")
                .with_description("gRPC calls answered, by method and status code")
                .build(),
            duration: metrics::seconds_histogram(
                "rpc.server.call.duration",
                "Time to answer a gRPC call, by method and status code",
            ),
        }
    }

    fn record(&self, method: &'static str, code: tonic::Code, started: Instant) {
        let labels = [
            KeyValue::new("method", method),
            KeyValue::new("code", format!("{code:?}")),
        ];
        self.requests.add(1, &labels);
        self.duration
            .record(started.elapsed().as_secs_f64(), &labels);
    }
}

// ---------------------------------------------------------------- the service

struct GrpcQueries {
    queries: Queries,
    metrics: GrpcMetrics,
    keys: ApiKeys,
}

impl GrpcQueries {
    /// Runs one call in a span continuing the caller's `traceparent` (metadata), after
    /// checking its `x-api-key` (every scope may read), and records its method, status code
    /// and duration. Authentication is here rather than in an interceptor because only here
    /// is the method known, so refused calls are counted under their method.
    async fn timed<T>(
        &self,
        method: &'static str,
        metadata: &MetadataMap,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let traceparent = metadata
            .get(trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        let (context, parent, span) = trace::server_span_with_parent(traceparent, method);
        let start = service_kit::otlp::enabled().then(std::time::SystemTime::now);
        let presented = metadata.get(API_KEY_METADATA).map(|value| value.as_bytes());
        let result = match self.keys.authorize(presented, Scope::Read) {
            Ok(_) => call.instrument(span).await,
            Err(problem) => Err(refusal_status(problem)),
        };
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.record(method, code, started);
        if let Some(start) = start {
            service_kit::otlp::record(service_kit::otlp::FinishedSpan {
                name: format!("school.query.v1.SchoolQuery/{method}").into(),
                kind: opentelemetry::trace::SpanKind::Server,
                context,
                parent,
                start,
                end: std::time::SystemTime::now(),
                attributes: vec![
                    opentelemetry::KeyValue::new("rpc.system", "grpc"),
                    opentelemetry::KeyValue::new("rpc.method", method),
                    opentelemetry::KeyValue::new("rpc.grpc.status_code", code as i64),
                ],
                error: matches!(
                    code,
                    tonic::Code::Internal | tonic::Code::Unavailable | tonic::Code::Unknown
                )
                .then(|| format!("{code:?}")),
            });
        }
        result.map(Response::new)
    }
}

/// The gRPC form of an authentication refusal; a spent rate budget carries `retry-after`
/// metadata (seconds), like the REST header.
fn refusal_status(problem: service_kit::Problem) -> Status {
    let detail = problem.detail.unwrap_or_default();
    match problem.status {
        axum::http::StatusCode::FORBIDDEN => Status::permission_denied(detail),
        axum::http::StatusCode::TOO_MANY_REQUESTS => {
            let mut status = Status::resource_exhausted(detail);
            if let Some(seconds) = problem.retry_after_seconds {
                status.metadata_mut().insert("retry-after", seconds.into());
            }
            status
        }
        _ => Status::unauthenticated(detail),
    }
}

#[tonic::async_trait]
impl SchoolQuery for GrpcQueries {
    async fn get_student(
        &self,
        request: Request<pb::GetStudentRequest>,
    ) -> Result<Response<pb::Student>, Status> {
        self.timed("GetStudent", request.metadata(), async {
            let token = token(request.metadata())?;
            let id = parse_id(&request.get_ref().id, "id")?;
            let student = self.queries.student(id, token).await.map_err(status)?;
            student
                .map(pb::Student::from)
                .ok_or_else(|| Status::not_found(format!("no student with id {id}")))
        })
        .await
    }

    async fn list_students(
        &self,
        request: Request<pb::ListStudentsRequest>,
    ) -> Result<Response<pb::ListStudentsResponse>, Status> {
        self.timed("ListStudents", request.metadata(), async {
            let token = token(request.metadata())?;
            let body = request.get_ref();
            let page = page_request(body.page_size, &body.page_token)?;
            let students = self.queries.students(page, token).await.map_err(status)?;
            Ok(students.into())
        })
        .await
    }

    async fn list_student_courses(
        &self,
        request: Request<pb::ListStudentCoursesRequest>,
    ) -> Result<Response<pb::ListCoursesResponse>, Status> {
        self.timed("ListStudentCourses", request.metadata(), async {
            let token = token(request.metadata())?;
            let body = request.get_ref();
            let id = parse_id(&body.student_id, "student_id")?;
            let page = page_request(body.page_size, &body.page_token)?;
            let courses = self
                .queries
                .student_courses(id, page, token)
                .await
                .map_err(status)?
                .ok_or_else(|| Status::not_found(format!("no student with id {id}")))?;
            Ok(courses.into())
        })
        .await
    }

    async fn get_course(
        &self,
        request: Request<pb::GetCourseRequest>,
    ) -> Result<Response<pb::Course>, Status> {
        self.timed("GetCourse", request.metadata(), async {
            let token = token(request.metadata())?;
            let id = parse_id(&request.get_ref().id, "id")?;
            let course = self.queries.course(id, token).await.map_err(status)?;
            course
                .map(pb::Course::from)
                .ok_or_else(|| Status::not_found(format!("no course with id {id}")))
        })
        .await
    }

    async fn list_courses(
        &self,
        request: Request<pb::ListCoursesRequest>,
    ) -> Result<Response<pb::ListCoursesResponse>, Status> {
        self.timed("ListCourses", request.metadata(), async {
            let token = token(request.metadata())?;
            let body = request.get_ref();
            let page = page_request(body.page_size, &body.page_token)?;
            let courses = self.queries.courses(page, token).await.map_err(status)?;
            Ok(courses.into())
        })
        .await
    }

    async fn list_course_students(
        &self,
        request: Request<pb::ListCourseStudentsRequest>,
    ) -> Result<Response<pb::ListStudentsResponse>, Status> {
        self.timed("ListCourseStudents", request.metadata(), async {
            let token = token(request.metadata())?;
            let body = request.get_ref();
            let id = parse_id(&body.course_id, "course_id")?;
            let page = page_request(body.page_size, &body.page_token)?;
            let students = self
                .queries
                .course_students(id, page, token)
                .await
                .map_err(status)?
                .ok_or_else(|| Status::not_found(format!("no course with id {id}")))?;
            Ok(students.into())
        })
        .await
    }
}

// ---------------------------------------------------------------- edges

fn parse_id(raw: &str, field: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(raw)
        .map_err(|_| Status::invalid_argument(format!("`{field}` must be a UUID, got {raw:?}")))
}

/// `page_size` 0 is the default (proto3 cannot tell it from unset).
fn page_request(page_size: u32, page_token: &str) -> Result<PageRequest, Status> {
    let limit = (page_size != 0).then_some(i64::from(page_size));
    PageRequest::parse(limit, Some(page_token)).map_err(|BadPageParameter { field, detail }| {
        let field = if field == "limit" {
            "page_size"
        } else {
            "page_token"
        };
        Status::invalid_argument(format!("`{field}` {detail}"))
    })
}

fn token(metadata: &MetadataMap) -> Result<Option<u64>, Status> {
    let Some(raw) = metadata.get(CONSISTENCY_TOKEN_METADATA) else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(
                "`x-consistency-token` must be the decimal stream position a command returned",
            )
        })
}

fn status(error: QueryError) -> Status {
    match error {
        QueryError::Unavailable(_) => Status::unavailable("the read model is unavailable; retry"),
        QueryError::NotReached(position) => Status::unavailable(format!(
            "the read models have not reached position {position} yet; retry"
        )),
    }
}

fn ids(ids: Vec<Uuid>) -> Vec<String> {
    ids.into_iter().map(|id| id.to_string()).collect()
}

impl From<StudentView> for pb::Student {
    fn from(view: StudentView) -> Self {
        pb::Student {
            id: view.id.to_string(),
            name: view.name,
            first_name: view.first_name,
            last_name: view.last_name,
            course_ids: ids(view.course_ids),
            version: u64::try_from(view.version).unwrap_or(0),
        }
    }
}

impl From<CourseView> for pb::Course {
    fn from(view: CourseView) -> Self {
        pb::Course {
            id: view.id.to_string(),
            name: view.name,
            description: view.description,
            discipline: view.discipline,
            teacher: view.teacher,
            student_ids: ids(view.student_ids),
            version: view.version,
        }
    }
}

impl From<Page<StudentView>> for pb::ListStudentsResponse {
    fn from(page: Page<StudentView>) -> Self {
        pb::ListStudentsResponse {
            students: page.items.into_iter().map(pb::Student::from).collect(),
            next_page_token: page.next_cursor.unwrap_or_default(),
        }
    }
}

impl From<Page<CourseView>> for pb::ListCoursesResponse {
    fn from(page: Page<CourseView>) -> Self {
        pb::ListCoursesResponse {
            courses: page.items.into_iter().map(pb::Course::from).collect(),
            next_page_token: page.next_cursor.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_parameters_are_named_as_in_the_proto() {
        assert_eq!(page_request(0, "").expect("defaults").limit, 20);
        let error = page_request(101, "").expect_err("too big");
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(error.message().contains("page_size"), "{}", error.message());
        let error = page_request(5, "nope").expect_err("foreign token");
        assert!(
            error.message().contains("page_token"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn tokens_come_from_metadata() {
        let mut metadata = MetadataMap::new();
        assert_eq!(token(&metadata).expect("none"), None);
        metadata.insert(CONSISTENCY_TOKEN_METADATA, "17".parse().expect("ascii"));
        assert_eq!(token(&metadata).expect("decimal"), Some(17));
        metadata.insert(CONSISTENCY_TOKEN_METADATA, "x".parse().expect("ascii"));
        assert_eq!(
            token(&metadata).expect_err("not a number").code(),
            tonic::Code::InvalidArgument
        );
    }
}
