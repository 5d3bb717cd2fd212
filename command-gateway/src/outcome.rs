//! The answer to a command as plain data, so the same answer can be stored for an
//! `Idempotency-Key` and replayed byte for byte.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use service_kit::Problem;
use service_kit::problem::PROBLEM_CONTENT_TYPE;
use uuid::Uuid;

/// A student's personal fields in an answer's `data` (what a stored outcome leaves out).
pub const PERSONAL_FIELDS: [&str; 3] = ["name", "first_name", "last_name"];

/// Status, headers and body of a command's response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    /// The body's `data` holds this student's personal fields, as they were at the version
    /// the `ETag` names. A stored outcome keeps them out ([`Outcome::without_personal`]):
    /// stored outcomes live for a day in a bucket no erasure reaches, so a replay fills them
    /// in again from the student's (sealed) events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal: Option<Uuid>,
}

impl Outcome {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Outcome {
            status: status.as_u16(),
            headers: vec![(header::CONTENT_TYPE.to_string(), "application/json".into())],
            body: Some(body.to_string()),
            personal: None,
        }
    }

    /// Marks `data`'s personal fields as `student`'s (see [`Outcome::personal`]).
    pub fn with_personal(mut self, student: Uuid) -> Self {
        self.personal = Some(student);
        self
    }

    /// The outcome as it may be stored: a student's personal fields in `data` are `null`.
    pub fn without_personal(&self) -> Outcome {
        let mut outcome = self.clone();
        if outcome.personal.is_some() {
            outcome.body = outcome.body.as_deref().map(|body| {
                with_data_fields(body, |data| {
                    for field in PERSONAL_FIELDS {
                        data.insert(field.to_owned(), serde_json::Value::Null);
                    }
                })
            });
        }
        outcome
    }

    /// A stored outcome with the student's personal fields set to `details` (`None`: erased,
    /// they stay `null`).
    pub fn with_personal_fields(mut self, details: Option<&events::StudentDetails>) -> Outcome {
        if let (Some(details), Some(body)) = (details, self.body.as_deref()) {
            self.body = Some(with_data_fields(body, |data| {
                for (field, value) in PERSONAL_FIELDS.into_iter().zip([
                    &details.name,
                    &details.first_name,
                    &details.last_name,
                ]) {
                    data.insert(field.to_owned(), serde_json::Value::from(value.as_str()));
                }
            }));
        }
        self
    }

    /// The version the `ETag` names, if any.
    pub fn etag_version(&self) -> Option<u64> {
        self.headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(header::ETAG.as_str()))
            .and_then(|(_, value)| value.trim_matches('"').parse().ok())
    }

    /// An answer without a body.
    pub fn empty(status: StatusCode) -> Self {
        Outcome {
            status: status.as_u16(),
            headers: Vec::new(),
            body: None,
            personal: None,
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    /// Sets header `name` (case-insensitive) in place, or adds it: the answer of an earlier
    /// attempt, kept before its positions were known, gets them without moving a header.
    pub fn set_header(mut self, name: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self
            .headers
            .iter_mut()
            .find(|(existing, _)| existing.eq_ignore_ascii_case(name))
        {
            Some((_, existing)) => *existing = value,
            None => self.headers.push((name.to_owned(), value)),
        }
        self
    }
}

impl From<Problem> for Outcome {
    fn from(problem: Problem) -> Self {
        let mut outcome = Outcome {
            status: problem.status.as_u16(),
            headers: vec![(
                header::CONTENT_TYPE.to_string(),
                PROBLEM_CONTENT_TYPE.into(),
            )],
            body: Some(problem.body_json()),
            personal: None,
        };
        if let Some(seconds) = problem.retry_after_seconds {
            outcome = outcome.with_header(header::RETRY_AFTER.as_str(), seconds.to_string());
        }
        outcome
    }
}

/// `body` with `change` applied to the object under `data` (unchanged if there is none).
fn with_data_fields(
    body: &str,
    change: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> String {
    let Ok(mut json) = serde_json::from_str::<serde_json::Value>(body) else {
        return body.to_owned();
    };
    match json
        .get_mut("data")
        .and_then(serde_json::Value::as_object_mut)
    {
        Some(data) => {
            change(data);
            json.to_string()
        }
        None => body.to_owned(),
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = match self.body {
            Some(body) => (status, body).into_response(),
            None => status.into_response(),
        };
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                headers.insert(name, value);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_outcome_holds_no_personal_field_and_gets_them_back_on_replay() {
        let student = Uuid::now_v7();
        let body = serde_json::json!({"data": {"id": student, "name": "Zorblax Q", "first_name": "Zorblax", "last_name": "Quintavius", "course_ids": []}});
        let outcome = Outcome::json(StatusCode::OK, &body)
            .with_header("etag", "\"12\"")
            .with_personal(student);
        let stored = outcome.without_personal();
        let text = serde_json::to_string(&stored).expect("encodes");
        assert!(
            !text.contains("Zorblax") && !text.contains("Quintavius"),
            "{text}"
        );
        assert_eq!(stored.etag_version(), Some(12));
        let decoded: Outcome = serde_json::from_str(&text).expect("decodes");
        let details = events::StudentDetails {
            name: "Zorblax Q".into(),
            first_name: "Zorblax".into(),
            last_name: "Quintavius".into(),
        };
        let replayed = decoded.clone().with_personal_fields(Some(&details));
        let json = |o: &Outcome| -> serde_json::Value {
            serde_json::from_str(o.body.as_deref().unwrap_or_default()).expect("json")
        };
        assert_eq!(json(&replayed), body);
        // Erased since: the fields stay null, everything else is as it was.
        let erased = json(&decoded.with_personal_fields(None));
        assert_eq!(erased["data"]["name"], serde_json::Value::Null);
        assert_eq!(erased["data"]["id"], body["data"]["id"]);
        // An outcome without personal fields is stored as it is.
        let created = Outcome::json(
            StatusCode::CREATED,
            &serde_json::json!({"data": {"id": student}}),
        );
        assert_eq!(created.without_personal(), created);
    }

    #[test]
    fn set_header_replaces_in_place_or_adds() {
        let outcome = Outcome::empty(StatusCode::NO_CONTENT)
            .with_header("etag", "\"0\"")
            .with_header("location", "/x")
            .set_header("ETag", "\"7\"")
            .set_header("x-consistency-token", "9");
        assert_eq!(
            outcome.headers,
            vec![
                ("etag".to_owned(), "\"7\"".to_owned()),
                ("location".to_owned(), "/x".to_owned()),
                ("x-consistency-token".to_owned(), "9".to_owned()),
            ]
        );
    }
}
