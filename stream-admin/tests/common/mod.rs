//! A live students projection on this test's own streams and database, and a way to put
//! events on the stream.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;

use events::{AggregateKind, Enrollment, Event, EventPayload, StudentDetails};
use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::PgStudents;
use service_kit::data_keys::DataKeys;
use service_kit::event_reader::EventReader;
use test_support::{SealingKeys, TestBroker, TestDatabase};
use tokio::sync::watch;
use uuid::Uuid;

pub struct Live {
    pub broker: TestBroker,
    pub db: TestDatabase,
    pub students: PgStudents,
    /// The students' data keys (a test KEK), and the reading path the live projection uses.
    pub keys: SealingKeys,
    pub reader: EventReader,
    stop: watch::Sender<bool>,
}

impl Live {
    /// The broker topology, a fresh database, and the live students projection running.
    pub async fn start() -> Live {
        let broker = TestBroker::start().await;
        let db = TestDatabase::create().await;
        let students = PgStudents::with_pool(db.pool.clone())
            .await
            .expect("migrated");
        let keys = DataKeys::bind(&broker.jetstream, &broker.names, test_support::test_kek())
            .await
            .expect("the data-key bucket");
        let reader = EventReader::new(keys.clone());
        let (stop, stopped) = watch::channel(false);
        let runner = ProjectionRunner {
            reader: reader.clone(),
            jetstream: broker.jetstream.clone(),
            names: broker.names.clone(),
            store: students.clone(),
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
            students,
            keys: SealingKeys::new(keys),
            reader,
            stop,
        }
    }

    /// Publishes a student event as the gateway writes it with a data key (schema version
    /// 2: personal fields sealed with the student's key, made on its first use).
    pub async fn publish_sealed(&self, event: &Event) -> u64 {
        let bytes = self.keys.encode(event).await;
        self.publish_bytes(event, bytes).await
    }

    /// Publishes an event on its aggregate's subject; returns its stream position.
    pub async fn publish(&self, event: &Event) -> u64 {
        self.publish_bytes(event, events::encode(event)).await
    }

    async fn publish_bytes(&self, event: &Event, bytes: Vec<u8>) -> u64 {
        self.broker
            .jetstream
            .publish(
                self.broker
                    .names
                    .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id),
                bytes.into(),
            )
            .await
            .expect("publish")
            .await
            .expect("ack")
            .sequence
    }

    /// Waits until the live projection has applied `position`.
    pub async fn caught_up(&self, position: u64) {
        test_support::eventually(30, "the live projection to catch up", || async {
            (self.students.checkpoint().await.ok()? >= position).then_some(())
        })
        .await;
    }

    pub async fn cleanup(self) {
        let _ = self.stop.send(true);
        self.db.cleanup().await;
        self.broker.cleanup().await;
    }
}

pub fn event(student_id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Student, student_id, payload)
}

pub fn registered(student_id: Uuid, name: &str) -> Event {
    event(
        student_id,
        EventPayload::StudentRegistered(StudentDetails {
            name: name.into(),
            first_name: "First".into(),
            last_name: "Last".into(),
        }),
    )
}

pub fn renamed(student_id: Uuid, name: &str) -> Event {
    event(
        student_id,
        EventPayload::StudentUpdated(StudentDetails {
            name: name.into(),
            first_name: "First".into(),
            last_name: "Last".into(),
        }),
    )
}

pub fn enrolled(student_id: Uuid, course_id: Uuid) -> Event {
    event(
        student_id,
        EventPayload::StudentEnrolled(Enrollment {
            student_id,
            course_id,
        }),
    )
}

impl Live {
    /// Publishes many events with up to 1 000 acks outstanding (the client bounds acks in
    /// flight); returns the last stream position.
    pub async fn publish_all(&self, events: &[Event]) -> u64 {
        let mut last = 0;
        for chunk in events.chunks(1000) {
            let mut acks = Vec::with_capacity(chunk.len());
            for event in chunk {
                acks.push(
                    self.broker
                        .jetstream
                        .publish(
                            self.broker.names.aggregate_subject(
                                event.metadata.aggregate_kind,
                                event.metadata.aggregate_id,
                            ),
                            events::encode(event).into(),
                        )
                        .await
                        .expect("publish"),
                );
            }
            for ack in acks {
                last = last.max(ack.await.expect("ack").sequence);
            }
        }
        last
    }
}

/// `n` students, each registered, most enrolled in a course, some renamed.
pub fn school(n: usize) -> Vec<Event> {
    let courses: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    let mut events = Vec::new();
    for i in 0..n {
        let id = Uuid::now_v7();
        events.push(registered(id, &format!("Student {i}")));
        if i % 4 != 0 {
            events.push(enrolled(id, courses[i % courses.len()]));
        }
        if i % 3 == 0 {
            events.push(renamed(id, &format!("Renamed {i}")));
        }
    }
    events
}
