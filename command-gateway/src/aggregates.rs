//! Loads aggregate state from the event stream, through an in-memory cache.
//!
//! A stale cache entry is safe: every append expects the version the decision read, so a
//! decision made on stale state fails with a conflict, and the retry catches the entry up
//! from the stream (reading only the events after its version).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use events::AggregateKind;

use crate::domain::{AggregateId, CourseState, Snapshot, StudentState, course, student};
use crate::event_store::{EventStore, LoadError};

/// Entries kept before the cache starts evicting.
const CACHE_CAPACITY: usize = 100_000;

#[derive(Clone)]
enum State {
    Student(StudentState),
    Course(CourseState),
}

#[derive(Clone)]
struct Entry {
    version: u64,
    state: State,
}

/// Aggregate states and versions, as the command side reads them.
pub struct Aggregates {
    store: EventStore,
    cache: Mutex<HashMap<AggregateId, Entry>>,
}

impl Aggregates {
    pub fn new(store: EventStore) -> Self {
        Aggregates {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Puts the current state and version of each of `ids` into `snapshot` and `versions`.
    /// With `refresh`, cached entries are first caught up with the stream.
    pub async fn load(
        &self,
        ids: &[AggregateId],
        refresh: bool,
        snapshot: &mut Snapshot,
        versions: &mut BTreeMap<AggregateId, u64>,
    ) -> Result<(), LoadError> {
        for &id in ids {
            if versions.contains_key(&id) {
                continue;
            }
            let cached = self.cached(id);
            let entry = match cached {
                Some(entry) if !refresh => entry,
                cached => {
                    let entry = self.catch_up(id, cached).await?;
                    self.remember(id, entry.clone());
                    entry
                }
            };
            versions.insert(id, entry.version);
            match entry.state {
                State::Student(state) => {
                    snapshot.students.insert(id.id, state);
                }
                State::Course(state) => {
                    snapshot.courses.insert(id.id, state);
                }
            }
        }
        Ok(())
    }

    /// Records states after a successful append, so the next command needs no read.
    pub fn remember_all(&self, snapshot: &Snapshot, versions: &BTreeMap<AggregateId, u64>) {
        for (&id, &version) in versions {
            let state = match id.kind {
                AggregateKind::Student => State::Student(snapshot.student(id.id).clone()),
                AggregateKind::Course => State::Course(snapshot.course(id.id).clone()),
            };
            self.remember(id, Entry { version, state });
        }
    }

    fn cached(&self, id: AggregateId) -> Option<Entry> {
        self.cache.lock().ok()?.get(&id).cloned()
    }

    fn remember(&self, id: AggregateId, entry: Entry) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        // Never move an entry backwards (a slower request may remember older state).
        if cache
            .get(&id)
            .is_some_and(|old| old.version > entry.version)
        {
            return;
        }
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(&id) {
            // Crude but bounded: evict an arbitrary entry; a miss costs one catch-up read.
            if let Some(victim) = cache.keys().next().copied() {
                cache.remove(&victim);
            }
        }
        cache.insert(id, entry);
    }

    async fn catch_up(&self, id: AggregateId, cached: Option<Entry>) -> Result<Entry, LoadError> {
        let mut entry = cached.unwrap_or(Entry {
            version: 0,
            state: match id.kind {
                AggregateKind::Student => State::Student(StudentState::Absent),
                AggregateKind::Course => State::Course(CourseState::Absent),
            },
        });
        for (sequence, payload) in self.store.load(id, entry.version).await? {
            entry.state = match entry.state {
                State::Student(state) => State::Student(student::evolve(state, &payload)),
                State::Course(state) => State::Course(course::evolve(state, &payload)),
            };
            entry.version = sequence;
        }
        Ok(entry)
    }
}
