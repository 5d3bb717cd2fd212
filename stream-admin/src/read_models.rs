//! The live read models, for the commands that look into them (`status`) or write to them
//! (`replay`, `dlq redrive`), through the projectors' own store code.

use anyhow::Context;
use events::Projection;
use read_models::{CourseStore, PgStudents};

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
            ReadModel::Courses(store) => read_models::ProjectionStore::checkpoint(store).await?,
        })
    }
}
