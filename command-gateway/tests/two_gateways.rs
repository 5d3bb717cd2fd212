//! Two gateway instances on one stream, as the chart runs them: an answer that appends
//! nothing (a `412`, a rule's refusal, a no-op) must come from state verified current, not
//! from the instance's own cache, which never sees the other instance's writes. Each case
//! was answered wrongly before: a correct `If-Match` got `412` again and again, a `PUT`
//! was answered `200` while nothing was appended, a course another instance emptied was
//! "full", an enrollment another instance made was "not enrolled".

mod common;

use common::{Answer, TestGateway};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn student_body(name: &str, courses: &[&str]) -> Value {
    json!({"name": name, "first_name": "First", "last_name": "Last", "course_ids": courses})
}

/// The second instance, spoken to like the first.
struct Other<'a> {
    gateway: &'a TestGateway,
    url: String,
}

impl Other<'_> {
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut request = self
            .gateway
            .http
            .request(method, format!("{}{path}", self.url))
            .header("x-api-key", test_support::WRITE_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.gateway.send(request).await
    }
}

async fn two() -> (TestGateway, String) {
    let gateway = TestGateway::spawn().await;
    let other = gateway.another_instance().await;
    (gateway, other)
}

#[tokio::test]
async fn an_if_match_with_the_version_another_instance_wrote_is_accepted() {
    let (a, b) = two().await;
    let b = Other {
        gateway: &a,
        url: b,
    };
    let id = a.student("Ada L", &[]).await;
    let path = format!("/api/students/{id}");
    // A reads it (and caches it); B changes it.
    assert_eq!(
        a.put(&path, Some(student_body("Ada A", &[]))).await.status,
        StatusCode::OK
    );
    let changed = b
        .send(Method::PUT, &path, Some(student_body("Ada B", &[])))
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.raw);
    let etag = changed.header("etag").to_owned();
    // A with B's ETag: the version is current, so it must be accepted.
    let request = a
        .request(Method::PUT, &path)
        .header("if-match", &etag)
        .json(&student_body("Ada C", &[]));
    let answer = a.send(request).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.raw);
    a.broker.cleanup().await;
}

#[tokio::test]
async fn a_put_back_to_a_value_another_instance_changed_is_appended() {
    let (a, b) = two().await;
    let b = Other {
        gateway: &a,
        url: b,
    };
    let id = a.student("Name X", &[]).await;
    let path = format!("/api/students/{id}");
    let renamed = b
        .send(Method::PUT, &path, Some(student_body("Name Y", &[])))
        .await;
    assert_eq!(renamed.status, StatusCode::OK);
    // A still caches X: renaming back to X is a change, not a no-op.
    let back = a.put(&path, Some(student_body("Name X", &[]))).await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.raw);
    let updates = a
        .stored_events()
        .await
        .iter()
        .filter(|(_, t)| t == "StudentUpdated")
        .count();
    assert_eq!(updates, 2, "the rename back was not appended");
    a.broker.cleanup().await;
}

#[tokio::test]
async fn a_course_another_instance_emptied_is_not_full() {
    let (a, b) = two().await;
    let b = Other {
        gateway: &a,
        url: b,
    };
    let mut students = Vec::new();
    for n in 0..61 {
        students.push(a.student(&format!("Student {n:02}"), &[]).await);
    }
    let refs: Vec<&str> = students[..60].iter().map(String::as_str).collect();
    let course = a.course("Full one", &refs).await;
    // A sees it full.
    let refused = a
        .put(
            &format!("/api/students/{}/courses/{course}", students[60]),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    // B takes one student out; A must now let the 61st in.
    let out = b
        .send(
            Method::DELETE,
            &format!("/api/students/{}/courses/{course}", students[0]),
            None,
        )
        .await;
    assert!(out.status.is_success(), "{}", out.raw);
    let enrolled = a
        .put(
            &format!("/api/students/{}/courses/{course}", students[60]),
            None,
        )
        .await;
    assert!(
        enrolled.status.is_success(),
        "{} {}",
        enrolled.status,
        enrolled.raw
    );
    a.broker.cleanup().await;
}

#[tokio::test]
async fn an_enrollment_another_instance_made_can_be_removed() {
    let (a, b) = two().await;
    let b = Other {
        gateway: &a,
        url: b,
    };
    let student = a.student("Ada L", &[]).await;
    let course = a.course("Algebra", &[]).await;
    let path = format!("/api/students/{student}/courses/{course}");
    // A caches both without the enrollment; B enrolls.
    assert_eq!(a.delete(&path).await.status, StatusCode::NOT_FOUND);
    let enrolled = b.send(Method::PUT, &path, None).await;
    assert!(enrolled.status.is_success(), "{}", enrolled.raw);
    let removed = a.delete(&path).await;
    assert!(
        removed.status.is_success(),
        "{} {}",
        removed.status,
        removed.raw
    );
    a.broker.cleanup().await;
}
