//! The whole system in one test process, on this test's own streams, database and Redis:
//! the real gateway router, both real projection loops, and query-api's REST and gRPC
//! servers.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;
use std::time::Duration;

use projectors::redis_cache::RedisInvalidator;
use projectors::{ProjectionProgress, ProjectionRunner};
use query_api::Queries;
use query_api::cache::Cache;
use query_api::consistency::Consistency;
use query_api::models::ReadModels;
use read_models::{CourseStore, PgStudents};
use reqwest::StatusCode;
use serde_json::{Value, json};
use test_support::{READ_KEY, RedisServer, TestBroker, TestDatabase, WRITE_KEY, free_port};
use tokio::sync::watch;

pub struct Options {
    pub redis: bool,
    pub projectors: bool,
    /// Whether the projectors invalidate the cache (off: as if every invalidation was lost).
    pub invalidate: bool,
    pub consistency_wait: Duration,
    /// Per-key rate limit of query-api (REST and gRPC share each key's budget).
    pub query_rate_limit: Option<service_kit::RateLimit>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            redis: true,
            projectors: true,
            invalidate: true,
            consistency_wait: Duration::from_secs(5),
            query_rate_limit: None,
        }
    }
}

pub struct TestSystem {
    pub gateway: String,
    pub query: String,
    pub grpc: String,
    pub http: reqwest::Client,
    pub broker: TestBroker,
    pub db: TestDatabase,
    pub redis: Option<RedisServer>,
    stop_projectors: watch::Sender<bool>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    pub fn is_problem(&self) -> bool {
        self.header("content-type") == "application/problem+json"
    }

    /// The ids of a list answer, in order.
    pub fn ids(&self) -> Vec<String> {
        self.body["data"]
            .as_array()
            .unwrap_or_else(|| panic!("a list: {}", self.body))
            .iter()
            .map(|item| item["id"].as_str().expect("id").to_owned())
            .collect()
    }
}

/// What a command answered: the new id (for creations) and the consistency token.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: String,
    pub token: String,
}

impl TestSystem {
    pub async fn start(options: Options) -> TestSystem {
        let broker = TestBroker::start().await;
        let db = TestDatabase::create().await;
        let redis = if options.redis {
            let server = RedisServer::start(free_port());
            server.ready().await;
            Some(server)
        } else {
            None
        };
        let redis_url = redis.as_ref().map(RedisServer::url);

        // Migrations run when the projectors' stores open.
        let students = PgStudents::with_pool(db.pool.clone())
            .await
            .expect("students read model migrated");
        let courses = CourseStore::connect(&db.url)
            .await
            .expect("courses read model migrated");
        let (stop_projectors, stopped) = watch::channel(false);
        if options.projectors {
            let progress = Arc::new(ProjectionProgress::default());
            let invalidator = |projection| {
                let url = redis_url.as_deref().filter(|_| options.invalidate);
                url.map(|url| Arc::new(RedisInvalidator::new(url, projection).expect("redis url")))
            };
            let until_stopped = |mut rx: watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            tokio::spawn(
                ProjectionRunner {
                    reader: service_kit::event_reader::EventReader::lazy(
                        broker.jetstream.clone(),
                        broker.names.clone(),
                        test_support::test_kek(),
                    ),
                    jetstream: broker.jetstream.clone(),
                    names: broker.names.clone(),
                    store: students,
                    batch_size: 100,
                    cache: invalidator("students"),
                    progress: progress.clone(),
                    lease: projectors::lease::LeaseSettings::default(),
                }
                .run(until_stopped(stopped.clone())),
            );
            tokio::spawn(
                ProjectionRunner {
                    reader: service_kit::event_reader::EventReader::lazy(
                        broker.jetstream.clone(),
                        broker.names.clone(),
                        test_support::test_kek(),
                    ),
                    jetstream: broker.jetstream.clone(),
                    names: broker.names.clone(),
                    store: courses.clone(),
                    batch_size: 100,
                    cache: invalidator("courses"),
                    progress,
                    lease: projectors::lease::LeaseSettings::default(),
                }
                .run(until_stopped(stopped)),
            );
        }

        let gateway_state = command_gateway::app_state(
            broker.client.clone(),
            broker.names.clone(),
            test_support::test_kek(),
        )
        .await
        .expect("gateway state");
        let gateway_app =
            command_gateway::http::router(gateway_state, test_support::api_keys(), 64 * 1024);
        let gateway =
            serve(|listener| command_gateway::run(listener, gateway_app, std::future::pending()))
                .await;

        let models = ReadModels {
            students: read_models::StudentReader::new(db.pool.clone()),
            courses,
        };
        let consistency = Consistency::new(
            models.clone(),
            Some(broker.client.clone()),
            broker.names.clone(),
            options.consistency_wait,
        );
        let queries = Queries::new(
            models,
            Cache::new(redis_url.as_deref()).expect("redis url"),
            broker.names.clone(),
            consistency,
        );
        let query_keys = test_support::api_keys().with_rate_limit(options.query_rate_limit);
        let query_app = query_api::http::router(queries.clone(), query_keys.clone());
        let query =
            serve(|listener| query_api::run(listener, query_app, std::future::pending())).await;
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let grpc = format!("http://{}", grpc_listener.local_addr().expect("addr"));
        tokio::spawn(query_api::grpc::run(
            grpc_listener,
            queries,
            query_keys,
            std::future::pending(),
        ));

        TestSystem {
            gateway,
            query,
            grpc,
            http: reqwest::Client::new(),
            broker,
            db,
            redis,
            stop_projectors,
        }
    }

    /// Stops both projection loops (their in-flight batch is finished first).
    pub fn stop_projectors(&self) {
        let _ = self.stop_projectors.send(true);
    }

    pub async fn cleanup(self) {
        self.stop_projectors();
        self.db.cleanup().await;
        self.broker.cleanup().await;
    }

    // ------------------------------------------------------------ commands

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Written {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.gateway))
            .header("x-api-key", WRITE_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = read(request.send().await.expect("command")).await;
        assert!(answer.status.is_success(), "{method} {path}: {answer:?}");
        Written {
            id: answer.body["data"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            token: answer.header("x-consistency-token").to_owned(),
        }
    }

    pub async fn register_student(&self, name: &str) -> Written {
        let body = json!({"name": name, "first_name": "First", "last_name": "Last"});
        self.command(reqwest::Method::POST, "/api/students", Some(body))
            .await
    }

    pub async fn rename_student(&self, id: &str, name: &str, course_ids: &[&str]) -> Written {
        let body = json!({"name": name, "first_name": "First", "last_name": "Last", "course_ids": course_ids});
        self.command(
            reqwest::Method::PUT,
            &format!("/api/students/{id}"),
            Some(body),
        )
        .await
    }

    pub async fn create_course(&self, name: &str) -> Written {
        let body = json!({"name": name, "description": "About it", "discipline": "Maths", "teacher": "Teacher"});
        self.command(reqwest::Method::POST, "/api/courses", Some(body))
            .await
    }

    pub async fn enroll(&self, student: &str, course: &str) -> Written {
        self.command(
            reqwest::Method::PUT,
            &format!("/api/students/{student}/courses/{course}"),
            None,
        )
        .await
    }

    pub async fn delete_student(&self, id: &str) -> Written {
        self.command(
            reqwest::Method::DELETE,
            &format!("/api/students/{id}"),
            None,
        )
        .await
    }

    // ------------------------------------------------------------ reads

    pub async fn get(&self, path: &str) -> Answer {
        self.get_with(path, &[]).await
    }

    /// A read after the write that answered `token`.
    pub async fn get_after(&self, path: &str, token: &str) -> Answer {
        self.get_with(path, &[("x-consistency-token", token)]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .get(format!("{}{path}", self.query))
            .header("x-api-key", READ_KEY);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        read(request.send().await.expect("read")).await
    }
}

async fn serve<F, Fut>(server: F) -> String
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(server(listener));
    url
}

pub async fn read(response: reqwest::Response) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}
