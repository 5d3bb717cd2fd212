//! Measures how fast each projection applies a backlog, on the local stack's NATS and
//! Postgres (`scripts/dev services`). Not a test and not the full benchmark of SPEC §10:
//! a quick, honest figure for one machine.
//!
//! `cargo run --release -p projectors --example projection_throughput -- 50000`

use std::sync::Arc;
use std::time::{Duration, Instant};

use events::{AggregateKind, CourseDetails, Enrollment, Event, EventPayload, StudentDetails};
use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::{CourseStore, PgStudents, ProjectionStore};
use test_support::{TestBroker, TestDatabase, event};
use uuid::Uuid;

/// Publishes with up to 2 000 acks outstanding; returns the last stream sequence.
async fn publish_all(broker: &TestBroker, events: Vec<Event>) -> u64 {
    let mut pending = Vec::with_capacity(2000);
    let mut last = 0;
    for event in events {
        let subject = broker
            .names
            .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
        pending.push(
            broker
                .jetstream
                .publish(subject, events::encode(&event).into())
                .await
                .expect("publish"),
        );
        if pending.len() == 2000 {
            for ack in pending.drain(..) {
                last = last.max(ack.await.expect("ack").sequence);
            }
        }
    }
    for ack in pending {
        last = last.max(ack.await.expect("ack").sequence);
    }
    last
}

async fn measure<S: ProjectionStore>(broker: &TestBroker, store: S, events: usize, last: u64) {
    let name = store.projection().as_str();
    let runner = ProjectionRunner {
        reader: service_kit::event_reader::EventReader::without_keys(),
        jetstream: broker.jetstream.clone(),
        names: broker.names.clone(),
        store: store.clone(),
        batch_size: 500,
        cache: None,
        progress: Arc::new(ProjectionProgress::default()),
        lease: projectors::lease::LeaseSettings::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    while store.checkpoint().await.expect("checkpoint") < last {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    let _ = task.await;
    println!(
        "{name:>8}: {events} events in {:.2} s = {:.0} events/s",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;

    // Students: registrations, each followed by an enrollment (two rows per student).
    let mut student_events = Vec::with_capacity(total);
    while student_events.len() < total {
        let id = Uuid::now_v7();
        student_events.push(event(
            AggregateKind::Student,
            id,
            EventPayload::StudentRegistered(StudentDetails {
                name: "Student".into(),
                first_name: "First".into(),
                last_name: "Last".into(),
            }),
        ));
        student_events.push(event(
            AggregateKind::Student,
            id,
            EventPayload::StudentEnrolled(Enrollment {
                student_id: id,
                course_id: Uuid::now_v7(),
            }),
        ));
    }
    // Courses: creations, each followed by 9 enrollments into it.
    let mut course_events = Vec::with_capacity(total);
    while course_events.len() < total {
        let id = Uuid::now_v7();
        course_events.push(event(
            AggregateKind::Course,
            id,
            EventPayload::CourseCreated(CourseDetails {
                name: "Course".into(),
                description: "About it".into(),
                discipline: "Maths".into(),
                teacher: "Teacher".into(),
            }),
        ));
        for _ in 0..9 {
            course_events.push(event(
                AggregateKind::Course,
                id,
                EventPayload::StudentEnrolled(Enrollment {
                    student_id: Uuid::now_v7(),
                    course_id: id,
                }),
            ));
        }
    }
    let (students_n, courses_n) = (student_events.len(), course_events.len());
    let published = Instant::now();
    let last_student = publish_all(&broker, student_events).await;
    let last_course = publish_all(&broker, course_events).await;
    println!(
        "published {} events in {:.2} s",
        students_n + courses_n,
        published.elapsed().as_secs_f64()
    );
    let students = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("students store");
    measure(&broker, students, students_n, last_student).await;
    let courses = CourseStore::connect(&db.url).await.expect("courses store");
    measure(&broker, courses, courses_n, last_course).await;
    db.cleanup().await;
    broker.cleanup().await;
}
