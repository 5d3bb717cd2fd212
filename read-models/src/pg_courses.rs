//! The course-store adapter for Postgres: one JSONB document per course, written in the same
//! transaction as the checkpoint. The local stack's default (`postgres://` URL).

use std::collections::HashMap;
use std::sync::Arc;

use events::{Event, Projection};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::course_document::{self, CourseDocument};
use crate::generation::{Generation, ensure_checkpoint_row};
use crate::pg_students::{
    advance_checkpoint, begin_batch, claim_checkpoint, lock_checkpoint, read_checkpoint,
    sequence_to_db, writer_pool,
};
use crate::rebuild::AggregateHistory;
use crate::store::{BatchOutcome, FenceToken, ProjectionStore, StoreError};

const PROJECTION: Projection = Projection::Courses;

#[derive(Clone)]
pub struct PgCourses {
    pool: PgPool,
    sql: Arc<Statements>,
    fence: FenceToken,
}

/// The statements of one generation (table names are ours, never input).
struct Statements {
    checkpoint_key: String,
    get: String,
    get_many: String,
    list: String,
    lock_many: String,
    upsert: String,
    delete_many: String,
}

impl Statements {
    fn new(generation: Generation) -> Self {
        let table = generation.table("course_documents");
        Statements {
            checkpoint_key: generation.checkpoint_key(PROJECTION),
            get: format!("SELECT document FROM {table} WHERE id = $1"),
            get_many: format!("SELECT document FROM {table} WHERE id = ANY($1) ORDER BY id"),
            list: format!(
                "SELECT document FROM {table} WHERE $1::uuid IS NULL OR id > $1
                 ORDER BY id LIMIT $2"
            ),
            lock_many: format!("SELECT id, document FROM {table} WHERE id = ANY($1) FOR UPDATE"),
            upsert: format!(
                "INSERT INTO {table} (id, document, version)
                 SELECT * FROM UNNEST($1::uuid[], $2::jsonb[], $3::bigint[])
                 ON CONFLICT (id) DO UPDATE SET document = EXCLUDED.document, version = EXCLUDED.version"
            ),
            delete_many: format!("DELETE FROM {table} WHERE id = ANY($1)"),
        }
    }
}

impl PgCourses {
    /// Connects and brings the schema up to date.
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        let pool = writer_pool().connect(database_url).await?;
        Self::with_pool(pool).await
    }

    pub async fn with_pool(pool: PgPool) -> anyhow::Result<Self> {
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self::on_migrated_pool(pool))
    }

    /// Over a schema the projectors migrate, for readers that may not change it (query-api
    /// connects as a read-only role: see migrations/0003_read_only_role.sql).
    pub fn on_migrated_pool(pool: PgPool) -> Self {
        PgCourses {
            pool,
            sql: Arc::new(Statements::new(Generation::Live)),
            fence: FenceToken::default(),
        }
    }

    /// The same database, writing the tables of `generation` (a replay builds `Next`).
    pub fn generation(&self, generation: Generation) -> Self {
        PgCourses {
            pool: self.pool.clone(),
            sql: Arc::new(Statements::new(generation)),
            fence: FenceToken::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One course document.
    pub async fn get(&self, id: Uuid) -> Result<Option<CourseDocument>, StoreError> {
        let row: Option<Json<CourseDocument>> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.get.as_str()))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|Json(doc)| doc))
    }

    /// The documents of `ids` that exist, in id order.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<CourseDocument>, StoreError> {
        let rows: Vec<Json<CourseDocument>> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.get_many.as_str()))
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
        let rows: Vec<Json<CourseDocument>> =
            sqlx::query_scalar(AssertSqlSafe(self.sql.list.as_str()))
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|Json(doc)| doc).collect())
    }
}

impl PgCourses {
    /// Replaces one course's document by the fold of its history (every event of its subject
    /// up to the checkpoint, in stream order; later events are the live projection's).
    /// Returns the number of events applied. The history is read once the checkpoint row is
    /// locked, as for students (see [`crate::PgStudents::rebuild_aggregate`]).
    pub async fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: impl AggregateHistory,
    ) -> Result<usize, StoreError> {
        ensure_checkpoint_row(&self.pool, &self.sql.checkpoint_key).await?;
        let mut tx = begin_batch(&self.pool).await?;
        let checkpoint = lock_checkpoint(&mut tx, &self.sql.checkpoint_key).await?;
        let history = history.read_through(checkpoint).await?;
        let mut document = None;
        let mut applied = 0;
        for (sequence, event) in history.iter().filter(|(seq, _)| *seq <= checkpoint) {
            document = course_document::fold(document, id, *sequence, &event.payload);
            applied += 1;
        }
        self.write_documents(&mut tx, HashMap::from([(id, document)]))
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// The stored documents of `ids`, locked for the transaction (`None`: none stored).
    async fn lock_documents(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Option<CourseDocument>>, sqlx::Error> {
        let stored: Vec<(Uuid, Json<CourseDocument>)> =
            sqlx::query_as(AssertSqlSafe(self.sql.lock_many.as_str()))
                .bind(ids)
                .fetch_all(&mut **tx)
                .await?;
        let mut documents: HashMap<Uuid, Option<CourseDocument>> =
            ids.iter().map(|id| (*id, None)).collect();
        for (id, Json(doc)) in stored {
            documents.insert(id, Some(doc));
        }
        Ok(documents)
    }

    /// Upserts the documents that exist and deletes the ones that do not.
    async fn write_documents(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        documents: HashMap<Uuid, Option<CourseDocument>>,
    ) -> Result<(), sqlx::Error> {
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
            sqlx::query(AssertSqlSafe(self.sql.upsert.as_str()))
                .bind(&upsert_ids)
                .bind(&upsert_docs)
                .bind(&upsert_versions)
                .execute(&mut **tx)
                .await?;
        }
        if !deletes.is_empty() {
            sqlx::query(AssertSqlSafe(self.sql.delete_many.as_str()))
                .bind(&deletes)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

impl ProjectionStore for PgCourses {
    fn projection(&self) -> Projection {
        PROJECTION
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        Ok(read_checkpoint(&self.pool, &self.sql.checkpoint_key).await?)
    }

    /// Reads every touched document once, folds the batch in memory, writes each changed
    /// document once: two round trips per batch whatever its size.
    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut tx = begin_batch(&self.pool).await?;
        let mut outcome = BatchOutcome {
            checkpoint: advance_checkpoint(
                &mut tx,
                &self.sql.checkpoint_key,
                through_sequence,
                self.fence.get(),
            )
            .await?,
            ..BatchOutcome::default()
        };
        let fresh: Vec<&(u64, Event)> = batch
            .iter()
            .filter(|(sequence, _)| *sequence > outcome.checkpoint)
            .collect();
        outcome.skipped = batch.len() - fresh.len();
        outcome.applied = fresh.len();
        let ids: Vec<Uuid> = fresh.iter().map(|(_, e)| e.metadata.aggregate_id).collect();
        let mut documents = self.lock_documents(&mut tx, &ids).await?;
        for (sequence, event) in fresh {
            let id = event.metadata.aggregate_id;
            let current = documents.remove(&id).flatten();
            documents.insert(
                id,
                course_document::fold(current, id, *sequence, &event.payload),
            );
        }
        self.write_documents(&mut tx, documents).await?;
        outcome.checkpoint = outcome.checkpoint.max(through_sequence);
        tx.commit().await?;
        Ok(outcome)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn claim(&self, token: u64) -> Result<(), StoreError> {
        claim_checkpoint(&self.pool, &self.sql.checkpoint_key, token, &self.fence).await
    }
}
