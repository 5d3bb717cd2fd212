//! The gRPC surface through generated tonic clients: reflection, health that follows
//! readiness, and every lookup, against the real system.

mod common;

use std::time::Duration;

use common::{Options, TestSystem};
use prost::Message;
use query_api::grpc::SERVICE_NAME;
use query_api::grpc::pb::school_query_client::SchoolQueryClient;
use query_api::grpc::pb::{
    GetCourseRequest, GetStudentRequest, ListCourseStudentsRequest, ListCoursesRequest,
    ListStudentCoursesRequest, ListStudentsRequest,
};
use test_support::READ_KEY;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn channel(system: &TestSystem) -> Channel {
    test_support::eventually(10, "the gRPC server to accept connections", || async {
        Channel::from_shared(system.grpc.clone())
            .ok()?
            .connect()
            .await
            .ok()
    })
    .await
}

/// A request with the read key and, optionally, a consistency token.
fn request<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-api-key", READ_KEY.parse().expect("ascii"));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("x-consistency-token", token.parse().expect("ascii"));
    }
    request
}

/// The status code a call ended with.
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn reflect(channel: Channel, message: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel);
    let outbound = futures::stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    }]);
    let mut inbound = client
        .server_reflection_info(outbound)
        .await
        .expect("reflection call")
        .into_inner();
    inbound
        .message()
        .await
        .expect("reflection answer")
        .and_then(|response| response.message_response)
        .expect("a response message")
}

#[tokio::test]
async fn reflection_lists_the_services_and_describes_the_query_service() {
    let system = TestSystem::start(Options::default()).await;
    let channel = channel(&system).await;

    let MessageResponse::ListServicesResponse(list) =
        reflect(channel.clone(), MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [SERVICE_NAME, "grpc.health.v1.Health"] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }

    let MessageResponse::FileDescriptorResponse(files) = reflect(
        channel,
        MessageRequest::FileContainingSymbol(SERVICE_NAME.into()),
    )
    .await
    else {
        panic!("not a file descriptor");
    };
    let methods: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("decodes"))
        .flat_map(|file| file.service)
        .flat_map(|service| service.method)
        .filter_map(|method| method.name)
        .collect();
    assert_eq!(
        methods,
        [
            "GetStudent",
            "ListStudents",
            "ListStudentCourses",
            "GetCourse",
            "ListCourses",
            "ListCourseStudents"
        ]
    );
    system.cleanup().await;
}

#[tokio::test]
async fn health_is_serving_while_the_read_models_answer_and_not_serving_after() {
    let system = TestSystem::start(Options::default()).await;
    let mut health = HealthClient::new(channel(&system).await);
    for service in ["", SERVICE_NAME] {
        let status = test_support::eventually(10, "a serving status", || {
            let mut health = health.clone();
            async move {
                let response = health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .ok()?;
                Some(response.into_inner().status)
            }
        })
        .await;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);

    // The read models go away: the health service follows readiness.
    let admin = sqlx::PgPool::connect(&test_support::database_url())
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {} WITH (FORCE)",
        system.db.name
    )))
    .execute(&admin)
    .await
    .expect("dropped");
    test_support::eventually(10, "NOT_SERVING after the database is gone", || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: SERVICE_NAME.into(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (status == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    system.broker.cleanup().await;
}

#[tokio::test]
async fn every_lookup_answers_what_was_written() {
    let system = TestSystem::start(Options::default()).await;
    let algebra = system.create_course("Algebra").await;
    let physics = system.create_course("Physics").await;
    let ada = system.register_student("Ada L").await;
    let alan = system.register_student("Alan T").await;
    system.enroll(&ada.id, &algebra.id).await;
    system.enroll(&ada.id, &physics.id).await;
    let last = system.enroll(&alan.id, &algebra.id).await;
    let token = Some(last.token.as_str());
    let mut client = SchoolQueryClient::new(channel(&system).await);

    let student = client
        .get_student(request(GetStudentRequest { id: ada.id.clone() }, token))
        .await
        .expect("GetStudent")
        .into_inner();
    assert_eq!(student.name, "Ada L");
    let mut ada_courses = vec![algebra.id.clone(), physics.id.clone()];
    ada_courses.sort();
    assert_eq!(student.course_ids, ada_courses);
    assert!(student.version > 0);

    let course = client
        .get_course(request(
            GetCourseRequest {
                id: algebra.id.clone(),
            },
            token,
        ))
        .await
        .expect("GetCourse")
        .into_inner();
    assert_eq!(course.teacher, "Teacher");
    let mut algebra_students = vec![ada.id.clone(), alan.id.clone()];
    algebra_students.sort();
    assert_eq!(course.student_ids, algebra_students);

    // Two pages of one student each, then the end.
    let first = client
        .list_students(request(
            ListStudentsRequest {
                page_size: 1,
                page_token: String::new(),
            },
            token,
        ))
        .await
        .expect("ListStudents")
        .into_inner();
    assert_eq!(first.students.len(), 1);
    assert_eq!(first.students[0].id, ada.id);
    let second = client
        .list_students(request(
            ListStudentsRequest {
                page_size: 1,
                page_token: first.next_page_token,
            },
            None,
        ))
        .await
        .expect("ListStudents")
        .into_inner();
    assert_eq!(second.students[0].id, alan.id);

    let courses = client
        .list_courses(request(ListCoursesRequest::default(), token))
        .await
        .expect("ListCourses")
        .into_inner();
    let names: Vec<&str> = courses.courses.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["Algebra", "Physics"]);
    assert_eq!(courses.next_page_token, "");

    let of_ada = client
        .list_student_courses(request(
            ListStudentCoursesRequest {
                student_id: ada.id.clone(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("ListStudentCourses")
        .into_inner();
    let ids: Vec<&str> = of_ada.courses.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ada_courses);

    let in_algebra = client
        .list_course_students(request(
            ListCourseStudentsRequest {
                course_id: algebra.id.clone(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("ListCourseStudents")
        .into_inner();
    let ids: Vec<&str> = in_algebra.students.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, algebra_students);
    system.cleanup().await;
}

#[tokio::test]
async fn errors_have_the_grpc_codes_of_their_rest_statuses() {
    let system = TestSystem::start(Options {
        projectors: false,
        consistency_wait: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let mut client = SchoolQueryClient::new(channel(&system).await);
    let unknown = uuid::Uuid::now_v7().to_string();
    let get = |id: &str| GetStudentRequest { id: id.into() };

    assert_eq!(
        code(client.get_student(request(get(&unknown), None)).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .get_course(request(
                    GetCourseRequest {
                        id: unknown.clone()
                    },
                    None
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .list_course_students(request(
                    ListCourseStudentsRequest {
                        course_id: unknown.clone(),
                        ..Default::default()
                    },
                    None
                ))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(client.get_student(request(get("not-a-uuid"), None)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            client
                .list_students(request(
                    ListStudentsRequest {
                        page_size: 101,
                        page_token: String::new()
                    },
                    None
                ))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.get_student(Request::new(get(&unknown))).await),
        Code::Unauthenticated
    );
    let mut wrong_key = Request::new(get(&unknown));
    wrong_key
        .metadata_mut()
        .insert("x-api-key", "nope".parse().expect("ascii"));
    assert_eq!(
        code(client.get_student(wrong_key).await),
        Code::Unauthenticated
    );
    // Refused calls are counted under their method, not as "unknown".
    let exposition = service_kit::metrics::render();
    assert!(
        exposition
            .contains(r#"rpc_server_requests_total{code="Unauthenticated",method="GetStudent"} 2"#),
        "{exposition}"
    );

    // Nothing projects: a token cannot be reached in time.
    let ada = system.register_student("Ada L").await;
    assert_eq!(
        code(
            client
                .get_student(request(get(&ada.id), Some(&ada.token)))
                .await
        ),
        Code::Unavailable
    );
    system.cleanup().await;
}

#[tokio::test]
async fn rest_and_grpc_spend_one_rate_budget_per_key() {
    let system = TestSystem::start(Options {
        projectors: false,
        query_rate_limit: service_kit::RateLimit::new(1, 2),
        ..Options::default()
    })
    .await;
    let mut client = SchoolQueryClient::new(channel(&system).await);
    let unknown = uuid::Uuid::now_v7().to_string();
    let get = || GetStudentRequest {
        id: unknown.clone(),
    };
    let rest = || async {
        system
            .http
            .get(format!("{}/api/students/{unknown}", system.query))
            .header("x-api-key", READ_KEY)
            .send()
            .await
            .expect("request")
    };
    // A burst of two: one over REST, one over gRPC.
    assert_eq!(rest().await.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(
        code(client.get_student(request(get(), None)).await),
        Code::NotFound
    );
    // The budget is spent for both protocols.
    let refused = rest().await;
    assert_eq!(refused.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let status = client
        .get_student(request(get(), None))
        .await
        .expect_err("over the rate");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    // Another key is not affected.
    let writer = system
        .http
        .get(format!("{}/api/students/{unknown}", system.query))
        .header("x-api-key", test_support::WRITE_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(writer.status(), reqwest::StatusCode::NOT_FOUND);
    system.cleanup().await;
}
