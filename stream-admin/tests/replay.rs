//! `replay` against real NATS and Postgres, with the live projection running and a reader
//! polling the REST API the whole time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Live, registered, school};
use read_models::generation::{Generation, STUDENTS};
use stream_admin::replay::{ReplayOptions, replay};
use uuid::Uuid;

const OPTIONS: ReplayOptions = ReplayOptions {
    force: false,
    keep_old: true,
    restart: false,
    batch_size: 100,
    progress: false,
};

fn target(live: &Live) -> read_models::PgStudents {
    live.students.clone()
}

/// query-api's REST router on the test database (no cache, no NATS).
async fn serve_reads(live: &Live) -> String {
    let models = query_api::models::ReadModels {
        students: read_models::StudentReader::new(live.db.pool.clone()),
        courses: read_models::CourseStore::connect(&live.db.url)
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
        &service_kit::event_reader::EventReader::without_keys(),
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
        tokio::spawn(async move {
            replay(
                &client,
                &names,
                &service_kit::event_reader::EventReader::without_keys(),
                target,
                slow,
            )
            .await
        })
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
        &service_kit::event_reader::EventReader::without_keys(),
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
        &service_kit::event_reader::EventReader::without_keys(),
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
        &service_kit::event_reader::EventReader::without_keys(),
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

/// Postgres backends of this test's database waiting for a lock, running SQL like `like`.
async fn waiting_on_a_lock(pool: &sqlx::PgPool, like: &str) -> bool {
    sqlx::query_scalar(
        "SELECT count(*) > 0 FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1",
    )
    .bind(like)
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

/// A replay whose switch runs before the live projection has committed anything: the live
/// checkpoint row does not exist yet, so there is no row to lock. The live projection's first
/// batch then runs in the middle of the switch: between the switch's two fingerprints (the
/// test holds the next generation's tables locked there). Unless the switch serialises with
/// that batch, the batch commits into the tables the switch renames away, and the read model
/// switched in lacks its events while the checkpoint says they are applied.
#[tokio::test]
async fn a_replay_before_the_live_projections_first_commit_serialises_with_its_first_batch() {
    let broker = test_support::TestBroker::start().await;
    let db = test_support::TestDatabase::create().await;
    let students = read_models::PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    // Events on the stream, and the live projection has not started yet.
    let events = school(20);
    let mut batch = Vec::new();
    for event in &events {
        let subject = broker
            .names
            .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
        let sequence = broker
            .jetstream
            .publish(subject, events::encode(event).into())
            .await
            .expect("publish")
            .await
            .expect("ack")
            .sequence;
        batch.push((sequence, event.clone()));
    }
    let last = batch.last().expect("events").0;
    let registered = events
        .iter()
        .filter(|e| matches!(e.payload, events::EventPayload::StudentRegistered(_)))
        .count();

    STUDENTS.prepare_next(&db.pool).await.expect("next tables");
    let mut hold = db.pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE students__next IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .expect("lock");
    let replaying = {
        let (client, names) = (broker.client.clone(), broker.names.clone());
        let target = students.clone();
        tokio::spawn(async move {
            replay(
                &client,
                &names,
                &service_kit::event_reader::EventReader::without_keys(),
                target,
                OPTIONS,
            )
            .await
        })
    };
    test_support::eventually(30, "the switch to wait for the next tables", || async {
        waiting_on_a_lock(&db.pool, "%students__next%")
            .await
            .then_some(())
    })
    .await;

    // The live projection's first batch, now.
    let first_batch = {
        let (students, batch) = (students.clone(), batch.clone());
        tokio::spawn(async move { students.apply_batch(&batch, last).await })
    };
    test_support::eventually(30, "the first batch to commit or wait", || async {
        (first_batch.is_finished() || waiting_on_a_lock(&db.pool, "%projection_checkpoints%").await)
            .then_some(())
    })
    .await;
    let batch_waited_for_the_switch = !first_batch.is_finished();
    hold.commit().await.expect("release");

    let report = replaying.await.expect("no panic");
    first_batch
        .await
        .expect("no panic")
        .expect("the first batch commits");
    let live_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM students")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(students.checkpoint().await.expect("checkpoint"), last);
    assert_eq!(
        live_rows,
        i64::try_from(registered).expect("small"),
        "the live model has every student its checkpoint covers (the switch {}; the batch \
         {} for it; replay: {:?})",
        if report.is_ok() { "happened" } else { "failed" },
        if batch_waited_for_the_switch {
            "waited"
        } else {
            "did not wait"
        },
        report.as_ref().map(|r| &r.switch)
    );
    db.cleanup().await;
    broker.cleanup().await;
}

/// The names of an erased student come back from no replay: its registration is read as
/// erased (empty fields) and its deletion removes it, while the sealed names of everyone
/// else are opened into the new generation. No generation, old or new, holds the names.
#[tokio::test]
async fn a_replay_after_an_erasure_brings_no_name_back() {
    let live = Live::start().await;
    let (erased, kept) = (Uuid::now_v7(), Uuid::now_v7());
    let registration = live
        .publish_sealed(&registered(erased, "Zebulon Quixotic"))
        .await;
    live.publish_sealed(&registered(kept, "Grace H")).await;
    let before = live
        .publish(&common::event(erased, events::EventPayload::StudentDeleted))
        .await;
    live.caught_up(before).await;
    live.keys.destroy(erased).await;
    let last = live
        .publish(&common::event(
            erased,
            events::EventPayload::StudentErased(Default::default()),
        ))
        .await;
    live.caught_up(last).await;

    let report = replay(
        &live.broker.client,
        &live.broker.names,
        &live.reader,
        target(&live),
        OPTIONS,
    )
    .await
    .expect("replay");
    assert_eq!(report.undecodable, 0, "{report:?}");
    // The stream still holds the registration (append-only), sealed and now unreadable.
    let stream = live
        .broker
        .jetstream
        .get_stream(live.broker.names.event_stream())
        .await
        .expect("stream");
    for sequence in 1..=last {
        let message = stream.direct_get(sequence).await.expect("stored event");
        assert!(
            !message.payload.windows(7).any(|w| w == b"Zebulon"),
            "event {sequence} holds the name in the clear"
        );
        if sequence == registration {
            let read = live.reader.read(&message.payload).await.expect("reads");
            assert_eq!(read.personal, service_kit::event_reader::Personal::Erased);
        }
    }
    assert_eq!(report.switch.live, report.switch.next);
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM students ORDER BY name")
        .fetch_all(&live.db.pool)
        .await
        .expect("students");
    assert_eq!(
        names,
        vec!["Grace H".to_owned()],
        "the sealed name was not opened"
    );
    for (table, query) in [
        (
            "students",
            "SELECT count(*) FROM students WHERE name LIKE '%Zebulon%' OR first_name LIKE '%Zebulon%'",
        ),
        (
            "students__old",
            "SELECT count(*) FROM students__old WHERE name LIKE '%Zebulon%' OR first_name LIKE '%Zebulon%'",
        ),
    ] {
        let hits: i64 = sqlx::query_scalar(query)
            .fetch_one(&live.db.pool)
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"));
        assert_eq!(hits, 0, "{table} holds the erased name");
    }
    live.cleanup().await;
}
