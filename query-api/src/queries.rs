//! The lookups both transports (REST and gRPC) serve: single items through the cache, keyset
//! pages, the two relation reads, each after an optional read-your-writes wait.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use events::{AggregateKind, Projection, StreamNames};
use uuid::Uuid;

use crate::cache::Cache;
use crate::consistency::{Consistency, Required, WaitError};
use crate::models::{CourseView, ReadError, ReadModels};
use read_models::StudentView;

/// Page size when the client names none.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Largest page a client may ask for.
pub const MAX_PAGE_SIZE: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the read model is unavailable")]
    Unavailable(#[source] ReadError),
    /// The projections did not reach the consistency token in time.
    #[error("the read model has not reached position {0} yet")]
    NotReached(u64),
}

impl From<ReadError> for QueryError {
    fn from(error: ReadError) -> Self {
        tracing::error!(%error, "read model query failed");
        QueryError::Unavailable(error)
    }
}

impl From<WaitError> for QueryError {
    fn from(error: WaitError) -> Self {
        match error {
            WaitError::TimedOut(position) => QueryError::NotReached(position),
            WaitError::Unavailable(error) => error.into(),
        }
    }
}

/// A bad page parameter, named as the client sent it.
#[derive(Debug, PartialEq, Eq)]
pub struct BadPageParameter {
    pub field: &'static str,
    pub detail: String,
}

/// Which page a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    /// The last id of the previous page.
    pub after: Option<Uuid>,
}

impl PageRequest {
    /// Validates a page size (`None`: the default) and an opaque cursor (`None` or empty:
    /// the first page).
    pub fn parse(limit: Option<i64>, cursor: Option<&str>) -> Result<Self, BadPageParameter> {
        let limit = match limit {
            None => DEFAULT_PAGE_SIZE,
            Some(limit) => u32::try_from(limit)
                .ok()
                .filter(|limit| (1..=MAX_PAGE_SIZE).contains(limit))
                .ok_or_else(|| BadPageParameter {
                    field: "limit",
                    detail: format!("must be an integer from 1 to {MAX_PAGE_SIZE}"),
                })?,
        };
        let after = match cursor {
            None | Some("") => None,
            Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| BadPageParameter {
                field: "cursor",
                detail: "is not a cursor this API issued".into(),
            })?),
        };
        Ok(PageRequest { limit, after })
    }
}

/// One page of items and the cursor of the next page, if there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Turns up to `limit + 1` fetched items into a page (the extra item says that another
    /// page follows).
    fn from_fetched(mut items: Vec<T>, limit: u32, id: impl Fn(&T) -> Uuid) -> Self {
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|item| encode_cursor(id(item)))
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// Cheap to clone (one reference count): axum clones the state for every request.
#[derive(Clone)]
pub struct Queries {
    inner: Arc<Shared>,
}

struct Shared {
    models: ReadModels,
    cache: Cache,
    names: StreamNames,
    consistency: Consistency,
}

impl Queries {
    pub fn new(
        models: ReadModels,
        cache: Cache,
        names: StreamNames,
        consistency: Consistency,
    ) -> Self {
        Queries {
            inner: Arc::new(Shared {
                models,
                cache,
                names,
                consistency,
            }),
        }
    }

    pub fn models(&self) -> &ReadModels {
        &self.inner.models
    }

    pub fn max_wait(&self) -> std::time::Duration {
        self.inner.consistency.max_wait()
    }

    pub async fn student(
        &self,
        id: Uuid,
        token: Option<u64>,
    ) -> Result<Option<StudentView>, QueryError> {
        let required = self.wait(token, &[Projection::Students]).await?;
        self.cached_student(id, required.students).await
    }

    pub async fn course(
        &self,
        id: Uuid,
        token: Option<u64>,
    ) -> Result<Option<CourseView>, QueryError> {
        let required = self.wait(token, &[Projection::Courses]).await?;
        self.cached_course(id, required.courses).await
    }

    pub async fn students(
        &self,
        page: PageRequest,
        token: Option<u64>,
    ) -> Result<Page<StudentView>, QueryError> {
        self.wait(token, &[Projection::Students]).await?;
        let students = self
            .inner
            .models
            .students(page.after, page.limit + 1)
            .await?;
        Ok(Page::from_fetched(students, page.limit, |s| s.id))
    }

    pub async fn courses(
        &self,
        page: PageRequest,
        token: Option<u64>,
    ) -> Result<Page<CourseView>, QueryError> {
        self.wait(token, &[Projection::Courses]).await?;
        let courses = self
            .inner
            .models
            .courses(page.after, page.limit + 1)
            .await?;
        Ok(Page::from_fetched(courses, page.limit, |c| c.id))
    }

    /// The courses of a student (`None`: no such student), in id order.
    pub async fn student_courses(
        &self,
        id: Uuid,
        page: PageRequest,
        token: Option<u64>,
    ) -> Result<Option<Page<CourseView>>, QueryError> {
        let required = self
            .wait(token, &[Projection::Students, Projection::Courses])
            .await?;
        let Some(student) = self.cached_student(id, required.students).await? else {
            return Ok(None);
        };
        let ids = related_page(&student.course_ids, page);
        let courses = self.inner.models.courses_by_id(&ids).await?;
        Ok(Some(Page::from_fetched(courses, page.limit, |c| c.id)))
    }

    /// The students of a course (`None`: no such course), in id order.
    pub async fn course_students(
        &self,
        id: Uuid,
        page: PageRequest,
        token: Option<u64>,
    ) -> Result<Option<Page<StudentView>>, QueryError> {
        let required = self
            .wait(token, &[Projection::Students, Projection::Courses])
            .await?;
        let Some(course) = self.cached_course(id, required.courses).await? else {
            return Ok(None);
        };
        let ids = related_page(&course.student_ids, page);
        let students = self.inner.models.students_by_id(&ids).await?;
        Ok(Some(Page::from_fetched(students, page.limit, |s| s.id)))
    }

    async fn wait(
        &self,
        token: Option<u64>,
        projections: &[Projection],
    ) -> Result<Required, QueryError> {
        match token {
            None => Ok(Required::default()),
            Some(token) => Ok(self.inner.consistency.wait_for(token, projections).await?),
        }
    }

    /// A student through the cache; a cached entry read before `min_position` is not served.
    async fn cached_student(
        &self,
        id: Uuid,
        min_position: u64,
    ) -> Result<Option<StudentView>, QueryError> {
        let key = self.inner.names.cache_key(AggregateKind::Student, id);
        let student = self
            .inner
            .cache
            .get_or_load(&key, min_position, || async {
                // Position first: the row read after it is at least that fresh.
                let position = self
                    .inner
                    .models
                    .applied_position(Projection::Students)
                    .await?;
                Ok::<_, ReadError>((position, self.inner.models.student(id).await?))
            })
            .await?;
        Ok(student)
    }

    async fn cached_course(
        &self,
        id: Uuid,
        min_position: u64,
    ) -> Result<Option<CourseView>, QueryError> {
        let key = self.inner.names.cache_key(AggregateKind::Course, id);
        let course = self
            .inner
            .cache
            .get_or_load(&key, min_position, || async {
                let position = self
                    .inner
                    .models
                    .applied_position(Projection::Courses)
                    .await?;
                Ok::<_, ReadError>((position, self.inner.models.course(id).await?))
            })
            .await?;
        Ok(course)
    }
}

/// The related ids of one page (one more than the limit, to know if another page follows).
fn related_page(ids: &[Uuid], page: PageRequest) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| page.after.is_none_or(|after| *id > after))
        .collect();
    ids.sort();
    ids.truncate(page.limit as usize + 1);
    ids
}

/// Cursors are opaque to clients: a versioned, base64url-encoded position.
pub fn encode_cursor(last_id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1:{last_id}"))
}

fn decode_cursor(cursor: &str) -> Option<Uuid> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    Uuid::parse_str(text.strip_prefix("v1:")?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)), Some(id));
        for bad in [
            "abc",
            "djE6bm90LWEtdXVpZA",
            &URL_SAFE_NO_PAD.encode(id.to_string()),
        ] {
            let error = PageRequest::parse(None, Some(bad)).expect_err("foreign");
            assert_eq!(error.field, "cursor", "{bad}");
        }
        assert_eq!(
            PageRequest::parse(None, Some(""))
                .expect("empty is the first page")
                .after,
            None
        );
    }

    #[test]
    fn limit_defaults_and_is_bounded() {
        assert_eq!(
            PageRequest::parse(None, None).expect("default").limit,
            DEFAULT_PAGE_SIZE
        );
        assert_eq!(PageRequest::parse(Some(100), None).expect("max").limit, 100);
        for bad in [0, 101, -1, i64::MAX] {
            let error = PageRequest::parse(Some(bad), None).expect_err("out of range");
            assert_eq!(error.field, "limit", "{bad}");
        }
    }

    #[test]
    fn pages_name_the_next_cursor_only_when_more_follow() {
        let ids: Vec<Uuid> = (1..=3u128).map(Uuid::from_u128).collect();
        let full = Page::from_fetched(ids.clone(), 2, |id| *id);
        assert_eq!(full.items, ids[..2]);
        assert_eq!(full.next_cursor, Some(encode_cursor(ids[1])));
        let last = Page::from_fetched(ids.clone(), 3, |id| *id);
        assert_eq!(last.items, ids);
        assert_eq!(last.next_cursor, None);
    }

    #[test]
    fn related_pages_are_sorted_bounded_and_after_the_cursor() {
        let ids: Vec<Uuid> = [5u128, 1, 3, 2, 4].map(Uuid::from_u128).to_vec();
        let first = related_page(
            &ids,
            PageRequest {
                limit: 2,
                after: None,
            },
        );
        assert_eq!(first, [1u128, 2, 3].map(Uuid::from_u128));
        let next = related_page(
            &ids,
            PageRequest {
                limit: 2,
                after: Some(Uuid::from_u128(2)),
            },
        );
        assert_eq!(next, [3u128, 4, 5].map(Uuid::from_u128));
    }
}
