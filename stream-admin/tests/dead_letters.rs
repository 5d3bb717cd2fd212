//! Dead letters end to end: the live projection sets an event aside, `dlq list` shows it,
//! a redrive before the cause is fixed fails and keeps it, a redrive after applies it.

mod common;

use common::{Live, registered, renamed};
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
    let error = dlq::redrive(&live.broker.client, &live.broker.names, &models, &sequences)
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
    let done = dlq::redrive(&live.broker.client, &live.broker.names, &models, &sequences)
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
