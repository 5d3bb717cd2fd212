//! The course-store adapter for MongoDB: one document per course with its student ids.
//!
//! No multi-document transaction (so no replica set is needed): each document carries the
//! stream sequence of its last applied event, and a write only replaces a document whose
//! version is older. The checkpoint is written after the documents; after a crash between
//! the two, the re-delivered events are skipped document by document.

use std::collections::HashMap;

use events::{Event, Projection};
use futures::TryStreamExt;
use mongodb::bson::doc;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::course_document::{self, CourseDocument};
use crate::pg_students::fenced;
use crate::store::{BatchOutcome, FenceToken, ProjectionStore, StoreError};

const PROJECTION: Projection = Projection::Courses;
/// MongoDB's duplicate-key error: an upsert lost to a newer stored version.
const DUPLICATE_KEY: i32 = 11000;

/// The stored shape: ids as canonical text, so documents read well in any MongoDB tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Serialize, Deserialize)]
struct StoredCheckpoint {
    #[serde(rename = "_id")]
    projection: String,
    last_sequence: i64,
    /// The lease token of the replica that last claimed the projection (fencing).
    #[serde(default)]
    fence: i64,
}

impl From<&CourseDocument> for StoredCourse {
    fn from(doc: &CourseDocument) -> Self {
        StoredCourse {
            id: doc.id.to_string(),
            name: doc.name.clone(),
            description: doc.description.clone(),
            discipline: doc.discipline.clone(),
            teacher: doc.teacher.clone(),
            student_ids: doc.student_ids.iter().map(Uuid::to_string).collect(),
            version: i64::try_from(doc.version).unwrap_or(i64::MAX),
        }
    }
}

impl TryFrom<StoredCourse> for CourseDocument {
    type Error = StoreError;

    fn try_from(stored: StoredCourse) -> Result<Self, StoreError> {
        let uuid = |text: &str| {
            Uuid::parse_str(text)
                .map_err(|_| StoreError::Refused(format!("stored id {text:?} is not a UUID")))
        };
        Ok(CourseDocument {
            id: uuid(&stored.id)?,
            name: stored.name,
            description: stored.description,
            discipline: stored.discipline,
            teacher: stored.teacher,
            student_ids: stored
                .student_ids
                .iter()
                .map(|s| uuid(s))
                .collect::<Result<_, _>>()?,
            version: u64::try_from(stored.version).unwrap_or(0),
        })
    }
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
    courses: Collection<StoredCourse>,
    checkpoints: Collection<StoredCheckpoint>,
    fence: FenceToken,
}

impl MongoCourses {
    /// Connects to the database the URL names (default `school`) and creates the indexes.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = Client::with_uri_str(url).await?;
        let database = client
            .default_database()
            .unwrap_or_else(|| client.database("school"));
        let courses = database.collection::<StoredCourse>("courses");
        // Which courses a student is in, without scanning every course.
        courses
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "student_ids": 1 })
                    .build(),
            )
            .await?;
        Ok(MongoCourses {
            checkpoints: database.collection("projection_checkpoints"),
            courses,
            database,
            fence: FenceToken::default(),
        })
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<CourseDocument>, StoreError> {
        self.courses
            .find_one(doc! { "_id": id.to_string() })
            .await?
            .map(CourseDocument::try_from)
            .transpose()
    }

    /// The documents of `ids` that exist, in id order.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<CourseDocument>, StoreError> {
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let stored: Vec<StoredCourse> = self
            .courses
            .find(doc! { "_id": { "$in": ids } })
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
            .find(filter)
            .sort(doc! { "_id": 1 })
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        stored.into_iter().map(CourseDocument::try_from).collect()
    }
}

impl ProjectionStore for MongoCourses {
    fn projection(&self) -> Projection {
        PROJECTION
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        Ok(self.stored_checkpoint().await?.0)
    }

    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        // Fencing without transactions: a replica whose token is older than the recorded one
        // stops here, before any document write, and the checkpoint update below is
        // conditional on the token too. A replica fenced between the two has written only
        // documents guarded by their versions: the state the live replica writes for the
        // same events, never an older one.
        let token = self.fence.get();
        let (checkpoint, recorded) = self.stored_checkpoint().await?;
        if recorded > token {
            return Err(fenced(recorded, token));
        }
        let fresh: Vec<&(u64, Event)> = batch.iter().filter(|(seq, _)| *seq > checkpoint).collect();
        let mut outcome = BatchOutcome {
            applied: fresh.len(),
            skipped: batch.len() - fresh.len(),
            checkpoint,
        };
        let ids: Vec<String> = fresh
            .iter()
            .map(|(_, e)| e.metadata.aggregate_id.to_string())
            .collect();
        let stored: Vec<StoredCourse> = self
            .courses
            .find(doc! { "_id": { "$in": &ids } })
            .await?
            .try_collect()
            .await?;
        let mut before: HashMap<Uuid, CourseDocument> = HashMap::new();
        for doc in stored {
            let doc = CourseDocument::try_from(doc)?;
            before.insert(doc.id, doc);
        }
        let mut after: HashMap<Uuid, Option<CourseDocument>> = HashMap::new();
        for (sequence, event) in fresh {
            let id = event.metadata.aggregate_id;
            let current = match after.remove(&id) {
                Some(current) => current,
                None => before.get(&id).cloned(),
            };
            after.insert(
                id,
                course_document::fold(current, id, *sequence, &event.payload),
            );
        }
        for (id, document) in after {
            match document {
                Some(doc) if before.get(&id).is_some_and(|b| b.version >= doc.version) => {}
                Some(doc) => {
                    let version = i64::try_from(doc.version).unwrap_or(i64::MAX);
                    let result = self
                        .courses
                        .replace_one(
                            doc! { "_id": id.to_string(), "version": { "$lt": version } },
                            StoredCourse::from(&doc),
                        )
                        .upsert(true)
                        .await;
                    match result {
                        Ok(_) => {}
                        // A newer version is stored already: this write was applied before.
                        Err(error) if is_duplicate_key(&error) => {}
                        Err(error) => return Err(error.into()),
                    }
                }
                None => {
                    if before.contains_key(&id) {
                        self.courses
                            .delete_one(doc! { "_id": id.to_string() })
                            .await?;
                    }
                }
            }
        }
        if through_sequence > checkpoint {
            outcome.checkpoint = through_sequence;
            let written = self
                .checkpoints
                .update_one(
                    checkpoint_fenced_at_most(token),
                    doc! {
                        "$max": { "last_sequence": to_db(through_sequence) },
                        "$set": { "fence": to_db(token) },
                    },
                )
                .upsert(true)
                .await;
            match written {
                Ok(_) => {}
                // The filter missed an existing checkpoint: it records a newer token.
                Err(error) if is_duplicate_key(&error) => {
                    let (_, recorded) = self.stored_checkpoint().await?;
                    return Err(fenced(recorded, token));
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(outcome)
    }

    async fn claim(&self, token: u64) -> Result<(), StoreError> {
        let claimed = self
            .checkpoints
            .update_one(
                checkpoint_fenced_at_most(token),
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
                let (_, recorded) = self.stored_checkpoint().await?;
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

/// The checkpoint document, if the token it records is at most `token` (a checkpoint
/// written before fencing existed records none).
fn checkpoint_fenced_at_most(token: u64) -> mongodb::bson::Document {
    doc! {
        "_id": PROJECTION.as_str(),
        "$or": [ { "fence": { "$lte": to_db(token) } }, { "fence": { "$exists": false } } ],
    }
}

fn to_db(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

impl MongoCourses {
    /// `(checkpoint, recorded lease token)`; `(0, 0)` before the first batch.
    async fn stored_checkpoint(&self) -> Result<(u64, u64), StoreError> {
        let stored = self
            .checkpoints
            .find_one(doc! { "_id": PROJECTION.as_str() })
            .await?;
        Ok(stored.map_or((0, 0), |c| {
            (
                u64::try_from(c.last_sequence).unwrap_or(0),
                u64::try_from(c.fence).unwrap_or(0),
            )
        }))
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    matches!(
        &*error.kind,
        ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY
    )
}
