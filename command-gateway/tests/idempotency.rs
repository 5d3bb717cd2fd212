//! `Idempotency-Key` against the real broker: a retry gets the first attempt's outcome for
//! every command, also when that attempt's append was stored but never confirmed (its ack
//! swallowed by a proxy), when its gateway was cut off right after sending it, and when it
//! lands only after the retry decided again; the fingerprint covers `If-Match` and not the
//! order of id lists; a key released a moment before a retry is `409`, never `503`.

mod common;

use std::time::Duration;

use command_gateway::idempotency::{Begin, IdempotencyStore};
use command_gateway::outcome::Outcome;
use common::{Answer, TestGateway};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use test_support::TcpProxy;

fn student_body(name: &str, courses: &[&str]) -> Value {
    json!({"name": name, "first_name": "First", "last_name": "Last", "course_ids": courses})
}

fn course_body(name: &str, students: &[&str]) -> Value {
    json!({"name": name, "description": "About it", "discipline": "Maths", "teacher": "Teacher", "student_ids": students})
}

/// A command as a client sends it, to send again with the same key.
#[derive(Clone)]
struct Request {
    method: Method,
    path: String,
    body: Option<Value>,
    if_match: Option<String>,
    key: String,
}

impl Request {
    fn new(method: Method, path: String) -> Request {
        Request {
            method,
            path,
            body: None,
            if_match: None,
            key: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn body(mut self, body: Value) -> Request {
        self.body = Some(body);
        self
    }

    fn if_match(mut self, etag: &str) -> Request {
        self.if_match = Some(etag.to_owned());
        self
    }

    async fn send_to(&self, gateway: &TestGateway, base: &str) -> Answer {
        let mut request = gateway
            .http
            .request(self.method.clone(), format!("{base}{}", self.path))
            .header("x-api-key", test_support::WRITE_KEY)
            .header("idempotency-key", &self.key);
        if let Some(etag) = &self.if_match {
            request = request.header("if-match", etag);
        }
        if let Some(body) = &self.body {
            request = request.json(body);
        }
        gateway.send(request).await
    }
}

/// A gateway whose NATS connection goes through a proxy, next to the test's own gateway.
struct Proxied {
    proxy: TcpProxy,
    url: String,
}

async fn proxied(gateway: &TestGateway) -> Proxied {
    let proxy = TcpProxy::start_nats(test_support::nats_addr()).await;
    let url = gateway.another_instance_via(&proxy.nats_url()).await;
    Proxied { proxy, url }
}

/// What only the event stream's publish acks contain (a KV write's ack names its bucket's
/// stream, a read's answer no stream at all).
fn event_stream_ack(gateway: &TestGateway) -> String {
    format!("\"stream\":\"{}\"", gateway.broker.names.event_stream())
}

fn student_subject(gateway: &TestGateway, id: &str) -> String {
    gateway.broker.names.aggregate_subject(
        events::AggregateKind::Student,
        uuid::Uuid::parse_str(id).expect("an id"),
    )
}

/// The sequences of the stored events of type `event_type`.
async fn sequences_of(gateway: &TestGateway, event_type: &str) -> Vec<u64> {
    gateway
        .stored_events_with_sequences()
        .await
        .into_iter()
        .filter(|(_, _, t)| t == event_type)
        .map(|(sequence, _, _)| sequence)
        .collect()
}

async fn last_sequence(gateway: &TestGateway) -> u64 {
    gateway
        .stored_events_with_sequences()
        .await
        .last()
        .map(|(sequence, _, _)| *sequence)
        .unwrap_or(0)
}

/// Sends `request` through a gateway whose broker acks of appends are swallowed, so the
/// append is stored and answered `503`; then retries it with the same key. Returns the
/// first answer, the retry's, and a second retry's.
async fn ack_lost_then_retried(gateway: &TestGateway, request: &Request) -> (Answer, Answer) {
    let via = proxied(gateway).await;
    let before = last_sequence(gateway).await;
    via.proxy
        .swallow_server_messages_containing(Some(&event_stream_ack(gateway)));
    let first = request.send_to(gateway, &via.url).await;
    via.proxy.swallow_server_messages_containing(None);
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the ack was lost: {}",
        first.raw
    );
    assert!(via.proxy.swallowed() >= 1, "an append ack was swallowed");
    assert!(
        last_sequence(gateway).await > before,
        "the first attempt's append is stored"
    );
    let retry = request.send_to(gateway, &via.url).await;
    // Once answered, the outcome is kept: another retry, elsewhere, gets it again.
    let again = request.send_to(gateway, &gateway.url).await;
    assert_eq!(again.status, retry.status, "{}", again.raw);
    assert_eq!(again.raw, retry.raw);
    assert_eq!(again.header("etag"), retry.header("etag"));
    assert_eq!(again.header("idempotent-replayed"), "true");
    (first, retry)
}

fn etag(sequence: u64) -> String {
    format!("\"{sequence}\"")
}

#[tokio::test]
async fn a_delete_stored_but_answered_503_is_answered_204_on_retry_and_stored_once() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Ada L", &[]).await;
    let request = Request::new(Method::DELETE, format!("/api/students/{student}"));
    let (_, retry) = ack_lost_then_retried(&gateway, &request).await;
    let deleted = sequences_of(&gateway, "StudentDeleted").await;
    assert_eq!(deleted.len(), 1, "stored exactly once");
    assert_eq!(retry.status, StatusCode::NO_CONTENT, "{}", retry.raw);
    assert_eq!(retry.header("etag"), etag(deleted[0]));
    assert_eq!(retry.header("x-consistency-token"), deleted[0].to_string());
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn a_put_with_if_match_stored_but_answered_503_is_answered_200_on_retry_not_412() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Ada L", &[]).await;
    let version = sequences_of(&gateway, "StudentRegistered").await[0];
    let request = Request::new(Method::PUT, format!("/api/students/{student}"))
        .body(student_body("Ada B", &[]))
        .if_match(&etag(version));
    let (_, retry) = ack_lost_then_retried(&gateway, &request).await;
    let updated = sequences_of(&gateway, "StudentUpdated").await;
    assert_eq!(updated.len(), 1, "stored exactly once");
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.raw);
    assert_eq!(retry.body["data"]["name"], "Ada B");
    assert_eq!(retry.header("etag"), etag(updated[0]));
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn an_unenrollment_stored_but_answered_503_is_answered_204_on_retry_not_404() {
    let gateway = TestGateway::spawn().await;
    let course = gateway.course("Algebra", &[]).await;
    let student = gateway.student("Ada L", &[&course]).await;
    let request = Request::new(
        Method::DELETE,
        format!("/api/students/{student}/courses/{course}"),
    );
    let (_, retry) = ack_lost_then_retried(&gateway, &request).await;
    let unenrolled = sequences_of(&gateway, "StudentUnenrolled").await;
    assert_eq!(
        unenrolled.len(),
        2,
        "one batch: the student's and the course's"
    );
    assert_eq!(retry.status, StatusCode::NO_CONTENT, "{}", retry.raw);
    // The student's event is the batch's first, the course's its last.
    assert_eq!(retry.header("etag"), etag(unenrolled[0]));
    assert_eq!(
        retry.header("x-consistency-token"),
        unenrolled[1].to_string()
    );
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn an_enrollment_with_if_match_stored_but_answered_503_is_answered_204_on_retry() {
    let gateway = TestGateway::spawn().await;
    let course = gateway.course("Algebra", &[]).await;
    let student = gateway.student("Ada L", &[]).await;
    let version = sequences_of(&gateway, "StudentRegistered").await[0];
    let request = Request::new(
        Method::PUT,
        format!("/api/students/{student}/courses/{course}"),
    )
    .if_match(&etag(version));
    let (_, retry) = ack_lost_then_retried(&gateway, &request).await;
    let enrolled = sequences_of(&gateway, "StudentEnrolled").await;
    assert_eq!(
        enrolled.len(),
        2,
        "one batch: the student's and the course's"
    );
    assert_eq!(retry.status, StatusCode::NO_CONTENT, "{}", retry.raw);
    assert_eq!(retry.header("etag"), etag(enrolled[0]));
    assert_eq!(retry.header("x-consistency-token"), enrolled[1].to_string());
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn a_retry_after_the_gateway_was_lost_right_after_sending_the_append_answers_its_success() {
    let gateway = TestGateway::spawn().await;
    let course = gateway.course("Algebra", &[]).await;
    let student = gateway.student("Ada L", &[&course]).await;
    let request = Request::new(Method::DELETE, format!("/api/courses/{course}"));
    // The first gateway sends the append, which is stored; the ack never reaches it, and
    // then it is cut off for good (as if the process had died): it can neither answer nor
    // record anything after the append.
    let via = proxied(&gateway).await;
    via.proxy
        .swallow_server_messages_containing(Some(&event_stream_ack(&gateway)));
    let first = {
        let (request, http, url) = (request.clone(), gateway.http.clone(), via.url.clone());
        tokio::spawn(async move {
            let mut sent = http
                .request(request.method.clone(), format!("{url}{}", request.path))
                .header("x-api-key", test_support::WRITE_KEY)
                .header("idempotency-key", &request.key);
            if let Some(body) = &request.body {
                sent = sent.json(body);
            }
            sent.send().await.map(|r| r.status())
        })
    };
    test_support::eventually(10, "the course's deletion to be stored", || async {
        (!sequences_of(&gateway, "CourseDeleted").await.is_empty()).then_some(())
    })
    .await;
    via.proxy.block().await;
    // The claim counts as abandoned once it is old enough (60 s): age it instead of waiting.
    age_every_claim(&gateway).await;
    let retry = request.send_to(&gateway, &gateway.url).await;
    let deleted = sequences_of(&gateway, "CourseDeleted").await;
    let unenrolled = sequences_of(&gateway, "StudentUnenrolled").await;
    assert_eq!(deleted.len(), 1, "stored exactly once");
    assert_eq!(unenrolled.len(), 1, "the student forgot it once");
    assert_eq!(retry.status, StatusCode::NO_CONTENT, "{}", retry.raw);
    assert_eq!(retry.header("etag"), etag(deleted[0]));
    assert_eq!(
        retry.header("x-consistency-token"),
        deleted[0].max(unenrolled[0]).to_string()
    );
    first.abort();
    assert!(!student.is_empty());
    gateway.broker.cleanup().await;
}

/// Moves the start of every pending claim in the bucket back past the abandonment age.
async fn age_every_claim(gateway: &TestGateway) {
    use futures::StreamExt;
    let bucket = gateway
        .broker
        .jetstream
        .get_key_value(gateway.broker.names.idempotency_bucket())
        .await
        .expect("idempotency bucket");
    let keys: Vec<String> = bucket
        .keys()
        .await
        .expect("keys")
        .map(|key| key.expect("key"))
        .collect()
        .await;
    assert!(!keys.is_empty(), "the first attempt claimed its key");
    for key in keys {
        let entry = bucket.entry(&key).await.expect("entry").expect("present");
        let mut record: Value = serde_json::from_slice(&entry.value).expect("a record");
        if record["state"] == "pending" {
            record["started_at_ms"] = json!(0);
            bucket
                .update(
                    &key,
                    serde_json::to_vec(&record).expect("json").into(),
                    entry.revision,
                )
                .await
                .expect("aging the claim");
        }
    }
}

#[tokio::test]
async fn a_first_append_landing_after_the_retry_decided_again_wins_and_the_retry_answers_it() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Ada L", &[]).await;
    let subject = student_subject(&gateway, &student);
    let request = Request::new(Method::DELETE, format!("/api/students/{student}"));
    // The first attempt's append is held back on its way: unanswered, 503.
    let a = proxied(&gateway).await;
    a.proxy.hold_publishes_to(Some(&subject));
    let first = request.send_to(&gateway, &a.url).await;
    assert_eq!(
        first.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        first.raw
    );
    assert_eq!(a.proxy.held(), 1);
    assert!(sequences_of(&gateway, "StudentDeleted").await.is_empty());
    // The retry finds nothing stored and decides again; its append is held too.
    let b = proxied(&gateway).await;
    b.proxy.hold_publishes_to(Some(&subject));
    let retry = {
        let (request, url) = (request.clone(), b.url.clone());
        let gateway = &gateway;
        async move { request.send_to(gateway, &url).await }
    };
    let release = async {
        test_support::eventually(10, "the retry's append", || async {
            (b.proxy.held() >= 1).then_some(())
        })
        .await;
        // Now the first append lands, and then the retry's, which expects the same version.
        a.proxy.release_held().await;
        test_support::eventually(10, "the first append to land", || async {
            (!sequences_of(&gateway, "StudentDeleted").await.is_empty()).then_some(())
        })
        .await;
        b.proxy.release_held().await;
    };
    let (retry, ()) = tokio::join!(retry, release);
    let deleted = sequences_of(&gateway, "StudentDeleted").await;
    assert_eq!(deleted.len(), 1, "only one of the two appends can win");
    assert_eq!(retry.status, StatusCode::NO_CONTENT, "{}", retry.raw);
    assert_eq!(retry.header("etag"), etag(deleted[0]));
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn the_fingerprint_covers_if_match_normalised() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Ada L", &[]).await;
    let version = sequences_of(&gateway, "StudentRegistered").await[0];
    let path = format!("/api/students/{student}");
    let request = Request::new(Method::PUT, path.clone())
        .body(student_body("Ada B", &[]))
        .if_match(&format!("{}, \"999\"", etag(version)));
    let first = request.send_to(&gateway, &gateway.url).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.raw);
    // The same tags in another order and spacing: the same request.
    let reordered = request
        .clone()
        .if_match(&format!("\"999\",{}", etag(version)))
        .send_to(&gateway, &gateway.url)
        .await;
    assert_eq!(reordered.status, StatusCode::OK, "{}", reordered.raw);
    assert_eq!(reordered.header("idempotent-replayed"), "true");
    // Another precondition is another request.
    for other in [Some(etag(version + 100)), None] {
        let mut changed = request.clone();
        changed.if_match = other.clone();
        let answer = changed.send_to(&gateway, &gateway.url).await;
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "If-Match {other:?}: {}",
            answer.raw
        );
        assert_eq!(answer.problem_type(), "idempotency-key-reused");
    }
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn id_lists_in_another_order_are_the_same_request() {
    let gateway = TestGateway::spawn().await;
    let (c1, c2) = (
        gateway.course("Algebra", &[]).await,
        gateway.course("Optics", &[]).await,
    );
    let (s1, s2) = (
        gateway.student("Ada L", &[]).await,
        gateway.student("Grace H", &[]).await,
    );
    let cases = [
        (
            Method::POST,
            "/api/students".to_owned(),
            student_body("Emmy N", &[&c1, &c2]),
            student_body("Emmy N", &[&c2, &c1]),
        ),
        (
            Method::PUT,
            format!("/api/students/{s1}"),
            student_body("Ada B", &[&c1, &c2]),
            student_body("Ada B", &[&c2, &c1]),
        ),
        (
            Method::POST,
            "/api/courses".to_owned(),
            course_body("Topology", &[&s1, &s2]),
            course_body("Topology", &[&s2, &s1]),
        ),
        (
            Method::PUT,
            format!("/api/courses/{c2}"),
            course_body("Optics", &[&s2, &s1]),
            course_body("Optics", &[&s1, &s2]),
        ),
    ];
    for (method, path, body, reordered) in cases {
        let request = Request::new(method, path.clone()).body(body);
        let first = request.send_to(&gateway, &gateway.url).await;
        assert!(first.status.is_success(), "{path}: {}", first.raw);
        let again = request
            .clone()
            .body(reordered)
            .send_to(&gateway, &gateway.url)
            .await;
        assert_eq!(again.status, first.status, "{path}: {}", again.raw);
        assert_eq!(again.raw, first.raw, "{path}");
        assert_eq!(again.header("idempotent-replayed"), "true", "{path}");
    }
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn a_key_released_a_moment_before_a_retry_is_409_in_use_never_503() {
    let broker = test_support::TestBroker::start().await;
    let store = IdempotencyStore::new(broker.jetstream.clone(), &broker.names.idempotency_bucket());
    let unavailable = Outcome::empty(axum::http::StatusCode::SERVICE_UNAVAILABLE);
    let (mut claimed, mut in_use, mut failed) = (0, 0, Vec::new());
    // The window is one broker round trip wide: sweep the retry's delay across it.
    for n in 0..300u32 {
        let key = format!("key-{n}");
        let Ok(Begin::Claimed(claim)) = store.begin(b"client", &key, "f".into()).await else {
            panic!("a fresh key is claimed");
        };
        // The first request ends with a server error (its claim is released) while its
        // client's retry arrives.
        let pause = Duration::from_micros(u64::from(n % 60) * 10);
        let release = store.finish(claim, &unavailable);
        let retry = async {
            // Finer than the timer's millisecond: spin, letting the client's tasks run.
            let until = std::time::Instant::now() + pause;
            while std::time::Instant::now() < until {
                tokio::task::yield_now().await;
            }
            store.begin(b"client", &key, "f".into()).await
        };
        let ((), retried) = tokio::join!(release, retry);
        match retried {
            Ok(Begin::Claimed(_)) => claimed += 1,
            Err(problem) if problem.status == axum::http::StatusCode::CONFLICT => {
                assert!(
                    problem.retry_after_seconds.is_some(),
                    "409 with Retry-After"
                );
                in_use += 1;
            }
            Err(problem) => failed.push(problem.status),
            Ok(Begin::Replay(outcome)) => panic!("nothing was stored to replay: {outcome:?}"),
        }
    }
    eprintln!(
        "{claimed} claimed, {in_use} in use, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} retries failed ({failed:?}); {claimed} claimed, {in_use} in use",
        failed.len()
    );
    test_support::delete_topology(&broker.jetstream, &broker.names).await;
}
