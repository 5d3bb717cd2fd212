//! Loads aggregate state from the event stream, through an in-memory cache.
//!
//! A stale cache entry is safe: every append expects the version the decision read, so a
//! decision made on stale state fails with a conflict, and the retry catches the entry up
//! from the stream (reading only the events after its version).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use events::AggregateKind;

use crate::domain::{AggregateId, CourseState, Snapshot, StudentState, course, student};
use crate::event_store::{EventStore, LoadError, ReadFrom};

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
    cache: Mutex<Bounded<Entry>>,
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
        Aggregates {
            store,
            cache: Mutex::new(Bounded::new(CACHE_CAPACITY)),
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
        });
        for (sequence, payload) in self.store.load(id, entry.version, from).await? {
            entry.state = match entry.state {
                State::Student(state) => State::Student(student::evolve(state, &payload)),
                State::Course(state) => State::Course(course::evolve(state, &payload)),
            };
            entry.version = sequence;
        }
        Ok(entry)
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
