//! Transient read-model errors are waited for, never dead-lettered (issue 18, item 3), and a
//! dead-letter reason of any text cannot panic the projection (item 6).
//!
//! - The projectors binary runs with `lock_timeout = 100ms` on its role in its database
//!   while the test holds the students checkpoint row for 10 s (longer than the three
//!   refusals after which a batch is isolated and its events dead-lettered) and events keep
//!   arriving: every batch attempt fails with `55P03`. Once the lock is released, every
//!   student is in the read model and the dead-letter stream is empty.
//! - Errors raised by a real PostgreSQL (real conditions, and every class by `RAISE ...
//!   USING ERRCODE`) and MongoDB errors convert as the classification says.
//! - A reason with CR/LF, NUL and 5000 multibyte characters reaches the dead-letter stream.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use common::Projectors;
use events::{AggregateKind, EventPayload, Projection, StudentDetails};
use futures::StreamExt;
use mongodb::bson::doc;
use mongodb::error::{CommandError, ErrorKind, WriteConcernError, WriteError, WriteFailure};
use projectors::dead_letters::{DeadLetters, MAX_REASON_CHARS, REASON_HEADER};
use read_models::StoreError;
use read_models::generation::Generation;
use read_models::mongo_courses::{
    TRANSIENT_MONGO_CODES, is_transient_mongo, is_transient_mongo_code, is_transient_mongo_kind,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use test_support::{TestBroker, TestDatabase, eventually};
use uuid::Uuid;

/// How long the test holds the checkpoint row: well past three refusals (a retry a second,
/// each after a 100 ms lock wait) and the isolation of the first event on its own.
const HOLD: Duration = Duration::from_secs(10);

fn registered(student_id: Uuid, name: &str) -> events::Event {
    test_support::event(
        AggregateKind::Student,
        student_id,
        EventPayload::StudentRegistered(StudentDetails {
            name: name.into(),
            first_name: "First".into(),
            last_name: "Last".into(),
        }),
    )
}

async fn publish_registration(broker: &TestBroker, name: &str) -> (Uuid, u64) {
    let id = Uuid::now_v7();
    let sequence = broker
        .jetstream
        .publish(
            broker.names.aggregate_subject(AggregateKind::Student, id),
            events::encode(&registered(id, name)).into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence;
    (id, sequence)
}

async fn students(pool: &PgPool) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT id, name FROM students ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("students")
}

async fn checkpoint(pool: &PgPool, key: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT last_sequence FROM projection_checkpoints WHERE projection = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

/// Transactions rolled back in `database` so far (each failed batch attempt is one).
async fn rollbacks(pool: &PgPool, database: &str) -> i64 {
    sqlx::query_scalar("SELECT xact_rollback FROM pg_stat_database WHERE datname = $1")
        .bind(database)
        .fetch_one(pool)
        .await
        .expect("pg_stat_database")
}

async fn dead_letter_count(broker: &TestBroker) -> u64 {
    let stream = broker
        .jetstream
        .get_stream(broker.names.dead_letter_stream())
        .await
        .expect("dead-letter stream");
    stream.get_info().await.expect("info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_on_the_checkpoint_is_waited_out_and_nothing_is_dead_lettered() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    // The projector's role gets a lock timeout in this test's database only (a per-role,
    // per-database setting, dropped with the database): new connections to it take it.
    sqlx::query(AssertSqlSafe(format!(
        "ALTER ROLE CURRENT_USER IN DATABASE {} SET lock_timeout = '100ms'",
        db.name
    )))
    .execute(&db.pool)
    .await
    .expect("lock_timeout for the projector's role");
    let fresh = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .expect("a connection made after the setting");
    let setting: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&fresh)
        .await
        .expect("show");
    assert_eq!(setting, "100ms", "new connections take the lock timeout");

    let mut expected = Vec::new();
    let mut last = 0;
    for n in 0..20 {
        let (id, sequence) = publish_registration(&broker, &format!("Before {n}")).await;
        expected.push((id, format!("Before {n}")));
        last = sequence;
    }
    let mut projectors = Projectors::start(broker.names.prefix(), &db.url);
    projectors.wait_started().await;
    let key = Generation::Live.checkpoint_key(Projection::Students);
    eventually(60, "the first events projected", || async {
        (checkpoint(&fresh, &key).await? == i64::try_from(last).ok()?).then_some(())
    })
    .await;
    assert_eq!(students(&fresh).await.len(), 20);

    // Hold the checkpoint row as a batch of another writer would (without a lock timeout
    // of our own), while more events arrive.
    let mut holder = PgConnection::connect(&db.url).await.expect("holder");
    sqlx::query("SET lock_timeout = 0")
        .execute(&mut holder)
        .await
        .expect("no timeout for the holder");
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begin");
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(&key)
    .fetch_optional(&mut holder)
    .await
    .expect("lock the checkpoint row");
    assert!(held.is_some(), "the checkpoint row exists");
    let held_at = Instant::now();
    let rollbacks_before = rollbacks(&fresh, &db.name).await;
    for n in 0..30 {
        let (id, sequence) = publish_registration(&broker, &format!("During {n}")).await;
        expected.push((id, format!("During {n}")));
        last = sequence;
    }
    tokio::time::sleep(HOLD.saturating_sub(held_at.elapsed())).await;
    let projected_while_held = students(&fresh).await.len();
    // Statistics reach pg_stat_database when a backend goes idle (at most once a second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let failed_attempts = rollbacks(&fresh, &db.name).await - rollbacks_before;
    let dead_while_held = dead_letter_count(&broker).await;
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release the checkpoint row");
    let released_at = Instant::now();

    eventually(60, "every event projected after the release", || async {
        let at = checkpoint(&fresh, &key).await?;
        (at >= i64::try_from(last).ok()?).then_some(())
    })
    .await;
    let caught_up_after = released_at.elapsed();
    let model = students(&fresh).await;
    let dead_letters = dead_letter_count(&broker).await;
    let alive = projectors.process.is_alive();
    let http = reqwest::Client::new();
    let counted = projectors
        .metric(&http, "projection_dead_letters_total", "students")
        .await;
    eprintln!(
        "RELIABILITY: scenario=lock-timeout-on-checkpoint lock_timeout_ms=100 held_ms={} \
         events={} failed_batch_attempts_while_held={failed_attempts} \
         projected_while_held={projected_while_held} caught_up_after_ms={} \
         dead_letters={dead_letters} lost={}",
        HOLD.as_millis(),
        expected.len(),
        caught_up_after.as_millis(),
        expected.iter().filter(|s| !model.contains(s)).count(),
    );

    assert_eq!(
        dead_while_held, 0,
        "events were dead-lettered while the checkpoint was locked"
    );
    assert_eq!(dead_letters, 0, "the dead-letter stream holds messages");
    assert!(
        counted.is_none_or(|n| n == 0.0),
        "dead letters counted: {counted:?}"
    );
    assert!(alive, "the projectors process exited");
    assert_eq!(
        projected_while_held, 20,
        "nothing can commit while the checkpoint row is held"
    );
    assert!(
        failed_attempts >= 3,
        "the projector's batches failed on the lock ({failed_attempts} rollbacks)"
    );
    expected.sort();
    assert_eq!(model, expected, "every student is in the read model");

    drop(projectors);
    fresh.close().await;
    let _ = sqlx::query(AssertSqlSafe(format!(
        "ALTER ROLE CURRENT_USER IN DATABASE {} RESET lock_timeout",
        db.name
    )))
    .execute(&db.pool)
    .await;
    db.cleanup().await;
    broker.cleanup().await;
}

fn classify(error: sqlx::Error) -> &'static str {
    let converted = StoreError::from(error);
    if matches!(converted, StoreError::Unavailable(_)) {
        "unavailable"
    } else if matches!(converted, StoreError::Refused(_)) {
        "refused"
    } else {
        "other"
    }
}

async fn execute(pool: &PgPool, statement: &str) {
    sqlx::query(AssertSqlSafe(statement.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// The code and the conversion of the error `statement` fails with on `connection`.
async fn failure(connection: &mut PgConnection, statement: &str) -> (String, &'static str) {
    let error = sqlx::query(AssertSqlSafe(statement.to_owned()))
        .execute(&mut *connection)
        .await
        .expect_err(statement);
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
        .unwrap_or_else(|| format!("not a database error: {error}"));
    (code, classify(error))
}

#[tokio::test]
async fn errors_from_a_real_postgres_convert_by_their_sqlstate() {
    let db = TestDatabase::create().await;
    execute(&db.pool, "CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    execute(&db.pool, "INSERT INTO t VALUES (1, 0), (2, 0)").await;
    let mut a = PgConnection::connect(&db.url).await.expect("a");
    let mut b = PgConnection::connect(&db.url).await.expect("b");

    // Real conditions.
    let mut seen = Vec::new();
    sqlx::query("BEGIN").execute(&mut a).await.expect("begin");
    sqlx::query("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .execute(&mut a)
        .await
        .expect("lock");
    sqlx::query("SET lock_timeout = '50ms'")
        .execute(&mut b)
        .await
        .expect("set");
    seen.push(failure(&mut b, "SELECT * FROM t").await);
    sqlx::query("ROLLBACK").execute(&mut a).await.expect("end");
    sqlx::query("SET statement_timeout = '50ms'")
        .execute(&mut b)
        .await
        .expect("set");
    seen.push(failure(&mut b, "SELECT pg_sleep(2)").await);
    sqlx::query("RESET statement_timeout")
        .execute(&mut b)
        .await
        .expect("reset");
    sqlx::query("BEGIN READ ONLY")
        .execute(&mut b)
        .await
        .expect("begin");
    seen.push(failure(&mut b, "INSERT INTO t VALUES (3, 0)").await);
    sqlx::query("ROLLBACK").execute(&mut b).await.expect("end");
    seen.push(failure(&mut b, "INSERT INTO t VALUES (1, 0)").await);
    seen.push(failure(&mut b, "SELECT 1 / 0").await);
    seen.push(failure(&mut b, "SELECT * FROM missing").await);
    seen.push(deadlock(&db.url).await);
    assert_eq!(
        seen,
        [
            ("55P03".to_owned(), "unavailable"), // lock_timeout
            ("57014".to_owned(), "unavailable"), // statement_timeout
            ("25006".to_owned(), "unavailable"), // read-only transaction
            ("23505".to_owned(), "refused"),     // unique violation
            ("22012".to_owned(), "refused"),     // division by zero
            ("42P01".to_owned(), "refused"),     // undefined table
            ("40P01".to_owned(), "unavailable"), // deadlock
        ]
    );

    // The session ended by an administrator: the error (or the broken connection) waits.
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut a)
        .await
        .expect("pid");
    execute(
        &db.pool,
        &format!("SELECT pg_terminate_backend({pid}, 5000)"),
    )
    .await;
    let error = sqlx::query("SELECT 1")
        .execute(&mut a)
        .await
        .expect_err("terminated");
    assert_eq!(classify(error), "unavailable", "admin shutdown");

    // Every class, raised with its code by the server, through the real driver.
    for (code, expected) in [
        ("08006", "unavailable"),
        ("25P03", "unavailable"),
        ("28P01", "unavailable"),
        ("3D000", "unavailable"),
        ("40001", "unavailable"),
        ("40002", "refused"),
        ("53100", "unavailable"),
        ("53200", "unavailable"),
        ("53300", "unavailable"),
        ("55000", "unavailable"),
        ("55006", "unavailable"),
        ("57P01", "unavailable"),
        ("57P03", "unavailable"),
        ("58030", "unavailable"),
        ("72000", "unavailable"),
        ("XX000", "unavailable"),
        ("XX001", "unavailable"),
        ("0A000", "refused"),
        ("22001", "refused"),
        ("22P02", "refused"),
        ("23503", "refused"),
        ("23514", "refused"),
        ("25P02", "refused"),
        ("42501", "refused"),
        ("42703", "refused"),
        ("54000", "refused"),
        ("55P02", "refused"),
        ("P0001", "refused"),
    ] {
        let raised = failure(
            &mut b,
            &format!("DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{code}'; END $$"),
        )
        .await;
        assert_eq!(raised, (code.to_owned(), expected), "{code}");
    }
    db.cleanup().await;
}

/// Two sessions that lock two rows in opposite orders: one of them gets `40P01`.
async fn deadlock(url: &str) -> (String, &'static str) {
    let mut first = PgConnection::connect(url).await.expect("first");
    let mut second = PgConnection::connect(url).await.expect("second");
    for (connection, id) in [(&mut first, 1), (&mut second, 2)] {
        sqlx::query("SET deadlock_timeout = '100ms'")
            .execute(&mut *connection)
            .await
            .expect("set");
        sqlx::query("BEGIN")
            .execute(&mut *connection)
            .await
            .expect("begin");
        sqlx::query("UPDATE t SET v = v + 1 WHERE id = $1")
            .bind(id)
            .execute(&mut *connection)
            .await
            .expect("first row");
    }
    let crossing = tokio::spawn(async move {
        let result = sqlx::query("UPDATE t SET v = v + 1 WHERE id = 2")
            .execute(&mut first)
            .await;
        (first, result)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let result = sqlx::query("UPDATE t SET v = v + 1 WHERE id = 1")
        .execute(&mut second)
        .await;
    let (_first, crossed) = crossing.await.expect("joined");
    let error = match (crossed, result) {
        (Err(error), _) | (_, Err(error)) => error,
        (Ok(_), Ok(_)) => panic!("no deadlock"),
    };
    let code = error
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
        .unwrap_or_default();
    (code, classify(error))
}

fn mongo(kind: ErrorKind) -> &'static str {
    let error = mongodb::error::Error::from(kind);
    let transient = is_transient_mongo(&error);
    let converted = StoreError::from(error);
    if transient && matches!(converted, StoreError::Unavailable(_)) {
        "unavailable"
    } else if !transient && matches!(converted, StoreError::Refused(_)) {
        "refused"
    } else {
        "inconsistent"
    }
}

fn command(code: i32) -> ErrorKind {
    ErrorKind::Command(
        mongodb::bson::from_document::<CommandError>(
            doc! { "code": code, "codeName": "Test", "errmsg": "test" },
        )
        .expect("command error"),
    )
}

fn write_error(code: i32) -> ErrorKind {
    ErrorKind::Write(WriteFailure::WriteError(
        mongodb::bson::from_document::<WriteError>(doc! { "code": code, "errmsg": "test" })
            .expect("write error"),
    ))
}

#[test]
fn mongodb_errors_convert_by_kind_code_and_label() {
    // The driver's own lists (mongodb 3.9.1 `error.rs`: RETRYABLE_READ_CODES, which hold
    // the not-writable-primary and recovering codes, plus LegacyNotPrimary) and the
    // transactions specification's unknown-commit-result codes are all waited for.
    for code in [
        11600, 11602, 10107, 13435, 13436, 189, 91, 7, 6, 89, 9001, 134, 262, 10058, 50, 64,
    ] {
        assert!(is_transient_mongo_code(code), "{code}");
        assert_eq!(mongo(command(code)), "unavailable", "command {code}");
        assert_eq!(mongo(write_error(code)), "unavailable", "write {code}");
    }
    for (code, _) in TRANSIENT_MONGO_CODES {
        assert_eq!(mongo(write_error(code)), "unavailable", "write {code}");
    }
    // A document's own data.
    for (code, name) in [
        (11000, "DuplicateKey"),
        (121, "DocumentValidationFailure"),
        (10334, "BSONObjectTooLarge"),
    ] {
        assert!(!is_transient_mongo_code(code), "{name}");
        assert_eq!(mongo(command(code)), "refused", "command {name}");
        assert_eq!(mongo(write_error(code)), "refused", "write {name}");
    }
    for (code, name) in [
        (2, "BadValue"),
        (14, "TypeMismatch"),
        (52, "DollarPrefixed"),
    ] {
        assert_eq!(mongo(write_error(code)), "refused", "write {name}");
    }

    // A write concern not satisfied (timeout, stepdown): the versioned write is repeatable.
    let concern = mongodb::bson::from_document::<WriteConcernError>(
        doc! { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out" },
    )
    .expect("write concern error");
    assert_eq!(
        mongo(ErrorKind::Write(WriteFailure::WriteConcernError(concern))),
        "unavailable"
    );
    let unsatisfiable = mongodb::bson::from_document::<WriteConcernError>(
        doc! { "code": 100, "codeName": "UnsatisfiableWriteConcern", "errmsg": "not enough data-bearing nodes" },
    )
    .expect("write concern error");
    assert_eq!(
        mongo(ErrorKind::Write(WriteFailure::WriteConcernError(
            unsatisfiable
        ))),
        "unavailable"
    );
    // insert_many: write concern only → wait; a duplicate key among the write errors → refuse.
    let insert_many = |body: mongodb::bson::Document| {
        ErrorKind::InsertMany(mongodb::bson::from_document(body).expect("insert many error"))
    };
    assert_eq!(
        mongo(insert_many(
            doc! { "writeConcernError": { "code": 64, "errmsg": "timeout" } }
        )),
        "unavailable"
    );
    assert_eq!(
        mongo(insert_many(
            doc! { "writeErrors": [ { "index": 0, "code": 11000, "errmsg": "dup" } ] }
        )),
        "refused"
    );

    // Network and I/O, a client shut down: wait.
    for kind in [
        std::io::ErrorKind::ConnectionReset,
        std::io::ErrorKind::TimedOut,
        std::io::ErrorKind::BrokenPipe,
    ] {
        assert_eq!(
            mongo(ErrorKind::Io(Arc::new(std::io::Error::new(kind, "net")))),
            "unavailable"
        );
    }
    assert_eq!(mongo(ErrorKind::Shutdown), "unavailable");
    assert_eq!(mongo(ErrorKind::SessionsNotSupported), "unavailable");
    // A stored document that does not decode: refuse.
    let undecodable =
        mongodb::bson::from_document::<CommandError>(doc! { "codeName": 1 }).expect_err("no code");
    assert_eq!(
        mongo(ErrorKind::BsonDeserialization(undecodable)),
        "refused"
    );

    // A retry label from the server or the driver makes any kind wait.
    let duplicate = write_error(11000);
    assert!(!is_transient_mongo_kind(&duplicate, false));
    assert!(is_transient_mongo_kind(&duplicate, true));
}

#[tokio::test]
async fn a_dead_letter_reason_of_any_text_reaches_the_dead_letter_stream() {
    let broker = TestBroker::start().await;
    let (id, sequence) = publish_registration(&broker, "Poisoned").await;
    let consumer: PullConsumer = broker
        .jetstream
        .get_consumer_from_stream(
            broker.names.projection_consumer(Projection::Students),
            broker.names.event_stream(),
        )
        .await
        .expect("consumer");
    let mut fetched = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let message = fetched.next().await.expect("one message").expect("message");
    drop(fetched);
    assert!(message.subject.as_str().ends_with(&id.to_string()));

    let long: String = "é€😀\n".repeat(1250);
    let reason = format!("refused:\r\nERROR: bad\0value\n{long}");
    let dead_letters = DeadLetters::new(
        broker.jetstream.clone(),
        &broker.names,
        Projection::Students,
    );
    dead_letters
        .send(&message, sequence, &reason)
        .await
        .expect("dead-lettered");

    let stream = broker
        .jetstream
        .get_stream(broker.names.dead_letter_stream())
        .await
        .expect("dead-letter stream");
    let letter = stream.get_raw_message(1).await.expect("dead letter");
    let stored = letter
        .headers
        .get(REASON_HEADER)
        .map(|v| v.as_str().to_owned())
        .expect("reason header");
    assert!(
        stored.starts_with("refused:  ERROR: bad value é€😀 é€😀"),
        "{stored:?}"
    );
    assert!(stored.chars().count() <= MAX_REASON_CHARS);
    assert!(!stored.contains(['\r', '\n', '\0']));
    broker.cleanup().await;
}
