//! The peer: the same create command on cqrs-es + postgres-es (what a team might pick
//! instead), behind the same kind of axum handler, in its own process. Bench code only.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use postgres_es::PostgresCqrs;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Student {
    registered: bool,
}

#[derive(Debug, Deserialize)]
pub struct Register {
    name: String,
    first_name: String,
    last_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StudentEvent {
    Registered {
        name: String,
        first_name: String,
        last_name: String,
    },
}

impl DomainEvent for StudentEvent {
    fn event_type(&self) -> String {
        "StudentRegistered".into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StudentError {
    #[error("the student is already registered")]
    AlreadyRegistered,
}

impl Aggregate for Student {
    const TYPE: &'static str = "student";
    type Command = Register;
    type Event = StudentEvent;
    type Error = StudentError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Register,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), StudentError> {
        if self.registered {
            return Err(StudentError::AlreadyRegistered);
        }
        let event = StudentEvent::Registered {
            name: command.name,
            first_name: command.first_name,
            last_name: command.last_name,
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: StudentEvent) {
        match event {
            StudentEvent::Registered { .. } => self.registered = true,
        }
    }
}

/// The same validation the gateway does on a registration (lengths 3..=20).
fn valid(field: &str) -> bool {
    (3..=20).contains(&field.trim().chars().count())
}

async fn register(
    State(cqrs): State<Arc<PostgresCqrs<Student>>>,
    Json(body): Json<Register>,
) -> Response {
    if ![&body.name, &body.first_name, &body.last_name]
        .iter()
        .all(|f| valid(f))
    {
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    }
    let id = uuid::Uuid::now_v7().to_string();
    match cqrs.execute(&id, body).await {
        Ok(()) => (
            StatusCode::CREATED,
            Json(serde_json::json!({"data": {"id": id}})),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Serves `POST /api/students` on `http`, storing events in `database_url`.
pub async fn serve(http: SocketAddr, database_url: &str) -> anyhow::Result<()> {
    // postgres-es brings its own sqlx (0.8); the table is the one its documentation gives.
    let pool = sqlx_peer::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect(database_url)
        .await?;
    sqlx_peer::query(
        "CREATE TABLE IF NOT EXISTS events (
             aggregate_type text NOT NULL,
             aggregate_id   text NOT NULL,
             sequence       bigint CHECK (sequence >= 0) NOT NULL,
             event_type     text NOT NULL,
             event_version  text NOT NULL,
             payload        json NOT NULL,
             metadata       json NOT NULL,
             timestamp      timestamptz DEFAULT now(),
             PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(&pool)
    .await?;
    let cqrs = Arc::new(postgres_es::postgres_cqrs(pool, Vec::new(), ()));
    let app = axum::Router::new()
        .route("/api/students", post(register))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(cqrs);
    let listener = tokio::net::TcpListener::bind(http).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
