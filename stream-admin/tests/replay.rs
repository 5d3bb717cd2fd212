//! `replay` against real NATS and Postgres, with the live projection running and a reader
//! polling the REST API the whole time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Live, registered, school};
use projectors::generation::{Generation, STUDENTS};
use stream_admin::replay::{ReplayOptions, ReplayTarget, replay};
use uuid::Uuid;

const OPTIONS: ReplayOptions = ReplayOptions {
    force: false,
    keep_old: true,
    restart: false,
    batch_size: 100,
    progress: false,
};

fn target(live: &Live) -> ReplayTarget<projectors::PgStudents> {
    ReplayTarget {
        model: STUDENTS,
        pool: live.db.pool.clone(),
        next: live.students.generation(Generation::Next),
    }
}

/// query-api's REST router on the test database (no cache, no NATS).
async fn serve_reads(live: &Live) -> String {
    let models = query_api::read_models::ReadModels {
        students: query_api::pg_students::PgStudents::new(live.db.pool.clone()),
        courses: projectors::CourseStore::connect(&live.db.url)
            .await
            .expect("courses store"),
    };
    let consistency = query_api::consistency::Consistency::new(
        models.clone(),
        None,
        live.broker.names.clone(),
        Duration::from_secs(1),
    );
    let queries = query_api::Queries::new(
        models,
        query_api::cache::Cache::new(None).expect("no cache"),
        live.broker.names.clone(),
        consistency,
    );
    let app = query_api::http::router(queries, test_support::api_keys());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(query_api::run(listener, app, std::future::pending()));
    url
}

#[tokio::test]
async fn replay_rebuilds_an_equal_model_and_switches_while_reads_never_fail() {
    let live = Live::start().await;
    let last = live.publish_all(&school(1500)).await;
    live.caught_up(last).await;
    let sample = Uuid::now_v7();
    live.caught_up(live.publish(&registered(sample, "Sample S")).await)
        .await;

    let url = serve_reads(&live).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                for path in [
                    "/api/students?limit=50".to_owned(),
                    format!("/api/students/{sample}"),
                ] {
                    let answer = http
                        .get(format!("{url}{path}"))
                        .header("x-api-key", test_support::READ_KEY)
                        .send()
                        .await;
                    match answer {
                        Ok(response) if response.status().is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        })
    };
    // Writes keep coming while the replay runs.
    let writer = {
        let events = school(300);
        let broker_js = live.broker.jetstream.clone();
        let names = live.broker.names.clone();
        tokio::spawn(async move {
            for event in events {
                let subject = names
                    .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
                let _ = broker_js
                    .publish(subject, events::encode(&event).into())
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let report = replay(
        &live.broker.client,
        &live.broker.names,
        target(&live),
        OPTIONS,
    )
    .await
    .expect("replay");
    writer.await.expect("writer");
    stop.store(true, Ordering::Relaxed);
    reader.await.expect("reader");

    assert_eq!(
        report.switch.live, report.switch.next,
        "verified equal before switching"
    );
    assert!(report.switch.next.rows >= 1501, "{:?}", report.switch);
    assert!(report.applied > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no read failed");
    assert!(ok.load(Ordering::Relaxed) > 10, "the reader kept reading");
    // The old generation was kept and equals what was switched in.
    assert_eq!(
        STUDENTS.old_fingerprint(&live.db.pool).await.expect("old"),
        Some(report.switch.live.clone())
    );
    // The live projection goes on writing into the new tables.
    let late = Uuid::now_v7();
    live.caught_up(live.publish(&registered(late, "Late L")).await)
        .await;
    let name: String = sqlx::query_scalar("SELECT name FROM students WHERE id = $1")
        .bind(late)
        .fetch_one(&live.db.pool)
        .await
        .expect("the late student is in the live tables");
    assert_eq!(name, "Late L");
    let next_left: bool = sqlx::query_scalar("SELECT to_regclass('students__next') IS NOT NULL")
        .fetch_one(&live.db.pool)
        .await
        .expect("regclass");
    assert!(!next_left, "the next generation became the live one");
    live.cleanup().await;
}

#[tokio::test]
async fn an_interrupted_replay_resumes_when_run_again() {
    let live = Live::start().await;
    let last = live.publish_all(&school(1500)).await;
    live.caught_up(last).await;

    let slow = ReplayOptions {
        batch_size: 20,
        ..OPTIONS
    };
    let interrupted = {
        let (client, names, target) = (
            live.broker.client.clone(),
            live.broker.names.clone(),
            target(&live),
        );
        tokio::spawn(async move { replay(&client, &names, target, slow).await })
    };
    let next = live.students.generation(Generation::Next);

    test_support::eventually(30, "the replay to make progress", || async {
        (next.checkpoint().await.ok()? > 200).then_some(())
    })
    .await;
    interrupted.abort();
    let _ = interrupted.await;
    let progress = next.checkpoint().await.expect("checkpoint");
    assert!(
        progress < last,
        "interrupted before the end ({progress} of {last})"
    );

    let report = replay(
        &live.broker.client,
        &live.broker.names,
        target(&live),
        OPTIONS,
    )
    .await
    .expect("rerun");
    assert!(
        report.resumed_at.is_some_and(|at| at >= progress),
        "{:?}",
        report.resumed_at
    );
    assert_eq!(report.switch.live, report.switch.next);
    live.cleanup().await;
}

#[tokio::test]
async fn a_model_that_differs_is_not_switched_in_without_force() {
    let live = Live::start().await;
    let last = live.publish_all(&school(50)).await;
    live.caught_up(last).await;
    // The live model drifted from the events (a bug, a manual edit): replay finds it.
    sqlx::query("UPDATE students SET name = 'Edited by hand' WHERE name = 'Student 1'")
        .execute(&live.db.pool)
        .await
        .expect("edit");
    let error = replay(
        &live.broker.client,
        &live.broker.names,
        target(&live),
        OPTIONS,
    )
    .await
    .expect_err("mismatch");
    assert!(error.to_string().contains("differs"), "{error}");
    let edited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM students WHERE name = 'Edited by hand'")
            .fetch_one(&live.db.pool)
            .await
            .expect("count");
    assert_eq!(edited, 1, "the live model was left in place");

    let forced = replay(
        &live.broker.client,
        &live.broker.names,
        target(&live),
        ReplayOptions {
            force: true,
            ..OPTIONS
        },
    )
    .await
    .expect("forced");
    assert_ne!(forced.switch.live, forced.switch.next);
    let edited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM students WHERE name = 'Edited by hand'")
            .fetch_one(&live.db.pool)
            .await
            .expect("count");
    assert_eq!(edited, 0, "the rebuilt model follows the events");
    live.cleanup().await;
}
