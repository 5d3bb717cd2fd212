//! `stream-admin migrate` on a stream the previous release wrote (schema version 1: names
//! in the clear), continued by this release (sealed names, an erasure of a student whose
//! names were only ever in the clear): the copy keeps every position and event id, seals
//! every v1 name, makes the erased student's names unreadable, resumes where a run
//! stopped, and after `--switch` the old stream takes no write; no v1 name is in the new
//! stream's files, while the old stream's still hold them.

use std::path::Path;
use std::sync::Arc;

use events::{AggregateKind, Enrollment, Event, EventPayload, StreamNames, StudentDetails};
use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::PgStudents;
use service_kit::event_reader::{EventReader, Personal};
use stream_admin::migrate::{MigrateOptions, migrate};
use test_support::{NatsServer, SealingKeys, TestDatabase, eventually};
use tokio::sync::watch;
use uuid::Uuid;

fn student(id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Student, id, payload)
}

fn details(name: &str, first: &str, last: &str) -> StudentDetails {
    StudentDetails {
        name: name.into(),
        first_name: first.into(),
        last_name: last.into(),
    }
}

async fn publish(broker: &test_support::TestBroker, event: &Event, bytes: Vec<u8>) -> u64 {
    broker
        .jetstream
        .publish(
            broker
                .names
                .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id),
            bytes.into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

/// The students projection of `names` into `store` until the sender says stop.
fn project(
    broker: &test_support::TestBroker,
    names: &StreamNames,
    store: &PgStudents,
) -> watch::Sender<bool> {
    let (stop, mut stopped) = watch::channel(false);
    let runner = ProjectionRunner {
        reader: EventReader::lazy(
            broker.jetstream.clone(),
            names.clone(),
            test_support::test_kek(),
        ),
        jetstream: broker.jetstream.clone(),
        names: names.clone(),
        store: store.clone(),
        batch_size: 100,
        cache: None,
        progress: Arc::new(ProjectionProgress::default()),
        lease: projectors::lease::LeaseSettings::default(),
    };
    tokio::spawn(runner.run(async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    }));
    stop
}

async fn caught_up(store: &PgStudents, position: u64) {
    eventually(30, "the students projection to catch up", || async {
        (store.checkpoint().await.ok()? >= position).then_some(())
    })
    .await;
}

async fn rows(store: &PgStudents) -> Vec<(Uuid, String, i64)> {
    sqlx::query_as("SELECT id, name, version FROM students ORDER BY id")
        .fetch_all(store.pool())
        .await
        .expect("rows")
}

fn options(switch: bool, stop_after: Option<u64>) -> MigrateOptions {
    MigrateOptions {
        replicas: 1,
        switch,
        progress: false,
        stop_after,
    }
}

/// Paths of files under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_containing(&path, needle, out);
        } else if std::fs::read(&path).is_ok_and(|bytes| {
            bytes
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
        }) {
            out.push(path.display().to_string());
        }
    }
}

#[tokio::test]
async fn a_stream_written_in_the_clear_is_copied_sealed_with_every_position_kept() {
    let server = NatsServer::start().await;
    let old = server.broker().await;
    let (ada, bob, grace, course) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let clear_names = [
        "Adaline Qwerty",
        "Adaline Kingsley",
        "Bobbert Zyx",
        "Gracelyn Vo",
    ];

    // The previous release: every name in the clear.
    let history = [
        test_support::event(
            AggregateKind::Course,
            course,
            EventPayload::CourseCreated(events::CourseDetails {
                name: "Algebra".into(),
                description: "About it".into(),
                discipline: "Maths".into(),
                teacher: "Teacher".into(),
            }),
        ),
        student(
            ada,
            EventPayload::StudentRegistered(details(clear_names[0], "Adaline", "Qwerty")),
        ),
        student(
            ada,
            EventPayload::StudentEnrolled(Enrollment {
                student_id: ada,
                course_id: course,
            }),
        ),
        student(
            ada,
            EventPayload::StudentUpdated(details(clear_names[1], "Adaline", "Kingsley")),
        ),
        student(
            bob,
            EventPayload::StudentRegistered(details(clear_names[2], "Bobbert", "Zyx")),
        ),
        student(
            grace,
            EventPayload::StudentRegistered(details(clear_names[3], "Gracelyn", "Vo")),
        ),
    ];
    for event in &history {
        publish(&old, event, events::encode(event)).await;
    }
    // Bytes no release could read: copied as they are.
    old.jetstream
        .publish(
            old.names.aggregate_subject(AggregateKind::Student, grace),
            bytes::Bytes::from_static(b"not an event"),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    // This release, before the migration: Grace renamed (sealed), Bob deleted and erased
    // (his names were only ever in the clear, so the gateway found no key to name).
    let keys = SealingKeys::bind(&old.jetstream, &old.names).await;
    let renamed = student(
        grace,
        EventPayload::StudentUpdated(details("Gracelyn Vox", "Gracelyn", "Vox")),
    );
    publish(&old, &renamed, keys.encode(&renamed).await).await;
    for payload in [
        EventPayload::StudentDeleted,
        EventPayload::StudentErased(events::Erasure { key: None }),
    ] {
        let event = student(bob, payload);
        publish(&old, &event, events::encode(&event)).await;
    }
    // The projectors' lease, whose revision fences the read models' checkpoints.
    let old_leases = old
        .jetstream
        .get_key_value(old.names.projection_lease_bucket())
        .await
        .expect("lease bucket");
    // Months of lease renewals: revisions far above what a new bucket would start at.
    let mut old_lease_revision = 0;
    for _ in 0..500 {
        old_lease_revision = old_leases
            .put("renewals", "replica-a".into())
            .await
            .expect("lease");
    }

    // The read model the old deployment's projectors keep.
    let db = TestDatabase::create().await;
    let store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let old_projection = project(&old, &old.names, &store);

    let new = StreamNames::new(format!("{}n", old.names.prefix()));
    let ring = test_support::test_kek();
    let client = &old.client;

    // A first run stopped early, then one that resumes, while the old deployment writes.
    let first = migrate(
        client,
        &old.names,
        &new,
        ring.clone(),
        options(false, Some(3)),
    )
    .await
    .expect("a first run");
    assert_eq!((first.resumed_at, first.copied, first.verified), (0, 3, 3));
    let second = migrate(client, &old.names, &new, ring.clone(), options(false, None))
        .await
        .expect("the run that resumes");
    assert_eq!(second.resumed_at, 3);
    assert_eq!(second.copied, second.source_last - 3);
    assert!(!second.switched);
    let ada_later = student(
        ada,
        EventPayload::StudentUpdated(details("Adaline Kingsford", "Adaline", "Kingsford")),
    );
    publish(&old, &ada_later, keys.encode(&ada_later).await).await;

    let last = migrate(client, &old.names, &new, ring.clone(), options(true, None))
        .await
        .expect("the switch");
    assert!(last.switched);
    assert_eq!(last.copied, 1, "only what came after the second run");
    assert_eq!(last.verified, last.source_last, "every position verified");
    assert_eq!(
        (
            first.sealed + second.sealed + last.sealed,
            last.erasures + second.erasures
        ),
        (4, 1),
        "four v1 names sealed, one erasure"
    );
    let refused = old
        .jetstream
        .publish(
            old.names.aggregate_subject(AggregateKind::Student, ada),
            events::encode(&student(ada, EventPayload::StudentDeleted)).into(),
        )
        .await;
    let refused = match refused {
        Ok(ack) => ack.await.err(),
        Err(error) => Some(error),
    };
    assert!(refused.is_some(), "the sealed old stream took a write");
    assert!(last.old_keys_retired);
    assert!(
        old.jetstream
            .get_key_value(old.names.student_keys_bucket())
            .await
            .is_err(),
        "the old key bucket outlives the switch"
    );

    // The projectors move over: from the old deployment's checkpoint, nothing applied twice,
    // and the next command's event lands.
    caught_up(&store, last.source_last).await;
    let _ = old_projection.send(true);
    let before_switch = rows(&store).await;
    assert_eq!(before_switch.len(), 2, "Ada and Grace: {before_switch:?}");
    let new_projection = project(&old, &new, &store);
    let new_keys = SealingKeys::bind(&old.jetstream, &new).await;
    let after = student(
        grace,
        EventPayload::StudentUpdated(details("Gracelyn Vex", "Gracelyn", "Vex")),
    );
    let subject = new.aggregate_subject(AggregateKind::Student, grace);
    let position = old
        .jetstream
        .publish(subject, new_keys.encode(&after).await.into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence;
    assert_eq!(
        position,
        last.source_last + 1,
        "the new stream continues the old one"
    );
    caught_up(&store, position).await;
    let after_switch = rows(&store).await;
    let graces: Vec<&(Uuid, String, i64)> = after_switch.iter().filter(|r| r.0 == grace).collect();
    assert_eq!(graces[0].1, "Gracelyn Vex");
    assert_eq!(graces[0].2, i64::try_from(position).expect("small"));
    let adas = |rows: &[(Uuid, String, i64)]| rows.iter().find(|r| r.0 == ada).cloned();
    assert_eq!(adas(&after_switch), adas(&before_switch), "Ada untouched");
    let _ = new_projection.send(true);
    // A migration run again once the new deployment writes refuses before touching anything.
    let again = migrate(
        client,
        &old.names,
        &new,
        test_support::test_kek(),
        options(true, None),
    )
    .await
    .expect_err("ran onto the new deployment's stream");
    assert!(
        format!("{again:#}").contains("something else writes to it"),
        "{again:#}"
    );

    // Every position holds the same event; the v1 names are sealed now.
    let old_stream = old
        .jetstream
        .get_stream(old.names.event_stream())
        .await
        .expect("old stream");
    let new_stream = old
        .jetstream
        .get_stream(new.event_stream())
        .await
        .expect("new stream");
    let reader = EventReader::lazy(old.jetstream.clone(), new.clone(), ring);
    let mut ada_names = Vec::new();
    for position in 1..=last.source_last {
        let before = old_stream.get_raw_message(position).await.expect("old");
        let after = new_stream.get_raw_message(position).await.expect("new");
        assert_eq!(
            after.subject.as_str(),
            before
                .subject
                .as_str()
                .replacen(old.names.prefix(), new.prefix(), 1)
        );
        let Ok(read) = reader.read(&after.payload).await else {
            assert_eq!(after.payload, before.payload, "undecodable bytes kept");
            continue;
        };
        let original = events::decode_sealed(&before.payload).expect("decodes");
        let event_id = match &original {
            events::Decoded::Plain(event) => event.metadata.event_id,
            events::Decoded::Sealed(sealed) => sealed.metadata().event_id,
        };
        assert_eq!(read.event.metadata.event_id, event_id, "at {position}");
        match (&read.event.payload, read.event.metadata.aggregate_id) {
            (EventPayload::StudentRegistered(d) | EventPayload::StudentUpdated(d), id) => {
                assert!(read.key.is_some(), "position {position} is not sealed");
                if id == ada {
                    ada_names.push(d.name.clone());
                }
                if id == bob {
                    assert!(matches!(read.personal, Personal::Erased), "{read:?}");
                } else {
                    assert!(matches!(read.personal, Personal::Opened), "{read:?}");
                }
            }
            (EventPayload::StudentErased(erasure), _) => {
                assert!(
                    erasure.key.is_some(),
                    "the erasure names the key it destroyed"
                );
            }
            _ => {}
        }
    }
    assert_eq!(
        ada_names,
        ["Adaline Qwerty", "Adaline Kingsley", "Adaline Kingsford"]
    );

    // No v1 name in the new stream's files; the old stream's hold them (so the search works).
    let new_dir = format!("/streams/{}/", new.event_stream());
    let old_dir = format!("/streams/{}/", old.names.event_stream());
    for name in clear_names {
        let found = eventually(10, "the old stream's files to hold the name", || async {
            let mut found = Vec::new();
            files_containing(&server.store_dir, name, &mut found);
            found
                .iter()
                .any(|path| path.contains(&old_dir))
                .then_some(found)
        })
        .await;
        let in_new: Vec<&String> = found.iter().filter(|p| p.contains(&new_dir)).collect();
        assert!(in_new.is_empty(), "{name:?} in the new stream: {in_new:?}");
    }

    // The new lease bucket's revisions continue above the old one's.
    let new_leases = old
        .jetstream
        .get_key_value(new.projection_lease_bucket())
        .await
        .expect("new lease bucket");
    let revision = new_leases
        .put("renewals", "replica-a".into())
        .await
        .expect("lease");
    assert!(
        revision > old_lease_revision,
        "{revision} ≤ {old_lease_revision}"
    );
    db.cleanup().await;
}
