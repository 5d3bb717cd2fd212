//! The course-store adapter for MongoDB: one record per course, a document with its student
//! ids or the tombstone of a deleted course.
//!
//! No multi-document transaction (so no replica set is needed). Each record carries the
//! stream sequence of its last applied event (`version`, the guard that makes redelivery
//! harmless) and a revision (`rev`, random, new at every write). A batch reads the
//! checkpoint document, then the records it touches, folds its events in memory and writes
//! every changed record in one unordered `update` command, each write conditional on the
//! revision it read (compare-and-set); then it moves the checkpoint, conditional on the
//! fence token, the replay epoch and no pause. Four round trips per batch.
//!
//! A deletion leaves a tombstone (`{_id, deleted: true, version, rev}`) rather than deleting:
//! after a crash between the record writes and the checkpoint write, the redelivered events
//! find the tombstone and change nothing, where a missing document would be created again.
//! Readers skip tombstones. A write that loses its compare-and-set (a redrive, a fenced
//! replica's late batch, a replay's switch changed the record since the read) fails the
//! batch as unavailable, so the consume loop retries it on fresh reads.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use events::{Event, Projection};
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, RawArrayBuf, RawDocumentBuf, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::Deserialize;
use uuid::Uuid;

use crate::course_document::{CourseDocument, CourseRecord, fold_record};
use crate::generation::Generation;
use crate::pg_students::fenced;
use crate::rebuild::AggregateHistory;
use crate::store::{BatchOutcome, FenceToken, ProjectionStore, StoreError};

const PROJECTION: Projection = Projection::Courses;
/// MongoDB's duplicate-key error: a conditional upsert whose filter missed an existing
/// record or checkpoint.
const DUPLICATE_KEY: i32 = 11000;
/// `create` of a collection that exists.
const NAMESPACE_EXISTS: i32 = 48;
const COURSES: &str = "courses";
const CHECKPOINTS: &str = "projection_checkpoints";
/// A pause (set by a replay's switch) this store has been seeing for longer than this, by
/// its own clock, is taken for the leftover of a replay that died, and cleared.
pub const PAUSE_EXPIRES: Duration = Duration::from_secs(60);
/// Record writes per `update` command (MongoDB takes up to 100 000, a batch has at most
/// 1 000 events).
const MAX_WRITES_PER_COMMAND: usize = 1_000;
/// Bytes of record writes per `update` command: a command is one BSON document, at most
/// 16 MiB (plus 16 KiB the server allows for the command's own fields); the rest is room
/// for the command's fields and the array's keys.
const MAX_COMMAND_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;
/// How many times a rebuild rereads and rewrites a course whose record a batch changed
/// meanwhile.
const REBUILD_ATTEMPTS: usize = 5;

/// A course document as readers read it (tombstones are filtered out by the query; the
/// `rev` a record carries is not needed to serve it).
#[derive(Debug, Clone, Deserialize)]
struct StoredCourse {
    #[serde(rename = "_id")]
    id: String,
    name: String,
    description: String,
    discipline: String,
    teacher: String,
    student_ids: Vec<String>,
    version: i64,
}

/// The checkpoint document of one generation (`_id` "courses" or "courses__next").
#[derive(Debug, Default, Deserialize)]
struct StoredCheckpoint {
    #[serde(default)]
    last_sequence: i64,
    /// The lease token of the replica that last claimed the projection (fencing).
    #[serde(default)]
    fence: i64,
    /// Moved on by every pause and unpause of a replay's switch (absent: 0).
    #[serde(default)]
    epoch: i64,
    /// Set while a replay's switch holds the projection still (absent: not paused).
    #[serde(default)]
    pause: Option<String>,
}

/// The checkpoint document as a batch reads it at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckpointState {
    sequence: u64,
    fence: u64,
    epoch: i64,
    pause: Option<String>,
}

impl From<StoredCheckpoint> for CheckpointState {
    fn from(stored: StoredCheckpoint) -> Self {
        CheckpointState {
            sequence: u64::try_from(stored.last_sequence).unwrap_or(0),
            fence: u64::try_from(stored.fence).unwrap_or(0),
            epoch: stored.epoch,
            pause: stored.pause,
        }
    }
}

fn uuid_of(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text)
        .map_err(|_| StoreError::Refused(format!("stored id {text:?} is not a UUID")))
}

impl TryFrom<StoredCourse> for CourseDocument {
    type Error = StoreError;

    fn try_from(stored: StoredCourse) -> Result<Self, StoreError> {
        Ok(CourseDocument {
            id: uuid_of(&stored.id)?,
            name: stored.name,
            description: stored.description,
            discipline: stored.discipline,
            teacher: stored.teacher,
            student_ids: stored
                .student_ids
                .iter()
                .map(|s| uuid_of(s))
                .collect::<Result<_, _>>()?,
            version: u64::try_from(stored.version).unwrap_or(0),
        })
    }
}

/// What a batch read of a record, and so what its write must still find there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadRevision {
    /// No record: the write inserts, and fails if one was inserted meanwhile.
    Absent,
    /// A record written before revisions existed: it must still be there at that version.
    Unrevised {
        version: i64,
    },
    Revision(i64),
}

/// A stored record and the revision it was read at.
#[derive(Debug, Clone)]
struct ReadRecord {
    record: Option<CourseRecord>,
    revision: ReadRevision,
}

/// One record write of a batch (or a rebuild): `record` replaces what was read at
/// `revision`.
#[derive(Debug, Clone)]
struct RecordWrite {
    revision: ReadRevision,
    record: CourseRecord,
}

/// Why record writes were not all done.
#[derive(Debug)]
enum RecordsNotWritten {
    /// This many records were changed by another writer since they were read.
    Changed(usize),
    Failed(StoreError),
}

impl From<StoreError> for RecordsNotWritten {
    fn from(error: StoreError) -> Self {
        RecordsNotWritten::Failed(error)
    }
}

impl From<mongodb::error::Error> for RecordsNotWritten {
    fn from(error: mongodb::error::Error) -> Self {
        RecordsNotWritten::Failed(error.into())
    }
}

/// A number stored as either integer width (a server may narrow an Int64).
fn integer(value: Option<&Bson>) -> Option<i64> {
    match value {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

/// A stored record (document or tombstone) with its revision.
fn parse_record(stored: Document) -> Result<(Uuid, ReadRecord), StoreError> {
    let version = integer(stored.get("version"))
        .ok_or_else(|| StoreError::Refused(format!("stored course {stored} has no version")))?;
    let revision = match stored.get("rev") {
        None | Some(Bson::Null) => ReadRevision::Unrevised { version },
        value => ReadRevision::Revision(integer(value).ok_or_else(|| {
            StoreError::Refused(format!(
                "stored course {stored} has a revision that is no integer"
            ))
        })?),
    };
    let record = if matches!(stored.get("deleted"), Some(Bson::Boolean(true))) {
        let id = match stored.get("_id") {
            Some(Bson::String(id)) => uuid_of(id)?,
            other => {
                return Err(StoreError::Refused(format!(
                    "stored id {other:?} is not a UUID"
                )));
            }
        };
        CourseRecord::Tombstone {
            id,
            version: u64::try_from(version).unwrap_or(0),
        }
    } else {
        let course: StoredCourse = mongodb::bson::from_document(stored)
            .map_err(|e| StoreError::Refused(format!("stored course does not read: {e}")))?;
        CourseRecord::Document(CourseDocument::try_from(course)?)
    };
    Ok((
        record.id(),
        ReadRecord {
            record: Some(record),
            revision,
        },
    ))
}

/// The stored shape of a record at revision `rev`: ids as canonical text, so records read
/// well in any MongoDB tool.
fn stored_record(record: &CourseRecord, rev: i64) -> Document {
    match record {
        CourseRecord::Document(course) => doc! {
            "_id": course.id.to_string(),
            "name": &course.name,
            "description": &course.description,
            "discipline": &course.discipline,
            "teacher": &course.teacher,
            "student_ids": course.student_ids.iter().map(Uuid::to_string).collect::<Vec<_>>(),
            "version": to_db(course.version),
            "rev": rev,
        },
        CourseRecord::Tombstone { id, version } => doc! {
            "_id": id.to_string(),
            "deleted": true,
            "version": to_db(*version),
            "rev": rev,
        },
    }
}

/// The filter of a compare-and-set write: it matches the record only as it was read, so an
/// upsert either replaces that state, or inserts where nothing was and nothing is, or fails
/// with a duplicate key (the record is there in another state).
fn unchanged_since_read(id: Uuid, revision: ReadRevision) -> Document {
    match revision {
        // `$in: []` matches no record: with `upsert` it inserts, unless the id exists.
        ReadRevision::Absent => doc! { "_id": id.to_string(), "rev": { "$in": [] } },
        ReadRevision::Unrevised { version } => doc! {
            "_id": id.to_string(),
            "rev": { "$exists": false },
            "version": version,
        },
        ReadRevision::Revision(rev) => doc! { "_id": id.to_string(), "rev": rev },
    }
}

/// A fresh revision: random, so two writers never pick the same one.
fn new_revision() -> i64 {
    let (high, _) = Uuid::new_v4().as_u64_pair();
    i64::from_ne_bytes(high.to_ne_bytes())
}

/// Consecutive ranges of `sizes` holding at most `max_items` items and `max_bytes` bytes
/// each (an item larger than `max_bytes` alone: the server refuses it).
fn chunks(sizes: &[usize], max_items: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, size) in sizes.iter().enumerate() {
        if i > start && (i - start == max_items || bytes + size > max_bytes) {
            ranges.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

/// Checks an `update` command's reply: `Changed` when a compare-and-set lost (duplicate
/// key), otherwise the write errors classified like the driver's errors.
fn check_update_reply(reply: &Document) -> Result<(), RecordsNotWritten> {
    let errors: Vec<(i32, String)> = match reply.get("writeErrors") {
        Some(Bson::Array(errors)) => errors
            .iter()
            .map(|error| match error {
                Bson::Document(error) => (
                    integer(error.get("code"))
                        .and_then(|c| i32::try_from(c).ok())
                        .unwrap_or(0),
                    error.get_str("errmsg").unwrap_or_default().to_owned(),
                ),
                other => (0, other.to_string()),
            })
            .collect(),
        _ => Vec::new(),
    };
    let changed = errors
        .iter()
        .filter(|(code, _)| *code == DUPLICATE_KEY)
        .count();
    if changed > 0 {
        return Err(RecordsNotWritten::Changed(changed));
    }
    if let Some((_, message)) = errors.first() {
        let message = format!(
            "{} course write(s) failed, the first: {message}",
            errors.len()
        );
        return Err(RecordsNotWritten::Failed(
            if errors
                .iter()
                .all(|(code, _)| is_transient_mongo_code(*code))
            {
                StoreError::Unavailable(message)
            } else {
                StoreError::Refused(message)
            },
        ));
    }
    if let Some(concern) = reply.get("writeConcernError") {
        // Written on the primary, not replicated as asked: the same writes are repeatable.
        return Err(RecordsNotWritten::Failed(StoreError::Unavailable(format!(
            "course writes not acknowledged as asked: {concern}"
        ))));
    }
    Ok(())
}

impl From<mongodb::error::Error> for StoreError {
    fn from(error: mongodb::error::Error) -> Self {
        if is_transient_mongo(&error) {
            StoreError::Unavailable(error.to_string())
        } else {
            StoreError::Refused(error.to_string())
        }
    }
}

/// Error labels with which the server or the driver marks an error as worth retrying
/// (the driver's `mongodb::error` constants; the retryable-writes, transactions and
/// backpressure specifications).
const RETRY_LABELS: [&str; 4] = [
    mongodb::error::RETRYABLE_WRITE_ERROR,
    mongodb::error::TRANSIENT_TRANSACTION_ERROR,
    mongodb::error::RETRYABLE_ERROR,
    mongodb::error::SYSTEM_OVERLOADED_ERROR,
];

/// Whether a MongoDB error means "not now" (wait and retry the same batch) rather than
/// "not these events" (dead-letter them after a few refusals). As for Postgres
/// ([`crate::store::is_transient_sqlx`]), only errors about the documents' own data refuse.
pub fn is_transient_mongo(error: &mongodb::error::Error) -> bool {
    let labelled = RETRY_LABELS.iter().any(|label| error.contains_label(label));
    is_transient_mongo_kind(&error.kind, labelled)
}

/// [`is_transient_mongo`] on the parts of an error: its kind, and whether it carries one of
/// the retry labels (labels cannot be put on an error outside the driver, so tests pass
/// them here).
pub fn is_transient_mongo_kind(kind: &ErrorKind, labelled_retryable: bool) -> bool {
    if labelled_retryable {
        return true;
    }
    match kind {
        // What we sent does not fit: the same events fail the same way.
        ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonDeserialization(_)
        | ErrorKind::BsonSerialization(_) => false,
        // The write was done on the primary but not replicated as asked (timeout, stepdown,
        // unsatisfiable): nothing about the document; the versioned write is repeatable.
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        // A document's own write failed: duplicate key, validation, too large… unless the
        // code says the node could not take writes then.
        ErrorKind::Write(WriteFailure::WriteError(error)) => is_transient_mongo_code(error.code),
        ErrorKind::InsertMany(error) => error
            .write_errors
            .iter()
            .flatten()
            .all(|e| is_transient_mongo_code(e.code)),
        ErrorKind::BulkWrite(error) => error
            .write_errors
            .values()
            .all(|e| is_transient_mongo_code(e.code)),
        // A command failed as a whole: the node (not primary, shutting down, interrupted),
        // the deployment or the credentials, which pass; a document's own data only for these.
        ErrorKind::Command(error) => !REFUSED_COMMAND_CODES.contains(&error.code),
        // Network, I/O, DNS, server selection, a cleared pool, authentication, a client shut
        // down, an invalid reply, an internal driver error, and kinds a later driver adds.
        _ => true,
    }
}

/// Command error codes about a document's own data (MongoDB's `error_codes.yml`).
const REFUSED_COMMAND_CODES: [i32; 3] = [
    DUPLICATE_KEY, // DuplicateKey
    121,           // DocumentValidationFailure
    10334,         // BSONObjectTooLarge
];

/// Whether a server error code (of a write error in particular) says the node could not
/// take the write then, rather than that it refuses the document.
///
/// The retryable-writes specification's codes (the driver's `RETRYABLE_READ_CODES`,
/// `NOTWRITABLEPRIMARY_CODES`, `RECOVERING_CODES` in `mongodb::error`), the transactions
/// specification's "unknown commit result" codes (50, 64), and codes of MongoDB's
/// `error_codes.yml` in the `RetriableError`, `Interruption` and `SystemOverloadedError`
/// categories or the counterparts of the Postgres conditions waited for (a lock timeout, a
/// write conflict, a full disk).
pub fn is_transient_mongo_code(code: i32) -> bool {
    TRANSIENT_MONGO_CODES
        .iter()
        .any(|&(known, _)| known == code)
}

/// Codes of [`is_transient_mongo_code`], with their names in `error_codes.yml`.
pub const TRANSIENT_MONGO_CODES: [(i32, &str); 32] = [
    (6, "HostUnreachable"),
    (7, "HostNotFound"),
    (24, "LockTimeout"),
    (50, "MaxTimeMSExpired"),
    (63, "StaleShardVersion"),
    (64, "WriteConcernFailed"),
    (89, "NetworkTimeout"),
    (91, "ShutdownInProgress"),
    (112, "WriteConflict"),
    (133, "FailedToSatisfyReadPreference"),
    (134, "ReadConcernMajorityNotAvailableYet"),
    (150, "StaleEpoch"),
    (189, "PrimarySteppedDown"),
    (202, "NetworkInterfaceExceededTimeLimit"),
    (216, "ElectionInProgress"),
    (237, "CursorKilled"),
    (262, "ExceededTimeLimit"),
    (279, "ClientDisconnect"),
    (402, "ResourceExhausted"),
    (433, "AdmissionQueueOverflow"),
    (449, "RateLimitExceeded"),
    (462, "IngressRequestRateLimitExceeded"),
    (9001, "SocketException"),
    (10058, "LegacyNotPrimary"),
    (10107, "NotWritablePrimary"),
    (11600, "InterruptedAtShutdown"),
    (11601, "Interrupted"),
    (11602, "InterruptedDueToReplStateChange"),
    (13388, "StaleConfig"),
    (13435, "NotPrimaryNoSecondaryOk"),
    (13436, "NotPrimaryOrSecondary"),
    (14031, "OutOfDiskSpace"),
];

#[derive(Clone)]
pub struct MongoCourses {
    database: Database,
    generation: Generation,
    /// Documents only (readers filter tombstones out).
    courses: Collection<StoredCourse>,
    /// The same collection, records of either kind (writers).
    records: Collection<Document>,
    checkpoints: Collection<StoredCheckpoint>,
    checkpoint_id: String,
    fence: FenceToken,
    /// The pause this store saw on the checkpoint and since when, by this process's clock.
    pause_seen: Arc<Mutex<Option<(String, Instant)>>>,
    /// [`MAX_WRITES_PER_COMMAND`] (lower in tests).
    writes_per_command: usize,
}

/// The database a URL names (default `school`).
async fn database_of(url: &str) -> anyhow::Result<Database> {
    let client = Client::with_uri_str(url).await?;
    Ok(client
        .default_database()
        .unwrap_or_else(|| client.database("school")))
}

/// Only documents, never tombstones.
fn visible(mut filter: Document) -> Document {
    filter.insert("deleted", doc! { "$ne": true });
    filter
}

impl MongoCourses {
    /// Connects to the database the URL names (default `school`) and creates the collections
    /// it writes and their indexes.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let store = Self::on_database(database_of(url).await?, Generation::Live);
        store.create_indexes().await?;
        Ok(store)
    }

    /// Connects for reading only: creates and writes nothing (not even an index), so a role
    /// with the `read` privilege suffices. The projectors' [`Self::connect`] owns the schema.
    pub async fn connect_reader(url: &str) -> anyhow::Result<Self> {
        Ok(Self::on_database(database_of(url).await?, Generation::Live))
    }

    fn on_database(database: Database, generation: Generation) -> Self {
        let name = generation.table(COURSES);
        MongoCourses {
            courses: database.collection(&name),
            records: database.collection(&name),
            checkpoints: database.collection(CHECKPOINTS),
            checkpoint_id: generation.checkpoint_key(PROJECTION),
            generation,
            database,
            fence: FenceToken::default(),
            pause_seen: Arc::default(),
            writes_per_command: MAX_WRITES_PER_COMMAND,
        }
    }

    /// The same database (and client), on the collection and checkpoint of `generation` (a
    /// replay builds `Next`), with a fence token of its own.
    pub fn generation(&self, generation: Generation) -> Self {
        Self::on_database(self.database.clone(), generation)
    }

    pub(crate) fn database(&self) -> &Database {
        &self.database
    }

    pub(crate) fn courses_collection_name(&self) -> &str {
        self.courses.name()
    }

    /// The `_id` of this generation's document in `projection_checkpoints`.
    pub(crate) fn checkpoint_id(&self) -> &str {
        &self.checkpoint_id
    }

    /// Creates this generation's collection and the checkpoints collection unless they
    /// exist, and the courses' indexes.
    pub(crate) async fn create_indexes(&self) -> Result<(), StoreError> {
        // Asked first rather than told by the error: the stand-in's NamespaceExists reply has
        // no `code`, which the driver cannot parse (MongoDB's has code 48).
        let existing = self.database().list_collection_names().await?;
        for name in [self.courses_collection_name(), CHECKPOINTS] {
            if existing.iter().any(|c| c == name) {
                continue;
            }
            match self.database().create_collection(name).await {
                Ok(()) => {}
                Err(error) if command_code(&error) == Some(NAMESPACE_EXISTS) => {}
                Err(error) => return Err(error.into()),
            }
        }
        // Which courses a student is in, without scanning every course.
        self.courses
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "student_ids": 1 })
                    .build(),
            )
            .await?;
        Ok(())
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<CourseDocument>, StoreError> {
        self.courses
            .find_one(visible(doc! { "_id": id.to_string() }))
            .await?
            .map(CourseDocument::try_from)
            .transpose()
    }

    /// The documents of `ids` that exist, in id order.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<CourseDocument>, StoreError> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let stored: Vec<StoredCourse> = self
            .courses
            .find(visible(doc! { "_id": { "$in": ids } }))
            .sort(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        stored.into_iter().map(CourseDocument::try_from).collect()
    }

    /// Up to `limit` courses with ids after `after`, in id order (canonical UUID text sorts
    /// like the UUID itself).
    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<CourseDocument>, StoreError> {
        let filter = match after {
            Some(after) => doc! { "_id": { "$gt": after.to_string() } },
            None => doc! {},
        };
        let stored: Vec<StoredCourse> = self
            .courses
            .find(visible(filter))
            .sort(doc! { "_id": 1 })
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        stored.into_iter().map(CourseDocument::try_from).collect()
    }

    /// Replaces one course's record by the fold of its history (redrive): every event of its
    /// subject up to the checkpoint, or up to the record's own version when a batch in
    /// flight wrote it past the checkpoint already (the records are written before the
    /// checkpoint). Returns the number of events folded.
    ///
    /// Serialised with the live projection by compare-and-set instead of a lock: the write
    /// is conditional on the record's revision read before the history, so a batch that
    /// wrote the record meanwhile makes it fail, and it starts over (checkpoint, record and
    /// history read again), at most 5 times. A batch that read the record before the
    /// rebuild wrote it loses its own compare-and-set and is retried on the rebuilt record.
    /// The history is read once per attempt (an [`AggregateHistory`] is `Clone`).
    pub async fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: impl AggregateHistory,
    ) -> Result<usize, StoreError> {
        for _ in 0..REBUILD_ATTEMPTS {
            let checkpoint = self.read_checkpoint().await?;
            if checkpoint.pause.is_some() {
                return Err(StoreError::Unavailable(
                    "paused for a replay's switch; rebuild after it".into(),
                ));
            }
            let read = self
                .read_records(&[id])
                .await?
                .remove(&id)
                .unwrap_or(ReadRecord {
                    record: None,
                    revision: ReadRevision::Absent,
                });
            let through = checkpoint
                .sequence
                .max(read.record.as_ref().map_or(0, CourseRecord::version));
            let events = history.clone().read_through(through).await?;
            let mut rebuilt = None;
            let mut applied = 0;
            for (sequence, event) in events.iter().filter(|(seq, _)| *seq <= through) {
                rebuilt = fold_record(rebuilt, id, *sequence, &event.payload);
                applied += 1;
            }
            let rebuilt = match (rebuilt, &read.record) {
                (Some(rebuilt), _) => rebuilt,
                (None, None) => return Ok(applied),
                // Stored, but no course in its history: as good as deleted at `through`.
                (None, Some(_)) => CourseRecord::Tombstone {
                    id,
                    version: through,
                },
            };
            if read.record.as_ref() == Some(&rebuilt) {
                return Ok(applied);
            }
            let write = RecordWrite {
                revision: read.revision,
                record: rebuilt,
            };
            match self.write_records(&[write]).await {
                Ok(()) => return Ok(applied),
                Err(RecordsNotWritten::Changed(_)) => continue,
                Err(RecordsNotWritten::Failed(error)) => return Err(error),
            }
        }
        Err(StoreError::Unavailable(format!(
            "course {id} changed during each of {REBUILD_ATTEMPTS} attempts to rebuild it; \
             try again"
        )))
    }
}

/// A batch read and folded, its writes not done yet.
struct PlannedBatch {
    token: u64,
    checkpoint: CheckpointState,
    outcome: BatchOutcome,
    writes: Vec<RecordWrite>,
}

impl MongoCourses {
    /// The stored records of `ids` (absent ids left out), one round trip.
    async fn read_records(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, ReadRecord>, StoreError> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let stored: Vec<Document> = self
            .records
            .find(doc! { "_id": { "$in": ids } })
            .await?
            .try_collect()
            .await?;
        stored.into_iter().map(parse_record).collect()
    }

    /// Writes every record, each conditional on the revision it was read at, in one
    /// unordered `update` command per [`MAX_WRITES_PER_COMMAND`] writes (the command every
    /// driver sends for bulk writes to servers before 8.0; the driver's `bulk_write` needs
    /// 8.0's `bulkWrite`).
    async fn write_records(&self, writes: &[RecordWrite]) -> Result<(), RecordsNotWritten> {
        let mut updates = Vec::with_capacity(writes.len());
        for write in writes {
            let update = doc! {
                "q": unchanged_since_read(write.record.id(), write.revision),
                "u": stored_record(&write.record, new_revision()),
                "upsert": true,
            };
            updates.push(RawDocumentBuf::from_document(&update).map_err(|e| {
                RecordsNotWritten::Failed(StoreError::Refused(format!(
                    "course {} does not encode: {e}",
                    write.record.id()
                )))
            })?);
        }
        let sizes: Vec<usize> = updates.iter().map(|u| u.as_bytes().len() + 8).collect();
        let mut changed = 0;
        let mut updates = updates.into_iter();
        for range in chunks(&sizes, self.writes_per_command, MAX_COMMAND_BYTES) {
            let mut array = RawArrayBuf::new();
            for update in updates.by_ref().take(range.len()) {
                array.push(update);
            }
            let mut command = RawDocumentBuf::new();
            command.append("update", self.courses_collection_name());
            command.append("updates", array);
            command.append("ordered", false);
            let reply = self.database.run_raw_command(command).await?;
            match check_update_reply(&reply) {
                Ok(()) => {}
                // The other chunks are written all the same: the retry rereads them all.
                Err(RecordsNotWritten::Changed(n)) => changed += n,
                Err(error) => return Err(error),
            }
        }
        if changed > 0 {
            return Err(RecordsNotWritten::Changed(changed));
        }
        Ok(())
    }

    /// Reads the checkpoint document and the touched records and folds the batch: two round
    /// trips, no write (but clearing an expired pause).
    async fn plan_batch(&self, batch: &[(u64, Event)]) -> Result<PlannedBatch, StoreError> {
        // Fencing without transactions: a replica whose token is older than the recorded one
        // stops here, before any record write, and the checkpoint update is conditional on
        // the token too. A replica fenced between the two writes only records whose
        // revision it read, so it overwrites nothing written since its read.
        let token = self.fence.get();
        let checkpoint = self.batch_checkpoint(token).await?;
        let fresh: Vec<&(u64, Event)> = batch
            .iter()
            .filter(|(seq, _)| *seq > checkpoint.sequence)
            .collect();
        let outcome = BatchOutcome {
            applied: fresh.len(),
            skipped: batch.len() - fresh.len(),
            checkpoint: checkpoint.sequence,
        };
        let mut ids: Vec<Uuid> = fresh.iter().map(|(_, e)| e.metadata.aggregate_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut read = if ids.is_empty() {
            HashMap::new()
        } else {
            self.read_records(&ids).await?
        };
        let mut after: HashMap<Uuid, Option<CourseRecord>> = HashMap::new();
        for (sequence, event) in fresh {
            let id = event.metadata.aggregate_id;
            let current = match after.remove(&id) {
                Some(current) => current,
                None => read.get(&id).and_then(|r| r.record.clone()),
            };
            after.insert(id, fold_record(current, id, *sequence, &event.payload));
        }
        let mut writes = Vec::new();
        for (id, record) in after {
            let before = read.remove(&id).unwrap_or(ReadRecord {
                record: None,
                revision: ReadRevision::Absent,
            });
            // Unchanged (every event at or below its version, or nothing to change).
            if record == before.record {
                continue;
            }
            if let Some(record) = record {
                writes.push(RecordWrite {
                    revision: before.revision,
                    record,
                });
            }
        }
        Ok(PlannedBatch {
            token,
            checkpoint,
            outcome,
            writes,
        })
    }

    /// Writes a planned batch's records, then moves the checkpoint to `through_sequence`:
    /// one round trip each.
    async fn commit_batch(
        &self,
        plan: PlannedBatch,
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        let PlannedBatch {
            token,
            checkpoint,
            mut outcome,
            writes,
        } = plan;
        if !writes.is_empty() {
            self.write_records(&writes)
                .await
                .map_err(|error| match error {
                    RecordsNotWritten::Changed(n) => StoreError::Unavailable(format!(
                        "{n} course record(s) changed concurrently (a redrive, a fenced replica, \
                     a replay's switch); retrying"
                    )),
                    RecordsNotWritten::Failed(error) => error,
                })?;
        }
        if through_sequence > checkpoint.sequence {
            outcome.checkpoint = through_sequence;
            let written = self
                .checkpoints
                .update_one(
                    self.checkpoint_unchanged(token, checkpoint.epoch),
                    doc! {
                        "$max": { "last_sequence": to_db(through_sequence) },
                        "$set": { "fence": to_db(token) },
                    },
                )
                .upsert(true)
                .await;
            match written {
                Ok(_) => {}
                // The filter missed an existing checkpoint: a newer token, another epoch or
                // a pause.
                Err(error) if is_duplicate_key(&error) => {
                    let now = self.read_checkpoint().await?;
                    if now.fence > token {
                        return Err(fenced(now.fence, token));
                    }
                    return Err(StoreError::Unavailable(
                        "the read model switched generations or paused mid-batch; retrying".into(),
                    ));
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(outcome)
    }

    /// The checkpoint document at a batch's start, once it is known to be neither fenced
    /// nor paused. A pause this store has been seeing for longer than [`PAUSE_EXPIRES`] is
    /// cleared (a replay that died left it) and the document read again.
    async fn batch_checkpoint(&self, token: u64) -> Result<CheckpointState, StoreError> {
        let paused = || StoreError::Unavailable("paused for a replay's switch".into());
        for _ in 0..3 {
            let checkpoint = self.read_checkpoint().await?;
            if checkpoint.fence > token {
                return Err(fenced(checkpoint.fence, token));
            }
            let Some(pause) = &checkpoint.pause else {
                *self
                    .pause_seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                return Ok(checkpoint);
            };
            if !self.pause_expired(pause, Instant::now()) {
                return Err(paused());
            }
            self.checkpoints
                .update_one(
                    doc! { "_id": self.checkpoint_id(), "pause": pause },
                    doc! { "$unset": { "pause": "" }, "$inc": { "epoch": 1_i64 } },
                )
                .await?;
            tracing::warn!(
                pause = %pause,
                seen_for_s = PAUSE_EXPIRES.as_secs(),
                generation = ?self.generation,
                "cleared a replay's pause left for longer than it may last (the replay died \
                 or hangs); the projection resumes"
            );
        }
        Err(paused())
    }

    /// Whether this store has been seeing the pause `pause` for longer than
    /// [`PAUSE_EXPIRES`] at `now` (a pause it sees for the first time starts the clock).
    fn pause_expired(&self, pause: &str, now: Instant) -> bool {
        let mut seen = self
            .pause_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*seen {
            Some((value, since)) if value == pause => now.duration_since(*since) > PAUSE_EXPIRES,
            _ => {
                *seen = Some((pause.to_owned(), now));
                false
            }
        }
    }

    /// The checkpoint document, if it records a lease token at most `token`, epoch `epoch`
    /// and no pause (a checkpoint written before fencing or replays records none).
    fn checkpoint_unchanged(&self, token: u64, epoch: i64) -> Document {
        let epoch = if epoch == 0 {
            doc! { "$or": [ { "epoch": 0_i64 }, { "epoch": { "$exists": false } } ] }
        } else {
            doc! { "epoch": epoch }
        };
        doc! {
            "_id": self.checkpoint_id(),
            "$and": [
                { "$or": [ { "fence": { "$lte": to_db(token) } }, { "fence": { "$exists": false } } ] },
                epoch,
                { "pause": { "$exists": false } },
            ],
        }
    }

    /// The checkpoint document, if the token it records is at most `token`.
    fn checkpoint_fenced_at_most(&self, token: u64) -> Document {
        doc! {
            "_id": self.checkpoint_id(),
            "$or": [ { "fence": { "$lte": to_db(token) } }, { "fence": { "$exists": false } } ],
        }
    }

    /// The checkpoint document as stored; all zero before the first batch.
    async fn read_checkpoint(&self) -> Result<CheckpointState, StoreError> {
        let stored = self
            .checkpoints
            .find_one(doc! { "_id": self.checkpoint_id() })
            .await?;
        Ok(stored.unwrap_or_default().into())
    }
}

impl ProjectionStore for MongoCourses {
    fn projection(&self) -> Projection {
        PROJECTION
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        Ok(self.read_checkpoint().await?.sequence)
    }

    /// Four round trips: the checkpoint document, the touched records, one `update` command
    /// with every record write, the checkpoint write.
    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        let plan = self.plan_batch(batch).await?;
        self.commit_batch(plan, through_sequence).await
    }

    async fn claim(&self, token: u64) -> Result<(), StoreError> {
        let claimed = self
            .checkpoints
            .update_one(
                self.checkpoint_fenced_at_most(token),
                doc! {
                    "$set": { "fence": to_db(token) },
                    "$setOnInsert": { "last_sequence": 0_i64 },
                },
            )
            .upsert(true)
            .await;
        match claimed {
            Ok(_) => {
                self.fence.set(token);
                Ok(())
            }
            Err(error) if is_duplicate_key(&error) => {
                let recorded = self.read_checkpoint().await?.fence;
                Err(fenced(recorded, token))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.database.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }
}

fn to_db(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    matches!(
        &*error.kind,
        ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY
    )
}

fn command_code(error: &mongodb::error::Error) -> Option<i32> {
    match &*error.kind {
        ErrorKind::Command(command) => Some(command.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use events::{AggregateKind, CourseDetails, EventMetadata, EventPayload};
    use mongodb::event::EventHandler;
    use mongodb::event::command::CommandEvent;
    use mongodb::options::ClientOptions;

    use super::*;

    #[test]
    fn writes_are_chunked_by_count_and_by_bytes() {
        assert_eq!(chunks(&[], 1000, 100), Vec::<Range<usize>>::new());
        assert_eq!(
            chunks(&[1; 2500], 1000, usize::MAX),
            [0..1000, 1000..2000, 2000..2500]
        );
        let whole = chunks(&[1; 1000], 1000, usize::MAX);
        assert_eq!((whole.len(), whole[0].len()), (1, 1000));
        assert_eq!(chunks(&[40, 40, 40, 10, 90], 1000, 100), [0..2, 2..4, 4..5]);
        // An item past the limit goes alone (the server refuses it, nothing else with it).
        assert_eq!(chunks(&[10, 500, 10], 1000, 100), [0..1, 1..2, 2..3]);
    }

    #[test]
    fn a_lost_compare_and_set_is_told_apart_from_other_write_errors() {
        let error = |code: i32| doc! { "index": 0, "code": code, "errmsg": format!("code {code}") };
        let reply = |errors: Vec<Document>| doc! { "ok": 1, "n": 0, "writeErrors": errors };
        assert!(check_update_reply(&doc! { "ok": 1, "n": 3, "nModified": 2 }).is_ok());
        assert!(matches!(
            check_update_reply(&reply(vec![error(11000), error(11000), error(121)])),
            Err(RecordsNotWritten::Changed(2))
        ));
        assert!(matches!(
            check_update_reply(&reply(vec![error(121)])),
            Err(RecordsNotWritten::Failed(StoreError::Refused(_)))
        ));
        assert!(matches!(
            check_update_reply(&reply(vec![error(91), error(11602)])),
            Err(RecordsNotWritten::Failed(StoreError::Unavailable(_)))
        ));
        assert!(matches!(
            check_update_reply(&reply(vec![error(91), error(10334)])),
            Err(RecordsNotWritten::Failed(StoreError::Refused(_)))
        ));
        assert!(matches!(
            check_update_reply(&doc! { "ok": 1, "writeConcernError": { "code": 64 } }),
            Err(RecordsNotWritten::Failed(StoreError::Unavailable(_)))
        ));
    }

    #[test]
    fn records_read_back_as_written_and_unrevised_ones_by_their_version() {
        let id = Uuid::now_v7();
        let course = CourseDocument {
            id,
            name: "Algebra".into(),
            description: "Rings".into(),
            discipline: "Maths".into(),
            teacher: "Noether".into(),
            student_ids: vec![Uuid::from_u128(1), Uuid::from_u128(2)],
            version: 7,
        };
        for record in [
            CourseRecord::Document(course.clone()),
            CourseRecord::Tombstone { id, version: 9 },
        ] {
            let (read_id, read) = parse_record(stored_record(&record, 42)).expect("reads");
            assert_eq!(read_id, id);
            assert_eq!(read.record, Some(record));
            assert_eq!(read.revision, ReadRevision::Revision(42));
        }
        let mut unrevised = stored_record(&CourseRecord::Document(course), 0);
        unrevised.remove("rev");
        unrevised.insert("version", 7_i32);
        let (_, read) = parse_record(unrevised).expect("reads");
        assert_eq!(read.revision, ReadRevision::Unrevised { version: 7 });
        assert_ne!(new_revision(), new_revision());
    }

    #[tokio::test]
    async fn a_pause_expires_after_this_store_saw_it_for_a_minute() {
        let store = MongoCourses::on_database(
            Client::with_options(ClientOptions::default())
                .expect("client")
                .database("unused"),
            Generation::Live,
        );
        let t0 = Instant::now();
        assert!(!store.pause_expired("a", t0), "first seen");
        assert!(!store.pause_expired("a", t0 + PAUSE_EXPIRES));
        assert!(store.pause_expired("a", t0 + PAUSE_EXPIRES + Duration::from_millis(1)));
        // Another pause starts the clock again, and so does the same one seen on a clone.
        assert!(!store.pause_expired("b", t0 + PAUSE_EXPIRES * 2));
        assert!(
            store
                .clone()
                .pause_expired("b", t0 + PAUSE_EXPIRES * 3 + Duration::from_millis(1))
        );
        let next = store.generation(Generation::Next);
        assert!(
            !next.pause_expired("b", t0 + PAUSE_EXPIRES * 4),
            "a generation has its own"
        );
        assert_eq!(next.courses_collection_name(), "courses__next");
        assert_eq!(next.checkpoint_id(), "courses__next");
        assert_eq!(store.courses_collection_name(), "courses");
        assert_eq!(store.checkpoint_id(), "courses");
    }

    /// A store on a fresh database of `MONGODB_URL`, and the names of the commands its
    /// client sends; `None` (SKIPPED) without `MONGODB_URL`.
    async fn monitored_store(test: &str) -> Option<(MongoCourses, Arc<StdMutex<Vec<String>>>)> {
        // SKIPPED without MONGODB_URL, failed under CI.
        let url = test_support::mongo::mongo_url(test)?;
        let commands = Arc::new(StdMutex::new(Vec::new()));
        let seen = commands.clone();
        let mut options = ClientOptions::parse(&url)
            .await
            .expect("MONGODB_URL parses");
        options.command_event_handler = Some(EventHandler::callback(move |event| {
            if let CommandEvent::Started(started) = event {
                let name = started.command_name.clone();
                if !matches!(
                    name.as_str(),
                    "hello" | "isMaster" | "ismaster" | "endSessions"
                ) {
                    seen.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(name);
                }
            }
        }));
        let client = Client::with_options(options).expect("client");
        let name = format!("test_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let store = MongoCourses::on_database(client.database(&name), Generation::Live);
        store.create_indexes().await.expect("indexes");
        commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Some((store, commands))
    }

    fn taken(commands: &StdMutex<Vec<String>>) -> Vec<String> {
        std::mem::take(&mut *commands.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn event(course: Uuid, payload: EventPayload) -> Event {
        Event {
            metadata: EventMetadata {
                event_id: Uuid::now_v7(),
                aggregate_kind: AggregateKind::Course,
                aggregate_id: course,
                occurred_at: chrono::Utc::now(),
                correlation_id: Uuid::now_v7(),
                causation_id: Uuid::now_v7(),
                trace: Default::default(),
            },
            payload,
        }
    }

    fn created(course: Uuid, name: &str) -> Event {
        event(
            course,
            EventPayload::CourseCreated(CourseDetails {
                name: name.into(),
                description: "About it".into(),
                discipline: "Maths".into(),
                teacher: "Noether".into(),
            }),
        )
    }

    fn updated(course: Uuid, name: &str) -> Event {
        event(
            course,
            EventPayload::CourseUpdated(CourseDetails {
                name: name.into(),
                description: "About it".into(),
                discipline: "Maths".into(),
                teacher: "Artin".into(),
            }),
        )
    }

    async fn name_of(store: &MongoCourses, id: Uuid) -> Option<String> {
        store.get(id).await.expect("get").map(|d| d.name)
    }

    fn checkpoints(store: &MongoCourses) -> Collection<Document> {
        store.database().collection(CHECKPOINTS)
    }

    /// The stand-in allowance: the SQLite-backed stand-in refuses an `$in` of more than
    /// about 450 values ("Expression tree is too large", SQLite's expression depth), which
    /// MongoDB does not limit, so the batches here touch 250 courses and the chunking is
    /// shown with 100 writes per command instead of 1 000 (the stand-in is slow, too).
    #[tokio::test]
    async fn a_batch_is_four_round_trips_whatever_its_size() {
        let Some((mut store, commands)) = monitored_store("the round-trip test").await else {
            return;
        };
        let creates = |from: u64, to: u64| -> Vec<(u64, Event)> {
            (from..=to)
                .map(|seq| (seq, created(Uuid::now_v7(), "Course")))
                .collect()
        };
        store
            .apply_batch(&creates(1, 250), 250)
            .await
            .expect("applied");
        assert_eq!(taken(&commands), ["find", "find", "update", "update"]);
        // Past the writes a command takes, the record writes take more commands.
        store.writes_per_command = 100;
        let more = creates(251, 500);
        store.apply_batch(&more, 500).await.expect("applied");
        assert_eq!(
            taken(&commands),
            ["find", "find", "update", "update", "update", "update"]
        );
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = store.list(after, 100).await.expect("list");
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            all.extend(page);
        }
        assert_eq!(all.len(), 500);
        taken(&commands);
        // Redelivered: nothing to write, one read of the checkpoint.
        store.apply_batch(&more, 500).await.expect("redelivered");
        assert_eq!(taken(&commands), ["find"]);
        store.database().drop().await.expect("drop");
    }

    /// A record changed between a batch's read and its write (here by a direct write, as a
    /// redrive or an old replica would) fails the batch as unavailable, and its retry
    /// applies the batch on top of that change.
    #[tokio::test]
    async fn a_record_changed_since_the_batchs_read_fails_the_batch_for_a_retry() {
        let Some((store, _)) = monitored_store("the compare-and-set test").await else {
            return;
        };
        let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
        store
            .apply_batch(&[(1, created(x, "X")), (2, created(y, "Y"))], 2)
            .await
            .expect("applied");
        let batch = [(3, updated(x, "X II")), (4, updated(y, "Y II"))];
        let plan = store.plan_batch(&batch).await.expect("planned");
        store
            .records
            .update_one(
                doc! { "_id": x.to_string() },
                doc! { "$set": { "rev": 1_i64 } },
            )
            .await
            .expect("changed behind the batch's back");
        let error = store
            .commit_batch(plan, 4)
            .await
            .expect_err("lost its compare-and-set");
        assert!(
            matches!(&error, StoreError::Unavailable(m) if m.contains("changed concurrently")),
            "{error:?}"
        );
        assert_eq!(store.checkpoint().await.expect("read"), 2, "not moved");
        assert_eq!(
            name_of(&store, y).await.as_deref(),
            Some("Y II"),
            "written all the same"
        );
        let retried = store.apply_batch(&batch, 4).await.expect("retried");
        assert_eq!(retried.checkpoint, 4);
        assert_eq!(name_of(&store, x).await.as_deref(), Some("X II"));
        store.database().drop().await.expect("drop");
    }

    /// An old replica paused between its read and its write, across a takeover during which
    /// the new one created and deleted the course: its late upsert finds the tombstone
    /// where it read nothing, fails, and its retry is fenced. The course stays deleted.
    #[tokio::test]
    async fn a_fenced_replicas_late_upsert_does_not_bring_a_deleted_course_back() {
        let Some((old, _)) = monitored_store("the late-upsert test").await else {
            return;
        };
        old.claim(1).await.expect("claimed");
        let x = Uuid::now_v7();
        let batch = [(1, created(x, "X")), (2, updated(x, "X II"))];
        let late = old.plan_batch(&batch).await.expect("planned");
        let new = old.generation(Generation::Live);
        new.claim(2).await.expect("took over");
        new.apply_batch(
            &[
                (1, created(x, "X")),
                (2, updated(x, "X II")),
                (3, event(x, EventPayload::CourseDeleted)),
            ],
            3,
        )
        .await
        .expect("applied");
        let error = old.commit_batch(late, 2).await.expect_err("lost");
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        assert_eq!(name_of(&new, x).await, None, "still deleted");
        let error = old.apply_batch(&batch, 2).await.expect_err("fenced");
        assert!(matches!(error, StoreError::Fenced(_)), "{error:?}");
        assert_eq!(name_of(&new, x).await, None);
        assert_eq!(new.checkpoint().await.expect("read"), 3);
        old.database().drop().await.expect("drop");
    }

    #[tokio::test]
    async fn records_written_before_revisions_are_still_updated_in_place() {
        let Some((store, _)) = monitored_store("the unrevised-record test").await else {
            return;
        };
        let x = Uuid::now_v7();
        // As the adapter stored a course before revisions and tombstones.
        store
            .records
            .insert_one(doc! {
                "_id": x.to_string(), "name": "X", "description": "d", "discipline": "Maths",
                "teacher": "Noether", "student_ids": [], "version": 5_i64,
            })
            .await
            .expect("inserted");
        store
            .apply_batch(&[(6, updated(x, "X II"))], 6)
            .await
            .expect("applied");
        let stored = store
            .records
            .find_one(doc! { "_id": x.to_string() })
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(stored.get_str("name"), Ok("X II"));
        assert!(stored.get("rev").is_some(), "revised now: {stored}");
        store
            .apply_batch(&[(7, event(x, EventPayload::CourseDeleted))], 7)
            .await
            .expect("applied");
        assert_eq!(name_of(&store, x).await, None);
        store.database().drop().await.expect("drop");
    }

    #[tokio::test]
    async fn a_paused_projection_writes_nothing_until_the_pause_expires_by_its_own_clock() {
        let Some((store, _)) = monitored_store("the pause test").await else {
            return;
        };
        let x = Uuid::now_v7();
        store
            .apply_batch(&[(1, created(x, "X"))], 1)
            .await
            .expect("applied");
        checkpoints(&store)
            .update_one(
                doc! { "_id": "courses" },
                doc! { "$set": { "pause": "replay 1" }, "$inc": { "epoch": 1_i64 } },
            )
            .await
            .expect("paused");
        let batch = [(2, updated(x, "X II"))];
        for _ in 0..2 {
            let error = store.apply_batch(&batch, 2).await.expect_err("paused");
            assert!(
                matches!(&error, StoreError::Unavailable(m) if m.contains("paused")),
                "{error:?}"
            );
        }
        assert_eq!(
            name_of(&store, x).await.as_deref(),
            Some("X"),
            "nothing written"
        );
        assert_eq!(store.checkpoint().await.expect("read"), 1);
        // Seen for longer than a pause may last (as if a minute had passed).
        let since = store
            .pause_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .expect("seen");
        assert_eq!(since.0, "replay 1");
        let long_ago = Instant::now()
            .checked_sub(PAUSE_EXPIRES + Duration::from_secs(1))
            .expect("the clock is past a minute");
        *store
            .pause_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((since.0, long_ago));
        store
            .apply_batch(&batch, 2)
            .await
            .expect("the pause expired");
        assert_eq!(name_of(&store, x).await.as_deref(), Some("X II"));
        let stored = checkpoints(&store)
            .find_one(doc! { "_id": "courses" })
            .await
            .expect("read")
            .expect("exists");
        assert!(stored.get("pause").is_none(), "cleared: {stored}");
        assert_eq!(integer(stored.get("epoch")), Some(2), "moved on: {stored}");
        assert_eq!(integer(stored.get("last_sequence")), Some(2));
        store.database().drop().await.expect("drop");
    }

    /// A batch that read the checkpoint before a switch paused the projection (or moved the
    /// epoch) or before another replica took over does not move the checkpoint.
    #[tokio::test]
    async fn a_checkpoint_changed_mid_batch_refuses_the_batchs_checkpoint_write() {
        let Some((store, _)) = monitored_store("the mid-batch test").await else {
            return;
        };
        let x = Uuid::now_v7();
        store
            .apply_batch(&[(1, created(x, "X"))], 1)
            .await
            .expect("applied");
        let changes = [
            doc! { "$set": { "pause": "replay 2" } },
            doc! { "$inc": { "epoch": 1_i64 } },
            doc! { "$set": { "pause": "replay 3" }, "$inc": { "epoch": 1_i64 } },
        ];
        for (seq, change) in (2..).zip(changes) {
            let plan = store
                .plan_batch(&[(seq, updated(x, &format!("X {seq}")))])
                .await
                .expect("planned");
            checkpoints(&store)
                .update_one(doc! { "_id": "courses" }, change)
                .await
                .expect("changed");
            let error = store.commit_batch(plan, seq).await.expect_err("refused");
            assert!(
                matches!(&error, StoreError::Unavailable(m) if m.contains("switched generations")),
                "{error:?}"
            );
            assert_eq!(store.checkpoint().await.expect("read"), 1);
            checkpoints(&store)
                .update_one(
                    doc! { "_id": "courses" },
                    doc! { "$unset": { "pause": "" } },
                )
                .await
                .expect("unpaused");
        }
        let plan = store
            .plan_batch(&[(5, updated(x, "X 5"))])
            .await
            .expect("planned");
        store
            .generation(Generation::Live)
            .claim(9)
            .await
            .expect("took over");
        let error = store.commit_batch(plan, 5).await.expect_err("fenced");
        assert!(matches!(error, StoreError::Fenced(_)), "{error:?}");
        assert_eq!(store.checkpoint().await.expect("read"), 1);
        store.database().drop().await.expect("drop");
    }
}
