//! The command gateway over real HTTP against a real JetStream (one stream set per test).

use events::{AggregateKind, EventPayload, StudentDetails};
use reqwest::StatusCode;
use serde_json::{Value, json};
use test_support::{READ_KEY, WRITE_KEY};
use uuid::Uuid;

mod common;

use common::{BODY_LIMIT, TestGateway};

impl TestGateway {
    fn post_students(&self) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, "/api/students")
    }

    async fn post_student_json(&self, body: Value) -> reqwest::Response {
        self.post_students()
            .json(&body)
            .send()
            .await
            .expect("request")
    }
}

async fn problem(response: reqwest::Response) -> Value {
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "status {}",
        response.status()
    );
    response.json().await.expect("problem body")
}

#[tokio::test]
async fn registering_a_student_appends_one_event_and_answers_201_with_its_position() {
    let gateway = TestGateway::spawn().await;
    let response = gateway
        .post_student_json(json!({"name": " Ada L ", "first_name": "Ada", "last_name": "Lovelace"}))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let token: u64 = response.headers()["x-consistency-token"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a stream sequence");
    assert_eq!(response.headers()["etag"], format!("\"{token}\"").as_str());
    let body: Value = response.json().await.expect("json");
    let id = Uuid::parse_str(body["data"]["id"].as_str().expect("id")).expect("uuid");
    assert_eq!(id.get_version_num(), 7, "ids are UUID v7");

    // The event is on the student's own subject, at the sequence the token names.
    let stream = gateway
        .broker
        .jetstream
        .get_stream(gateway.broker.names.event_stream())
        .await
        .expect("stream");
    let stored = stream.get_raw_message(token).await.expect("stored event");
    assert_eq!(
        stored.subject.as_str(),
        gateway
            .broker
            .names
            .aggregate_subject(AggregateKind::Student, id)
    );
    let event = test_support::read_stored(
        &gateway.broker.jetstream,
        &gateway.broker.names,
        &stored.payload,
    )
    .await;
    assert_eq!(event.metadata.aggregate_id, id);
    assert_eq!(
        event.payload,
        EventPayload::StudentRegistered(StudentDetails {
            name: "Ada L".into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
        })
    );
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn invalid_fields_are_a_422_naming_every_one() {
    let gateway = TestGateway::spawn().await;
    let response = gateway
        .post_student_json(
            json!({"name": "ab", "last_name": "x".repeat(21), "course_ids": ["nope"]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = problem(response).await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["field"].as_str().expect("field"))
        .collect();
    assert_eq!(fields, ["name", "first_name", "last_name", "course_ids[0]"]);
    assert_eq!(body["status"], 422);
    assert_eq!(body["type"], "urn:school:problem:validation-failed");
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn malformed_bodies_get_4xx_problems_and_append_nothing() {
    let gateway = TestGateway::spawn().await;
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode)> = vec![
        (
            "broken json",
            gateway
                .post_students()
                .header("content-type", "application/json")
                .body("{\"name\": "),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown field",
            gateway.post_students().json(
                &json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace", "age": 36}),
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong type",
            gateway
                .post_students()
                .json(&json!({"name": 5, "first_name": "Ada", "last_name": "Lovelace"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            "not an object",
            gateway.post_students().json(&json!(["Ada"])),
            StatusCode::BAD_REQUEST,
        ),
        (
            "wrong content type",
            gateway
                .post_students()
                .header("content-type", "text/plain")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "oversize body",
            gateway
                .post_students()
                .header("content-type", "application/json")
                .body(format!("{{\"name\": \"{}\"}}", "x".repeat(BODY_LIMIT))),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (case, request, expected) in cases {
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), expected, "{case}");
        let body = problem(response).await;
        assert_eq!(body["status"], expected.as_u16(), "{case}");
    }
    let info = gateway
        .broker
        .jetstream
        .get_stream(gateway.broker.names.event_stream())
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    assert_eq!(info.state.messages, 0, "no bad request may append an event");
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn writes_need_a_write_key() {
    let gateway = TestGateway::spawn().await;
    let body = json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"});
    let url = format!("{}/api/students", gateway.url);
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (Some("not-a-key-at-all"), StatusCode::UNAUTHORIZED),
        (Some(READ_KEY), StatusCode::FORBIDDEN),
    ];
    for (key, expected) in cases {
        let mut request = gateway.http.post(&url).json(&body);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), expected, "{key:?}");
        problem(response).await;
    }
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_appends_nothing() {
    let keys = test_support::api_keys().with_rate_limit(service_kit::RateLimit::new(1, 2));
    let gateway = TestGateway::spawn_with_keys(keys).await;
    let body = json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"});
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = gateway.post_student_json(body.clone()).await;
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse::<u64>()
                .expect("whole seconds");
            assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
            assert_eq!(
                problem(response).await["type"],
                "urn:school:problem:rate-limited"
            );
        }
    }
    // A burst of 2, then one per second: the 3rd and 4th (well within a second) are refused.
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(
        gateway.stored_events().await.len(),
        2,
        "a refused command appended"
    );
    // The read key has a budget of its own (and is refused for its scope, not its rate).
    let response = gateway
        .http
        .post(format!("{}/api/students", gateway.url))
        .header("x-api-key", READ_KEY)
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems_and_health_is_open() {
    let gateway = TestGateway::spawn().await;
    let response = gateway
        .http
        .get(format!("{}/nope", gateway.url))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    problem(response).await;
    let response = gateway
        .http
        .delete(format!("{}/api/students", gateway.url))
        .header("x-api-key", WRITE_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    for path in ["/healthz", "/readyz"] {
        let response = gateway
            .http
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn metrics_count_requests_per_route_and_commands_per_result() {
    let gateway = TestGateway::spawn().await;
    let created = gateway
        .post_student_json(json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"}))
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let invalid = gateway.post_student_json(json!({"name": "x"})).await;
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let unknown = gateway
        .http
        .get(format!("{}/api/nope/{}", gateway.url, Uuid::now_v7()))
        .send()
        .await
        .expect("answered");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    let metrics = gateway
        .http
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .expect("metrics are open")
        .text()
        .await
        .expect("text");
    // The registry is per process and other tests of this binary may run alongside (under
    // `cargo test`), so a series counts at least what this test did.
    for (series, at_least) in [
        (
            r#"commands_total{command="register_student",result="accepted"}"#,
            1.0,
        ),
        (
            r#"http_server_requests_total{method="POST",route="/api/students",status="201"}"#,
            1.0,
        ),
        (
            r#"http_server_requests_total{method="POST",route="/api/students",status="422"}"#,
            1.0,
        ),
        (
            r#"command_append_duration_seconds_count{append="single"}"#,
            1.0,
        ),
        // Unknown routes are counted under one bounded label, not their raw path.
        (
            r#"http_server_requests_total{method="GET",route="unmatched",status="404"}"#,
            1.0,
        ),
        // Series exist at zero before the first conflict.
        (r#"command_conflicts_total{command="enroll"}"#, 0.0),
    ] {
        let value = metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok());
        assert!(
            value.is_some_and(|value| value >= at_least),
            "{series} should be at least {at_least}, is {value:?} in:\n{metrics}"
        );
    }
    assert!(
        metrics
            .split('"')
            .all(|value| Uuid::parse_str(value).is_err()),
        "an id in a label would make it unbounded"
    );
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_command_route_and_swagger_ui_is_served() {
    let gateway = TestGateway::spawn().await;
    let document: Value = gateway
        .http
        .get(format!("{}/openapi.json", gateway.url))
        .send()
        .await
        .expect("openapi is open")
        .json()
        .await
        .expect("json");
    let expected = [
        ("/api/students", "post"),
        ("/api/students/{id}", "put"),
        ("/api/students/{id}", "delete"),
        ("/api/students/{id}/courses/{course_id}", "put"),
        ("/api/students/{id}/courses/{course_id}", "delete"),
        ("/api/courses", "post"),
        ("/api/courses/{id}", "put"),
        ("/api/courses/{id}", "delete"),
    ];
    for (path, method) in expected {
        let operation = &document["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        assert!(
            operation["responses"]["422"].is_object() || method == "delete",
            "{method} {path} documents its validation errors"
        );
    }
    assert_eq!(
        document["components"]["securitySchemes"]["api_key"]["name"],
        "x-api-key"
    );
    let ui = gateway
        .http
        .get(format!("{}/docs/", gateway.url))
        .send()
        .await
        .expect("swagger ui");
    assert_eq!(ui.status(), StatusCode::OK);
    assert!(ui.text().await.expect("html").contains("swagger"));
    gateway.broker.cleanup().await;
}

/// A gateway started before `stream-admin apply` (a first install: the Job and the pods
/// start together) stays up: `/readyz` is 503 naming the stream and the bucket, commands
/// answer 503 problem+json, and once the topology exists it is ready and commands with an
/// `Idempotency-Key` (the bucket) work, without a restart.
#[tokio::test]
async fn a_gateway_started_before_the_topology_waits_unready_and_then_serves() {
    let client = async_nats::connect(test_support::nats_url())
        .await
        .expect("NATS");
    let jetstream = async_nats::jetstream::new(client.clone());
    let names = events::StreamNames::new(format!("g{}", test_support::unique_suffix()));
    let state = command_gateway::app_state(client, names.clone(), test_support::test_kek())
        .await
        .expect("the state does not need the topology");
    let app = command_gateway::http::router(state, test_support::api_keys(), BODY_LIMIT);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(command_gateway::run(listener, app, std::future::pending()));
    let http = reqwest::Client::new();
    let body = json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"});
    let post = |key: &'static str| {
        http.post(format!("{url}/api/students"))
            .header("x-api-key", WRITE_KEY)
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };

    let ready = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let checks: Value = ready.json().await.expect("json");
    assert_ne!(checks["checks"]["event_stream"], "ok", "{checks}");
    assert_ne!(checks["checks"]["idempotency_bucket"], "ok", "{checks}");
    let refused = post("before-apply").await.expect("POST");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );

    stream_admin::apply(
        &jetstream,
        &stream_admin::desired(&names, 1),
        stream_admin::ApplyOptions::default(),
    )
    .await
    .expect("apply");
    let ready = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "{}",
        ready.text().await.unwrap_or_default()
    );
    let created = post("after-apply").await.expect("POST");
    assert_eq!(created.status(), StatusCode::CREATED);
    let again = post("after-apply").await.expect("POST again");
    assert_eq!(
        again.status(),
        StatusCode::CREATED,
        "the key's outcome is replayed"
    );
    test_support::delete_topology(&jetstream, &names).await;
}
