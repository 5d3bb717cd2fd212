//! A JSON body extractor whose every rejection is a problem+json `4xx`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// Like `axum::Json`, but malformed JSON and unknown or mistyped fields are `400`, a wrong
/// content type `415` and an oversize body `413`, all as problem+json.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(rejection_to_problem(&rejection)),
        }
    }
}

fn rejection_to_problem(rejection: &JsonRejection) -> Problem {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
        )
        .with_detail("send the body as `content-type: application/json`"),
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
            )
            .with_detail(rejection.body_text())
        }
        // Syntax errors, unknown fields and wrong types: the body is not the document we
        // accept, so 400 (missing and invalid *values* are 422 from validation instead).
        _ => Problem::bad_request(rejection.body_text()),
    }
}
