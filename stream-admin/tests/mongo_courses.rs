//! `replay courses` and `dlq redrive` on a MongoDB course store (the chart's default), through
//! the same port as Postgres. Needs a MongoDB-wire server (`MONGODB_URL`; the test command
//! starts the stand-in): SKIPPED without one, failed under CI.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use events::{AggregateKind, CourseDetails, Enrollment, Event, EventPayload, Projection};
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::{CourseStore, ProjectionStore};
use stream_admin::dlq;
use stream_admin::read_models::ReadModel;
use stream_admin::replay::{ReplayOptions, replay};
use test_support::{TestBroker, TestDatabase};
use tokio::sync::watch;
use uuid::Uuid;

const OPTIONS: ReplayOptions = ReplayOptions {
    force: false,
    keep_old: true,
    restart: false,
    batch_size: 100,
    progress: false,
};

fn details(name: &str) -> CourseDetails {
    CourseDetails {
        name: name.into(),
        description: "Rings".into(),
        discipline: "Mathematics".into(),
        teacher: "Emmy N".into(),
    }
}

fn course(id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Course, id, payload)
}

/// `n` courses, each with a few students; every third renamed, every fifth deleted.
fn courses(n: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for i in 0..n {
        let id = Uuid::now_v7();
        events.push(course(
            id,
            EventPayload::CourseCreated(details(&format!("Course {i}"))),
        ));
        for _ in 0..(i % 4) {
            events.push(course(
                id,
                EventPayload::StudentEnrolled(Enrollment {
                    student_id: Uuid::now_v7(),
                    course_id: id,
                }),
            ));
        }
        if i % 3 == 0 {
            events.push(course(
                id,
                EventPayload::CourseUpdated(details(&format!("Renamed {i}"))),
            ));
        }
        if i % 5 == 0 {
            events.push(course(id, EventPayload::CourseDeleted));
        }
    }
    events
}

/// A live courses projection on MongoDB, on this test's own streams and database.
struct Live {
    broker: TestBroker,
    db: TestDatabase,
    url: String,
    store: CourseStore,
    stop: watch::Sender<bool>,
}

impl Live {
    async fn start(url: String) -> Live {
        let broker = TestBroker::start().await;
        let db = TestDatabase::create().await;
        let store = CourseStore::connect(&url)
            .await
            .expect("MongoDB course store");
        let (stop, stopped) = watch::channel(false);
        let runner = ProjectionRunner {
            reader: service_kit::event_reader::EventReader::lazy(
                broker.jetstream.clone(),
                broker.names.clone(),
                test_support::test_kek(),
            ),
            jetstream: broker.jetstream.clone(),
            names: broker.names.clone(),
            store: store.clone(),
            batch_size: 200,
            cache: None,
            progress: Arc::new(ProjectionProgress::default()),
            lease: projectors::lease::LeaseSettings::default(),
        };
        tokio::spawn(runner.run(async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        Live {
            broker,
            db,
            url,
            store,
            stop,
        }
    }

    async fn publish(&self, event: &Event) -> u64 {
        let subject = self
            .broker
            .names
            .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
        self.broker
            .jetstream
            .publish(subject, events::encode(event).into())
            .await
            .expect("publish")
            .await
            .expect("ack")
            .sequence
    }

    async fn publish_all(&self, events: &[Event]) -> u64 {
        let mut last = 0;
        for event in events {
            last = self.publish(event).await;
        }
        last
    }

    async fn caught_up(&self, position: u64) {
        test_support::eventually(60, "the live courses projection to catch up", || async {
            (self.store.checkpoint().await.ok()? >= position).then_some(())
        })
        .await;
    }

    async fn database(&self) -> mongodb::Database {
        let client = mongodb::Client::with_uri_str(&self.url)
            .await
            .expect("client");
        client
            .default_database()
            .expect("the URL names the database")
    }

    async fn collections(&self) -> Vec<String> {
        let mut names = self
            .database()
            .await
            .list_collection_names()
            .await
            .expect("collections");
        names.sort();
        names
    }

    /// query-api's REST router on this store (read-only reader) and the test database.
    async fn serve_reads(&self) -> String {
        let models = query_api::models::ReadModels {
            students: read_models::StudentReader::new(self.db.pool.clone()),
            courses: CourseStore::connect_reader(&self.url, None)
                .await
                .expect("courses reader"),
        };
        let consistency = query_api::consistency::Consistency::new(
            models.clone(),
            None,
            self.broker.names.clone(),
            Duration::from_secs(1),
        );
        let queries = query_api::Queries::new(
            models,
            query_api::cache::Cache::new(None).expect("no cache"),
            self.broker.names.clone(),
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

    async fn cleanup(self) {
        let _ = self.stop.send(true);
        let _ = self.database().await.drop().await;
        self.db.cleanup().await;
        self.broker.cleanup().await;
    }
}

#[tokio::test]
async fn a_mongodb_course_replay_rebuilds_verifies_and_switches_while_reads_never_fail() {
    let Some(url) = test_support::mongo::mongo_url("the MongoDB course replay") else {
        return;
    };
    let live = Live::start(url).await;
    live.caught_up(live.publish_all(&courses(120)).await).await;
    let sample = Uuid::now_v7();
    live.caught_up(
        live.publish(&course(
            sample,
            EventPayload::CourseCreated(details("Sample S")),
        ))
        .await,
    )
    .await;

    let reads = live.serve_reads().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                for path in [
                    "/api/courses?limit=50".to_owned(),
                    format!("/api/courses/{sample}"),
                ] {
                    let answer = http
                        .get(format!("{reads}{path}"))
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
        let events = courses(40);
        let (jetstream, names) = (live.broker.jetstream.clone(), live.broker.names.clone());
        tokio::spawn(async move {
            for event in events {
                let subject = names
                    .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
                let _ = jetstream
                    .publish(subject, events::encode(&event).into())
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let report = replay(
        &live.broker.client,
        &live.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        live.store.clone(),
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
    // 121 created, 24 of them deleted, at least.
    assert!(report.switch.next.rows >= 97, "{:?}", report.switch);
    assert!(report.applied > 0);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no read failed");
    assert!(ok.load(Ordering::Relaxed) > 10, "the reader kept reading");
    let collections = live.collections().await;
    assert!(
        collections.contains(&"courses__old".to_owned())
            && !collections.contains(&"courses__next".to_owned()),
        "the next generation became the live one and the old one was kept: {collections:?}"
    );
    // The old generation holds what was live: every course counted, tombstones aside.
    let old: Vec<Document> = live
        .database()
        .await
        .collection::<Document>("courses__old")
        .find(doc! { "deleted": { "$ne": true } })
        .await
        .expect("old")
        .try_collect()
        .await
        .expect("old documents");
    // (Records a batch in flight wrote past the switch position are in the old generation
    // too, uncompared: some of them tombstones.)
    let (rows, uncompared) = (report.switch.live.rows as u64, report.switch.uncompared);
    assert!(
        (rows..=rows + uncompared).contains(&(old.len() as u64)),
        "{} old documents; {:?}",
        old.len(),
        report.switch
    );
    // The live projection goes on writing into the new collection.
    let late = Uuid::now_v7();
    live.caught_up(
        live.publish(&course(
            late,
            EventPayload::CourseCreated(details("Late L")),
        ))
        .await,
    )
    .await;
    let stored = live
        .store
        .get(late)
        .await
        .expect("read")
        .expect("late course");
    assert_eq!(stored.name, "Late L");
    live.cleanup().await;
}

#[tokio::test]
async fn a_mongodb_model_that_differs_is_not_switched_in_and_the_projection_goes_on() {
    let Some(url) = test_support::mongo::mongo_url("the MongoDB replay mismatch") else {
        return;
    };
    let live = Live::start(url).await;
    let events = courses(30);
    live.caught_up(live.publish_all(&events).await).await;
    // A live document that no replay can produce (as a changed projection would leave).
    let tampered = events
        .iter()
        .find(|e| matches!(&e.payload, EventPayload::CourseCreated(d) if d.name == "Course 1"))
        .expect("course 1 (not deleted)")
        .metadata
        .aggregate_id;
    live.database()
        .await
        .collection::<Document>("courses")
        .update_one(
            doc! { "_id": tampered.to_string() },
            doc! { "$set": { "name": "Tampered" } },
        )
        .await
        .expect("tamper");

    let error = replay(
        &live.broker.client,
        &live.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        live.store.clone(),
        OPTIONS,
    )
    .await
    .expect_err("a mismatch refuses the switch");
    assert!(error.to_string().contains("differs"), "{error:#}");
    let kept = live.store.get(tampered).await.expect("read").expect("kept");
    assert_eq!(kept.name, "Tampered", "the live model was left in place");
    // The pause was lifted: the live projection applies what comes next.
    let after = Uuid::now_v7();
    live.caught_up(
        live.publish(&course(
            after,
            EventPayload::CourseCreated(details("After A")),
        ))
        .await,
    )
    .await;
    // A rerun resumes the half-built generation and still refuses.
    let again = replay(
        &live.broker.client,
        &live.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        live.store.clone(),
        OPTIONS,
    )
    .await
    .expect_err("still differs");
    assert!(again.to_string().contains("differs"), "{again:#}");
    live.cleanup().await;
}

#[tokio::test]
async fn a_mongodb_course_redrive_rebuilds_the_course_with_what_was_applied_after() {
    let Some(url) = test_support::mongo::mongo_url("the MongoDB course redrive") else {
        return;
    };
    let live = Live::start(url).await;
    let algebra = Uuid::now_v7();
    let created = course(algebra, EventPayload::CourseCreated(details("Algebra T")));
    let enrolled = course(
        algebra,
        EventPayload::StudentEnrolled(Enrollment {
            student_id: Uuid::now_v7(),
            course_id: algebra,
        }),
    );
    // The creation is dead-lettered as the live projection would do it: the letter on the
    // dead-letter stream, the checkpoint moved past it, no document.
    let poisoned = live.publish(&created).await;
    live.caught_up(poisoned).await;
    live.database()
        .await
        .collection::<Document>("courses")
        .delete_one(doc! { "_id": algebra.to_string() })
        .await
        .expect("the creation lost");
    let names = &live.broker.names;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(events::dead_letter_headers::REASON, "refused by the test");
    headers.insert(
        events::dead_letter_headers::ORIGINAL_SEQUENCE,
        poisoned.to_string().as_str(),
    );
    let subject = names.aggregate_subject(AggregateKind::Course, algebra);
    headers.insert(
        events::dead_letter_headers::ORIGINAL_SUBJECT,
        subject.as_str(),
    );
    headers.insert(
        events::dead_letter_headers::PROJECTION,
        Projection::Courses.as_str(),
    );
    live.broker
        .jetstream
        .publish_with_headers(
            names.dead_letter_subject(Projection::Courses),
            headers,
            events::encode(&created).into(),
        )
        .await
        .expect("publish the letter")
        .await
        .expect("letter stored");
    // A later event of the course, applied (to nothing) while the letter waits.
    let later = live.publish(&enrolled).await;
    live.caught_up(later).await;
    assert!(live.store.get(algebra).await.expect("read").is_none());

    let letters = dlq::list(&live.broker.jetstream, names, Some(Projection::Courses))
        .await
        .expect("list");
    let letter = letters
        .iter()
        .find(|l| l.original_sequence == Some(poisoned))
        .expect("the letter");
    let models = dlq::ReadModels {
        students: None,
        courses: Some(ReadModel::Courses(
            CourseStore::connect(&live.url).await.expect("store"),
        )),
    };
    let done = dlq::redrive(
        &live.broker.client,
        names,
        &service_kit::event_reader::EventReader::without_keys(),
        &models,
        &[letter.sequence],
    )
    .await
    .expect("redrive");
    assert_eq!(done[0].events_applied, 2, "the creation and the enrollment");
    let rebuilt = live
        .store
        .get(algebra)
        .await
        .expect("read")
        .expect("rebuilt");
    assert_eq!(rebuilt.name, "Algebra T");
    assert_eq!(rebuilt.student_ids.len(), 1);
    assert_eq!(rebuilt.version, later);
    let left = dlq::list(&live.broker.jetstream, names, Some(Projection::Courses))
        .await
        .expect("list");
    assert!(
        left.iter().all(|l| l.sequence != letter.sequence),
        "the letter is gone"
    );
    live.cleanup().await;
}
