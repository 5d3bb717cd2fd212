//! OpenAPI pieces every service's document shares: the problem+json body, the `x-api-key`
//! security scheme, and the answers every `/api` operation can give whatever it does.

use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response, Schema};
use utoipa::{Modify, PartialSchema, ToSchema};

use crate::problem::PROBLEM_CONTENT_TYPE;

/// An RFC 9457 problem, as every error of these APIs is answered.
#[derive(Serialize, ToSchema)]
pub struct ProblemDoc {
    /// `urn:school:problem:<rule>`, e.g. `urn:school:problem:course-full`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[schema(nullable = false)]
    pub detail: Option<String>,
    /// Every invalid field, for `422`.
    #[schema(nullable = false)]
    pub errors: Option<Vec<FieldErrorDoc>>,
}

#[derive(Serialize, ToSchema)]
pub struct FieldErrorDoc {
    /// The field as sent, e.g. `course_ids[2]`.
    pub field: String,
    pub detail: String,
}

/// Declares the `api_key` scheme (the `x-api-key` header) and the problem schemas, and
/// gives every `/api` operation the answers of the layers in front of its handler:
/// `401` (no or unknown key), `403` (a key without the scope) and `429` (the key's rate
/// limit, with `Retry-After`).
pub struct ApiKeySecurity;

impl Modify for ApiKeySecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
        components
            .schemas
            .insert(ProblemDoc::name().into_owned(), ProblemDoc::schema());
        components
            .schemas
            .insert(FieldErrorDoc::name().into_owned(), FieldErrorDoc::schema());
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/") {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
            ];
            for operation in operations.into_iter().flatten() {
                add_guard_responses(operation);
            }
        }
    }
}

fn add_guard_responses(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    let guard_answers = [
        (
            "401",
            "No `x-api-key`, or a key this service does not know.",
            false,
        ),
        (
            "403",
            "The key lacks the scope this operation needs.",
            false,
        ),
        (
            "429",
            "The key sent too many requests; `Retry-After` says how many seconds to wait.",
            true,
        ),
    ];
    for (status, description, retry_after) in guard_answers {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(problem_response(description, retry_after)));
    }
}

/// A problem+json answer; with `retry_after`, it carries the `Retry-After` header (seconds).
pub fn problem_response(description: &str, retry_after: bool) -> Response {
    let problem = Content::new(Some(RefOr::Ref(Ref::from_schema_name(ProblemDoc::name()))));
    let mut response = ResponseBuilder::new()
        .description(description)
        .content(PROBLEM_CONTENT_TYPE, problem);
    if retry_after {
        let seconds = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .build();
        response = response.header(
            "retry-after",
            HeaderBuilder::new()
                .schema(Some(Schema::Object(seconds)))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    response.build()
}
