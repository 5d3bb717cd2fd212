//! Per-aggregate locks inside one gateway process.
//!
//! Correctness never depends on them: every append carries the versions it read, so the
//! broker refuses a decision made on stale state, whatever the gateway replicas do. They
//! only stop commands of one replica from racing each other for the same aggregates (100
//! concurrent enrollments into one course would otherwise mostly lose and retry), so those
//! wait in line instead. Locks are taken in sorted order, so two commands never deadlock.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::domain::AggregateId;

#[derive(Default)]
pub struct AggregateLocks {
    table: Mutex<HashMap<AggregateId, Arc<AsyncMutex<()>>>>,
}

/// Held locks; released on drop.
pub struct Held {
    ids: BTreeSet<AggregateId>,
    _guards: Vec<OwnedMutexGuard<()>>,
}

impl Held {
    /// Whether these locks cover every aggregate in `ids`.
    pub fn covers(&self, ids: &BTreeSet<AggregateId>) -> bool {
        ids.is_subset(&self.ids)
    }
}

impl AggregateLocks {
    /// Waits for the locks of all `ids`, taken in sorted order.
    pub async fn lock(&self, ids: BTreeSet<AggregateId>) -> Held {
        let mut guards = Vec::with_capacity(ids.len());
        for id in &ids {
            let lock = self.lock_of(*id);
            guards.push(lock.lock_owned().await);
        }
        Held {
            ids,
            _guards: guards,
        }
    }

    fn lock_of(&self, id: AggregateId) -> Arc<AsyncMutex<()>> {
        let mut table = match self.table.lock() {
            Ok(table) => table,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Drop locks nobody holds or waits for, so the table stays as small as the set of
        // aggregates in use.
        if table.len() > 1024 {
            table.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        table.entry(id).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;

    #[tokio::test]
    async fn overlapping_sets_wait_and_disjoint_sets_do_not() {
        let locks = Arc::new(AggregateLocks::default());
        let (a, b, c) = (
            AggregateId::student(Uuid::from_u128(1)),
            AggregateId::course(Uuid::from_u128(2)),
            AggregateId::course(Uuid::from_u128(3)),
        );
        let held = locks.lock(BTreeSet::from([a, b])).await;
        assert!(held.covers(&BTreeSet::from([b])));
        assert!(!held.covers(&BTreeSet::from([c])));
        // Disjoint: immediate.
        let other =
            tokio::time::timeout(Duration::from_millis(100), locks.lock(BTreeSet::from([c])))
                .await
                .expect("disjoint set is not blocked");
        drop(other);
        // Overlapping: waits until the first holder is done.
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                locks
                    .lock(BTreeSet::from([b, c]))
                    .await
                    .covers(&BTreeSet::from([b]))
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "must wait for the held lock");
        drop(held);
        assert!(waiter.await.expect("no panic"));
    }
}
