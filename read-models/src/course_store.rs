//! The course-store port: the courses read model on whichever database the URL names.
//! `postgres://` (a JSONB document table, the local default) or `mongodb://` (production).

use events::{Event, Projection};
use uuid::Uuid;

use crate::course_document::CourseDocument;
use crate::generation;
use crate::mongo_courses::MongoCourses;
use crate::mongo_generations::MongoSwitch;
use crate::pg_courses::PgCourses;
use crate::rebuild::{AggregateHistory, GenerationSwitch, Rebuildable, SwitchError, SwitchReport};
use crate::store::{BatchOutcome, ProjectionStore, StoreError};

/// A course store chosen at start by URL scheme.
#[derive(Clone)]
pub enum CourseStore {
    Postgres(PgCourses),
    Mongo(MongoCourses),
}

impl CourseStore {
    /// Connects to the store the URL names, creating its schema if needed.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => Ok(CourseStore::Postgres(PgCourses::connect(url).await?)),
            "mongodb" | "mongodb+srv" => Ok(CourseStore::Mongo(MongoCourses::connect(url).await?)),
            other => anyhow::bail!(
                "COURSES_STORE_URL has scheme {other:?}; expected postgres:// or mongodb://"
            ),
        }
    }

    /// Connects for reading only: never migrates (the projectors own the schema), so a
    /// read-only database role suffices. A Postgres store gets `pool`, the pool the reader
    /// already holds for the same URL, when there is one.
    pub async fn connect_reader(url: &str, pool: Option<sqlx::PgPool>) -> anyhow::Result<Self> {
        let scheme = url.split("://").next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => {
                let pool = match pool {
                    Some(pool) => pool,
                    None => {
                        sqlx::postgres::PgPoolOptions::new()
                            .max_connections(4)
                            .connect(url)
                            .await?
                    }
                };
                Ok(CourseStore::Postgres(PgCourses::on_migrated_pool(pool)))
            }
            "mongodb" | "mongodb+srv" => {
                Ok(CourseStore::Mongo(MongoCourses::connect_reader(url).await?))
            }
            other => anyhow::bail!(
                "COURSES_STORE_URL has scheme {other:?}; expected postgres:// or mongodb://"
            ),
        }
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<CourseDocument>, StoreError> {
        match self {
            CourseStore::Postgres(store) => store.get(id).await,
            CourseStore::Mongo(store) => store.get(id).await,
        }
    }

    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<CourseDocument>, StoreError> {
        match self {
            CourseStore::Postgres(store) => store.get_many(ids).await,
            CourseStore::Mongo(store) => store.get_many(ids).await,
        }
    }

    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<CourseDocument>, StoreError> {
        match self {
            CourseStore::Postgres(store) => store.list(after, limit).await,
            CourseStore::Mongo(store) => store.list(after, limit).await,
        }
    }
}

/// A switch in progress on whichever store is in use.
pub enum CourseSwitch {
    Postgres(generation::Switch),
    Mongo(MongoSwitch),
}

impl GenerationSwitch for CourseSwitch {
    fn live_checkpoint(&self) -> u64 {
        match self {
            CourseSwitch::Postgres(switch) => switch.live_checkpoint(),
            CourseSwitch::Mongo(switch) => switch.live_checkpoint(),
        }
    }

    async fn finish(self, force: bool, keep_old: bool) -> Result<SwitchReport, SwitchError> {
        match self {
            CourseSwitch::Postgres(switch) => switch.finish(force, keep_old).await,
            CourseSwitch::Mongo(switch) => switch.finish(force, keep_old).await,
        }
    }

    async fn abort(self) {
        match self {
            CourseSwitch::Postgres(switch) => switch.abort().await,
            CourseSwitch::Mongo(switch) => switch.abort().await,
        }
    }
}

impl Rebuildable for CourseStore {
    type Switch = CourseSwitch;

    fn next_generation(&self) -> Self {
        match self {
            CourseStore::Postgres(store) => CourseStore::Postgres(store.next_generation()),
            CourseStore::Mongo(store) => CourseStore::Mongo(store.next_generation()),
        }
    }

    async fn prepare_next(&self) -> Result<bool, StoreError> {
        match self {
            CourseStore::Postgres(store) => store.prepare_next().await,
            CourseStore::Mongo(store) => store.prepare_next().await,
        }
    }

    async fn drop_next(&self) -> Result<(), StoreError> {
        match self {
            CourseStore::Postgres(store) => store.drop_next().await,
            CourseStore::Mongo(store) => store.drop_next().await,
        }
    }

    async fn begin_switch(&self) -> Result<CourseSwitch, StoreError> {
        Ok(match self {
            CourseStore::Postgres(store) => CourseSwitch::Postgres(store.begin_switch().await?),
            CourseStore::Mongo(store) => CourseSwitch::Mongo(store.begin_switch().await?),
        })
    }

    async fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: impl AggregateHistory,
    ) -> Result<usize, StoreError> {
        match self {
            CourseStore::Postgres(store) => {
                Rebuildable::rebuild_aggregate(store, id, history).await
            }
            CourseStore::Mongo(store) => Rebuildable::rebuild_aggregate(store, id, history).await,
        }
    }
}

impl ProjectionStore for CourseStore {
    fn projection(&self) -> Projection {
        Projection::Courses
    }

    async fn checkpoint(&self) -> Result<u64, StoreError> {
        match self {
            CourseStore::Postgres(store) => store.checkpoint().await,
            CourseStore::Mongo(store) => store.checkpoint().await,
        }
    }

    async fn apply_batch(
        &self,
        batch: &[(u64, Event)],
        through_sequence: u64,
    ) -> Result<BatchOutcome, StoreError> {
        match self {
            CourseStore::Postgres(store) => store.apply_batch(batch, through_sequence).await,
            CourseStore::Mongo(store) => store.apply_batch(batch, through_sequence).await,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match self {
            CourseStore::Postgres(store) => store.ping().await,
            CourseStore::Mongo(store) => store.ping().await,
        }
    }

    async fn claim(&self, token: u64) -> Result<(), StoreError> {
        match self {
            CourseStore::Postgres(store) => store.claim(token).await,
            CourseStore::Mongo(store) => store.claim(token).await,
        }
    }
}
