//! Loads aggregate state from the event stream, through an in-memory cache.
//!
//! A stale cache entry is safe: every append expects the version the decision read, so a
//! decision made on stale state fails with a conflict, and the retry catches the entry up
//! from the stream (reading only the events after its version).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use events::personal::DataKeyRef;
use events::{AggregateKind, Event};
use service_kit::data_keys::EVERY_BLOCK;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::domain::{AggregateId, CourseState, Snapshot, StudentState, course, student};
use crate::event_store::{AppendError, EventStore, LoadError, ReadFrom};

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
    /// A student's data key (`None` for courses and students written before sealing).
    key: Option<DataKeyRef>,
}

/// Aggregate states and versions, as the command side reads them.
///
/// A student's state holds its names: when its key block is rewritten (an erasure, here or
/// in another gateway), every cached student whose key is in that block is dropped, so no
/// gateway keeps an erased student's names in memory past the moment the key bucket's
/// watch delivers the rewrite.
pub struct Aggregates {
    store: EventStore,
    cache: Arc<Mutex<Bounded<Entry>>>,
    forget_rewritten: tokio::task::JoinHandle<()>,
}

impl Drop for Aggregates {
    fn drop(&mut self) {
        self.forget_rewritten.abort();
    }
}

/// A map that, when full, forgets the entry inserted first: a forgotten aggregate costs one
/// catch-up read. (Evicting "any" key by taking the map's first one made every insert scan
/// the ever emptier front of the table once the cache was full: 3 % of the gateway's CPU.)
struct Bounded<V> {
    capacity: usize,
    entries: HashMap<AggregateId, V>,
    /// Keys in insertion order, each once.
    order: VecDeque<AggregateId>,
}

impl<V> Bounded<V> {
    /// Sized up front: growing a table of this size rehashes every entry while the lock is
    /// held, a stall of milliseconds for every command (untouched pages cost no memory).
    fn new(capacity: usize) -> Self {
        Bounded {
            capacity,
            entries: HashMap::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
        }
    }

    fn get(&self, id: &AggregateId) -> Option<&V> {
        self.entries.get(id)
    }

    fn remove(&mut self, id: &AggregateId) {
        if self.entries.remove(id).is_some() {
            self.order.retain(|other| other != id);
        }
    }

    /// Drops every entry `forget` picks.
    fn forget_where(&mut self, forget: impl Fn(&V) -> bool) {
        self.entries.retain(|_, value| !forget(value));
        let entries = &self.entries;
        self.order.retain(|id| entries.contains_key(id));
    }

    fn insert(&mut self, id: AggregateId, value: V) {
        if !self.entries.contains_key(&id) {
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self.order.pop_front()
            {
                self.entries.remove(&oldest);
            }
            self.order.push_back(id);
        }
        self.entries.insert(id, value);
    }
}

impl Aggregates {
    pub fn new(store: EventStore) -> Self {
        let cache = Arc::new(Mutex::new(Bounded::new(CACHE_CAPACITY)));
        let forget_rewritten = tokio::spawn(forget_rewritten_blocks(
            store.clone(),
            Arc::downgrade(&cache),
        ));
        Aggregates {
            store,
            cache,
            forget_rewritten,
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
                    // A refresh decides answers no append checks: read what the leader has.
                    let from = if refresh {
                        ReadFrom::Leader
                    } else {
                        ReadFrom::AnyReplica
                    };
                    let entry = self.catch_up(id, cached, from).await?;
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

    /// Appends `events` (see [`EventStore::append`]), each student's personal fields sealed
    /// with its data key; answers the sequences and the data key of every student sealed.
    pub async fn append(
        &self,
        events: &[Event],
        versions: &BTreeMap<AggregateId, u64>,
    ) -> Result<(Vec<u64>, BTreeMap<Uuid, DataKeyRef>), AppendError> {
        let mut keys = BTreeMap::new();
        for event in events {
            let student = event.metadata.aggregate_id;
            if event.metadata.aggregate_kind != AggregateKind::Student
                || keys.contains_key(&student)
            {
                continue;
            }
            let id = AggregateId::student(student);
            let key = match self.cached(id) {
                Some(entry) => entry.key,
                // Forgotten since the decision read it (a full cache): read it again.
                None if versions.get(&id).is_some_and(|&v| v > 0) => {
                    self.catch_up(id, None, ReadFrom::AnyReplica)
                        .await
                        .map_err(|e| AppendError::Unavailable(e.to_string()))?
                        .key
                }
                None => None,
            };
            if let Some(key) = key {
                keys.insert(student, key);
            }
        }
        let sequences = self.store.append(events, versions, &mut keys).await?;
        Ok((sequences, keys))
    }

    /// Records states after a successful append, so the next command needs no read; `keys`
    /// are the students' data keys the append sealed with.
    pub fn remember_all(
        &self,
        snapshot: &Snapshot,
        versions: &BTreeMap<AggregateId, u64>,
        keys: &BTreeMap<Uuid, DataKeyRef>,
    ) {
        for (&id, &version) in versions {
            let (state, key) = match id.kind {
                AggregateKind::Student => (
                    State::Student(snapshot.student(id.id).clone()),
                    keys.get(&id.id)
                        .copied()
                        .or_else(|| self.cached(id).and_then(|entry| entry.key)),
                ),
                AggregateKind::Course => (State::Course(snapshot.course(id.id).clone()), None),
            };
            self.remember(
                id,
                Entry {
                    version,
                    state,
                    key,
                },
            );
        }
    }

    /// Destroys every data key the student's events were sealed with (usually one; a
    /// student written before sealing got its key with its first update), read from the
    /// stream leader. Idempotent.
    pub async fn destroy_student_keys(&self, student: Uuid) -> Result<(), String> {
        let id = AggregateId::student(student);
        let loaded = self
            .store
            .load(id, 0, ReadFrom::Leader)
            .await
            .map_err(|e| e.to_string())?;
        let keys: std::collections::BTreeSet<DataKeyRef> =
            loaded.iter().filter_map(|event| event.key).collect();
        if !keys.is_empty() {
            let data_keys = self
                .store
                .reader()
                .data_keys()
                .await
                .map_err(|e| format!("the data keys: {e}"))?;
            for key in keys {
                data_keys
                    .destroy(key)
                    .await
                    .map_err(|e| format!("destroying the student's data key: {e}"))?;
            }
        }
        self.forget(id);
        Ok(())
    }

    /// The student's personal fields as they were at `version` (read from the stream
    /// leader); `None` when it was not registered then or its names are erased.
    pub async fn student_details_at(
        &self,
        student: Uuid,
        version: u64,
    ) -> Result<Option<events::StudentDetails>, LoadError> {
        let mut state = StudentState::Absent;
        let loaded = self
            .store
            .load(AggregateId::student(student), 0, ReadFrom::Leader)
            .await?;
        for event in loaded.iter().take_while(|event| event.sequence <= version) {
            state = student::evolve(state, &event.payload);
        }
        // Names are validated non-empty: empty ones are what an erased key reads as.
        Ok(state
            .active()
            .map(|active| active.details.clone())
            .filter(|details| !details.name.is_empty()))
    }

    /// Forgets one aggregate (its state must be read from the stream next time).
    pub fn forget(&self, id: AggregateId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(&id);
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
        cache.insert(id, entry);
    }

    async fn catch_up(
        &self,
        id: AggregateId,
        cached: Option<Entry>,
        from: ReadFrom,
    ) -> Result<Entry, LoadError> {
        let mut entry = cached.unwrap_or(Entry {
            version: 0,
            state: match id.kind {
                AggregateKind::Student => State::Student(StudentState::Absent),
                AggregateKind::Course => State::Course(CourseState::Absent),
            },
            key: None,
        });
        for loaded in self.store.load(id, entry.version, from).await? {
            entry.state = match entry.state {
                State::Student(state) => State::Student(student::evolve(state, &loaded.payload)),
                State::Course(state) => State::Course(course::evolve(state, &loaded.payload)),
            };
            entry.version = loaded.sequence;
            entry.key = loaded.key.or(entry.key);
        }
        Ok(entry)
    }
}

/// Drops the cached students whose key block was rewritten (see [`Aggregates`]), for as
/// long as the cache lives. Waits for the data-key bucket first: a gateway starts before
/// `stream-admin apply` has made it.
async fn forget_rewritten_blocks(store: EventStore, cache: Weak<Mutex<Bounded<Entry>>>) {
    let mut rewritten = loop {
        match store.reader().data_keys().await {
            Ok(keys) => break keys.rewritten_blocks(),
            Err(_) if cache.strong_count() > 0 => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(_) => return,
        }
    };
    loop {
        let block = match rewritten.recv().await {
            Ok(block) => Some(block).filter(|b| *b != EVERY_BLOCK),
            Err(RecvError::Lagged(_)) => None,
            Err(RecvError::Closed) => return,
        };
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if let Ok(mut cache) = cache.lock() {
            cache.forget_where(|entry| match (block, entry.key) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(block), Some(key)) => key.block == block,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn id(n: u128) -> AggregateId {
        AggregateId::student(Uuid::from_u128(n))
    }

    #[test]
    fn a_full_map_forgets_the_entry_inserted_first_and_updates_keep_their_place() {
        let mut map = Bounded::new(3);
        for n in 1..=3 {
            map.insert(id(n), n);
        }
        map.insert(id(1), 10); // an update: nothing is evicted, 1 stays the oldest
        assert_eq!(map.get(&id(1)), Some(&10));
        map.insert(id(4), 4);
        assert_eq!(map.get(&id(1)), None);
        assert_eq!(map.get(&id(2)), Some(&2));
        map.insert(id(5), 5);
        assert_eq!(map.get(&id(2)), None);
        for n in [3, 4, 5] {
            assert_eq!(map.get(&id(n)), Some(&n));
        }
        assert_eq!(map.entries.len(), 3);
        assert_eq!(map.order.len(), 3);
    }
}
