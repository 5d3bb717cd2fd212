//! The read models as query-api serves them: students (Postgres) and courses (the course
//! store), the relation reads that cross the two, and how far each projection has applied.

use events::Projection;
use read_models::course_document::CourseDocument;
use read_models::{CourseStore, ProjectionStore};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use read_models::{StudentReader, StudentView};

/// A course as read from its read model (and cached).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CourseView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub discipline: String,
    pub teacher: String,
    pub student_ids: Vec<Uuid>,
    /// Stream sequence of the last event applied to this course (the ETag).
    pub version: u64,
}

impl From<CourseDocument> for CourseView {
    fn from(doc: CourseDocument) -> Self {
        CourseView {
            id: doc.id,
            name: doc.name,
            description: doc.description,
            discipline: doc.discipline,
            teacher: doc.teacher,
            student_ids: doc.student_ids,
            version: doc.version,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("read model unavailable: {0}")]
pub struct ReadError(pub String);

impl From<sqlx::Error> for ReadError {
    fn from(error: sqlx::Error) -> Self {
        ReadError(error.to_string())
    }
}

impl From<read_models::StoreError> for ReadError {
    fn from(error: read_models::StoreError) -> Self {
        ReadError(error.to_string())
    }
}

#[derive(Clone)]
pub struct ReadModels {
    pub students: StudentReader,
    pub courses: CourseStore,
}

impl ReadModels {
    pub async fn student(&self, id: Uuid) -> Result<Option<StudentView>, ReadError> {
        Ok(self.students.get(id).await?)
    }

    pub async fn students(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<StudentView>, ReadError> {
        Ok(self.students.list(after, limit).await?)
    }

    pub async fn students_by_id(&self, ids: &[Uuid]) -> Result<Vec<StudentView>, ReadError> {
        Ok(self.students.get_many(ids).await?)
    }

    pub async fn course(&self, id: Uuid) -> Result<Option<CourseView>, ReadError> {
        Ok(self.courses.get(id).await?.map(CourseView::from))
    }

    pub async fn courses(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<CourseView>, ReadError> {
        Ok(self
            .courses
            .list(after, limit)
            .await?
            .into_iter()
            .map(CourseView::from)
            .collect())
    }

    pub async fn courses_by_id(&self, ids: &[Uuid]) -> Result<Vec<CourseView>, ReadError> {
        Ok(self
            .courses
            .get_many(ids)
            .await?
            .into_iter()
            .map(CourseView::from)
            .collect())
    }

    /// How far a projection has applied the stream.
    pub async fn applied_position(&self, projection: Projection) -> Result<u64, ReadError> {
        match projection {
            Projection::Students => Ok(self.students.applied_position().await?),
            Projection::Courses => Ok(ProjectionStore::checkpoint(&self.courses).await?),
        }
    }

    /// Whether both read models answer (for `/readyz`).
    pub async fn check(&self) -> Vec<(&'static str, Result<(), String>)> {
        let students = self
            .students
            .applied_position()
            .await
            .map(|_| ())
            .map_err(|e| format!("students read model: {e}"));
        let courses = ProjectionStore::ping(&self.courses)
            .await
            .map_err(|e| format!("courses read model: {e}"));
        vec![("students_store", students), ("courses_store", courses)]
    }
}
