//! Dead letters end to end: the live projection sets an event aside, `dlq list` shows it,
//! a redrive before the cause is fixed fails and keeps it, a redrive after applies it.

mod common;

use std::time::Duration;

use common::{Live, registered, renamed};
use events::{AggregateKind, CourseDetails, Event, EventPayload};
use futures::StreamExt;
use projectors::dead_letters::{
    ORIGINAL_SEQUENCE_HEADER, ORIGINAL_SUBJECT_HEADER, PROJECTION_HEADER, REASON_HEADER,
};
use read_models::pg_courses::PgCourses;
use read_models::{CourseStore, PgStudents, ProjectionStore};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;
use stream_admin::dlq::{self, ReadModels};
use stream_admin::read_models::ReadModel;
use uuid::Uuid;

#[tokio::test]
async fn a_dead_letter_is_listed_redriven_after_the_fix_and_applied() {
    let live = Live::start().await;
    // The cause: the read model refuses one name (think of a bad migration).
    sqlx::query("ALTER TABLE students ADD CONSTRAINT no_bobby CHECK (name <> 'Bobby T')")
        .execute(&live.db.pool)
        .await
        .expect("constraint");
    let ada = Uuid::now_v7();
    let bobby = Uuid::now_v7();
    live.publish(&registered(ada, "Ada L")).await;
    let poisoned = live.publish(&registered(bobby, "Bobby T")).await;
    let after = live.publish(&renamed(ada, "Ada K")).await;
    live.caught_up(after).await;

    let letters = test_support::eventually(30, "the dead letter", || async {
        let letters = dlq::list(&live.broker.jetstream, &live.broker.names, None)
            .await
            .ok()?;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.projection, "students");
    assert_eq!(letter.original_sequence, Some(poisoned));
    assert_eq!(letter.event_type.as_deref(), Some("StudentRegistered"));
    assert!(letter.reason.contains("no_bobby"), "{}", letter.reason);

    let models = ReadModels {
        students: Some(ReadModel::Students(live.students.clone())),
        courses: None,
    };
    let sequences = [letter.sequence];
    let error = dlq::redrive(
        &live.broker.client,
        &live.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        &models,
        &sequences,
    )
    .await
    .expect_err("the cause is not fixed");
    assert!(format!("{error:#}").contains("not fixed"), "{error:#}");
    assert_eq!(
        dlq::list(&live.broker.jetstream, &live.broker.names, None)
            .await
            .expect("list")
            .len(),
        1,
        "a failed redrive keeps the letter"
    );

    sqlx::query("ALTER TABLE students DROP CONSTRAINT no_bobby")
        .execute(&live.db.pool)
        .await
        .expect("fix");
    let done = dlq::redrive(
        &live.broker.client,
        &live.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        &models,
        &sequences,
    )
    .await
    .expect("redrive");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].events_applied, 1);
    let (name, version): (String, i64) =
        sqlx::query_as("SELECT name, version FROM students WHERE id = $1")
            .bind(bobby)
            .fetch_one(&live.db.pool)
            .await
            .expect("bobby is in the read model");
    assert_eq!(name, "Bobby T");
    assert_eq!(version, i64::try_from(poisoned).expect("small"));
    assert!(
        dlq::list(&live.broker.jetstream, &live.broker.names, None)
            .await
            .expect("list")
            .is_empty(),
        "the redriven letter is gone"
    );
    // Ada, applied around the dead letter, is untouched.
    let ada_name: String = sqlx::query_scalar("SELECT name FROM students WHERE id = $1")
        .bind(ada)
        .fetch_one(&live.db.pool)
        .await
        .expect("ada");
    assert_eq!(ada_name, "Ada K");
    live.cleanup().await;
}

#[tokio::test]
async fn purge_deletes_the_letters_of_one_projection() {
    let live = Live::start().await;
    sqlx::query("ALTER TABLE students ADD CONSTRAINT no_bobby CHECK (name <> 'Bobby T')")
        .execute(&live.db.pool)
        .await
        .expect("constraint");
    live.publish(&registered(Uuid::now_v7(), "Bobby T")).await;
    test_support::eventually(30, "the dead letter", || async {
        let letters = dlq::list(&live.broker.jetstream, &live.broker.names, None)
            .await
            .ok()?;
        (letters.len() == 1).then_some(())
    })
    .await;
    let none = dlq::purge(
        &live.broker.jetstream,
        &live.broker.names,
        Some(events::Projection::Courses),
    )
    .await
    .expect("purge courses");
    assert_eq!(none, 0);
    let purged = dlq::purge(
        &live.broker.jetstream,
        &live.broker.names,
        Some(events::Projection::Students),
    )
    .await
    .expect("purge students");
    assert_eq!(purged, 1);
    assert!(
        dlq::list(&live.broker.jetstream, &live.broker.names, None)
            .await
            .expect("list")
            .is_empty()
    );
    live.cleanup().await;
}

/// Redrive against a live projection that applies an event of the same aggregate while the
/// redrive runs. The redrive's read model is on a pool of one connection the test holds, so
/// the redrive waits where it first needs Postgres; the live projection applies the event in
/// that wait. A redrive that read the aggregate's history before that point (an ordered
/// consumer on the event stream appears, announced by a JetStream advisory) misses the
/// event, and writes the older state over it once it gets the connection.
struct RedriveRace {
    projection: events::Projection,
    created: Event,
    renamed: Event,
}

/// The live projection of the race's read model.
enum LiveProjection {
    /// `Live`'s students projection, running; a constraint refuses the creation until the
    /// test drops it.
    Running {
        table: &'static str,
        refusal: &'static str,
    },
    /// A courses projection played by the test through the store (`Live` runs only the
    /// students one): the same writes, with the dead letter the runner would send.
    ByHand(CourseStore),
}

impl LiveProjection {
    /// The creation, dead-lettered by the live projection; returns the letter (the cause of
    /// the refusal is fixed by then).
    async fn dead_letter(&self, live: &Live, race: &RedriveRace) -> dlq::DeadLetter {
        let poisoned = match self {
            LiveProjection::Running { table, refusal } => {
                sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE {table} ADD CONSTRAINT refused CHECK ({refusal})"
                )))
                .execute(&live.db.pool)
                .await
                .expect("constraint");
                live.publish(&race.created).await
            }
            LiveProjection::ByHand(store) => {
                let poisoned = live.publish(&race.created).await;
                let names = &live.broker.names;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(REASON_HEADER, "refused by the test");
                headers.insert(ORIGINAL_SEQUENCE_HEADER, poisoned.to_string().as_str());
                let subject = names.aggregate_subject(
                    race.created.metadata.aggregate_kind,
                    race.created.metadata.aggregate_id,
                );
                headers.insert(ORIGINAL_SUBJECT_HEADER, subject.as_str());
                headers.insert(PROJECTION_HEADER, race.projection.as_str());
                live.broker
                    .jetstream
                    .publish_with_headers(
                        names.dead_letter_subject(race.projection),
                        headers,
                        events::encode(&race.created).into(),
                    )
                    .await
                    .expect("publish the letter")
                    .await
                    .expect("letter stored");
                // Dead-lettered: the checkpoint moves past it.
                store.apply_batch(&[], poisoned).await.expect("checkpoint");
                poisoned
            }
        };
        let letter = test_support::eventually(30, "the dead letter", || async {
            let letters = dlq::list(&live.broker.jetstream, &live.broker.names, None)
                .await
                .ok()?;
            letters
                .into_iter()
                .find(|l| l.original_sequence == Some(poisoned))
        })
        .await;
        if let LiveProjection::Running { table, .. } = self {
            live.caught_up(poisoned).await;
            sqlx::query(AssertSqlSafe(format!(
                "ALTER TABLE {table} DROP CONSTRAINT refused"
            )))
            .execute(&live.db.pool)
            .await
            .expect("fix");
        }
        letter
    }

    /// Publishes `event` and returns once the live projection has applied it.
    async fn apply(&self, live: &Live, event: &Event) -> u64 {
        let position = live.publish(event).await;
        match self {
            LiveProjection::Running { .. } => live.caught_up(position).await,
            LiveProjection::ByHand(store) => {
                store
                    .apply_batch(&[(position, event.clone())], position)
                    .await
                    .expect("applied");
            }
        }
        position
    }
}

async fn a_redrive_keeps_an_event_applied_while_it_runs(
    live: &Live,
    projection: LiveProjection,
    race: RedriveRace,
) {
    let id = race.created.metadata.aggregate_id;
    let letter = projection.dead_letter(live, &race).await;
    assert_eq!(letter.projection, race.projection.as_str());

    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&live.db.url)
        .await
        .expect("redrive pool");
    let models = match race.projection {
        events::Projection::Students => ReadModels {
            students: Some(ReadModel::Students(
                PgStudents::with_pool(pool.clone()).await.expect("store"),
            )),
            courses: None,
        },
        events::Projection::Courses => ReadModels {
            students: None,
            courses: Some(ReadModel::Courses(CourseStore::Postgres(
                PgCourses::with_pool(pool.clone()).await.expect("store"),
            ))),
        },
    };
    let held = pool.acquire().await.expect("the redrive's only connection");
    let durable = live.broker.names.projection_consumer(race.projection);
    let mut created = live
        .broker
        .client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.CREATED.{}.*",
            live.broker.names.event_stream()
        ))
        .await
        .expect("advisories");
    live.broker.client.flush().await.expect("flush");
    let redrive = {
        let (client, names) = (live.broker.client.clone(), live.broker.names.clone());
        let sequence = letter.sequence;
        tokio::spawn(async move {
            dlq::redrive(
                &client,
                &names,
                &service_kit::event_reader::EventReader::without_keys(),
                &models,
                &[sequence],
            )
            .await
        })
    };
    // Without the fix this is where the history has been read; with it, nothing is read
    // until the redrive holds the checkpoint lock, and this waits out its 3 s.
    let history_read_before_postgres = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(advisory) = created.next().await {
            if !advisory.subject.ends_with(durable.as_str()) {
                return;
            }
        }
    })
    .await
    .is_ok();
    eprintln!("history read before the redrive had Postgres: {history_read_before_postgres}");

    let applied_meanwhile = projection.apply(live, &race.renamed).await;
    drop(held);
    let done = redrive
        .await
        .expect("no panic")
        .expect("redrive after the fix");
    let (name, version) = stored(live, race.projection, id).await;
    assert_eq!(
        (name.as_str(), version),
        (
            renamed_to(&race.renamed),
            i64::try_from(applied_meanwhile).expect("small")
        ),
        "the event applied during the redrive is in the rebuilt aggregate"
    );
    assert_eq!(done[0].events_applied, 2);
}

fn renamed_to(event: &Event) -> &str {
    match &event.payload {
        EventPayload::StudentUpdated(details) => &details.name,
        EventPayload::CourseUpdated(details) => &details.name,
        other => panic!("not a rename: {other:?}"),
    }
}

async fn stored(live: &Live, projection: events::Projection, id: Uuid) -> (String, i64) {
    let sql = match projection {
        events::Projection::Students => "SELECT name, version FROM students WHERE id = $1",
        events::Projection::Courses => {
            "SELECT document->>'name', version FROM course_documents WHERE id = $1"
        }
    };
    sqlx::query_as(sql)
        .bind(id)
        .fetch_one(&live.db.pool)
        .await
        .expect("the rebuilt aggregate is in the read model")
}

#[tokio::test]
async fn a_student_redrive_keeps_an_event_the_live_projection_applies_meanwhile() {
    let live = Live::start().await;
    let bobby = Uuid::now_v7();
    a_redrive_keeps_an_event_applied_while_it_runs(
        &live,
        LiveProjection::Running {
            table: "students",
            refusal: "name <> 'Bobby T'",
        },
        RedriveRace {
            projection: events::Projection::Students,
            created: registered(bobby, "Bobby T"),
            renamed: renamed(bobby, "Bobby K"),
        },
    )
    .await;
    live.cleanup().await;
}

#[tokio::test]
async fn a_course_redrive_keeps_an_event_the_live_projection_applies_meanwhile() {
    let live = Live::start().await;
    let courses = CourseStore::Postgres(
        PgCourses::with_pool(live.db.pool.clone())
            .await
            .expect("migrated"),
    );
    let algebra = Uuid::now_v7();
    a_redrive_keeps_an_event_applied_while_it_runs(
        &live,
        LiveProjection::ByHand(courses),
        RedriveRace {
            projection: events::Projection::Courses,
            created: course(algebra, EventPayload::CourseCreated(details("Algebra T"))),
            renamed: course(algebra, EventPayload::CourseUpdated(details("Algebra K"))),
        },
    )
    .await;
    live.cleanup().await;
}

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
