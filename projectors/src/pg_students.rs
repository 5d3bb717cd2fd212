//! The students projection into Postgres: students and their course ids, plus the
//! checkpoint that makes re-delivery harmless.

use events::{Event, EventPayload, Projection};
use sqlx::{PgPool, Postgres, Transaction};

/// Applies batches of student events, each batch in one transaction with its checkpoint.
#[derive(Clone)]
pub struct PgStudents {
    pool: PgPool,
}

/// How a batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Events whose effect was written now.
    pub applied: usize,
    /// Events at or below the checkpoint: already applied before (re-delivery).
    pub skipped: usize,
    /// The checkpoint after the batch.
    pub checkpoint: u64,
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
        let row: Option<i64> = sqlx::query_scalar(
            "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1",
        )
        .bind(PROJECTION.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or(0, sequence_from_db))
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
        // The row lock serialises writers of this projection's checkpoint.
        let checkpoint: Option<i64> = sqlx::query_scalar(
            "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        )
        .bind(PROJECTION.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let mut outcome = BatchOutcome {
            checkpoint: checkpoint.map_or(0, sequence_from_db),
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
            sqlx::query(
                "INSERT INTO projection_checkpoints (projection, last_sequence) VALUES ($1, $2)
                 ON CONFLICT (projection) DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
            )
            .bind(PROJECTION.as_str())
            .bind(sequence_to_db(outcome.checkpoint))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }
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
fn sequence_to_db(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

fn sequence_from_db(sequence: i64) -> u64 {
    u64::try_from(sequence).unwrap_or(0)
}
