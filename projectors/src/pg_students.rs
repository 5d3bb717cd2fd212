//! The students projection into Postgres: students and their course ids, plus the
//! checkpoint that makes re-delivery harmless.

use events::{Event, EventPayload, Projection};
use sqlx::{PgPool, Postgres, Transaction};

use crate::store::{BatchOutcome, ProjectionStore, StoreError};

/// Applies batches of student events, each batch in one transaction with its checkpoint.
#[derive(Clone)]
pub struct PgStudents {
    pool: PgPool,
}

const PROJECTION: Projection = Projection::Students;

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
        Ok(PgStudents { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Last stream sequence applied (0 before the first event).
    pub async fn checkpoint(&self) -> Result<u64, sqlx::Error> {
        read_checkpoint(&self.pool, PROJECTION).await
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
            checkpoint: lock_checkpoint(&mut tx, PROJECTION).await?,
            ..BatchOutcome::default()
        };
        for (sequence, event) in batch {
            if *sequence <= outcome.checkpoint {
                outcome.skipped += 1;
                continue;
            }
            apply_event(&mut tx, *sequence, event).await?;
            outcome.applied += 1;
        }
        if through_sequence > outcome.checkpoint {
            outcome.checkpoint = through_sequence;
            write_checkpoint(&mut tx, PROJECTION, through_sequence).await?;
        }
        tx.commit().await?;
        Ok(outcome)
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

/// The checkpoint of `projection` (0 before the first batch).
pub(crate) async fn read_checkpoint(
    pool: &PgPool,
    projection: Projection,
) -> Result<u64, sqlx::Error> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(projection.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map_or(0, sequence_from_db))
}

/// Reads the checkpoint inside a batch transaction, locking its row: writers of one
/// projection's checkpoint are serialised.
pub(crate) async fn lock_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    projection: Projection,
) -> Result<u64, sqlx::Error> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
    )
    .bind(projection.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map_or(0, sequence_from_db))
}

pub(crate) async fn write_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    projection: Projection,
    sequence: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, last_sequence) VALUES ($1, $2)
         ON CONFLICT (projection) DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
    )
    .bind(projection.as_str())
    .bind(sequence_to_db(sequence))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn apply_event(
    tx: &mut Transaction<'_, Postgres>,
    sequence: u64,
    event: &Event,
) -> Result<(), sqlx::Error> {
    let id = event.metadata.aggregate_id;
    let at = event.metadata.occurred_at;
    let version = sequence_to_db(sequence);
    match &event.payload {
        EventPayload::StudentRegistered(details) => {
            sqlx::query(
                "INSERT INTO students (id, name, first_name, last_name, version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)
                 ON CONFLICT (id) DO NOTHING",
            )
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
            sqlx::query(
                "UPDATE students SET name = $2, first_name = $3, last_name = $4, version = $5,
                        updated_at = $6
                 WHERE id = $1",
            )
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
            // Enrollment rows go with it (ON DELETE CASCADE).
            sqlx::query("DELETE FROM students WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
        EventPayload::StudentEnrolled(enrollment) => {
            sqlx::query(
                "INSERT INTO student_courses (student_id, course_id, enrolled_at)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM students WHERE id = $1)
                 ON CONFLICT DO NOTHING",
            )
            .bind(enrollment.student_id)
            .bind(enrollment.course_id)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            bump_version(tx, id, version, at).await?;
        }
        EventPayload::StudentUnenrolled(enrollment) => {
            sqlx::query("DELETE FROM student_courses WHERE student_id = $1 AND course_id = $2")
                .bind(enrollment.student_id)
                .bind(enrollment.course_id)
                .execute(&mut **tx)
                .await?;
            bump_version(tx, id, version, at).await?;
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
    tx: &mut Transaction<'_, Postgres>,
    id: uuid::Uuid,
    version: i64,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE students SET version = $2, updated_at = $3 WHERE id = $1")
        .bind(id)
        .bind(version)
        .bind(at)
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
