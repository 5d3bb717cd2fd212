//! The live read models, for the commands that look into them (`status`) or write to them
//! (`replay`, `dlq redrive`), through the projectors' own store code.

use anyhow::Context;
use events::{Event, Projection};
use projectors::{CourseStore, PgStudents};
use uuid::Uuid;

#[derive(Clone)]
pub enum ReadModel {
    Students(PgStudents),
    Courses(CourseStore),
}

impl ReadModel {
    /// Connects to `projection`'s read model (and brings its schema up to date, as the
    /// projectors do at start).
    pub async fn connect(
        projection: Projection,
        database_url: &str,
        courses_store_url: Option<&str>,
    ) -> anyhow::Result<Self> {
        Ok(match projection {
            Projection::Students => ReadModel::Students(
                PgStudents::connect(database_url)
                    .await
                    .context("connecting to DATABASE_URL")?,
            ),
            Projection::Courses => ReadModel::Courses(
                CourseStore::connect(courses_store_url.unwrap_or(database_url))
                    .await
                    .context("connecting to COURSES_STORE_URL")?,
            ),
        })
    }

    /// Last stream sequence the live model has applied.
    pub async fn checkpoint(&self) -> anyhow::Result<u64> {
        Ok(match self {
            ReadModel::Students(store) => store.checkpoint().await?,
            ReadModel::Courses(store) => projectors::ProjectionStore::checkpoint(store).await?,
        })
    }

    /// Replaces one aggregate in the live model by the fold of its history.
    pub async fn rebuild_aggregate(
        &self,
        id: Uuid,
        history: &[(u64, Event)],
    ) -> anyhow::Result<usize> {
        Ok(match self {
            ReadModel::Students(store) => store.rebuild_aggregate(id, history).await?,
            ReadModel::Courses(store) => store.rebuild_aggregate(id, history).await?,
        })
    }
}
