//! Spans out over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; nothing at all otherwise.
//!
//! The span ids are the ones [`crate::trace`] already puts on log lines and into events'
//! `traceparent`, so an exported trace, the JSON logs and the events name the same spans:
//! the HTTP request span (parent: the caller's `traceparent`), and the projection's span
//! of each event (parent: the request span the event's `traceparent` names). The SDK's
//! tracer would pick span ids of its own, so finished spans are handed to the
//! opentelemetry-otlp exporter as `SpanData` directly, batched by one task. A full queue
//! drops spans (counted in a log line), never slows a request.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext as OtelSpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;

use crate::trace::SpanContext;

/// Spans waiting for the exporter; past this they are dropped.
const QUEUE: usize = 16 * 1024;
/// Most spans per export request.
const BATCH: usize = 512;
/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static QUEUED: OnceLock<mpsc::Sender<SpanData>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// One finished span, in this crate's ids.
pub struct FinishedSpan {
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub context: SpanContext,
    pub parent: Option<SpanContext>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// `Some(description)` marks the span as failed.
    pub error: Option<String>,
}

/// Whether spans are exported (cheap; check before building a [`FinishedSpan`]).
pub fn enabled() -> bool {
    QUEUED.get().is_some()
}

/// Queues `span` for export if exporting is on and its trace is sampled.
pub fn record(span: FinishedSpan) {
    let Some(queue) = QUEUED.get() else { return };
    if !span.context.sampled {
        return;
    }
    if queue.try_send(span_data(span)).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The exporting task; [`Exporting::shutdown`] sends what is queued before the process ends.
pub struct Exporting {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Exporting {
    /// Exports what is still queued (bounded by one export timeout) and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(EXPORT_TIMEOUT, self.task).await;
    }
}

/// Starts exporting if an OTLP endpoint is configured; `service_name` is the resource's
/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise. Call once, inside the runtime.
pub fn init(service_name: &'static str) -> anyhow::Result<Option<Exporting>> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()));
    if !configured {
        return Ok(None);
    }
    // The exporter reads the endpoint (and headers, timeout, TLS) from the environment.
    start(service_name, None).map(Some)
}

/// Like [`init`], to the OTLP/gRPC endpoint `endpoint` (e.g. `http://127.0.0.1:4317`)
/// whatever the environment says: for tests that start a receiver of their own.
pub fn init_with_endpoint(service_name: &'static str, endpoint: &str) -> anyhow::Result<Exporting> {
    start(service_name, Some(endpoint))
}

fn start(service_name: &'static str, endpoint: Option<&str>) -> anyhow::Result<Exporting> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let mut exporter = builder.build().map_err(|e| {
        anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: building the OTLP exporter: {e}")
    })?;
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty()) {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name(service_name).build()
    };
    exporter.set_resource(&resource);
    let (queue, mut queued) = mpsc::channel(QUEUE);
    if QUEUED.set(queue).is_err() {
        anyhow::bail!("OTLP export initialised twice");
    }
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let stopping = tokio::select! {
                received = queued.recv_many(&mut batch, BATCH) => received == 0,
                _ = &mut stopped => {
                    while batch.len() < BATCH {
                        match queued.try_recv() {
                            Ok(span) => batch.push(span),
                            Err(_) => break,
                        }
                    }
                    true
                }
            };
            if !batch.is_empty() {
                let spans = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                let count = spans.len();
                match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(spans)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(%error, count, "OTLP span export failed"),
                    Err(_) => tracing::warn!(count, "OTLP span export timed out"),
                }
            }
            let dropped = DROPPED.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(dropped, "OTLP span queue was full; spans dropped");
            }
            if stopping {
                break;
            }
        }
        let _ = exporter.shutdown();
    });
    tracing::info!("exporting spans over OTLP");
    Ok(Exporting { stop, task })
}

fn otel_context(context: SpanContext, remote: bool) -> OtelSpanContext {
    OtelSpanContext::new(
        TraceId::from_bytes(context.trace_id.to_be_bytes()),
        SpanId::from_bytes(context.span_id.to_be_bytes()),
        if context.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        remote,
        TraceState::default(),
    )
}

fn span_data(span: FinishedSpan) -> SpanData {
    SpanData {
        span_context: otel_context(span.context, false),
        parent_span_id: span.parent.map_or(SpanId::INVALID, |p| {
            SpanId::from_bytes(p.span_id.to_be_bytes())
        }),
        // The parent is always another process's span (the caller, or the gateway's
        // request span an event names).
        parent_span_is_remote: span.parent.is_some(),
        span_kind: span.kind,
        name: span.name,
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match span.error {
            Some(description) => Status::error(description),
            None => Status::Unset,
        },
        instrumentation_scope: InstrumentationScope::builder("school").build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_ids_are_the_ids_of_the_logs_and_the_traceparent() {
        let parent = SpanContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        let context = parent.child();
        let data = span_data(FinishedSpan {
            name: "POST /api/students".into(),
            kind: SpanKind::Server,
            context,
            parent: Some(parent),
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: vec![],
            error: None,
        });
        assert_eq!(
            data.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            data.span_context.span_id().to_string(),
            context.span_id_hex()
        );
        assert_eq!(data.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(data.parent_span_is_remote);
    }
}
