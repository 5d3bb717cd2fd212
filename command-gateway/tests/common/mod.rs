//! The gateway under test: the real router on a free port, on its own streams.

#![allow(dead_code)] // each test binary uses a different part

use reqwest::StatusCode;
use serde_json::Value;
use test_support::{TestBroker, WRITE_KEY};

pub const BODY_LIMIT: usize = 64 * 1024;

pub struct TestGateway {
    pub url: String,
    pub http: reqwest::Client,
    pub broker: TestBroker,
}

impl TestGateway {
    pub async fn spawn() -> TestGateway {
        TestGateway::spawn_with_keys(test_support::api_keys()).await
    }

    /// A gateway checking `keys` (e.g. with a rate limit).
    pub async fn spawn_with_keys(keys: service_kit::ApiKeys) -> TestGateway {
        let broker = TestBroker::start().await;
        let url = spawn_gateway_on(&broker, keys).await;
        TestGateway {
            url,
            http: reqwest::Client::new(),
            broker,
        }
    }

    /// Another gateway process on the same streams (a replica, or the same after a restart).
    pub async fn another_instance(&self) -> String {
        spawn_gateway_on(&self.broker, test_support::api_keys()).await
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .header("x-api-key", WRITE_KEY)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        Answer::from(request.send().await.expect("request")).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(self.request(reqwest::Method::POST, path).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, body: Option<Value>) -> Answer {
        let mut request = self.request(reqwest::Method::PUT, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    /// Registers a student and returns its id.
    pub async fn student(&self, name: &str, courses: &[&str]) -> String {
        let answer = self
            .post(
                "/api/students",
                serde_json::json!({"name": name, "first_name": "First", "last_name": "Last", "course_ids": courses}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body["data"]["id"].as_str().expect("id").to_owned()
    }

    /// Creates a course and returns its id.
    pub async fn course(&self, name: &str, students: &[&str]) -> String {
        let answer = self
            .post(
                "/api/courses",
                serde_json::json!({"name": name, "description": "About it", "discipline": "Maths", "teacher": "Teacher", "student_ids": students}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body["data"]["id"].as_str().expect("id").to_owned()
    }

    /// Another gateway on the same streams whose NATS connection goes to `nats_url` (a
    /// proxy in front of the test broker, to lose or delay what goes through it).
    pub async fn another_instance_via(&self, nats_url: &str) -> String {
        let client = async_nats::connect(nats_url)
            .await
            .expect("connecting through the proxy");
        spawn_gateway_with(client, &self.broker.names, test_support::api_keys()).await
    }

    /// Every event type on the stream, in order, with its subject.
    pub async fn stored_events(&self) -> Vec<(String, String)> {
        self.stored_events_with_sequences()
            .await
            .into_iter()
            .map(|(_, subject, event_type)| (subject, event_type))
            .collect()
    }

    /// Every event on the stream, in order: (sequence, subject, event type).
    pub async fn stored_events_with_sequences(&self) -> Vec<(u64, String, String)> {
        let stream = self
            .broker
            .jetstream
            .get_stream(self.broker.names.event_stream())
            .await
            .expect("stream");
        let last = stream.get_info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for sequence in 1..=last {
            if let Ok(message) = stream.get_raw_message(sequence).await {
                let event = test_support::read_stored(
                    &self.broker.jetstream,
                    &self.broker.names,
                    &message.payload,
                )
                .await;
                out.push((
                    sequence,
                    message.subject.to_string(),
                    event.payload.event_type().to_owned(),
                ));
            }
        }
        out
    }
}

async fn spawn_gateway_on(broker: &TestBroker, keys: service_kit::ApiKeys) -> String {
    spawn_gateway_with(broker.client.clone(), &broker.names, keys).await
}

async fn spawn_gateway_with(
    client: async_nats::Client,
    names: &events::StreamNames,
    keys: service_kit::ApiKeys,
) -> String {
    let state = command_gateway::app_state(client, names.clone(), test_support::test_kek())
        .await
        .expect("state");
    let app = command_gateway::http::router(state, keys, BODY_LIMIT);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(command_gateway::run(listener, app, std::future::pending()));
    url
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub raw: String,
}

impl Answer {
    pub async fn from(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response.text().await.expect("body");
        let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            raw,
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The problem `type` slug of a problem+json answer.
    pub fn problem_type(&self) -> &str {
        assert_eq!(
            self.header("content-type"),
            "application/problem+json",
            "{}",
            self.raw
        );
        self.body["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("urn:school:problem:")
    }
}
