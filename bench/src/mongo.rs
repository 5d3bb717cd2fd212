//! The courses projection into MongoDB, next to its raw ceiling on the same server in the
//! same run. Measured only when a server is named (`--mongodb-url`, default `MONGODB_URL`):
//! no MongoDB can be installed on these machines, and `scripts/dev bench` passes the
//! wire-protocol stand-in's URL, whose figures say so in the row's name.
//!
//! The system: `read_models::CourseStore` (the projectors' own store code) applying a backlog
//! of course events (creations and enrollments) through `ProjectionStore::apply_batch`, in
//! batches of [`crate::figures::PROJECTOR_BATCH`] (the projector's default; 250 under `--tiny`) with the
//! checkpoint, as the projector does. No broker: the Postgres projection row measures
//! delivery; this row measures the store.
//!
//! The ceiling: the documents each of those batches leaves behind (folded in memory before
//! the clock starts), written with one unordered bulk upsert per batch (the `update` command,
//! one `upsert: true` statement per document, `ordered: false`): the least work MongoDB can
//! do to hold the same state after each batch. Its rate is counted in the events whose
//! documents it writes, so both sides compare as events/s.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{Context, bail};
use events::{AggregateKind, CourseDetails, Enrollment, Event, EventPayload};
use mongodb::bson::{Bson, Document, doc};
use read_models::course_document::{self, CourseDocument};
use read_models::{CourseStore, ProjectionStore};
use uuid::Uuid;

use crate::figures::Run;
use crate::load::histogram;
use crate::world;

/// What the row is called after, and what the report says about the server.
#[derive(Clone, Debug, Default)]
pub struct Server {
    /// The MongoDB wire-protocol stand-in (`../shared/mongo-standin`), not MongoDB.
    pub stand_in: bool,
    /// `buildInfo`'s `version` and `gitVersion`.
    pub version: String,
}

/// Course events of a run unless `--mongo-events` says otherwise: on MongoDB, and on the
/// stand-in, which writes a few hundred documents a second and slows down as its collection
/// grows (measured 2026-12-03: 270 events/s on 1 000 events, 130/s on 2 000).
pub const EVENTS: usize = 20_000;
pub const STAND_IN_EVENTS: usize = 2_000;

/// Every run of the MongoDB row.
#[derive(Default)]
pub struct MongoFigures {
    pub projection: Vec<Run>,
    pub ceiling: Vec<Run>,
    pub server: Server,
    pub notes: Vec<String>,
    /// Events and batch size of the runs.
    pub events: usize,
    pub batch: usize,
}

impl MongoFigures {
    pub fn measured(&self) -> bool {
        !self.projection.is_empty()
    }

    /// The row's figure, naming the stand-in as such.
    pub fn figure(&self) -> String {
        let server = if self.server.stand_in {
            "(stand-in, not a MongoDB figure)".to_owned()
        } else {
            format!("(MongoDB {})", self.server.version)
        };
        format!(
            "courses projection into MongoDB {server}: CourseStore::apply_batch, {} course \
             events (creations + enrollments) in batches of {}",
            self.events, self.batch
        )
    }

    pub fn push(&mut self, runs: MongoRuns) {
        self.server = runs.server;
        self.events = runs.events;
        self.batch = runs.batch;
        self.projection.push(runs.projection);
        self.ceiling.push(runs.ceiling);
        self.notes.push(runs.note);
    }
}

/// One run: the projection and its ceiling on one fresh database.
pub struct MongoRuns {
    pub projection: Run,
    pub ceiling: Run,
    pub server: Server,
    pub note: String,
    pub events: usize,
    pub batch: usize,
}

/// The ceiling's name in the table.
pub const CEILING: &str = "bulk upsert of the same documents, unordered, same server, same run";

/// What BENCHMARKS.md says about the row.
pub const REPORT_TEXT: &str = "the courses projection's store code \
    (read_models::CourseStore, as the projectors run it) applying a backlog of course events \
    (a creation, then four enrollments into courses created so far, for every fifth event) \
    with ProjectionStore::apply_batch, in batches of the projector's size with the \
    checkpoint; no broker. Its ceiling writes the documents each batch leaves behind \
    (folded before the clock starts) with one unordered bulk upsert per batch (the update \
    command, ordered: false), on the same server in the same run, counted in the events \
    whose documents it writes. p50/p99: per batch. The server runs on the same machine.";

/// Measures one run on a database of its own on the server `url` names (dropped after):
/// `events` course events (default [`EVENTS`], [`STAND_IN_EVENTS`] on the stand-in) in
/// batches of `batch`. `stand_in`: the caller knows it is the stand-in (`scripts/dev` says
/// so); the server's `buildInfo` is asked as well.
pub async fn courses_projection(
    url: &str,
    events: Option<usize>,
    batch: usize,
    stand_in: bool,
) -> anyhow::Result<MongoRuns> {
    if !url.starts_with("mongodb://") && !url.starts_with("mongodb+srv://") {
        bail!("--mongodb-url must be a mongodb:// URL");
    }
    let database = format!("bench_{}", test_support::unique_suffix());
    let url = test_support::mongo::with_database(url, &database);
    let client = mongodb::Client::with_uri_str(&url)
        .await
        .context("connecting to the MongoDB of --mongodb-url")?;
    let db = client.database(&database);
    let server = server(&db, stand_in).await?;
    let events = events.unwrap_or(if server.stand_in {
        STAND_IN_EVENTS
    } else {
        EVENTS
    });
    let result = measure(&url, &db, events, batch.max(1), server).await;
    // Best effort: a leftover database only costs disk.
    let _ = db.drop().await;
    result
}

async fn server(db: &mongodb::Database, stand_in: bool) -> anyhow::Result<Server> {
    let info = db
        .run_command(doc! { "buildInfo": 1 })
        .await
        .context("buildInfo on the MongoDB of --mongodb-url")?;
    let version = info.get_str("version").unwrap_or("?").to_owned();
    let git = info.get_str("gitVersion").unwrap_or("?").to_owned();
    // A MongoDB build names its commit (40 hex digits); the stand-in names itself.
    let stand_in = stand_in || git.contains("mongoeco");
    Ok(Server {
        stand_in,
        version: format!("{version}, gitVersion {git}"),
    })
}

async fn measure(
    url: &str,
    db: &mongodb::Database,
    events: usize,
    batch_size: usize,
    server: Server,
) -> anyhow::Result<MongoRuns> {
    let backlog = course_events(events);
    let store = CourseStore::connect(url)
        .await
        .context("CourseStore::connect on --mongodb-url")?;

    // The system: the store's own batches, checkpoint included.
    let mut latencies = histogram();
    let cpu = world::own_cpu_seconds();
    let started = Instant::now();
    for batch in backlog.chunks(batch_size) {
        let through = batch.last().map_or(0, |(sequence, _)| *sequence);
        let sent = Instant::now();
        store
            .apply_batch(batch, through)
            .await
            .with_context(|| format!("apply_batch through {through}"))?;
        latencies.saturating_record(sent.elapsed().as_micros() as u64);
    }
    let seconds = started.elapsed().as_secs_f64();
    let projection = Run {
        rate: backlog.len() as f64 / seconds,
        p50_ms: latencies.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
        system_cpu: world::own_cpu_seconds() - cpu,
        ..Run::default()
    };
    let last = backlog.last().map_or(0, |(sequence, _)| *sequence);
    let checkpoint = store.checkpoint().await?;
    if checkpoint != last {
        bail!("the course store's checkpoint is {checkpoint} after the backlog through {last}");
    }

    // The ceiling: the same documents, one unordered bulk upsert per batch.
    let writes = documents_per_batch(&backlog, batch_size);
    let collection = "courses_ceiling";
    let mut latencies = histogram();
    let cpu = world::own_cpu_seconds();
    let started = Instant::now();
    for documents in &writes {
        let updates: Vec<Document> = documents
            .iter()
            .map(|d| doc! { "q": { "_id": d.get_str("_id").unwrap_or_default() }, "u": d.clone(), "upsert": true })
            .collect();
        let sent = Instant::now();
        let reply = db
            .run_command(doc! { "update": collection, "updates": updates, "ordered": false })
            .await
            .context("bulk upsert (update command)")?;
        latencies.saturating_record(sent.elapsed().as_micros() as u64);
        if let Ok(errors) = reply.get_array("writeErrors")
            && !errors.is_empty()
        {
            bail!(
                "the bulk upsert reported {} write errors: {:?}",
                errors.len(),
                errors.first()
            );
        }
    }
    let ceiling_seconds = started.elapsed().as_secs_f64();
    let ceiling = Run {
        rate: backlog.len() as f64 / ceiling_seconds,
        p50_ms: latencies.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
        system_cpu: world::own_cpu_seconds() - cpu,
        ..Run::default()
    };

    let courses = db
        .collection::<Document>(collection)
        .count_documents(doc! {})
        .await?;
    let projected = store.list(None, 1).await?.len();
    if projected == 0 || courses == 0 {
        bail!("no course documents after the run (projection {projected}, ceiling {courses})");
    }
    let written: usize = writes.iter().map(Vec::len).sum();
    let note = format!(
        "{} events in {:.2} s, ceiling {:.2} s: {courses} courses, {written} document writes in \
         {} batches",
        backlog.len(),
        seconds,
        ceiling_seconds,
        writes.len()
    );
    Ok(MongoRuns {
        projection,
        ceiling,
        server,
        note,
        events,
        batch: batch_size,
    })
}

/// `events` course events at stream sequences 1…: every fifth a course creation, the others
/// enrollments of new students into courses created so far (spread over old and new ones,
/// so a batch reads documents of earlier batches and writes each of its courses once).
pub fn course_events(events: usize) -> Vec<(u64, Event)> {
    let mut courses: Vec<Uuid> = Vec::with_capacity(events / 5 + 1);
    let mut out = Vec::with_capacity(events);
    for i in 0..events {
        let event = if i % 5 == 0 {
            let id = Uuid::now_v7();
            courses.push(id);
            course_event(
                id,
                EventPayload::CourseCreated(CourseDetails {
                    name: format!("Course {}", courses.len()),
                    description: "A course of the benchmark".into(),
                    discipline: "Benchmarks".into(),
                    teacher: "Bench Teacher".into(),
                }),
            )
        } else {
            // A multiplicative spread over the courses made so far (deterministic).
            let course_id = courses[(i * 7919) % courses.len()];
            course_event(
                course_id,
                EventPayload::StudentEnrolled(Enrollment {
                    student_id: Uuid::now_v7(),
                    course_id,
                }),
            )
        };
        out.push((i as u64 + 1, event));
    }
    out
}

fn course_event(id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Course, id, payload)
}

/// For each batch of `batch_size`, the documents it leaves behind (each course it touched,
/// folded through the batch), shaped as the course store keeps them.
fn documents_per_batch(backlog: &[(u64, Event)], batch_size: usize) -> Vec<Vec<Document>> {
    let mut state: HashMap<Uuid, CourseDocument> = HashMap::new();
    backlog
        .chunks(batch_size)
        .map(|batch| {
            let mut touched = BTreeMap::new();
            for (sequence, event) in batch {
                let id = event.metadata.aggregate_id;
                let folded =
                    course_document::fold(state.remove(&id), id, *sequence, &event.payload);
                if let Some(doc) = folded {
                    touched.insert(id, ());
                    state.insert(id, doc);
                }
            }
            touched
                .keys()
                .filter_map(|id| state.get(id))
                .map(stored)
                .collect()
        })
        .collect()
}

/// A course document as BSON: ids as canonical text, the version as Int64.
fn stored(doc: &CourseDocument) -> Document {
    let student_ids: Vec<Bson> = doc
        .student_ids
        .iter()
        .map(|s| Bson::String(s.to_string()))
        .collect();
    doc! {
        "_id": doc.id.to_string(),
        "name": &doc.name,
        "description": &doc.description,
        "discipline": &doc.discipline,
        "teacher": &doc.teacher,
        "student_ids": student_ids,
        "version": i64::try_from(doc.version).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::figures::PROJECTOR_BATCH;

    #[test]
    fn the_backlog_creates_every_fifth_event_and_enrolls_into_existing_courses() {
        let backlog = course_events(2_500);
        assert_eq!(backlog.len(), 2_500);
        assert_eq!(backlog.first().map(|(s, _)| *s), Some(1));
        let creations = backlog
            .iter()
            .filter(|(_, e)| matches!(e.payload, EventPayload::CourseCreated(_)))
            .count();
        assert_eq!(creations, 500);
        // Every enrollment names a course created before it, as its own aggregate.
        let mut created = std::collections::HashSet::new();
        for (_, event) in &backlog {
            match &event.payload {
                EventPayload::CourseCreated(_) => {
                    created.insert(event.metadata.aggregate_id);
                }
                EventPayload::StudentEnrolled(e) => {
                    assert_eq!(e.course_id, event.metadata.aggregate_id);
                    assert!(created.contains(&e.course_id));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Batches write each course they touch once, and the last state has every course.
        let writes = documents_per_batch(&backlog, PROJECTOR_BATCH);
        assert_eq!(writes.len(), 3);
        let students: usize = writes
            .last()
            .into_iter()
            .flatten()
            .map(|d| d.get_array("student_ids").map_or(0, Vec::len))
            .sum();
        assert!(students > 0);
        for batch in &writes {
            let mut ids: Vec<&str> = batch.iter().filter_map(|d| d.get_str("_id").ok()).collect();
            let n = ids.len();
            ids.dedup();
            assert_eq!(ids.len(), n);
        }
    }
}
