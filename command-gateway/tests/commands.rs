//! Every command over HTTP against a real JetStream: the rules, preconditions, invariants
//! under concurrency, idempotency keys, and hostile bodies.

mod common;

use std::collections::BTreeSet;

use common::{Answer, TestGateway};
use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn ids(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .expect("array of ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn student_body(name: &str, courses: &[&str]) -> Value {
    json!({"name": name, "first_name": "First", "last_name": "Last", "course_ids": courses})
}

fn course_body(name: &str, students: &[&str]) -> Value {
    json!({"name": name, "description": "About it", "discipline": "Maths", "teacher": "Teacher", "student_ids": students})
}

#[tokio::test]
async fn a_student_and_course_lifecycle_keeps_both_sides_of_every_enrollment() {
    let gateway = TestGateway::spawn().await;
    let algebra = gateway.course("Algebra", &[]).await;
    let geometry = gateway.course("Geometry", &[]).await;
    let ada = gateway.student("Ada L", &[&algebra]).await;

    // PUT replaces the course list: the difference becomes unenroll + enroll.
    let replaced = gateway
        .put(
            &format!("/api/students/{ada}"),
            Some(student_body("Ada King", &[&geometry])),
        )
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.raw);
    assert_eq!(replaced.body["data"]["name"], "Ada King");
    assert_eq!(ids(&replaced.body["data"]["course_ids"]), set(&[&geometry]));

    // The course side followed: its PUT answer lists the student.
    let geometry_now = gateway
        .put(
            &format!("/api/courses/{geometry}"),
            Some(course_body("Geometry", &[&ada])),
        )
        .await;
    assert_eq!(geometry_now.status, StatusCode::OK);
    assert_eq!(ids(&geometry_now.body["data"]["student_ids"]), set(&[&ada]));

    // Explicit enrollment, then deleting the course removes it from the student.
    let enrolled = gateway
        .put(&format!("/api/students/{ada}/courses/{algebra}"), None)
        .await;
    assert_eq!(enrolled.status, StatusCode::NO_CONTENT);
    let deleted = gateway.delete(&format!("/api/courses/{algebra}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(!deleted.header("x-consistency-token").is_empty());
    let ada_now = gateway
        .put(
            &format!("/api/students/{ada}"),
            Some(student_body("Ada King", &[&geometry])),
        )
        .await;
    assert_eq!(ids(&ada_now.body["data"]["course_ids"]), set(&[&geometry]));

    // Deleting the student removes it from its courses.
    assert_eq!(
        gateway.delete(&format!("/api/students/{ada}")).await.status,
        StatusCode::NO_CONTENT
    );
    let geometry_after = gateway
        .put(
            &format!("/api/courses/{geometry}"),
            Some(course_body("Geometry", &[])),
        )
        .await;
    assert_eq!(
        ids(&geometry_after.body["data"]["student_ids"]),
        BTreeSet::new()
    );

    // Every enrollment change was recorded on both subjects.
    let events = gateway.stored_events().await;
    let count = |event_type: &str, kind: &str| {
        events
            .iter()
            .filter(|(subject, t)| t == event_type && subject.contains(&format!(".{kind}.")))
            .count()
    };
    assert_eq!(
        count("StudentEnrolled", "student"),
        count("StudentEnrolled", "course")
    );
    assert_eq!(count("StudentEnrolled", "student"), 3);
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn missing_aggregates_and_relations_are_404_problems() {
    let gateway = TestGateway::spawn().await;
    let ghost = uuid::Uuid::now_v7().to_string();
    let course = gateway.course("Algebra", &[]).await;
    let student = gateway.student("Ada L", &[]).await;
    let cases = [
        gateway
            .put(
                &format!("/api/students/{ghost}"),
                Some(student_body("Ada L", &[])),
            )
            .await,
        gateway.delete(&format!("/api/students/{ghost}")).await,
        gateway
            .put(
                &format!("/api/courses/{ghost}"),
                Some(course_body("Algebra", &[])),
            )
            .await,
        gateway.delete(&format!("/api/courses/{ghost}")).await,
        gateway
            .put(&format!("/api/students/{student}/courses/{ghost}"), None)
            .await,
        gateway
            .put(&format!("/api/students/{ghost}/courses/{course}"), None)
            .await,
        gateway.delete("/api/students/not-a-uuid").await,
    ];
    for answer in &cases {
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.raw);
        assert_eq!(answer.problem_type(), "not-found");
    }
    let not_enrolled = gateway
        .delete(&format!("/api/students/{student}/courses/{course}"))
        .await;
    assert_eq!(not_enrolled.status, StatusCode::NOT_FOUND);
    assert_eq!(not_enrolled.problem_type(), "not-enrolled");
    // A body naming a course that does not exist is invalid input, not a missing resource.
    let unknown = gateway
        .post("/api/students", student_body("Ada L", &[&ghost]))
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(unknown.body["errors"][0]["field"], "course_ids");
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn if_match_guards_replacements_and_deletes() {
    let gateway = TestGateway::spawn().await;
    let created = gateway
        .post("/api/students", student_body("Ada L", &[]))
        .await;
    let id = created.body["data"]["id"].as_str().expect("id").to_owned();
    let etag = created.header("etag").to_owned();

    let stale = gateway
        .send(
            gateway
                .request(Method::PUT, &format!("/api/students/{id}"))
                .header("if-match", "\"999999\"")
                .json(&student_body("Ada King", &[])),
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.problem_type(), "precondition-failed");

    let fresh = gateway
        .send(
            gateway
                .request(Method::PUT, &format!("/api/students/{id}"))
                .header("if-match", &etag)
                .json(&student_body("Ada King", &[])),
        )
        .await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_ne!(fresh.header("etag"), etag, "the version moved");

    let delete_with_old_tag = gateway
        .send(
            gateway
                .request(Method::DELETE, &format!("/api/students/{id}"))
                .header("if-match", &etag),
        )
        .await;
    assert_eq!(delete_with_old_tag.status, StatusCode::PRECONDITION_FAILED);
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn a_hundred_concurrent_enrollments_into_one_course_admit_exactly_sixty() {
    let gateway = TestGateway::spawn().await;
    let course = gateway.course("Popular", &[]).await;
    let students = join_all((0..100).map(|n| {
        let gateway = &gateway;
        async move { gateway.student(&format!("Student {n:03}"), &[]).await }
    }))
    .await;
    let (gateway_ref, course_ref) = (&gateway, &course);
    let answers: Vec<Answer> = join_all(students.iter().map(|student| async move {
        let (gateway, course) = (gateway_ref, course_ref);
        gateway
            .put(&format!("/api/students/{student}/courses/{course}"), None)
            .await
    }))
    .await;
    let accepted = answers
        .iter()
        .filter(|a| a.status == StatusCode::NO_CONTENT)
        .count();
    let full = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT && a.problem_type() == "course-full")
        .count();
    assert_eq!(accepted, 60, "exactly 60 admitted");
    assert_eq!(
        full,
        40,
        "the rest told the course is full: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );

    let events = gateway.stored_events().await;
    let on_course = events
        .iter()
        .filter(|(subject, t)| t == "StudentEnrolled" && subject.ends_with(&course))
        .count();
    assert_eq!(
        on_course, 60,
        "the stream holds exactly 60 enrollments of the course"
    );
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn one_student_enrolled_concurrently_into_thirty_courses_gets_exactly_fifteen() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Busy Bee", &[]).await;
    let courses = join_all((0..30).map(|n| {
        let gateway = &gateway;
        async move { gateway.course(&format!("Course {n:02}"), &[]).await }
    }))
    .await;
    let (gateway_ref, student_ref) = (&gateway, &student);
    let answers: Vec<Answer> = join_all(courses.iter().map(|course| async move {
        let (gateway, student) = (gateway_ref, student_ref);
        gateway
            .put(&format!("/api/students/{student}/courses/{course}"), None)
            .await
    }))
    .await;
    let accepted = answers
        .iter()
        .filter(|a| a.status == StatusCode::NO_CONTENT)
        .count();
    let limited = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT && a.problem_type() == "student-course-limit")
        .count();
    assert_eq!((accepted, limited), (15, 15));
    let events = gateway.stored_events().await;
    let on_student = events
        .iter()
        .filter(|(subject, t)| t == "StudentEnrolled" && subject.ends_with(&student))
        .count();
    assert_eq!(on_student, 15);
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn twenty_concurrent_puts_with_the_same_if_match_let_exactly_one_through() {
    let gateway = TestGateway::spawn().await;
    // Two gateway processes on the same stream: the broker, not a lock, decides.
    let replica = gateway.another_instance().await;
    let created = gateway
        .post("/api/students", student_body("Ada L", &[]))
        .await;
    let id = created.body["data"]["id"].as_str().expect("id").to_owned();
    let etag = created.header("etag").to_owned();
    let answers: Vec<Answer> = join_all((0..20).map(|n| {
        let base = if n % 2 == 0 {
            gateway.url.clone()
        } else {
            replica.clone()
        };
        let request = gateway
            .http
            .put(format!("{base}/api/students/{id}"))
            .header("x-api-key", test_support::WRITE_KEY)
            .header("if-match", &etag)
            .json(&student_body(&format!("Name {n:02}"), &[]));
        gateway.send(request)
    }))
    .await;
    let ok = answers.iter().filter(|a| a.status.is_success()).count();
    let precondition = answers
        .iter()
        .filter(|a| a.status == StatusCode::PRECONDITION_FAILED)
        .count();
    assert_eq!(
        (ok, precondition),
        (1, 19),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let updates = gateway
        .stored_events()
        .await
        .iter()
        .filter(|(_, t)| t == "StudentUpdated")
        .count();
    assert_eq!(updates, 1);
    gateway.broker.cleanup().await;
}

#[tokio::test]
async fn a_retried_idempotency_key_returns_the_first_outcome_also_from_a_restarted_gateway() {
    let gateway = TestGateway::spawn().await;
    let key = uuid::Uuid::new_v4().to_string();
    let post = |base: String| {
        gateway
            .http
            .post(format!("{base}/api/students"))
            .header("x-api-key", test_support::WRITE_KEY)
            .header("idempotency-key", &key)
            .json(&student_body("Ada L", &[]))
    };
    let first = gateway.send(post(gateway.url.clone())).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = gateway.send(post(gateway.url.clone())).await;
    // A new gateway process (as after a restart, or another replica) knows the key too.
    let restarted = gateway.another_instance().await;
    let elsewhere = gateway.send(post(restarted)).await;
    for retry in [&again, &elsewhere] {
        assert_eq!(retry.status, first.status);
        assert_eq!(retry.raw, first.raw, "same body, same id");
        assert_eq!(retry.header("etag"), first.header("etag"));
        assert_eq!(
            retry.header("x-consistency-token"),
            first.header("x-consistency-token")
        );
        assert_eq!(retry.header("idempotent-replayed"), "true");
    }
    let registered = gateway
        .stored_events()
        .await
        .iter()
        .filter(|(_, t)| t == "StudentRegistered")
        .count();
    assert_eq!(registered, 1, "one set of events");

    // The same key for a different request is refused.
    let other = gateway
        .send(
            gateway
                .request(Method::POST, "/api/students")
                .header("idempotency-key", &key)
                .json(&student_body("Grace H", &[])),
        )
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.problem_type(), "idempotency-key-reused");
    gateway.broker.cleanup().await;
}

/// What a `503` for an append the broker did store leaves behind: the events are in the
/// stream and no outcome is kept under the key (server errors are not remembered).
async fn forget_idempotency_outcomes(gateway: &TestGateway) {
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
    assert!(!keys.is_empty(), "the first attempt kept an outcome");
    for key in keys {
        bucket.purge(&key).await.expect("purge");
    }
}

fn token(answer: &Answer) -> u64 {
    answer
        .header("x-consistency-token")
        .parse()
        .expect("a numeric token")
}

#[tokio::test]
async fn a_create_retried_after_its_outcome_was_lost_answers_what_the_first_attempt_made() {
    let gateway = TestGateway::spawn().await;
    let algebra = gateway.course("Algebra", &[]).await;
    let key = uuid::Uuid::new_v4().to_string();
    let cases = [
        (
            "/api/students",
            student_body("Ada L", &[&algebra]),
            "StudentRegistered",
        ),
        ("/api/courses", course_body("Optics", &[]), "CourseCreated"),
    ];
    for (path, body, created_type) in cases {
        let post = || {
            gateway
                .request(Method::POST, path)
                .header("idempotency-key", &key)
                .json(&body)
        };
        let first = gateway.send(post()).await;
        assert_eq!(first.status, StatusCode::CREATED, "{path}: {}", first.raw);
        forget_idempotency_outcomes(&gateway).await;
        let retry = gateway.send(post()).await;
        assert_eq!(retry.status, StatusCode::CREATED, "{path}: {}", retry.raw);
        assert_eq!(
            retry.body["data"]["id"], first.body["data"]["id"],
            "{path}: the retry names what the first attempt made"
        );
        assert_eq!(retry.header("etag"), first.header("etag"), "{path}");
        assert_eq!(retry.header("location"), first.header("location"), "{path}");
        assert!(
            token(&retry) >= token(&first),
            "{path}: the token covers the creation"
        );
        let made = gateway
            .stored_events()
            .await
            .iter()
            .filter(|(_, t)| t == created_type)
            .count();
        let expected = if created_type == "CourseCreated" {
            2
        } else {
            1
        };
        assert_eq!(made, expected, "{path}: made once");
        // The same key with another body is another request, with an aggregate of its own.
        forget_idempotency_outcomes(&gateway).await;
        let mut other_body = body.clone();
        other_body["name"] = json!("Other name");
        let other = gateway
            .send(
                gateway
                    .request(Method::POST, path)
                    .header("idempotency-key", &key)
                    .json(&other_body),
            )
            .await;
        assert_eq!(other.status, StatusCode::CREATED, "{path}: {}", other.raw);
        assert_ne!(other.body["data"]["id"], first.body["data"]["id"], "{path}");
        forget_idempotency_outcomes(&gateway).await;
    }
    gateway.broker.cleanup().await;
}

/// A small deterministic generator, so a failure names a reproducible case.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 2 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.next() as i64),
            3 => json!(-(self.below(1000) as f64) / 7.0),
            4 => json!(self.text()),
            5 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut object = serde_json::Map::new();
                for _ in 0..self.below(6) {
                    object.insert(self.field(), self.value(depth + 1));
                }
                Value::Object(object)
            }
        }
    }

    fn field(&mut self) -> String {
        const FIELDS: [&str; 10] = [
            "name",
            "first_name",
            "last_name",
            "course_ids",
            "student_ids",
            "description",
            "discipline",
            "teacher",
            "id",
            "extra",
        ];
        FIELDS[self.below(FIELDS.len() as u64) as usize].to_owned()
    }

    fn text(&mut self) -> String {
        const PIECES: [&str; 8] = [
            "a",
            "Zoë",
            "数",
            " ",
            "\u{0}",
            "\"",
            "😀",
            "0193a1c2-0000-7000-8000-000000000001",
        ];
        (0..self.below(30))
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }
}

#[tokio::test]
async fn random_and_malformed_bodies_never_get_a_5xx_from_any_endpoint() {
    let gateway = TestGateway::spawn().await;
    let student = gateway.student("Ada L", &[]).await;
    let course = gateway.course("Algebra", &[]).await;
    let endpoints = [
        (Method::POST, "/api/students".to_owned()),
        (Method::PUT, format!("/api/students/{student}")),
        (Method::POST, "/api/courses".to_owned()),
        (Method::PUT, format!("/api/courses/{course}")),
        (
            Method::PUT,
            format!("/api/students/{student}/courses/{course}"),
        ),
        (
            Method::DELETE,
            format!("/api/students/{student}/courses/{course}"),
        ),
    ];
    let mut random = XorShift(0x5eed_1234_abcd_0001);
    let mut bodies: Vec<String> = (0..60).map(|_| random.value(0).to_string()).collect();
    bodies.extend(
        [
            "",
            "{",
            "}",
            "[",
            "nul",
            "{\"name\":",
            "\u{feff}{}",
            "{\"name\": \"\\ud800\"}",
            "{\"course_ids\": [1, 2]}",
        ]
        .map(str::to_owned),
    );
    bodies.push(format!("{{\"name\": \"{}\"}}", "x".repeat(70_000)));
    bodies.push("[".repeat(10_000));
    for (method, path) in &endpoints {
        for body in &bodies {
            let answer = gateway
                .send(
                    gateway
                        .request(method.clone(), path)
                        .header("content-type", "application/json")
                        .body(body.clone()),
                )
                .await;
            assert!(
                answer.status.as_u16() < 500,
                "{method} {path} with {:.80} answered {}: {}",
                body,
                answer.status,
                answer.raw
            );
            if !answer.status.is_success() {
                answer.problem_type();
            }
        }
    }
    gateway.broker.cleanup().await;
}
