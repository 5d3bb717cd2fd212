//! OpenAPI pieces every service's document shares: the problem+json body and the
//! `x-api-key` security scheme.

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, ToSchema};

/// An RFC 9457 problem, as every error of these APIs is answered.
#[derive(Serialize, ToSchema)]
pub struct ProblemDoc {
    /// `urn:school:problem:<rule>`, e.g. `urn:school:problem:course-full`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: Option<String>,
    /// Every invalid field, for `422`.
    pub errors: Option<Vec<FieldErrorDoc>>,
}

#[derive(Serialize, ToSchema)]
pub struct FieldErrorDoc {
    /// The field as sent, e.g. `course_ids[2]`.
    pub field: String,
    pub detail: String,
}

/// Declares the `api_key` scheme: the `x-api-key` header.
pub struct ApiKeySecurity;

impl Modify for ApiKeySecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}
