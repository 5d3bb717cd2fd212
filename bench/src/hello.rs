//! The raw ceilings of the read benchmarks: hello-world handlers with nothing behind them,
//! answering a constant student of the same shape, in their own process.

use std::net::SocketAddr;

use axum::routing::get;
use query_api::grpc::pb;
use query_api::grpc::pb::school_query_server::{SchoolQuery, SchoolQueryServer};
use tonic::{Request, Response, Status};

const ID: &str = "01938a3c-6f1e-7c4a-9b1e-3d2f5a6b7c8d";

fn student() -> pb::Student {
    pb::Student {
        id: ID.into(),
        name: "Ada L".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        course_ids: Vec::new(),
        version: 1,
    }
}

pub async fn serve(http: SocketAddr, grpc: SocketAddr) -> anyhow::Result<()> {
    let body = serde_json::json!({"data": {"id": ID, "name": "Ada L", "first_name": "Ada", "last_name": "Lovelace", "course_ids": []}});
    let app = axum::Router::new().route(
        "/api/students/{id}",
        get(move || {
            let body = body.clone();
            async move { axum::Json(body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(http).await?;
    let http = tokio::spawn(async move { axum::serve(listener, app).await });
    let grpc = tonic::transport::Server::builder()
        .add_service(SchoolQueryServer::new(Hello))
        .serve(grpc);
    tokio::select! {
        result = http => result??,
        result = grpc => result?,
    }
    Ok(())
}

struct Hello;

#[tonic::async_trait]
impl SchoolQuery for Hello {
    async fn get_student(
        &self,
        _: Request<pb::GetStudentRequest>,
    ) -> Result<Response<pb::Student>, Status> {
        Ok(Response::new(student()))
    }

    async fn list_students(
        &self,
        _: Request<pb::ListStudentsRequest>,
    ) -> Result<Response<pb::ListStudentsResponse>, Status> {
        Err(Status::unimplemented("hello-world server"))
    }

    async fn list_student_courses(
        &self,
        _: Request<pb::ListStudentCoursesRequest>,
    ) -> Result<Response<pb::ListCoursesResponse>, Status> {
        Err(Status::unimplemented("hello-world server"))
    }

    async fn get_course(
        &self,
        _: Request<pb::GetCourseRequest>,
    ) -> Result<Response<pb::Course>, Status> {
        Err(Status::unimplemented("hello-world server"))
    }

    async fn list_courses(
        &self,
        _: Request<pb::ListCoursesRequest>,
    ) -> Result<Response<pb::ListCoursesResponse>, Status> {
        Err(Status::unimplemented("hello-world server"))
    }

    async fn list_course_students(
        &self,
        _: Request<pb::ListCourseStudentsRequest>,
    ) -> Result<Response<pb::ListStudentsResponse>, Status> {
        Err(Status::unimplemented("hello-world server"))
    }
}
