//! API-key authentication (`x-api-key`, as the replaced system's Kong key-auth) with a read
//! and a write scope. Keys are compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use crate::problem::Problem;

/// Header carrying the key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// What a key may do. A write key may also read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
}

/// The configured keys.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<(Vec<u8>, Scope)>>,
}

impl std::fmt::Debug for ApiKeys {
    // Never print the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiKeysError {
    #[error("entry {0} is not `read:KEY` or `write:KEY`")]
    BadEntry(usize),
    #[error("entry {0} has a key shorter than 8 characters")]
    ShortKey(usize),
    #[error("no keys configured")]
    Empty,
}

impl std::str::FromStr for ApiKeys {
    type Err = ApiKeysError;

    /// Parses `scope:key` entries separated by commas, e.g. `write:abc123xyz,read:def456uvw`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut keys = Vec::new();
        for (index, entry) in text.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (scope, key) = entry.split_once(':').ok_or(ApiKeysError::BadEntry(index))?;
            let scope = match scope {
                "read" => Scope::Read,
                "write" => Scope::Write,
                _ => return Err(ApiKeysError::BadEntry(index)),
            };
            if key.chars().count() < 8 {
                return Err(ApiKeysError::ShortKey(index));
            }
            keys.push((key.as_bytes().to_vec(), scope));
        }
        if keys.is_empty() {
            return Err(ApiKeysError::Empty);
        }
        Ok(ApiKeys {
            keys: Arc::new(keys),
        })
    }
}

impl ApiKeys {
    /// The scope of `presented`, if it is a configured key. Every configured key is compared
    /// (no early exit), so timing does not reveal which key or how much of it matched.
    pub fn scope_of(&self, presented: &[u8]) -> Option<Scope> {
        let mut found = None;
        for (key, scope) in self.keys.iter() {
            if bool::from(key.as_slice().ct_eq(presented)) {
                found = Some(*scope);
            }
        }
        found
    }

    /// Checks a request's key against the scope a route needs.
    pub fn authorize(&self, presented: Option<&[u8]>, needed: Scope) -> Result<Scope, Problem> {
        let presented = presented.ok_or_else(|| {
            unauthorized().with_detail(format!("send an API key in the `{API_KEY_HEADER}` header"))
        })?;
        let scope = self
            .scope_of(presented)
            .ok_or_else(|| unauthorized().with_detail("unknown API key"))?;
        if scope < needed {
            return Err(
                Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden")
                    .with_detail("this API key may only read"),
            );
        }
        Ok(scope)
    }
}

fn unauthorized() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
}

/// State of [`require_scope`]: the keys and the scope the wrapped routes need.
#[derive(Clone, Debug)]
pub struct ScopeGuard {
    pub keys: ApiKeys,
    pub needed: Scope,
}

/// Middleware (`axum::middleware::from_fn_with_state`) rejecting requests without a key
/// of the needed scope.
pub async fn require_scope(
    State(guard): State<ScopeGuard>,
    request: Request,
    next: Next,
) -> Result<Response, Problem> {
    let presented = request
        .headers()
        .get(API_KEY_HEADER)
        .map(|value| value.as_bytes());
    guard.keys.authorize(presented, guard.needed)?;
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        "write:writer-key-1, read:reader-key-1"
            .parse()
            .expect("valid keys")
    }

    #[test]
    fn a_write_key_may_read_and_write() {
        assert_eq!(
            keys().authorize(Some(b"writer-key-1"), Scope::Write),
            Ok(Scope::Write)
        );
        assert_eq!(
            keys().authorize(Some(b"writer-key-1"), Scope::Read),
            Ok(Scope::Write)
        );
    }

    #[test]
    fn a_read_key_is_forbidden_to_write() {
        let err = keys()
            .authorize(Some(b"reader-key-1"), Scope::Write)
            .expect_err("forbidden");
        assert_eq!(err.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn missing_unknown_and_prefix_keys_are_unauthorized() {
        for presented in [
            None,
            Some(&b"nope-nope-nope"[..]),
            Some(b"writer-key"),
            Some(b""),
        ] {
            let err = keys()
                .authorize(presented, Scope::Read)
                .expect_err("unauthorized");
            assert_eq!(err.status, StatusCode::UNAUTHORIZED, "{presented:?}");
        }
    }

    #[test]
    fn bad_configuration_is_refused_with_the_entry_named() {
        assert_eq!(
            "admin:abcdefghijk".parse::<ApiKeys>().err(),
            Some(ApiKeysError::BadEntry(0))
        );
        assert_eq!(
            "read:abcdefghij,write:short".parse::<ApiKeys>().err(),
            Some(ApiKeysError::ShortKey(1))
        );
        assert_eq!("".parse::<ApiKeys>().err(), Some(ApiKeysError::Empty));
    }
}
