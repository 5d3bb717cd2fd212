//! `POST /api/students/{id}/erasure` against the real broker: the student is deleted with its
//! enrollments, its data key destroyed, so every sealed event of it reads as erased; only an
//! erase key may do it; it is idempotent; and no stored `Idempotency-Key` outcome ever held
//! the names (a replay refills them from the stream while the key lives, `null` after).

mod common;

use common::{Answer, TestGateway};
use reqwest::{Method, StatusCode};
use serde_json::json;
use service_kit::event_reader::Personal;
use test_support::{ERASE_KEY, READ_KEY, WRITE_KEY};

async fn erase(gateway: &TestGateway, student: &str, key: &str) -> Answer {
    gateway
        .send(
            gateway
                .http
                .post(format!("{}/api/students/{student}/erasure", gateway.url))
                .header("x-api-key", key),
        )
        .await
}

/// Every stored event of `aggregate`, read through the one reading path.
async fn read_events_of(gateway: &TestGateway, aggregate: &str) -> Vec<(String, Personal)> {
    let stream = gateway
        .broker
        .jetstream
        .get_stream(gateway.broker.names.event_stream())
        .await
        .expect("stream");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let reader = test_support::test_reader(&gateway.broker.jetstream, &gateway.broker.names);
    let mut out = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.expect("message");
        let read = reader.read(&message.payload).await.expect("readable");
        if read.event.metadata.aggregate_id.to_string() == aggregate {
            out.push((read.event.payload.event_type().to_owned(), read.personal));
        }
    }
    out
}

#[tokio::test]
async fn erasing_deletes_the_student_with_its_enrollments_destroys_its_key_and_is_idempotent() {
    let gateway = TestGateway::spawn().await;
    let course = gateway.course("Algebra", &[]).await;
    let student = gateway.student("Ada Lovelace", &[course.as_str()]).await;
    let renamed = gateway
        .put(
            &format!("/api/students/{student}"),
            Some(json!({"name": "Ada King", "first_name": "Ada", "last_name": "King", "course_ids": [course]})),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.raw);
    let before = read_events_of(&gateway, &student).await;
    assert!(
        before
            .iter()
            .all(|(kind, personal)| kind == "StudentEnrolled"
                || matches!(personal, Personal::Opened)),
        "before erasure the names open with the key: {before:?}"
    );

    for refused in [WRITE_KEY, READ_KEY] {
        let answer = erase(&gateway, &student, refused).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.raw);
    }
    assert_eq!(read_events_of(&gateway, &student).await.len(), before.len());

    let erased = erase(&gateway, &student, ERASE_KEY).await;
    assert_eq!(erased.status, StatusCode::NO_CONTENT, "{}", erased.raw);
    assert!(!erased.header("x-consistency-token").is_empty());

    let after = read_events_of(&gateway, &student).await;
    let kinds: Vec<&str> = after.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["StudentDeleted", "StudentErased"],
        "deleted, then erased: {kinds:?}"
    );
    for (kind, personal) in &after {
        if kind == "StudentRegistered" || kind == "StudentUpdated" {
            assert!(
                matches!(personal, Personal::Erased),
                "{kind} still opens: {personal:?}"
            );
        }
    }
    let course_events = read_events_of(&gateway, &course).await;
    assert_eq!(
        course_events.last().map(|(kind, _)| kind.as_str()),
        Some("StudentUnenrolled"),
        "the course forgets the student: {course_events:?}"
    );

    let again = erase(&gateway, &student, ERASE_KEY).await;
    assert_eq!(again.status, StatusCode::NO_CONTENT, "{}", again.raw);
    assert_eq!(read_events_of(&gateway, &student).await.len(), after.len());

    let gone = gateway
        .put(
            &format!("/api/students/{student}"),
            Some(json!({"name": "Ada Lovelace", "first_name": "Ada", "last_name": "Lovelace", "course_ids": []})),
        )
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.raw);

    let unknown = erase(&gateway, &uuid::Uuid::new_v4().to_string(), ERASE_KEY).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.raw);
}

#[tokio::test]
async fn a_deleted_student_can_still_be_erased() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Grace Hopper", &[]).await;
    let deleted = gateway.delete(&format!("/api/students/{student}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.raw);

    let erased = erase(&gateway, &student, ERASE_KEY).await;
    assert_eq!(erased.status, StatusCode::NO_CONTENT, "{}", erased.raw);
    let events = read_events_of(&gateway, &student).await;
    assert_eq!(
        events.last().map(|(kind, _)| kind.as_str()),
        Some("StudentErased")
    );
    assert!(matches!(events[0].1, Personal::Erased), "{events:?}");
}

#[tokio::test]
async fn stored_idempotency_outcomes_never_hold_the_names_and_replays_show_them_until_erasure() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Someone", &[]).await;
    let name = format!("ZephQuill{}", &test_support::unique_suffix()[..8]);
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({"name": name, "first_name": "Zephyrine", "last_name": "Quillfeather", "course_ids": []});
    let path = format!("/api/students/{student}");
    let send = || {
        gateway.send(
            gateway
                .request(Method::PUT, &path)
                .header("idempotency-key", &key)
                .json(&body),
        )
    };
    let first = send().await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.raw);
    assert_eq!(first.body["data"]["name"], name.as_str());

    let stored = idempotency_bucket_bytes(&gateway).await;
    assert!(!stored.is_empty(), "the outcome is stored");
    for needle in [name.as_str(), "Zephyrine", "Quillfeather"] {
        assert!(
            !contains(&stored, needle.as_bytes()),
            "{needle:?} is in the idempotency bucket"
        );
    }

    let replayed = send().await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.raw);
    assert_eq!(
        replayed.body, first.body,
        "a replay answers as the first did"
    );

    let erased = erase(&gateway, &student, ERASE_KEY).await;
    assert_eq!(erased.status, StatusCode::NO_CONTENT, "{}", erased.raw);
    let after = send().await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.raw);
    assert_eq!(after.body["data"]["id"], student.as_str());
    for field in ["name", "first_name", "last_name"] {
        assert!(
            after.body["data"][field].is_null(),
            "{field} after erasure: {}",
            after.raw
        );
    }
    assert!(!after.raw.contains("Quillfeather"), "{}", after.raw);
}

/// Every byte of every message of the gateway's idempotency bucket, history included.
async fn idempotency_bucket_bytes(gateway: &TestGateway) -> Vec<u8> {
    let stream = gateway
        .broker
        .jetstream
        .get_stream(format!("KV_{}", gateway.broker.names.idempotency_bucket()))
        .await
        .expect("the idempotency bucket");
    let last = stream.get_info().await.expect("info").state.last_sequence;
    let mut bytes = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            bytes.extend_from_slice(&message.payload);
            bytes.extend_from_slice(message.subject.as_bytes());
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
