//! Reads of the students read model in Postgres (query-api's side: a read-only role
//! suffices; the schema is `pg_students`' migrations).

use std::collections::HashMap;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// A student as read from its read model (and cached).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StudentView {
    pub id: Uuid,
    pub name: String,
    pub first_name: String,
    pub last_name: String,
    pub course_ids: Vec<Uuid>,
    /// Stream sequence of the last event applied to this student (the ETag).
    pub version: i64,
}

#[derive(sqlx::FromRow)]
struct StudentRow {
    id: Uuid,
    name: String,
    first_name: String,
    last_name: String,
    version: i64,
}

#[derive(Clone)]
pub struct StudentReader {
    pool: PgPool,
}

impl StudentReader {
    pub fn new(pool: PgPool) -> Self {
        StudentReader { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<StudentView>, sqlx::Error> {
        let row: Option<StudentRow> = sqlx::query_as(
            "SELECT id, name, first_name, last_name, version FROM students WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut views = self.with_course_ids(vec![row]).await?;
        Ok(views.pop())
    }

    /// The students of `ids` that exist, in id order.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<StudentView>, sqlx::Error> {
        let rows: Vec<StudentRow> = sqlx::query_as(
            "SELECT id, name, first_name, last_name, version FROM students
             WHERE id = ANY($1) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        self.with_course_ids(rows).await
    }

    /// The stream position up to which the students projection has applied every event.
    pub async fn applied_position(&self) -> Result<u64, sqlx::Error> {
        let position: Option<i64> = sqlx::query_scalar(
            "SELECT last_sequence FROM projection_checkpoints WHERE projection = 'students'",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
    }

    /// Up to `limit` students with ids after `after`, in id order. Ids are UUID v7, so this
    /// is creation order, and keyset paging stays stable while students are added or removed.
    pub async fn list(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<StudentView>, sqlx::Error> {
        let rows: Vec<StudentRow> = sqlx::query_as(
            "SELECT id, name, first_name, last_name, version FROM students
             WHERE $1::uuid IS NULL OR id > $1
             ORDER BY id
             LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        self.with_course_ids(rows).await
    }

    async fn with_course_ids(
        &self,
        rows: Vec<StudentRow>,
    ) -> Result<Vec<StudentView>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let pairs: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT student_id, course_id FROM student_courses
             WHERE student_id = ANY($1) ORDER BY student_id, course_id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut courses: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (student_id, course_id) in pairs {
            courses.entry(student_id).or_default().push(course_id);
        }
        Ok(rows
            .into_iter()
            .map(|row| StudentView {
                course_ids: courses.remove(&row.id).unwrap_or_default(),
                id: row.id,
                name: row.name,
                first_name: row.first_name,
                last_name: row.last_name,
                version: row.version,
            })
            .collect())
    }
}
