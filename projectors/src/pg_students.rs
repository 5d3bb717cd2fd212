//! The students projection into Postgres: students and their course ids, plus the
//! checkpoint that makes re-delivery harmless.

use std::sync::Arc;

use events::{Event, EventPayload, Projection};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use crate::generation::Generation;
use crate::store::{BatchOutcome, ProjectionStore, StoreError};

/// Applies batches of student events, each batch in one transaction with its checkpoint.
#[derive(Clone)]
pub struct PgStudents {
    pool: PgPool,
    sql: Arc<Statements>,
}

const PROJECTION: Projection = Projection::Students;

/// The tables of the students read model, parents first.
pub const TABLES: [&str; 2] = ["students", "student_courses"];

/// The statements of one generation of the model (table names are ours, never input).
struct Statements {
    generation: Generation,
    checkpoint_key: String,
    register: String,
    update: String,
    delete: String,
    enroll: String,
    unenroll: String,
    bump_version: String,
    delete_enrollments: String,
}

impl Statements {
    fn new(generation: Generation) -> Self {
        let students = generation.table("students");
        let enrollments = generation.table("student_courses");
        Statements {
            generation,
            checkpoint_key: generation.checkpoint_key(PROJECTION),
            register: format!(
                "INSERT INTO {students} (id, name, first_name, last_name, version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)
                 ON CONFLICT (id) DO NOTHING"
            ),
            update: format!(
                "UPDATE {students} SET name = $2, first_name = $3, last_name = $4, version = $5,
                        updated_at = $6
                 WHERE id = $1"
            ),
            // Enrollment rows go with it (ON DELETE CASCADE).
            delete: format!("DELETE FROM {students} WHERE id = $1"),
            enroll: format!(
                "INSERT INTO {enrollments} (student_id, course_id, enrolled_at)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM {students} WHERE id = $1)
                 ON CONFLICT DO NOTHING"
            ),
            unenroll: format!(
                "DELETE FROM {enrollments} WHERE student_id = $1 AND course_id = $2"
            ),
            bump_version: format!(
                "UPDATE {students} SET version = $2, updated_at = $3 WHERE id = $1"
            ),
            delete_enrollments: format!("DELETE FROM {enrollments} WHERE student_id = $1"),
        }
    }
}

impl PgStudents {
    /// Connects and brings the schema up to date (migrations are idempotent and take a
    /// Postgres advisory lock, so concurrent starts are safe).
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(database_url)
            .await?;
        Self::with_pool(pool).await
    }

    pub async fn with_pool(pool: PgPool) -> anyhow::Result<Self> {
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(PgStudents {
            pool,
            sql: Arc::new(Statements::new(Generation::Live)),
        })
    }

    /// The same database, writing the tables of `generation` (a replay builds `Next`).
    pub fn generation(&self, generation: Generation) -> Self {
        PgStudents {
            pool: self.pool.clone(),
            sql: Arc::new(Statements::new(generation)),
        }
    }

    pub fn current_generation(&self) -> Generation {
        self.sql.generation
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Last stream sequence applied (0 before the first event).
    pub async fn checkpoint(&self) -> Result<u64, sqlx::Error> {
        read_checkpoint(&self.pool, &self.sql.checkpoint_key).await
    }

    /// Applies `(stream sequence, event)` pairs in stream order, in one transaction, skipping
    /// what the checkpoint says is already applied, and moves the checkpoint to
    /// `through_sequence` (the batch may end with events that were dead-lettered instead).
    pub async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut outcome = BatchOutcome {
            checkpoint: lock_checkpoint(&mut tx, &self.sql.checkpoint_key).await?,
            ..BatchOutcome::default()
        };
        for (sequence, event) in batch {
            if *sequence <= outcome.checkpoint {
                outcome.skipped += 1;
                continue;
            }
            self.apply_event(&mut tx, *sequence, event).await?;
            outcome.applied += 1;
        }
        if through_sequence > outcome.checkpoint {
            outcome.checkpoint = through_sequence;
            write_checkpoint(&mut tx, &self.sql.checkpoint_key, through_sequence).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Replaces one student's rows by the fold of `history` (every event of its subject, in
    /// stream order), counting only events the checkpoint covers; later ones are the live
    /// projection's to apply. Serialised with batches by the checkpoint row lock. Returns the
    /// number of events applied.
    pub async fn rebuild_aggregate(
        &self,
        id: uuid::Uuid,
        history: &[(u64, Event)],
    ) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let checkpoint = lock_checkpoint(&mut tx, &self.sql.checkpoint_key).await?;
        sqlx::query(AssertSqlSafe(self.sql.delete_enrollments.as_str()))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(self.sql.delete.as_str()))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let mut applied = 0;
        for (sequence, event) in history.iter().filter(|(seq, _)| *seq <= checkpoint) {
            self.apply_event(&mut tx, *sequence, event).await?;
            applied += 1;
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn apply_event(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        sequence: u64,
        event: &Event,
    ) -> Result<(), sqlx::Error> {
        let sql = &self.sql;
        let id = event.metadata.aggregate_id;
        let at = event.metadata.occurred_at;
        let version = sequence_to_db(sequence);
        match &event.payload {
            EventPayload::StudentRegistered(details) => {
                sqlx::query(AssertSqlSafe(sql.register.as_str()))
                    .bind(id)
                    .bind(&details.name)
                    .bind(&details.first_name)
                    .bind(&details.last_name)
                    .bind(version)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
            }
            EventPayload::StudentUpdated(details) => {
                sqlx::query(AssertSqlSafe(sql.update.as_str()))
                    .bind(id)
                    .bind(&details.name)
                    .bind(&details.first_name)
                    .bind(&details.last_name)
                    .bind(version)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
            }
            EventPayload::StudentDeleted => {
                sqlx::query(AssertSqlSafe(sql.delete.as_str()))
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
            }
            EventPayload::StudentEnrolled(enrollment) => {
                sqlx::query(AssertSqlSafe(sql.enroll.as_str()))
                    .bind(enrollment.student_id)
                    .bind(enrollment.course_id)
                    .bind(at)
                    .execute(&mut **tx)
                    .await?;
                self.bump_version(tx, id, version, at).await?;
            }
            EventPayload::StudentUnenrolled(enrollment) => {
                sqlx::query(AssertSqlSafe(sql.unenroll.as_str()))
                    .bind(enrollment.student_id)
                    .bind(enrollment.course_id)
                    .execute(&mut **tx)
                    .await?;
                self.bump_version(tx, id, version, at).await?;
            }
            // Course events are filtered out by the consumer; one that slips through has no
            // effect on students.
            EventPayload::CourseCreated(_)
            | EventPayload::CourseUpdated(_)
            | EventPayload::CourseDeleted => {}
        }
        Ok(())
    }

    async fn bump_version(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        id: uuid::Uuid,
        version: i64,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.sql.bump_version.as_str()))
            .bind(id)
            .bind(version)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl ProjectionStore for PgStudents {
    fn projection(&self) -> Projection {
        PROJECTION
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        Ok(PgStudents::checkpoint(self).await?)
    }

    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        Ok(PgStudents::apply_batch(self, batch, through_sequence).await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// The checkpoint stored under `key` (0 before the first batch).
pub(crate) async fn read_checkpoint(pool: &PgPool, key: &str) -> Result<u64, sqlx::Error> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?;
    Ok(row.map_or(0, sequence_from_db))
}

/// Reads the checkpoint inside a batch transaction, locking its row: writers of one
/// projection's checkpoint are serialised.
pub(crate) async fn lock_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
) -> Result<u64, sqlx::Error> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map_or(0, sequence_from_db))
}

pub(crate) async fn write_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    sequence: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, last_sequence) VALUES ($1, $2)
         ON CONFLICT (projection) DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
    )
    .bind(key)
    .bind(sequence_to_db(sequence))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stream sequences fit in i64 for any stream that will ever exist (2^63 messages).
pub(crate) fn sequence_to_db(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

pub(crate) fn sequence_from_db(sequence: i64) -> u64 {
    u64::try_from(sequence).unwrap_or(0)
}
