//! The course-store adapter for Postgres: one JSONB document per course, written in the same
//! transaction as the checkpoint. The local stack's default (`postgres://` URL).

use std::collections::HashMap;

use events::{Event, Projection};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use crate::course_document::{self, CourseDocument};
use crate::pg_students::{lock_checkpoint, read_checkpoint, sequence_to_db, write_checkpoint};
use crate::store::{BatchOutcome, ProjectionStore, StoreError};

const PROJECTION: Projection = Projection::Courses;

#[derive(Clone)]
pub struct PgCourses {
    pool: PgPool,
}

impl PgCourses {
    /// Connects and brings the schema up to date.
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(database_url)
            .await?;
        Self::with_pool(pool).await
    }

    pub async fn with_pool(pool: PgPool) -> anyhow::Result<Self> {
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(PgCourses { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One course document.
    pub async fn get(&self, id: Uuid) -> Result<Option<CourseDocument>, StoreError> {
        let row: Option<Json<CourseDocument>> =
            sqlx::query_scalar("SELECT document FROM course_documents WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|Json(doc)| doc))
    }

    /// The documents of `ids` that exist, in id order.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<CourseDocument>, StoreError> {
        let rows: Vec<Json<CourseDocument>> = sqlx::query_scalar(
            "SELECT document FROM course_documents WHERE id = ANY($1) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|Json(doc)| doc).collect())
    }

    /// Up to `limit` courses with ids after `after`, in id order.
    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<CourseDocument>, StoreError> {
        let rows: Vec<Json<CourseDocument>> = sqlx::query_scalar(
            "SELECT document FROM course_documents WHERE $1::uuid IS NULL OR id > $1
             ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|Json(doc)| doc).collect())
    }
}

impl ProjectionStore for PgCourses {
    fn projection(&self) -> Projection {
        PROJECTION
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        Ok(read_checkpoint(&self.pool, PROJECTION).await?)
    }

    /// Reads every touched document once, folds the batch in memory, writes each changed
    /// document once: two round trips per batch whatever its size.
    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut outcome = BatchOutcome {
            checkpoint: lock_checkpoint(&mut tx, PROJECTION).await?,
            ..BatchOutcome::default()
        };
        let fresh: Vec<&(u64, Event)> = batch
            .iter()
            .filter(|(sequence, _)| *sequence > outcome.checkpoint)
            .collect();
        outcome.skipped = batch.len() - fresh.len();
        outcome.applied = fresh.len();
        let ids: Vec<Uuid> = fresh.iter().map(|(_, e)| e.metadata.aggregate_id).collect();
        let stored: Vec<(Uuid, Json<CourseDocument>)> = sqlx::query_as(
            "SELECT id, document FROM course_documents WHERE id = ANY($1) FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut documents: HashMap<Uuid, Option<CourseDocument>> =
            ids.iter().map(|id| (*id, None)).collect();
        for (id, Json(doc)) in stored {
            documents.insert(id, Some(doc));
        }
        for (sequence, event) in fresh {
            let id = event.metadata.aggregate_id;
            let current = documents.remove(&id).flatten();
            documents.insert(
                id,
                course_document::fold(current, id, *sequence, &event.payload),
            );
        }
        let (mut upsert_ids, mut upsert_docs, mut upsert_versions, mut deletes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, document) in documents {
            match document {
                Some(doc) => {
                    upsert_ids.push(id);
                    upsert_versions.push(sequence_to_db(doc.version));
                    upsert_docs.push(Json(doc));
                }
                None => deletes.push(id),
            }
        }
        if !upsert_ids.is_empty() {
            sqlx::query(
                "INSERT INTO course_documents (id, document, version)
                 SELECT * FROM UNNEST($1::uuid[], $2::jsonb[], $3::bigint[])
                 ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, version = EXCLUDED.version",
            )
            .bind(&upsert_ids)
            .bind(&upsert_docs)
            .bind(&upsert_versions)
            .execute(&mut *tx)
            .await?;
        }
        if !deletes.is_empty() {
            sqlx::query("DELETE FROM course_documents WHERE id = ANY($1)")
                .bind(&deletes)
                .execute(&mut *tx)
                .await?;
        }
        if through_sequence > outcome.checkpoint {
            outcome.checkpoint = through_sequence;
            write_checkpoint(&mut tx, PROJECTION, through_sequence).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
