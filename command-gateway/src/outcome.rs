//! The answer to a command as plain data, so the same answer can be stored for an
//! `Idempotency-Key` and replayed byte for byte.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use service_kit::Problem;
use service_kit::problem::PROBLEM_CONTENT_TYPE;

/// Status, headers and body of a command's response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
}

impl Outcome {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        Outcome {
            status: status.as_u16(),
            headers: vec![(header::CONTENT_TYPE.to_string(), "application/json".into())],
            body: Some(body.to_string()),
        }
    }

    /// An answer without a body.
    pub fn empty(status: StatusCode) -> Self {
        Outcome {
            status: status.as_u16(),
            headers: Vec::new(),
            body: None,
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
        };
        if let Some(seconds) = problem.retry_after_seconds {
            outcome = outcome.with_header(header::RETRY_AFTER.as_str(), seconds.to_string());
        }
        outcome
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
