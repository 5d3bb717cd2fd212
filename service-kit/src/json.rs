//! A JSON body extractor whose every rejection is a problem+json `4xx`, and which reads an
//! oversize body to its end (up to [`DRAIN_LIMIT_BYTES`]) before answering `413`.
//!
//! Why drain: a reverse proxy (nginx, Kong) forwards the whole body before it reads the
//! answer. A server that answers `413` and closes after the first 64 KiB makes the proxy's
//! write fail ("broken pipe"), and the proxy answers `502` instead, for that request and
//! for the next one on the same upstream connection. Reading the rest and discarding it
//! keeps the connection healthy and the answer a `413`.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// Most bytes of an oversize body read and discarded to keep the connection usable; the
/// same as the entry point's `client_max_body_size` (nginx, Kong), which answer bigger
/// bodies themselves. A body declared bigger than this is refused without reading it (the
/// server then closes the connection).
pub const DRAIN_LIMIT_BYTES: usize = 8 * 1024 * 1024;

/// The limit used when a router sets no [`BodyLimit`].
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 64 * 1024;

/// The largest body [`JsonBody`] accepts, as a request extension
/// (`.layer(axum::Extension(BodyLimit(n)))`).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// Like `axum::Json`, but malformed JSON and unknown or mistyped fields are `400`, a wrong
/// content type `415` and an oversize body `413`, all as problem+json.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map_or(DEFAULT_BODY_LIMIT_BYTES, |limit| limit.0);
        let is_json = has_json_content_type(request.headers());
        if declared_length(request.headers()).is_some_and(|length| length > drain_limit(limit)) {
            return Err(too_large(limit));
        }
        // Read (or drain) before judging the content type, so every rejection leaves the
        // connection ready for the next request.
        let body = read_bounded(request.into_body(), limit).await?;
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            )
            .with_detail("send the body as `content-type: application/json`"));
        }
        let Some(bytes) = body else {
            return Err(too_large(limit));
        };
        deserialize(&bytes).map(JsonBody)
    }
}

/// The body if it fits in `limit`; `None` if it does not (then it was read to its end, up
/// to [`DRAIN_LIMIT_BYTES`], and discarded).
async fn read_bounded(body: Body, limit: usize) -> Result<Option<Vec<u8>>, Problem> {
    let mut chunks = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| Problem::bad_request(format!("reading the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen > drain_limit(limit) {
            // Past what is worth reading: answer now (the connection then closes).
            return Ok(None);
        }
        if seen <= limit {
            bytes.extend_from_slice(&chunk);
        } else if !bytes.is_empty() {
            bytes = Vec::new();
        }
    }
    Ok((seen <= limit).then_some(bytes))
}

/// A limit configured above [`DRAIN_LIMIT_BYTES`] is read in full too.
fn drain_limit(limit: usize) -> usize {
    DRAIN_LIMIT_BYTES.max(limit)
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body-too-large",
        "Request body too large",
    )
    .with_detail(format!(
        "the body is larger than the limit of {limit} bytes"
    ))
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `application/json` or any `application/*+json`, parameters allowed (as `axum::Json`).
fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Syntax errors, unknown fields and wrong types: the body is not the document we accept,
/// so `400` (missing and invalid *values* are `422` from validation instead).
fn deserialize<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let detail = if inner.is_data() && path != "." {
            format!("Failed to deserialize the JSON body into the target type: {path}: {inner}")
        } else if inner.is_data() {
            format!("Failed to deserialize the JSON body into the target type: {inner}")
        } else {
            format!("Failed to parse the request body as JSON: {inner}")
        };
        Problem::bad_request(detail)
    })?;
    deserializer.end().map_err(|e| {
        Problem::bad_request(format!("Failed to parse the request body as JSON: {e}"))
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            content_type.parse().expect("header value"),
        );
        headers
    }

    #[test]
    fn json_content_types_are_recognised_like_axum_does() {
        for json in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
        ] {
            assert!(has_json_content_type(&headers(json)), "{json}");
        }
        for other in [
            "text/plain",
            "application/jsonx",
            "json",
            "application/+json",
            "",
        ] {
            assert!(!has_json_content_type(&headers(other)), "{other}");
        }
        assert!(!has_json_content_type(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn an_oversize_body_is_read_to_its_end_and_refused() {
        let body = Body::from(vec![b'x'; 100]);
        assert_eq!(read_bounded(body, 10).await.expect("read"), None);
        let body = Body::from(vec![b'x'; 10]);
        assert_eq!(
            read_bounded(body, 10).await.expect("read"),
            Some(vec![b'x'; 10])
        );
    }

    #[test]
    fn trailing_garbage_and_wrong_types_are_bad_requests() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            name: String,
        }
        assert!(deserialize::<Doc>(br#"{"name":"a"}"#).is_ok());
        let error = deserialize::<Doc>(br#"{"name":5}"#).expect_err("wrong type");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.detail.as_deref().unwrap_or("").contains("name"),
            "{error:?}"
        );
        assert!(deserialize::<Doc>(br#"{"name":"a"} x"#).is_err());
    }
}
