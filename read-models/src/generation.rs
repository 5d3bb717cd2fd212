//! Generations of a Postgres read model, for zero-downtime rebuilds (`stream-admin replay`).
//!
//! The live generation is the tables readers and the live projection use (`students`, …).
//! A replay fills the next generation (`students__next`, …, checkpoint key
//! `students__next`) with the same projection code, then [`Switch`] swaps them in one
//! transaction: it first locks the live checkpoint row, creating it if the live projection
//! has not committed yet (the live projection's batches take that lock first, so they wait
//! and cannot deadlock), lets the caller bring the next generation to exactly the live
//! checkpoint, compares the two (row count and a checksum over the content), and renames
//! the tables. Readers and the live projection address tables by name, so their next
//! statement sees the new generation; reads only wait for the rename, they never fail.

use events::Projection;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use crate::pg_students::{lock_checkpoint, read_checkpoint};
use uuid::Uuid;

use crate::pg_courses::PgCourses;
use crate::pg_students::PgStudents;
use crate::rebuild::{
    AggregateHistory, Fingerprint, GenerationSwitch, Rebuildable, SwitchError, SwitchReport,
};
use crate::store::StoreError;

/// Which set of tables a store reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    Live,
    /// The one a replay is building.
    Next,
}

const NEXT_SUFFIX: &str = "__next";
pub(crate) const OLD_SUFFIX: &str = "__old";

impl Generation {
    pub fn table(self, base: &str) -> String {
        match self {
            Generation::Live => base.to_owned(),
            Generation::Next => format!("{base}{NEXT_SUFFIX}"),
        }
    }

    /// The row of `projection_checkpoints` holding this generation's checkpoint.
    pub fn checkpoint_key(self, projection: Projection) -> String {
        self.table(projection.as_str())
    }
}

/// A Postgres read model: its tables (parents first) and how to fingerprint its content.
#[derive(Debug, Clone, Copy)]
pub struct PgModel {
    pub projection: Projection,
    pub tables: &'static [&'static str],
    /// `(child table, column, parent table)`: foreign keys `LIKE` does not copy.
    pub foreign_keys: &'static [(&'static str, &'static str, &'static str)],
}

pub const STUDENTS: PgModel = PgModel {
    projection: Projection::Students,
    tables: &crate::pg_students::TABLES,
    foreign_keys: &[("student_courses", "student_id", "students")],
};

pub const COURSES: PgModel = PgModel {
    projection: Projection::Courses,
    tables: &["course_documents"],
    foreign_keys: &[],
};

impl PgModel {
    /// Creates the next generation's tables (same columns, indexes and constraints as the
    /// live ones) unless they exist. Returns `true` when they existed: an interrupted replay
    /// resumes from their checkpoint.
    pub async fn prepare_next(&self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(Generation::Next.table(self.tables[0]))
            .fetch_one(&mut *tx)
            .await?;
        if exists {
            return Ok(true);
        }
        for table in self.tables {
            let next = Generation::Next.table(table);
            execute(
                &mut tx,
                format!("CREATE TABLE {next} (LIKE {table} INCLUDING ALL)"),
            )
            .await?;
        }
        for (child, column, parent) in self.foreign_keys {
            execute(
                &mut tx,
                format!(
                    "ALTER TABLE {} ADD FOREIGN KEY ({column}) REFERENCES {} (id) ON DELETE CASCADE",
                    Generation::Next.table(child),
                    Generation::Next.table(parent)
                ),
            )
            .await?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
            .bind(Generation::Next.checkpoint_key(self.projection))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(false)
    }

    /// Drops the next generation (a replay started over, or abandoned).
    pub async fn drop_next(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        for table in self.tables.iter().rev() {
            execute(
                &mut tx,
                format!("DROP TABLE IF EXISTS {}", Generation::Next.table(table)),
            )
            .await?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
            .bind(Generation::Next.checkpoint_key(self.projection))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    pub async fn checkpoint(
        &self,
        pool: &PgPool,
        generation: Generation,
    ) -> Result<u64, sqlx::Error> {
        read_checkpoint(pool, &generation.checkpoint_key(self.projection)).await
    }

    /// The content of a generation, without the bookkeeping columns (timestamps).
    pub async fn fingerprint<'c, E>(
        &self,
        executor: E,
        generation: Generation,
    ) -> Result<Fingerprint, sqlx::Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        self.fingerprint_of(executor, |table| generation.table(table))
            .await
    }

    /// The old generation a `--keep-old` replay left, if there is one.
    pub async fn old_fingerprint(&self, pool: &PgPool) -> Result<Option<Fingerprint>, sqlx::Error> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}{OLD_SUFFIX}", self.tables[0]))
            .fetch_one(pool)
            .await?;
        if !exists {
            return Ok(None);
        }
        let old = |table: &str| format!("{table}{OLD_SUFFIX}");
        Ok(Some(self.fingerprint_of(pool, old).await?))
    }

    async fn fingerprint_of<'c, E>(
        &self,
        executor: E,
        table: impl Fn(&str) -> String,
    ) -> Result<Fingerprint, sqlx::Error>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let sql = match self.projection {
            Projection::Students => format!(
                "SELECT count(*), coalesce(sum(hashtextextended(concat_ws('|', s.id, s.name,
                        s.first_name, s.last_name, s.version, c.ids), 0)::numeric), 0)::text
                 FROM {} s LEFT JOIN (
                     SELECT student_id, string_agg(course_id::text, ',' ORDER BY course_id) AS ids
                     FROM {} GROUP BY student_id) c ON c.student_id = s.id",
                table("students"),
                table("student_courses")
            ),
            Projection::Courses => format!(
                "SELECT count(*), coalesce(sum(hashtextextended(concat_ws('|', id, document::text,
                        version), 0)::numeric), 0)::text
                 FROM {}",
                table("course_documents")
            ),
        };
        let (rows, checksum): (i64, String) = sqlx::query_as(AssertSqlSafe(sql))
            .fetch_one(executor)
            .await?;
        Ok(Fingerprint { rows, checksum })
    }

    /// Starts the switch: locks the live checkpoint row, so the live projection pauses
    /// (it finishes the batch in flight first) and its checkpoint stays put until
    /// [`Switch::finish`] or drop.
    ///
    /// Before the live projection's first commit there is no checkpoint row to lock, and a
    /// lock on nothing would let the live projection's first batch commit into the tables
    /// being renamed away: the row is created first (at 0), so the lock always holds.
    pub async fn begin_switch(&self, pool: &PgPool) -> Result<Switch, sqlx::Error> {
        let key = Generation::Live.checkpoint_key(self.projection);
        ensure_checkpoint_row(pool, &key).await?;
        let mut tx = pool.begin().await?;
        let live_checkpoint = lock_checkpoint(&mut tx, &key).await?;
        Ok(Switch {
            model: *self,
            pool: pool.clone(),
            tx,
            live_checkpoint,
        })
    }
}

/// A switch in progress: the live projection is paused at `live_checkpoint`.
pub struct Switch {
    model: PgModel,
    pool: PgPool,
    tx: Transaction<'static, Postgres>,
    pub live_checkpoint: u64,
}

impl GenerationSwitch for Switch {
    fn live_checkpoint(&self) -> u64 {
        self.live_checkpoint
    }

    async fn abort(self) {
        self.rollback().await
    }

    /// Compares the generations and, when they match (or `force`), makes the next one live.
    /// The old one is dropped after the commit unless `keep_old` (then it replaces any
    /// earlier `__old` tables).
    async fn finish(mut self, force: bool, keep_old: bool) -> Result<SwitchReport, SwitchError> {
        let model = self.model;
        let pool = self.pool.clone();
        let next_checkpoint = read_checkpoint_in(
            &mut self.tx,
            &Generation::Next.checkpoint_key(model.projection),
        )
        .await?;
        if next_checkpoint != self.live_checkpoint {
            return Err(SwitchError::NotCaughtUp {
                next: next_checkpoint,
                live: self.live_checkpoint,
            });
        }
        let live = model.fingerprint(&mut *self.tx, Generation::Live).await?;
        let next = model.fingerprint(&mut *self.tx, Generation::Next).await?;
        if live != next && !force {
            return Err(SwitchError::Mismatch { live, next });
        }
        let tables: Vec<String> = model
            .tables
            .to_vec()
            .iter()
            .map(|t| t.to_string())
            .collect();
        execute(
            &mut self.tx,
            format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", tables.join(", ")),
        )
        .await?;
        for table in model.tables.iter().rev() {
            execute(
                &mut self.tx,
                format!("DROP TABLE IF EXISTS {table}{OLD_SUFFIX}"),
            )
            .await?;
        }
        for table in model.tables {
            execute(
                &mut self.tx,
                format!("ALTER TABLE {table} RENAME TO {table}{OLD_SUFFIX}"),
            )
            .await?;
            execute(
                &mut self.tx,
                format!(
                    "ALTER TABLE {} RENAME TO {table}",
                    Generation::Next.table(table)
                ),
            )
            .await?;
        }
        sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1")
            .bind(Generation::Next.checkpoint_key(model.projection))
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        if !keep_old {
            let mut tx = pool.begin().await?;
            for table in model.tables.iter().rev() {
                execute(&mut tx, format!("DROP TABLE IF EXISTS {table}{OLD_SUFFIX}")).await?;
            }
            tx.commit().await?;
        }
        Ok(SwitchReport {
            position: next_checkpoint,
            live,
            next,
            kept_old: keep_old,
            uncompared: 0,
        })
    }
}

impl Switch {
    async fn rollback(self) {
        // Rolling back releases the checkpoint row lock: the live projection goes on.
        if let Err(error) = self.tx.rollback().await {
            tracing::warn!(%error, "rolling back an aborted switch; the connection's end releases the lock");
        }
    }
}

async fn read_checkpoint_in(
    tx: &mut Transaction<'static, Postgres>,
    key: &str,
) -> Result<u64, sqlx::Error> {
    let row: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(key)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map_or(0, crate::pg_students::sequence_from_db))
}

/// Makes sure the checkpoint row under `key` exists (at 0 if it did not), committed, so a
/// later `SELECT … FOR UPDATE` of it locks a row. A lock taken before the live projection's
/// first commit would otherwise lock nothing, and that first batch would not wait for it.
/// A row at 0 means what no row means: nothing applied yet.
pub(crate) async fn ensure_checkpoint_row(pool: &PgPool, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, last_sequence) VALUES ($1, 0)
         ON CONFLICT (projection) DO NOTHING",
    )
    .bind(key)
    .execute(pool)
    .await?;
    Ok(())
}

/// Runs DDL built from our own table names (never from input).
async fn execute(tx: &mut Transaction<'_, Postgres>, sql: String) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql)).execute(&mut **tx).await?;
    Ok(())
}

/// The Postgres read models' generations: tables renamed in one transaction.
macro_rules! pg_rebuildable {
    ($store:ty, $model:expr) => {
        impl Rebuildable for $store {
            type Switch = Switch;

            fn next_generation(&self) -> Self {
                self.generation(Generation::Next)
            }

            async fn prepare_next(&self) -> Result<bool, StoreError> {
                Ok($model.prepare_next(self.pool()).await?)
            }

            async fn drop_next(&self) -> Result<(), StoreError> {
                Ok($model.drop_next(self.pool()).await?)
            }

            async fn begin_switch(&self) -> Result<Switch, StoreError> {
                Ok($model.begin_switch(self.pool()).await?)
            }

            async fn rebuild_aggregate(
                &self,
                id: Uuid,
                history: impl AggregateHistory,
            ) -> Result<usize, StoreError> {
                <$store>::rebuild_aggregate(self, id, history).await
            }
        }
    };
}

pg_rebuildable!(PgStudents, STUDENTS);
pg_rebuildable!(PgCourses, COURSES);
