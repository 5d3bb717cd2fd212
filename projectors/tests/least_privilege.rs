//! The projectors' database role: a login that is no superuser and may only create tables
//! in the read models' schema (what the chart, compose and `scripts/dev` give
//! `school_projector`) runs the migrations, projects events and replays a generation (create
//! the next tables, rename them into place) through the real store code, and Postgres
//! refuses it everything beyond that: roles, databases, other roles' tables, the catalogue
//! of passwords, programs on the server and the server's configuration.

use events::{AggregateKind, Enrollment, Event, EventPayload, StudentDetails};
use read_models::PgStudents;
use read_models::generation::{Generation, STUDENTS};
use read_models::rebuild::GenerationSwitch;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use test_support::{TestDatabase, unique_suffix};
use uuid::Uuid;

fn event(student_id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Student, student_id, payload)
}

fn events(ada: Uuid, course: Uuid) -> Vec<(u64, Event)> {
    vec![
        (
            1,
            event(
                ada,
                EventPayload::StudentRegistered(StudentDetails {
                    name: "Ada L".into(),
                    first_name: "Ada".into(),
                    last_name: "Lovelace".into(),
                }),
            ),
        ),
        (
            2,
            event(
                ada,
                EventPayload::StudentEnrolled(Enrollment {
                    student_id: ada,
                    course_id: course,
                }),
            ),
        ),
    ]
}

async fn execute(pool: &PgPool, statement: String) {
    sqlx::query(AssertSqlSafe(statement.clone()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn connect_as(db: &TestDatabase, role: &str) -> PgPool {
    let options: PgConnectOptions = db.url.parse().expect("database url");
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.username(role))
        .await
        .unwrap_or_else(|e| panic!("connecting as {role}: {e}"))
}

#[tokio::test]
async fn the_projector_role_migrates_projects_and_replays_and_may_do_nothing_else() {
    let db = TestDatabase::create().await;
    let suffix = unique_suffix();
    let projector = format!("projector_{suffix}");
    let reader = format!("reader_{suffix}");
    // What the chart's init script (and compose, and scripts/dev) does. `school_reader`
    // exists before the first migration: the projector may not create roles.
    execute(
        &db.pool,
        "DO $$ BEGIN
             CREATE ROLE school_reader NOLOGIN;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
         END $$"
            .into(),
    )
    .await;
    execute(
        &db.pool,
        format!(
            "CREATE ROLE {projector} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS"
        ),
    )
    .await;
    execute(
        &db.pool,
        format!("GRANT USAGE, CREATE ON SCHEMA public TO {projector}"),
    )
    .await;
    execute(
        &db.pool,
        format!("CREATE ROLE {reader} LOGIN IN ROLE school_reader"),
    )
    .await;
    // A table of another role in the same database.
    execute(&db.pool, "CREATE TABLE not_the_projectors (x int)".into()).await;

    let as_projector = connect_as(&db, &projector).await;
    // The migrations, with the function the projectors (and stream-admin) run at start.
    let store = PgStudents::with_pool(as_projector.clone())
        .await
        .expect("the projector runs the migrations");
    let owner: String =
        sqlx::query_scalar("SELECT tableowner FROM pg_tables WHERE tablename = 'students'")
            .fetch_one(&db.pool)
            .await
            .expect("owner");
    assert_eq!(owner, projector);

    // It projects, through the real store.
    let (ada, course) = (Uuid::now_v7(), Uuid::now_v7());
    let batch = events(ada, course);
    store
        .apply_batch(&batch, 2)
        .await
        .expect("the projector writes");
    assert_eq!(store.checkpoint().await.expect("checkpoint"), 2);

    // It replays: creates the next generation, fills it, renames it into place.
    assert!(!STUDENTS.prepare_next(&as_projector).await.expect("next"));
    store
        .generation(Generation::Next)
        .apply_batch(&batch, 2)
        .await
        .expect("the projector fills the next generation");
    let switch = STUDENTS
        .begin_switch(&as_projector)
        .await
        .expect("begin switch");
    switch
        .finish(false, false)
        .await
        .expect("the projector switches generations");

    // A member of school_reader reads the generation the projector created after the
    // migrations (the default privileges are the projector's own).
    let as_reader = connect_as(&db, &reader).await;
    let name: String = sqlx::query_scalar("SELECT name FROM students WHERE id = $1")
        .bind(ada)
        .fetch_one(&as_reader)
        .await
        .expect("the reader reads the switched-in generation");
    assert_eq!(name, "Ada L");
    sqlx::query("SELECT count(*) FROM student_courses")
        .execute(&as_reader)
        .await
        .expect("the reader reads enrolments");

    // Everything else is refused, with the code Postgres gives for it.
    let database = &db.name;
    let attempts = [
        (format!("CREATE ROLE intruder_{suffix}"), "42501"),
        (format!("CREATE DATABASE intruder_{suffix}"), "42501"),
        (format!("DROP DATABASE {database}"), "42501"),
        ("CREATE SCHEMA intruder".to_owned(), "42501"),
        (
            "INSERT INTO not_the_projectors VALUES (1)".to_owned(),
            "42501",
        ),
        ("SELECT * FROM not_the_projectors".to_owned(), "42501"),
        ("DROP TABLE not_the_projectors".to_owned(), "42501"),
        ("SELECT rolpassword FROM pg_authid".to_owned(), "42501"),
        ("COPY (SELECT 1) TO PROGRAM 'true'".to_owned(), "42501"),
        ("ALTER SYSTEM SET work_mem = '1MB'".to_owned(), "42501"),
        (format!("ALTER ROLE {projector} SUPERUSER"), "42501"),
        (
            format!("GRANT pg_read_server_files TO {projector}"),
            "42501",
        ),
    ];
    for (statement, expected) in &attempts {
        let error = sqlx::query(AssertSqlSafe(statement.clone()))
            .execute(&as_projector)
            .await
            .expect_err(statement);
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(
            code.as_deref(),
            Some(*expected),
            "{statement}: expected SQLSTATE {expected}, got {error}"
        );
    }

    as_projector.close().await;
    as_reader.close().await;
    db.cleanup().await;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&test_support::database_url())
        .await
        .expect("admin");
    for role in [&reader, &projector] {
        execute(&admin, format!("DROP ROLE IF EXISTS {role}")).await;
    }
}
