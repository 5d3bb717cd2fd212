//! W3C trace context (`traceparent`, version 00) without a tracing SDK: enough to carry one
//! trace from an HTTP request through the events it produced into the projector that
//! applies them, and to put trace and span ids on every JSON log line on the way.
//!
//! The logs are the record; with an OTLP endpoint configured the same spans are also
//! exported ([`crate::otlp`]). An incoming `traceparent` continues the caller's trace,
//! otherwise a new trace starts at the service.

use std::fmt;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The position of one span in one trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl SpanContext {
    /// Parses a `traceparent` header. Versions other than `00` are read by their first four
    /// fields, as the spec asks; `ff`, all-zero ids and anything malformed give `None`.
    pub fn parse(value: &str) -> Option<SpanContext> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2)) {
            return None;
        }
        if version.eq_ignore_ascii_case("ff") || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(SpanContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The first span of a new trace.
    pub fn root() -> SpanContext {
        SpanContext {
            trace_id: (u128::from(random_u64()) << 64 | u128::from(random_u64())).max(1),
            span_id: new_span_id(),
            sampled: true,
        }
    }

    /// A new span of the same trace, whose parent is `self`.
    pub fn child(&self) -> SpanContext {
        SpanContext {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// Continues `traceparent` if it is well formed, otherwise starts a new trace.
    pub fn continue_or_start(traceparent: Option<&str>) -> (SpanContext, Option<SpanContext>) {
        match traceparent.and_then(SpanContext::parse) {
            Some(parent) => (parent.child(), Some(parent)),
            None => (SpanContext::root(), None),
        }
    }

    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

impl fmt::Display for SpanContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

fn new_span_id() -> u64 {
    random_u64().max(1) // an all-zero id is invalid
}

/// 64 unpredictable bits without a syscall per request: every `RandomState` has fresh
/// SipHash keys (seeded from the OS once per thread, then stepped), and hashing nothing
/// with them scrambles those keys into a uniformly spread value.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The span a server runs one incoming request or call in: it continues `traceparent` if
/// well formed, otherwise starts a trace, and carries `trace_id`, `span_id`,
/// `parent_span_id` and `method` (HTTP method or RPC name), so every log line written
/// inside names its trace. Returns the service's own [`SpanContext`] too.
pub fn server_span(traceparent: Option<&str>, method: &str) -> (SpanContext, tracing::Span) {
    let (context, _, span) = server_span_with_parent(traceparent, method);
    (context, span)
}

/// [`server_span`], also returning the caller's span it continues (for export).
pub fn server_span_with_parent(
    traceparent: Option<&str>,
    method: &str,
) -> (SpanContext, Option<SpanContext>, tracing::Span) {
    let (context, parent) = SpanContext::continue_or_start(traceparent);
    let span = tracing::info_span!(
        "request",
        trace_id = %context.trace_id_hex(),
        span_id = %context.span_id_hex(),
        parent_span_id = parent.map(|p| p.span_id_hex()),
        method,
    );
    (context, parent, span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_version_00() {
        let raw = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = SpanContext::parse(raw).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id_hex(), "00f067aa0ba902b7");
        assert!(context.sampled);
        assert_eq!(context.traceparent(), raw);
    }

    #[test]
    fn refuses_malformed_and_invalid_values() {
        for raw in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9zzb7-01",
        ] {
            assert_eq!(SpanContext::parse(raw), None, "{raw:?}");
        }
        // A future version may append fields; its first four are still read.
        assert!(
            SpanContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_a_new_span() {
        let parent = SpanContext::root();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_ne!(SpanContext::root().trace_id, parent.trace_id);
    }

    #[test]
    fn an_absent_or_bad_traceparent_starts_a_new_trace() {
        let (context, parent) = SpanContext::continue_or_start(Some("garbage"));
        assert!(parent.is_none());
        assert_ne!(context.trace_id, 0);
        let raw = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let (context, parent) = SpanContext::continue_or_start(Some(raw));
        assert_eq!(parent, SpanContext::parse(raw));
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!context.sampled, "the caller's sampling decision is kept");
    }
}
