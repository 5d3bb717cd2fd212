//! query-api's database role: a login role in `school_reader` (created and granted by the
//! projectors' migrations) reads every read model through query-api's own read code, and
//! every attempt to write, change the schema or create a table is refused by Postgres.

use query_api::models::ReadModels;
use read_models::CourseStore;
use read_models::StudentReader;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool};
use test_support::{TestDatabase, unique_suffix};
use uuid::Uuid;

/// A login role that is a member of `school_reader`, and a pool connected as it.
async fn reader_login(db: &TestDatabase) -> (String, PgPool) {
    let role = format!("reader_{}", unique_suffix());
    sqlx::query(AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN IN ROLE school_reader"
    )))
    .execute(&db.pool)
    .await
    .expect("creating the login role");
    let options: PgConnectOptions = db.url.parse().expect("database url");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.username(&role))
        .await
        .expect("connecting as the reader");
    (role, pool)
}

#[tokio::test]
async fn the_query_role_reads_every_read_model_and_cannot_write_anything() {
    let db = TestDatabase::create().await;
    // The projectors' store opens as the owner and migrates (this creates the grants).
    read_models::PgStudents::with_pool(db.pool.clone())
        .await
        .expect("migrated");
    let student = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO students (id, name, first_name, last_name, version, created_at, updated_at)
         VALUES ($1, 'Ada L', 'Ada', 'Lovelace', 7, now(), now())",
    )
    .bind(student)
    .execute(&db.pool)
    .await
    .expect("the owner writes");
    let (role, reader) = reader_login(&db).await;

    // Reads, through query-api's code.
    let models = ReadModels {
        students: StudentReader::new(reader.clone()),
        courses: CourseStore::connect_reader(&db.url, Some(reader.clone()))
            .await
            .expect("course store"),
    };
    let read = models.student(student).await.expect("the reader reads");
    assert_eq!(read.map(|s| s.name), Some("Ada L".to_owned()));
    models
        .courses_by_id(&[Uuid::now_v7()])
        .await
        .expect("the reader reads courses");
    models
        .applied_position(events::Projection::Students)
        .await
        .expect("the reader reads checkpoints");

    // Writes and schema changes.
    let attempts = [
        "INSERT INTO students (id, name, first_name, last_name, version, created_at, updated_at)
         VALUES (gen_random_uuid(), 'x', 'x', 'x', 1, now(), now())",
        "UPDATE students SET name = 'changed'",
        "DELETE FROM students",
        "TRUNCATE student_courses",
        "INSERT INTO projection_checkpoints VALUES ('students', 999)",
        "UPDATE course_documents SET version = 0",
        "DELETE FROM course_documents",
        "ALTER TABLE students ADD COLUMN sneaky int",
        "DROP TABLE student_courses",
        "CREATE TABLE intruder (x int)",
    ];
    for statement in attempts {
        let error = sqlx::query(statement)
            .execute(&reader)
            .await
            .expect_err(statement);
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(
            code.as_deref(),
            Some("42501"),
            "{statement}: expected insufficient_privilege, got {error}"
        );
    }
    let name: String = sqlx::query_scalar("SELECT name FROM students WHERE id = $1")
        .bind(student)
        .fetch_one(&db.pool)
        .await
        .expect("owner reads");
    assert_eq!(name, "Ada L");

    // A table the owner creates later (a replay's next generation) is readable at once.
    sqlx::query("CREATE TABLE students_next (LIKE students INCLUDING ALL)")
        .execute(&db.pool)
        .await
        .expect("the owner creates a generation");
    sqlx::query("SELECT count(*) FROM students_next")
        .execute(&reader)
        .await
        .expect("the reader reads a new generation");

    reader.close().await;
    db.cleanup().await;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&test_support::database_url())
        .await
        .expect("admin");
    sqlx::query(AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
        .execute(&admin)
        .await
        .expect("dropping the login role");
}
