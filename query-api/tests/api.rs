//! The query API over real HTTP against a real Postgres read model, filled by the real
//! projection code.

use events::{AggregateKind, Enrollment, Event, EventMetadata, EventPayload, StudentDetails};
use query_api::http::{AppState, router};
use reqwest::StatusCode;
use serde_json::Value;
use test_support::{READ_KEY, TestDatabase, WRITE_KEY};
use uuid::Uuid;

struct TestQueryApi {
    url: String,
    http: reqwest::Client,
    db: TestDatabase,
    projection: projectors::PgStudents,
    next_sequence: u64,
}

impl TestQueryApi {
    async fn spawn() -> TestQueryApi {
        let db = TestDatabase::create().await;
        let projection = projectors::PgStudents::with_pool(db.pool.clone())
            .await
            .expect("migrated");
        let state = AppState {
            students: query_api::pg_students::PgStudents::new(db.pool.clone()),
        };
        let app = router(state, test_support::api_keys());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(query_api::run(listener, app, std::future::pending()));
        TestQueryApi {
            url,
            http: reqwest::Client::new(),
            db,
            projection,
            next_sequence: 1,
        }
    }

    /// Projects events as the projector would, at the next stream sequences.
    async fn project(&mut self, events: Vec<Event>) {
        let batch: Vec<(u64, Event)> = events
            .into_iter()
            .map(|event| {
                self.next_sequence += 1;
                (self.next_sequence, event)
            })
            .collect();
        self.projection
            .apply_batch(&batch, self.next_sequence)
            .await
            .expect("projected");
    }

    async fn register(&mut self, name: &str) -> Uuid {
        let id = Uuid::now_v7();
        self.project(vec![event(
            id,
            EventPayload::StudentRegistered(StudentDetails {
                name: name.into(),
                first_name: "First".into(),
                last_name: "Last".into(),
            }),
        )])
        .await;
        id
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .header("x-api-key", READ_KEY)
            .send()
            .await
            .expect("request")
    }
}

fn event(student_id: Uuid, payload: EventPayload) -> Event {
    Event {
        metadata: EventMetadata {
            event_id: Uuid::now_v7(),
            aggregate_kind: AggregateKind::Student,
            aggregate_id: student_id,
            occurred_at: chrono::Utc::now(),
            correlation_id: Uuid::now_v7(),
            causation_id: Uuid::now_v7(),
            trace: Default::default(),
        },
        payload,
    }
}

#[tokio::test]
async fn a_projected_student_is_served_with_its_course_ids_and_etag() {
    let mut api = TestQueryApi::spawn().await;
    let id = api.register("Ada L").await;
    let course = Uuid::now_v7();
    api.project(vec![event(
        id,
        EventPayload::StudentEnrolled(Enrollment {
            student_id: id,
            course_id: course,
        }),
    )])
    .await;

    let response = api.get(&format!("/api/students/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()["etag"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(etag, format!("\"{}\"", api.next_sequence));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["data"]["id"], id.to_string());
    assert_eq!(body["data"]["name"], "Ada L");
    assert_eq!(body["data"]["first_name"], "First");
    assert_eq!(body["data"]["last_name"], "Last");
    assert_eq!(
        body["data"]["course_ids"],
        serde_json::json!([course.to_string()])
    );

    let cached = api
        .http
        .get(format!("{}/api/students/{id}", api.url))
        .header("x-api-key", READ_KEY)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    api.db.cleanup().await;
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_problems() {
    let api = TestQueryApi::spawn().await;
    for path in [
        format!("/api/students/{}", Uuid::now_v7()),
        "/api/students/not-a-uuid".into(),
    ] {
        let response = api.get(&path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    api.db.cleanup().await;
}

#[tokio::test]
async fn pages_cover_every_student_once_in_creation_order() {
    let mut api = TestQueryApi::spawn().await;
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(api.register(&format!("Student {n}")).await);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/students?limit=2&cursor={cursor}"),
            None => "/api/students?limit=2".into(),
        };
        let body: Value = api.get(&path).await.json().await.expect("json");
        pages += 1;
        let data = body["data"].as_array().expect("data is an array");
        assert!(data.len() <= 2);
        seen.extend(
            data.iter()
                .map(|s| Uuid::parse_str(s["id"].as_str().expect("id")).expect("uuid")),
        );
        if pages == 1 {
            // A student added while paging shows up on a later page, not twice.
            created.push(api.register("Late Comer").await);
        }
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);
    assert_eq!(pages, 3);
    api.db.cleanup().await;
}

#[tokio::test]
async fn bad_page_parameters_are_422_problems() {
    let api = TestQueryApi::spawn().await;
    for query in ["limit=0", "limit=101", "limit=abc", "cursor=bm9wZQ"] {
        let response = api.get(&format!("/api/students?{query}")).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    api.db.cleanup().await;
}

#[tokio::test]
async fn reads_need_a_key_and_any_key_may_read() {
    let api = TestQueryApi::spawn().await;
    let url = format!("{}/api/students", api.url);
    let anonymous = api.http.get(&url).send().await.expect("request");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        anonymous.headers()["content-type"],
        "application/problem+json"
    );
    for key in [READ_KEY, WRITE_KEY] {
        let response = api
            .http
            .get(&url)
            .header("x-api-key", key)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{key}");
    }
    api.db.cleanup().await;
}
