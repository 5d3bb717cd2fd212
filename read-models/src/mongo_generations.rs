//! Generations of the MongoDB course store, for `stream-admin replay`: the next generation
//! is the collection `courses__next` (checkpoint `_id` "courses__next"), filled by the same
//! `apply_batch`, and switched in by `renameCollection … dropTarget: true`, which replaces
//! the live collection atomically: readers see the old collection or the new one, never
//! none.
//!
//! MongoDB has no transaction here to pause the live projection with (Postgres locks the
//! checkpoint row), so the switch pauses it through the live checkpoint document: it sets
//! `pause` (a value of its own) and moves `epoch` on. A live batch reads that document first
//! and, paused, writes nothing and is retried; a batch already past that read when the pause
//! began fails its checkpoint write (the epoch it read is gone) and is retried on whichever
//! collection is live by then. Such a batch may still have written records past the switch
//! position into the live collection: the comparison leaves those records out on both
//! sides (`SwitchReport::uncompared`), and the retried batch rewrites them.
//!
//! A pause left by a replay that died expires: a projection ignores (and clears) a pause
//! it has been seeing for 60 s by its own clock. The switch therefore renames only within
//! [`SWITCH_DEADLINE`] of setting it, by the replay's own clock (no clock comparison).

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use uuid::Uuid;

use crate::generation::Generation;
use crate::mongo_courses::MongoCourses;
use crate::rebuild::{
    AggregateHistory, Fingerprint, GenerationSwitch, Rebuildable, SwitchError, SwitchReport,
};
use crate::store::{ProjectionStore, StoreError};

/// The collection holding the checkpoints of every generation.
const CHECKPOINTS: &str = "projection_checkpoints";
/// How long a batch already in flight when the pause began gets to finish its writes before
/// the switch reads the live checkpoint (it cannot commit its checkpoint either way).
const SETTLE: Duration = Duration::from_millis(500);
/// The rename happens within this long of setting the pause, or not at all; a projection
/// ignores a pause after 60 s of seeing it.
pub const SWITCH_DEADLINE: Duration = Duration::from_secs(40);
const OLD_SUFFIX: &str = "__old";
/// Records copied per insert when `--keep-old` keeps the old generation.
const COPY_CHUNK: usize = 1_000;

impl Rebuildable for MongoCourses {
    type Switch = MongoSwitch;

    fn next_generation(&self) -> Self {
        self.generation(Generation::Next)
    }

    async fn prepare_next(&self) -> Result<bool, StoreError> {
        let next = self.generation(Generation::Next);
        let database = next.database();
        let name = next.courses_collection_name();
        let existing = database.list_collection_names().await?;
        if existing.iter().any(|c| c.as_str() == name) {
            return Ok(true);
        }
        next.create_indexes().await?;
        checkpoints(&next)
            .delete_one(doc! { "_id": next.checkpoint_id() })
            .await?;
        Ok(false)
    }

    async fn drop_next(&self) -> Result<(), StoreError> {
        let next = self.generation(Generation::Next);
        next.database()
            .collection::<Document>(next.courses_collection_name())
            .drop()
            .await
            .or_else(ignore_namespace_not_found)?;
        checkpoints(&next)
            .delete_one(doc! { "_id": next.checkpoint_id() })
            .await?;
        Ok(())
    }

    async fn begin_switch(&self) -> Result<MongoSwitch, StoreError> {
        let live = self.generation(Generation::Live);
        let pause = format!("replay {}", Uuid::new_v4());
        let paused_at = Instant::now();
        let set = checkpoints(&live)
            .update_one(
                doc! { "_id": live.checkpoint_id(), "pause": { "$exists": false } },
                doc! {
                    "$set": { "pause": &pause },
                    "$inc": { "epoch": 1_i64 },
                    "$setOnInsert": { "last_sequence": 0_i64 },
                },
            )
            .upsert(true)
            .await;
        match set {
            Ok(_) => {}
            Err(error) if is_duplicate_key(&error) => {
                return Err(StoreError::Unavailable(
                    "another switch holds the courses projection's pause (a replay running \
                     elsewhere, or one that died: its pause expires 60 s after it was set)"
                        .into(),
                ));
            }
            Err(error) => return Err(error.into()),
        }
        tokio::time::sleep(SETTLE).await;
        let live_checkpoint = match live.checkpoint().await {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                unpause(&live, &pause).await;
                return Err(error);
            }
        };
        Ok(MongoSwitch {
            live,
            pause,
            paused_at,
            live_checkpoint,
        })
    }

    async fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: impl AggregateHistory,
    ) -> Result<usize, StoreError> {
        MongoCourses::rebuild_aggregate(self, id, history).await
    }
}

/// A MongoDB switch in progress: the live projection is paused at `live_checkpoint`.
pub struct MongoSwitch {
    live: MongoCourses,
    pause: String,
    paused_at: Instant,
    live_checkpoint: u64,
}

impl GenerationSwitch for MongoSwitch {
    fn live_checkpoint(&self) -> u64 {
        self.live_checkpoint
    }

    async fn finish(self, force: bool, keep_old: bool) -> Result<SwitchReport, SwitchError> {
        let result = self.switch(force, keep_old).await;
        if result.is_err() {
            unpause(&self.live, &self.pause).await;
        }
        result
    }

    async fn abort(self) {
        unpause(&self.live, &self.pause).await;
    }
}

impl MongoSwitch {
    async fn switch(&self, force: bool, keep_old: bool) -> Result<SwitchReport, SwitchError> {
        let live = &self.live;
        let next = live.generation(Generation::Next);
        let position = self.live_checkpoint;
        let next_checkpoint = next.checkpoint().await?;
        if next_checkpoint != position {
            return Err(SwitchError::NotCaughtUp {
                next: next_checkpoint,
                live: position,
            });
        }
        let database = live.database();
        let live_name = live.courses_collection_name();
        let next_name = next.courses_collection_name();
        let live_records = records(live, live_name).await?;
        let next_records = records(live, next_name).await?;
        // Written past the switch position by a batch in flight when the pause began.
        let ahead: HashSet<String> = live_records
            .iter()
            .filter(|r| r.version > position)
            .map(|r| r.id.clone())
            .collect();
        let live_print = fingerprint(&live_records, &ahead);
        let next_print = fingerprint(&next_records, &ahead);
        if live_print != next_print && !force {
            return Err(SwitchError::Mismatch {
                live: live_print,
                next: next_print,
            });
        }
        let old_name = format!("{live_name}{OLD_SUFFIX}");
        if keep_old {
            copy_collection(live, live_name, &old_name).await?;
        }
        if self.paused_at.elapsed() > SWITCH_DEADLINE {
            return Err(StoreError::Unavailable(format!(
                "the switch took longer than {} s, so its pause may expire under the rename; \
                 nothing was switched: rerun the replay (it resumes)",
                SWITCH_DEADLINE.as_secs()
            ))
            .into());
        }
        let db = database.name();
        live.database()
            .client()
            .database("admin")
            .run_command(doc! {
                "renameCollection": format!("{db}.{next_name}"),
                "to": format!("{db}.{live_name}"),
                "dropTarget": true,
            })
            .await
            .map_err(StoreError::from)?;
        checkpoints(live)
            .delete_one(doc! { "_id": next.checkpoint_id() })
            .await
            .map_err(StoreError::from)?;
        if !unpause(live, &self.pause).await {
            return Err(StoreError::Refused(
                "the new generation is live, but the projection resumed before the switch \
                 completed (the pause expired): run the replay again to be sure it holds \
                 every event"
                    .into(),
            )
            .into());
        }
        Ok(SwitchReport {
            position,
            live: live_print,
            next: next_print,
            kept_old: keep_old,
            uncompared: ahead.len() as u64,
        })
    }
}

/// A stored record as the comparison sees it: the bookkeeping (`rev`) left out.
struct Record {
    id: String,
    version: u64,
    deleted: bool,
    content: String,
}

/// Every record of `collection`, in id order.
async fn records(store: &MongoCourses, collection: &str) -> Result<Vec<Record>, StoreError> {
    let documents: Vec<Document> = store
        .database()
        .collection::<Document>(collection)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await?
        .try_collect()
        .await?;
    Ok(documents.iter().map(record).collect())
}

fn record(document: &Document) -> Record {
    let number = |value: Option<&Bson>| match value {
        Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    let mut fields: Vec<String> = document
        .iter()
        .filter(|(key, _)| key.as_str() != "rev")
        .map(|(key, value)| format!("{key}={}", canonical(value)))
        .collect();
    fields.sort();
    Record {
        id: match document.get("_id") {
            Some(Bson::String(id)) => id.clone(),
            other => format!("{other:?}"),
        },
        version: number(document.get("version")),
        deleted: matches!(document.get("deleted"), Some(Bson::Boolean(true))),
        content: fields.join("|"),
    }
}

/// A value's text, with integers of either width alike (a server may narrow an Int64).
fn canonical(value: &Bson) -> String {
    match value {
        Bson::Int32(n) => i64::from(*n).to_string(),
        Bson::Int64(n) => n.to_string(),
        Bson::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// Count and checksum of the documents (tombstones are bookkeeping: a store written before
/// they existed has none), leaving out the ids in `left_out`.
fn fingerprint(records: &[Record], left_out: &HashSet<String>) -> Fingerprint {
    let mut rows = 0_i64;
    let mut sum = 0_u64;
    for record in records
        .iter()
        .filter(|r| !r.deleted && !left_out.contains(&r.id))
    {
        rows += 1;
        let mut hasher = DefaultHasher::new();
        record.content.hash(&mut hasher);
        sum = sum.wrapping_add(hasher.finish());
    }
    Fingerprint {
        rows,
        checksum: format!("{sum:016x}"),
    }
}

/// Replaces `to` by a copy of `from` (the old generation `--keep-old` keeps).
async fn copy_collection(store: &MongoCourses, from: &str, to: &str) -> Result<(), StoreError> {
    let database = store.database();
    let target = database.collection::<Document>(to);
    target.drop().await.or_else(ignore_namespace_not_found)?;
    let mut cursor = database.collection::<Document>(from).find(doc! {}).await?;
    let mut chunk = Vec::with_capacity(COPY_CHUNK);
    while let Some(document) = cursor.try_next().await? {
        chunk.push(document);
        if chunk.len() == COPY_CHUNK {
            target.insert_many(std::mem::take(&mut chunk)).await?;
        }
    }
    if !chunk.is_empty() {
        target.insert_many(chunk).await?;
    } else {
        database.create_collection(to).await.or_else(|error| {
            // Created by the last chunk's insert already.
            if command_code(&error) == Some(NAMESPACE_EXISTS) {
                Ok(())
            } else {
                Err(error)
            }
        })?;
    }
    Ok(())
}

/// Lifts the pause `pause` (only that one) and moves the epoch on; `false` when the pause
/// was no longer there (a projection cleared it as expired).
async fn unpause(live: &MongoCourses, pause: &str) -> bool {
    let lifted = checkpoints(live)
        .update_one(
            doc! { "_id": live.checkpoint_id(), "pause": pause },
            doc! { "$unset": { "pause": "" }, "$inc": { "epoch": 1_i64 } },
        )
        .await;
    match lifted {
        Ok(result) => result.matched_count == 1,
        Err(error) => {
            tracing::warn!(%error, "lifting the switch's pause failed; it expires after 60 s");
            false
        }
    }
}

fn checkpoints(store: &MongoCourses) -> mongodb::Collection<Document> {
    store.database().collection(CHECKPOINTS)
}

const NAMESPACE_NOT_FOUND: i32 = 26;
const NAMESPACE_EXISTS: i32 = 48;

fn command_code(error: &mongodb::error::Error) -> Option<i32> {
    match &*error.kind {
        ErrorKind::Command(command) => Some(command.code),
        _ => None,
    }
}

fn ignore_namespace_not_found(error: mongodb::error::Error) -> Result<(), mongodb::error::Error> {
    if command_code(&error) == Some(NAMESPACE_NOT_FOUND) {
        Ok(())
    } else {
        Err(error)
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    matches!(
        &*error.kind,
        ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == 11000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(id: &str, version: i64, name: &str) -> Document {
        doc! { "_id": id, "name": name, "student_ids": ["b", "a"], "version": version, "rev": 7_i64 }
    }

    #[test]
    fn the_fingerprint_ignores_revisions_integer_widths_and_left_out_ids() {
        let a = [
            record(&stored("1", 5, "Algebra")),
            record(&stored("2", 9, "Logic")),
        ];
        let mut narrowed = stored("1", 5, "Algebra");
        narrowed.insert("version", 5_i32);
        narrowed.insert("rev", 99_i64);
        let b = [record(&narrowed), record(&stored("2", 9, "Logic"))];
        let none = HashSet::new();
        assert_eq!(fingerprint(&a, &none), fingerprint(&b, &none));
        assert_eq!(fingerprint(&a, &none).rows, 2);
        let renamed = [
            record(&stored("1", 5, "Algebra")),
            record(&stored("2", 9, "Logik")),
        ];
        assert_ne!(fingerprint(&a, &none), fingerprint(&renamed, &none));
        let left_out: HashSet<String> = ["2".to_owned()].into();
        assert_eq!(fingerprint(&a, &left_out), fingerprint(&renamed, &left_out));
        assert_eq!(fingerprint(&a, &left_out).rows, 1);
    }

    #[test]
    fn tombstones_are_not_counted() {
        let mut tombstone = doc! { "_id": "3", "deleted": true, "version": 12_i64 };
        let with = [record(&stored("1", 5, "Algebra")), record(&tombstone)];
        let without = [record(&stored("1", 5, "Algebra"))];
        assert_eq!(
            fingerprint(&with, &HashSet::new()),
            fingerprint(&without, &HashSet::new())
        );
        tombstone.insert("deleted", false);
        assert_ne!(
            fingerprint(
                &[record(&stored("1", 5, "Algebra")), record(&tombstone)],
                &HashSet::new()
            ),
            fingerprint(&without, &HashSet::new())
        );
    }
}
