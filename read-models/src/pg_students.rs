//! The students projection into Postgres: students and their course ids, plus the
//! checkpoint that makes re-delivery harmless.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use events::{Event, EventPayload, Projection};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::generation::{Generation, ensure_checkpoint_row};
use crate::rebuild::AggregateHistory;
use crate::store::{BatchOutcome, FenceToken, ProjectionStore, StoreError};
use crate::student_fold::{self, StudentRow, Touched, Writes};

/// Applies batches of student events, each batch in one transaction with its checkpoint.
#[derive(Clone)]
pub struct PgStudents {
    pool: PgPool,
    sql: Arc<Statements>,
    fence: FenceToken,
}

const PROJECTION: Projection = Projection::Students;

/// The tables of the students read model, parents first.
pub const TABLES: [&str; 2] = ["students", "student_courses"];

/// The statements of one generation of the model (table names are ours, never input).
struct Statements {
    generation: Generation,
    checkpoint_key: String,
    load_students: String,
    load_enrollments: String,
    delete: String,
    insert: String,
    upsert: String,
    enroll: String,
    unenroll: String,
}

impl Statements {
    fn new(generation: Generation) -> Self {
        let students = generation.table("students");
        let enrollments = generation.table("student_courses");
        Statements {
            generation,
            checkpoint_key: generation.checkpoint_key(PROJECTION),
            load_students: format!(
                "SELECT id, name, first_name, last_name, version, created_at, updated_at
                 FROM {students} WHERE id = ANY($1) FOR UPDATE"
            ),
            load_enrollments: format!(
                "SELECT student_id, course_id, enrolled_at FROM {enrollments}
                 WHERE student_id = ANY($1)"
            ),
            // Enrollment rows go with their student (ON DELETE CASCADE).
            delete: format!("DELETE FROM {students} WHERE id = ANY($1)"),
            insert: format!(
                "INSERT INTO {students} (id, name, first_name, last_name, version, created_at, updated_at)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                      $5::bigint[], $6::timestamptz[], $7::timestamptz[])
                 ON CONFLICT (id) DO NOTHING"
            ),
            upsert: format!(
                "INSERT INTO {students} (id, name, first_name, last_name, version, created_at, updated_at)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                      $5::bigint[], $6::timestamptz[], $7::timestamptz[])
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name,
                     first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
                     version = EXCLUDED.version, updated_at = EXCLUDED.updated_at"
            ),
            enroll: format!(
                "INSERT INTO {enrollments} (student_id, course_id, enrolled_at)
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[])
                 ON CONFLICT DO NOTHING"
            ),
            unenroll: format!(
                "DELETE FROM {enrollments} e USING UNNEST($1::uuid[], $2::uuid[]) AS gone (s, c)
                 WHERE e.student_id = gone.s AND e.course_id = gone.c"
            ),
        }
    }
}

impl PgStudents {
    /// Connects and brings the schema up to date (migrations are idempotent and take a
    /// Postgres advisory lock, so concurrent starts are safe).
    pub async fn connect(database_url: &str) -> anyhow::Result<Self> {
        let pool = writer_pool().connect(database_url).await?;
        Self::with_pool(pool).await
    }

    pub async fn with_pool(pool: PgPool) -> anyhow::Result<Self> {
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(PgStudents {
            pool,
            sql: Arc::new(Statements::new(Generation::Live)),
            fence: FenceToken::default(),
        })
    }

    /// The same database, writing the tables of `generation` (a replay builds `Next`).
    pub fn generation(&self, generation: Generation) -> Self {
        PgStudents {
            pool: self.pool.clone(),
            sql: Arc::new(Statements::new(generation)),
            fence: FenceToken::default(),
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
    ) -> Result<BatchOutcome, StoreError> {
        match self
            .apply_in_transaction(batch, through_sequence, Loads::AllButRegistered)
            .await?
        {
            Some(outcome) => Ok(outcome),
            // A student registered in the batch was already stored: the stream broke the
            // rule that a registration is its subject's first event. Fold it as stored.
            None => Ok(self
                .apply_in_transaction(batch, through_sequence, Loads::All)
                .await?
                .unwrap_or_default()),
        }
    }

    /// One batch transaction. `None`: rolled back, because a student assumed new (registered
    /// in the batch, so not loaded) turned out to be stored.
    async fn apply_in_transaction(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
        loads: Loads,
    ) -> Result<Option<BatchOutcome>, StoreError> {
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
        // A student whose first event here is its registration cannot be stored yet (the
        // gateway appends a registration only to an empty subject): it is not read, and its
        // insert would reveal a stream that broke that rule. One that ends deleted within
        // the batch writes nothing, so it is read like any other.
        let mut touched: HashMap<Uuid, Touched> = match loads {
            Loads::AllButRegistered => registered_first(&fresh)
                .into_iter()
                .map(|id| (id, Touched::new(None)))
                .collect(),
            Loads::All => HashMap::new(),
        };
        fold(&mut touched, &fresh);
        touched.retain(|_, student| student.current.is_some());
        let assumed_new: HashSet<Uuid> = touched.keys().copied().collect();
        let to_load: Vec<Uuid> = fresh
            .iter()
            .map(|(_, e)| e.metadata.aggregate_id)
            .filter(|id| !assumed_new.contains(id))
            .collect();
        let mut loaded = self.load(&mut tx, &to_load).await?;
        fold(&mut loaded, &fresh);
        touched.extend(loaded);
        let writes = student_fold::writes(touched.values());
        if !self.write(&mut tx, writes, &assumed_new).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        self.erase_from_kept_generation(&mut tx, &fresh).await?;
        outcome.checkpoint = outcome.checkpoint.max(through_sequence);
        tx.commit().await?;
        Ok(Some(outcome))
    }

    /// An erased student leaves the generation a replay kept (`--keep-old`) too: that copy
    /// was taken before the erasure and still holds the names. Only the live projection
    /// does this; the tables exist only after such a replay.
    async fn erase_from_kept_generation(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        fresh: &[&(u64, Event)],
    ) -> Result<(), sqlx::Error> {
        let erased: Vec<Uuid> = fresh
            .iter()
            .filter(|(_, event)| matches!(event.payload, EventPayload::StudentErased(_)))
            .map(|(_, event)| event.metadata.aggregate_id)
            .collect();
        if erased.is_empty() || self.sql.generation != Generation::Live {
            return Ok(());
        }
        let kept: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}{}", TABLES[0], crate::generation::OLD_SUFFIX))
            .fetch_one(&mut **tx)
            .await?;
        if kept {
            for (table, column) in [("student_courses", "student_id"), ("students", "id")] {
                let statement = format!(
                    "DELETE FROM {table}{} WHERE {column} = ANY($1)",
                    crate::generation::OLD_SUFFIX
                );
                sqlx::query(AssertSqlSafe(statement))
                    .bind(&erased)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// Replaces one student's rows by the fold of its history (every event of its subject up
    /// to the checkpoint, in stream order; later ones are the live projection's to apply).
    /// Returns the number of events applied.
    ///
    /// Serialised with the live projection's batches by the checkpoint row lock, and the
    /// history is read only once that lock is held: an event applied just before is in it,
    /// and none can be applied until the rebuild commits. (Read before the lock, the history
    /// could miss an event applied in between, and the rebuild would write older state over
    /// it.)
    pub async fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: impl AggregateHistory,
    ) -> Result<usize, StoreError> {
        // Before the first commit there is no row: a lock on nothing serialises nothing.
        ensure_checkpoint_row(&self.pool, &self.sql.checkpoint_key).await?;
        let mut tx = begin_batch(&self.pool).await?;
        let checkpoint = lock_checkpoint(&mut tx, &self.sql.checkpoint_key).await?;
        let history = history.read_through(checkpoint).await?;
        let stored = self
            .load(&mut tx, &[id])
            .await?
            .remove(&id)
            .and_then(|t| t.stored);
        let mut student = Touched::rebuilt(stored);
        let mut applied = 0;
        for (sequence, event) in history.iter().filter(|(seq, _)| *seq <= checkpoint) {
            student.apply(*sequence, event);
            applied += 1;
        }
        self.write(&mut tx, student_fold::writes([&student]), &HashSet::new())
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// The stored state of every student in `ids` (locked for the transaction).
    async fn load(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Touched>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        type Row = (
            Uuid,
            String,
            String,
            String,
            i64,
            DateTime<Utc>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(self.sql.load_students.as_str()))
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?;
        let mut stored: HashMap<Uuid, StudentRow> = rows
            .into_iter()
            .map(
                |(id, name, first_name, last_name, version, created_at, updated_at)| {
                    let row = StudentRow {
                        id,
                        name,
                        first_name,
                        last_name,
                        version: sequence_from_db(version),
                        created_at,
                        updated_at,
                        courses: BTreeMap::new(),
                    };
                    (id, row)
                },
            )
            .collect();
        if !stored.is_empty() {
            let enrollments: Vec<(Uuid, Uuid, DateTime<Utc>)> =
                sqlx::query_as(AssertSqlSafe(self.sql.load_enrollments.as_str()))
                    .bind(&ids)
                    .fetch_all(&mut **tx)
                    .await?;
            for (student, course, at) in enrollments {
                if let Some(row) = stored.get_mut(&student) {
                    row.courses.insert(course, at);
                }
            }
        }
        Ok(ids
            .into_iter()
            .map(|id| (id, Touched::new(stored.remove(&id))))
            .collect())
    }

    /// Deletes, inserts and upserts students, then removes and adds enrollments: at most
    /// five statements, whatever the batch size. `assumed_new` students are inserted only;
    /// `false` (and nothing to commit) when one of them turns out to exist.
    async fn write(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        writes: Writes<'_>,
        assumed_new: &HashSet<Uuid>,
    ) -> Result<bool, sqlx::Error> {
        let sql = &self.sql;
        if !writes.deletes.is_empty() {
            sqlx::query(AssertSqlSafe(sql.delete.as_str()))
                .bind(&writes.deletes)
                .execute(&mut **tx)
                .await?;
        }
        let (inserts, upserts): (Vec<&StudentRow>, Vec<&StudentRow>) = writes
            .upserts
            .into_iter()
            .partition(|row| assumed_new.contains(&row.id));
        if !inserts.is_empty() {
            let inserted = bind_rows(sqlx::query(AssertSqlSafe(sql.insert.as_str())), &inserts)
                .execute(&mut **tx)
                .await?
                .rows_affected();
            if inserted != inserts.len() as u64 {
                return Ok(false);
            }
        }
        if !upserts.is_empty() {
            bind_rows(sqlx::query(AssertSqlSafe(sql.upsert.as_str())), &upserts)
                .execute(&mut **tx)
                .await?;
        }
        if !writes.unenroll.is_empty() {
            sqlx::query(AssertSqlSafe(sql.unenroll.as_str()))
                .bind(writes.unenroll.iter().map(|e| e.0).collect::<Vec<_>>())
                .bind(writes.unenroll.iter().map(|e| e.1).collect::<Vec<_>>())
                .execute(&mut **tx)
                .await?;
        }
        if !writes.enroll.is_empty() {
            sqlx::query(AssertSqlSafe(sql.enroll.as_str()))
                .bind(writes.enroll.iter().map(|e| e.0).collect::<Vec<_>>())
                .bind(writes.enroll.iter().map(|e| e.1).collect::<Vec<_>>())
                .bind(writes.enroll.iter().map(|e| e.2).collect::<Vec<_>>())
                .execute(&mut **tx)
                .await?;
        }
        Ok(true)
    }
}

/// Which students a batch reads before folding.
#[derive(Clone, Copy)]
enum Loads {
    /// All but those whose first event in the batch is their registration.
    AllButRegistered,
    All,
}

/// Applies `fresh` to the students of `touched` (others' events are skipped).
fn fold(touched: &mut HashMap<Uuid, Touched>, fresh: &[&(u64, Event)]) {
    for (sequence, event) in fresh {
        if let Some(student) = touched.get_mut(&event.metadata.aggregate_id) {
            student.apply(*sequence, event);
        }
    }
}

/// Students whose first event among `fresh` is their registration.
fn registered_first(fresh: &[&(u64, Event)]) -> HashSet<Uuid> {
    let mut seen = HashSet::new();
    let mut registered = HashSet::new();
    for (_, event) in fresh {
        let id = event.metadata.aggregate_id;
        if seen.insert(id) && matches!(event.payload, EventPayload::StudentRegistered(_)) {
            registered.insert(id);
        }
    }
    registered
}

/// Binds the seven columns of `rows` to the insert or upsert statement, as arrays.
fn bind_rows<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    rows: &[&'q StudentRow],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.first_name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.last_name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| sequence_to_db(r.version))
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
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
        PgStudents::apply_batch(self, batch, through_sequence).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn claim(&self, token: u64) -> Result<(), StoreError> {
        claim_checkpoint(&self.pool, &self.sql.checkpoint_key, token, &self.fence).await
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

/// The pool options of the projections' Postgres writers.
///
/// No ping before each acquire (sqlx's default): batches take a connection one after
/// another, and sqlx already pings every connection it takes back, closing one that
/// failed. A connection that died while idle costs one failed, retried batch instead of a
/// round trip in every batch (of six for a small live batch).
pub fn writer_pool() -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
}

/// Claims the checkpoint row under `key` for lease token `token` (see
/// [`ProjectionStore::claim`]) and makes `fence` write with it.
pub(crate) async fn claim_checkpoint(
    pool: &PgPool,
    key: &str,
    token: u64,
    fence: &FenceToken,
) -> Result<(), StoreError> {
    // Waits for the row lock of a batch still open (a paused replica's: the server ends its
    // transaction after 3 s idle, see `begin_batch`), so no batch of an older token commits
    // after this claim.
    let recorded: i64 = sqlx::query_scalar(
        "INSERT INTO projection_checkpoints (projection, last_sequence, fence) VALUES ($1, 0, $2)
         ON CONFLICT (projection) DO UPDATE
         SET fence = GREATEST(projection_checkpoints.fence, EXCLUDED.fence)
         RETURNING fence",
    )
    .bind(key)
    .bind(sequence_to_db(token))
    .fetch_one(pool)
    .await?;
    let recorded = sequence_from_db(recorded);
    if recorded > token {
        return Err(fenced(recorded, token));
    }
    fence.set(token);
    Ok(())
}

pub(crate) fn fenced(recorded: u64, token: u64) -> StoreError {
    StoreError::Fenced(format!(
        "the projection was claimed with lease token {recorded}, newer than this replica's {token}"
    ))
}

/// Starts a batch transaction whose statements are planned for their actual arguments.
///
/// sqlx prepares each statement once per connection, and after five runs Postgres may keep
/// the generic plan it made while the table was nearly empty — for `id = ANY($1) FOR
/// UPDATE`, a sequential scan (seen with auto_explain) that then runs against a growing
/// table batch after batch until autovacuum happens to analyze it. Measured on a 200 000
/// event backlog after a 1 M replay kept autovacuum busy: 16 000 events/s with cached
/// plans, 58 000–61 000 with a plan per batch, which costs microseconds.
pub(crate) async fn begin_batch(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    // One round trip: the statements go as one simple query.
    //
    // A batch may sit idle in its transaction at most 3 s before Postgres ends it. A
    // replica paused (or cut off) mid-batch would otherwise hold the checkpoint row lock,
    // and the replica taking over would wait for it; 3 s is shorter than the projection
    // lease, so the lock is gone by the time a standby may claim. Batches never wait
    // between statements that long.
    pool.begin_with(concat!(
        "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan; ",
        "SET LOCAL idle_in_transaction_session_timeout = '3s'"
    ))
    .await
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

/// Locks the checkpoint under `key` for the batch transaction, moves it forward to
/// `through` (never back) and returns where it was: what the batch must skip. One round
/// trip instead of a lock and a later write; a rolled back batch leaves it where it was.
/// [`StoreError::Fenced`] (and nothing moved) when the row records a lease token newer
/// than `fence`: the caller drops the transaction, so nothing of the batch is written.
pub(crate) async fn advance_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    through: u64,
    fence: u64,
) -> Result<u64, StoreError> {
    // `stored` locks and reads the row before `advanced` writes it: `advanced` reads
    // `stored`, which fixes that order (sibling WITH statements otherwise run in no set
    // order). After a concurrent batch commits, the lock returns the row it wrote. Before
    // the first batch there is no row to lock: 0, as with a separate lock and write.
    let stored: Option<(i64, i64)> = sqlx::query_as(
        "WITH stored AS (
             SELECT last_sequence, fence FROM projection_checkpoints WHERE projection = $1 FOR UPDATE
         ), advanced AS (
             INSERT INTO projection_checkpoints (projection, last_sequence, fence)
             SELECT $1, $2, $3 FROM (SELECT count(*) FROM stored) AS after_lock
             ON CONFLICT (projection) DO UPDATE
             SET last_sequence = GREATEST(projection_checkpoints.last_sequence, EXCLUDED.last_sequence),
                 fence = EXCLUDED.fence
             WHERE projection_checkpoints.fence <= EXCLUDED.fence
         )
         SELECT last_sequence, fence FROM stored",
    )
    .bind(key)
    .bind(sequence_to_db(through))
    .bind(sequence_to_db(fence))
    .fetch_optional(&mut **tx)
    .await?;
    match stored {
        Some((_, recorded)) if sequence_from_db(recorded) > fence => {
            Err(fenced(sequence_from_db(recorded), fence))
        }
        Some((previous, _)) => Ok(sequence_from_db(previous)),
        None => Ok(0),
    }
}

/// Stream sequences fit in i64 for any stream that will ever exist (2^63 messages).
pub(crate) fn sequence_to_db(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

pub(crate) fn sequence_from_db(sequence: i64) -> u64 {
    u64::try_from(sequence).unwrap_or(0)
}
