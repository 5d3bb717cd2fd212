//! Every REST read over real HTTP, with the real gateway writing and the real projections
//! applying, on real NATS, Postgres and Redis.

mod common;

use std::time::{Duration, Instant};

use common::{Options, TestSystem};
use reqwest::StatusCode;
use serde_json::json;
use test_support::WRITE_KEY;

#[tokio::test]
async fn single_items_and_both_relation_reads_show_what_was_written() {
    let system = TestSystem::start(Options::default()).await;
    let algebra = system.create_course("Algebra").await;
    let physics = system.create_course("Physics").await;
    let ada = system.register_student("Ada L").await;
    let alan = system.register_student("Alan T").await;
    system.enroll(&ada.id, &algebra.id).await;
    system.enroll(&ada.id, &physics.id).await;
    let last = system.enroll(&alan.id, &algebra.id).await;

    let student = system
        .get_after(&format!("/api/students/{}", ada.id), &last.token)
        .await;
    assert_eq!(student.status, StatusCode::OK, "{student:?}");
    let mut courses = vec![algebra.id.clone(), physics.id.clone()];
    courses.sort();
    assert_eq!(
        student.body,
        json!({"data": {"id": ada.id, "name": "Ada L", "first_name": "First", "last_name": "Last", "course_ids": courses}})
    );

    let course = system
        .get_after(&format!("/api/courses/{}", algebra.id), &last.token)
        .await;
    assert_eq!(course.status, StatusCode::OK, "{course:?}");
    let mut students = vec![ada.id.clone(), alan.id.clone()];
    students.sort();
    assert_eq!(
        course.body,
        json!({"data": {"id": algebra.id, "name": "Algebra", "description": "About it", "discipline": "Maths", "teacher": "Teacher", "student_ids": students}})
    );

    let of_ada = system
        .get_after(&format!("/api/students/{}/courses", ada.id), &last.token)
        .await;
    assert_eq!(of_ada.status, StatusCode::OK, "{of_ada:?}");
    assert_eq!(of_ada.ids(), courses);
    assert_eq!(of_ada.body["data"][0]["teacher"], "Teacher");
    assert_eq!(of_ada.body["next_cursor"], json!(null));

    let in_algebra = system
        .get_after(
            &format!("/api/courses/{}/students", algebra.id),
            &last.token,
        )
        .await;
    assert_eq!(in_algebra.ids(), students);
    assert_eq!(in_algebra.body["data"][0]["last_name"], "Last");

    // The relation pages are paged too.
    let first = system
        .get(&format!("/api/students/{}/courses?limit=1", ada.id))
        .await;
    assert_eq!(first.ids(), courses[..1]);
    let cursor = first.body["next_cursor"].as_str().expect("a next page");
    let second = system
        .get(&format!(
            "/api/students/{}/courses?limit=1&cursor={cursor}",
            ada.id
        ))
        .await;
    assert_eq!(second.ids(), courses[1..]);
    assert_eq!(second.body["next_cursor"], json!(null));

    let lists = system.get_after("/api/courses", &last.token).await;
    assert_eq!(lists.ids(), vec![algebra.id.clone(), physics.id.clone()]);
    system.cleanup().await;
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404_problems_on_every_item_route() {
    let system = TestSystem::start(Options::default()).await;
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/api/students/{unknown}"),
        format!("/api/courses/{unknown}"),
        format!("/api/students/{unknown}/courses"),
        format!("/api/courses/{unknown}/students"),
        "/api/students/not-a-uuid".into(),
        "/api/courses/not-a-uuid/students".into(),
    ] {
        let answer = system.get(&path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert!(answer.is_problem(), "{path}: {answer:?}");
    }
    system.cleanup().await;
}

#[tokio::test]
async fn pages_cover_every_student_once_while_students_are_added_and_removed() {
    let system = TestSystem::start(Options::default()).await;
    let mut expected = Vec::new();
    let mut last = None;
    for n in 0..7 {
        let written = system.register_student(&format!("Student {n}")).await;
        expected.push(written.id.clone());
        last = Some(written);
    }
    let mut token = last.expect("written").token;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/students?limit=3&cursor={cursor}"),
            None => "/api/students?limit=3".into(),
        };
        let page = system.get_after(&path, &token).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let ids = page.ids();
        assert!(ids.len() <= 3);
        seen.extend(ids);
        pages += 1;
        if pages == 1 {
            // Writes between pages: one student after the cursor appears later, one
            // already seen goes away; neither shifts what the next page starts with.
            let late = system.register_student("Late Comer").await;
            expected.push(late.id);
            token = system.delete_student(&expected[0]).await.token;
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, expected, "every student once, in creation order");
    assert_eq!(pages, 3);
    system.cleanup().await;
}

#[tokio::test]
async fn bad_page_parameters_and_tokens_are_problems() {
    let system = TestSystem::start(Options::default()).await;
    for query in ["limit=0", "limit=101", "limit=abc", "cursor=bm9wZQ"] {
        for route in ["/api/students", "/api/courses"] {
            let answer = system.get(&format!("{route}?{query}")).await;
            assert_eq!(
                answer.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{route}?{query}"
            );
            assert!(answer.is_problem());
        }
    }
    let answer = system.get_after("/api/students", "soon").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(answer.is_problem());
    system.cleanup().await;
}

#[tokio::test]
async fn a_read_with_the_token_always_sees_the_write_even_through_the_cache() {
    let system = TestSystem::start(Options::default()).await;
    let ada = system.register_student("Ada L").await;
    let path = format!("/api/students/{}", ada.id);
    let first = system.get_after(&path, &ada.token).await;
    assert_eq!(first.body["data"]["name"], "Ada L");
    for round in 0..25 {
        let name = format!("Ada {round:02}");
        let written = system.rename_student(&ada.id, &name, &[]).await;
        // Warm the cache with whatever the model holds right now (maybe the old name)...
        let _ = system.get(&path).await;
        // ...and the read with the token still must see the new name.
        let read = system.get_after(&path, &written.token).await;
        assert_eq!(read.status, StatusCode::OK, "{read:?}");
        assert_eq!(read.body["data"]["name"], name.as_str(), "round {round}");
        assert_eq!(read.header("etag"), format!("\"{}\"", written.token));
    }
    system.cleanup().await;
}

#[tokio::test]
async fn a_cached_entry_older_than_the_token_is_not_served_even_if_invalidation_was_lost() {
    let system = TestSystem::start(Options {
        invalidate: false,
        ..Options::default()
    })
    .await;
    let ada = system.register_student("Ada L").await;
    let path = format!("/api/students/{}", ada.id);
    let cached = system.get_after(&path, &ada.token).await;
    assert_eq!(cached.body["data"]["name"], "Ada L");
    let renamed = system.rename_student(&ada.id, "Ada K", &[]).await;
    let read = system.get_after(&path, &renamed.token).await;
    assert_eq!(read.body["data"]["name"], "Ada K");
    // Without a token (and without invalidation) the old entry may be served until it
    // expires: the cache is allowed to lag, never to go back behind a token.
    let lagging = system.get(&path).await;
    assert_eq!(lagging.status, StatusCode::OK);
    system.cleanup().await;
}

/// query-api keeps what it reads from Redis in memory too (server-assisted client-side
/// caching). A token-less read must not be served that copy once the projector has
/// invalidated the entry in Redis: Redis tells the connection, and the copy goes.
#[tokio::test]
async fn a_copy_held_in_memory_goes_when_the_projector_invalidates_the_entry() {
    let system = TestSystem::start(Options::default()).await;
    let ada = system.register_student("Ada L").await;
    let path = format!("/api/students/{}", ada.id);
    let key = system.broker.names.cache_key(
        events::AggregateKind::Student,
        ada.id.parse().expect("uuid"),
    );
    let port = system.redis.as_ref().expect("redis").port;
    assert_eq!(system_get_name(&system, &path, &ada.token).await, "Ada L");
    // A copy the first reads left in memory may be the entry as it was before their own
    // store (query-api's LOCAL_TTL bounds that case): let it expire, then read once more.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = system.get(&path).await;
    // Served from memory now: read again without a token, Redis is not asked.
    let gets_before = redis_gets(port).await;
    for _ in 0..5 {
        assert_eq!(system.get(&path).await.body["data"]["name"], "Ada L");
    }
    let asked = redis_gets(port).await - gets_before;
    assert!(asked < 5, "5 reads asked Redis {asked} times");
    let renamed = system.rename_student(&ada.id, "Ada K", &[]).await;
    let position: u64 = renamed.token.parse().expect("token");
    test_support::eventually(10, "the projector to invalidate the entry", || async {
        let entry = cached_entry(port, &key).await?;
        let (at, _) = entry.split_once(':')?;
        (at.parse::<u64>().ok()? >= position).then_some(())
    })
    .await;
    test_support::eventually(2, "a token-less read to see the rename", || async {
        let read = system.get(&path).await;
        (read.body["data"]["name"] == "Ada K").then_some(())
    })
    .await;
    system.cleanup().await;
}

#[tokio::test]
async fn a_token_from_the_other_aggregate_kind_does_not_wait_for_the_timeout() {
    let system = TestSystem::start(Options {
        consistency_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let ada = system.register_student("Ada L").await;
    // The newest event is a course event: the students projection never sees it.
    let algebra = system.create_course("Algebra").await;
    let started = Instant::now();
    let read = system
        .get_after(&format!("/api/students/{}", ada.id), &algebra.token)
        .await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered when the students projection had applied all of its events, not at the timeout ({:?})",
        started.elapsed()
    );
    system.cleanup().await;
}

#[tokio::test]
async fn without_the_token_a_read_may_lag_with_it_the_read_waits_then_answers_503() {
    let system = TestSystem::start(Options {
        projectors: false,
        consistency_wait: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let ada = system.register_student("Ada L").await;
    let path = format!("/api/students/{}", ada.id);
    // Nothing projects: without the token the read answers at once from the lagging model.
    let lagging = system.get(&path).await;
    assert_eq!(lagging.status, StatusCode::NOT_FOUND);
    let started = Instant::now();
    let waited = system.get_after(&path, &ada.token).await;
    assert_eq!(waited.status, StatusCode::SERVICE_UNAVAILABLE, "{waited:?}");
    assert!(waited.is_problem());
    assert_eq!(waited.header("retry-after"), "1");
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited");
    // A token beyond the end of the stream names no write yet: it cannot be reached.
    let future = system.get_after("/api/students", "999999999").await;
    assert_eq!(future.status, StatusCode::SERVICE_UNAVAILABLE);
    system.cleanup().await;
}

#[tokio::test]
async fn a_token_past_the_stream_end_waits_for_the_end_not_for_a_timeout() {
    let system = TestSystem::start(Options {
        consistency_wait: Duration::from_secs(5),
        ..Options::default()
    })
    .await;
    let ada = system.register_student("Ada L").await;
    // No write of the client's can lie past the stream's end: the read waits until the
    // models reflect the whole stream, then answers (with the write in it).
    let started = Instant::now();
    let read = system
        .get_after(&format!("/api/students/{}", ada.id), "999999999")
        .await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered before the wait ran out: {:?}",
        started.elapsed()
    );
    system.cleanup().await;
}

#[tokio::test]
async fn etags_answer_304_for_students_and_courses() {
    let system = TestSystem::start(Options::default()).await;
    let ada = system.register_student("Ada L").await;
    let algebra = system.create_course("Algebra").await;
    for (path, token) in [
        (format!("/api/students/{}", ada.id), &ada.token),
        (format!("/api/courses/{}", algebra.id), &algebra.token),
    ] {
        let first = system.get_after(&path, token).await;
        let etag = first.header("etag").to_owned();
        assert_eq!(etag, format!("\"{token}\""), "{path}");
        // Twice: once from the database, once from the cache (which must keep the version).
        for _ in 0..2 {
            let again = system.get_with(&path, &[("if-none-match", &etag)]).await;
            assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{path}");
            assert_eq!(again.header("etag"), etag);
        }
        let other = system.get_with(&path, &[("if-none-match", "\"0\"")]).await;
        assert_eq!(other.status, StatusCode::OK);
    }
    system.cleanup().await;
}

#[tokio::test]
async fn reads_need_a_key_and_any_key_may_read() {
    let system = TestSystem::start(Options::default()).await;
    let url = format!("{}/api/students", system.query);
    let anonymous = common::read(system.http.get(&url).send().await.expect("request")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert!(anonymous.is_problem());
    let wrong = common::read(
        system
            .http
            .get(&url)
            .header("x-api-key", "not-a-key")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let writer = common::read(
        system
            .http
            .get(&url)
            .header("x-api-key", WRITE_KEY)
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(writer.status, StatusCode::OK);
    system.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_names_every_read_route() {
    let system = TestSystem::start(Options::default()).await;
    let doc = common::read(
        system
            .http
            .get(format!("{}/openapi.json", system.query))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(doc.status, StatusCode::OK);
    for route in [
        "/api/students",
        "/api/students/{id}",
        "/api/students/{id}/courses",
        "/api/courses",
        "/api/courses/{id}",
        "/api/courses/{id}/students",
    ] {
        assert!(doc.body["paths"][route]["get"].is_object(), "{route}");
    }
    system.cleanup().await;
}

#[tokio::test]
async fn with_redis_stopped_reads_come_from_the_databases_and_the_cache_returns_with_redis() {
    let mut system = TestSystem::start(Options::default()).await;
    let ada = system.register_student("Ada L").await;
    let path = format!("/api/students/{}", ada.id);
    let key = system.broker.names.cache_key(
        events::AggregateKind::Student,
        ada.id.parse().expect("uuid"),
    );
    let redis = system.redis.as_mut().expect("redis");
    let port = redis.port;
    assert_eq!(system_get_name(&system, &path, &ada.token).await, "Ada L");
    assert!(
        cached_entry(port, &key).await.is_some(),
        "the read filled the cache"
    );

    system.redis.as_mut().expect("redis").stop();
    let started = Instant::now();
    assert_eq!(system.get(&path).await.status, StatusCode::OK);
    let renamed = system.rename_student(&ada.id, "Ada K", &[]).await;
    assert_eq!(
        system_get_name(&system, &path, &renamed.token).await,
        "Ada K"
    );
    for _ in 0..20 {
        assert_eq!(system.get(&path).await.status, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "reads do not wait for the dead Redis ({:?})",
        started.elapsed()
    );
    let raw = system
        .http
        .get(format!("{}/metrics", system.query))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        raw.lines()
            .any(|l| l.starts_with("query_cache_requests_total{") && l.contains("result=\"error\"")),
        "the outage shows in the metrics:\n{raw}"
    );

    // Redis back on the same port: after the back-off, reads fill the cache again.
    system.redis = Some(test_support::RedisServer::start(port));
    system.redis.as_ref().expect("redis").ready().await;
    test_support::eventually(10, "the cache to be used again", || async {
        let _ = system.get(&path).await;
        cached_entry(port, &key)
            .await
            .filter(|entry| entry.contains("Ada K"))
            .map(|_| ())
    })
    .await;
    system.cleanup().await;
}

async fn system_get_name(system: &TestSystem, path: &str, token: &str) -> String {
    let answer = system.get_after(path, token).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    answer.body["data"]["name"]
        .as_str()
        .expect("name")
        .to_owned()
}

/// GET commands Redis has served so far (`INFO commandstats`).
async fn redis_gets(port: u16) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("info");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_get:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// The raw cache entry under `key` (`None` when there is none or Redis is down).
async fn cached_entry(port: u16, key: &str) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    redis::cmd("GET")
        .arg(key)
        .query_async::<Option<String>>(&mut connection)
        .await
        .ok()
        .flatten()
}
