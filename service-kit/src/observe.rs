//! The layer every HTTP route runs under: one trace span per request (see [`server_span`])
//! and the request counted and timed by method, route template and status
//! ([`http_metrics`]).
//!
//! Written as a plain tower layer rather than two `axum::middleware::from_fn` layers: each of
//! those clones the route and boxes both the rest of the stack and its own future on every
//! request, and together they cost a quarter of a cached read's throughput (PROFILING.md).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::response::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::http_metrics;
use crate::otlp;
use crate::trace::{SpanContext, TRACEPARENT, server_span_with_parent};

/// Add with `Router::layer`, after the routes and fallbacks it should see. Behind it the
/// request's `traceparent` header names the service's own span: the parent of anything a
/// handler passes the trace on to (the command gateway writes it into the events).
#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

/// One route with [`ObserveLayer`] around it.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let traceparent = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        let (context, parent, span) =
            server_span_with_parent(traceparent, request.method().as_str());
        let exported = otlp::enabled().then(|| Exported {
            context,
            parent,
            start: std::time::SystemTime::now(),
        });
        if let Ok(own) = HeaderValue::from_str(&context.traceparent()) {
            request.headers_mut().insert(TRACEPARENT, own);
        }
        let method = request.method().clone();
        // Set by the router before it calls the route; absent for the fallbacks.
        let route = request.extensions().get::<MatchedPath>().cloned();
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Observed {
            inner: inner.instrument(span),
            started,
            method,
            route,
            exported,
        }
    }
}

pin_project! {
    /// A request in flight under [`ObserveLayer`]; records it when the response is ready.
    pub struct Observed<F> {
        #[pin]
        inner: Instrumented<F>,
        started: Instant,
        method: Method,
        route: Option<MatchedPath>,
        exported: Option<Exported>,
    }
}

/// What a request's exported span needs from its start (only with OTLP export on).
struct Exported {
    context: SpanContext,
    parent: Option<SpanContext>,
    start: std::time::SystemTime,
}

impl<F, E> Future for Observed<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
            http_metrics::record(
                this.method,
                route,
                response.status(),
                this.started.elapsed(),
            );
            if let Some(exported) = this.exported.take() {
                let status = response.status();
                otlp::record(otlp::FinishedSpan {
                    name: format!("{} {route}", this.method).into(),
                    kind: opentelemetry::trace::SpanKind::Server,
                    context: exported.context,
                    parent: exported.parent,
                    start: exported.start,
                    end: std::time::SystemTime::now(),
                    attributes: vec![
                        opentelemetry::KeyValue::new(
                            "http.request.method",
                            this.method.to_string(),
                        ),
                        opentelemetry::KeyValue::new("http.route", route.to_owned()),
                        opentelemetry::KeyValue::new(
                            "http.response.status_code",
                            i64::from(status.as_u16()),
                        ),
                    ],
                    error: status.is_server_error().then(|| status.to_string()),
                });
            }
        }
        Poll::Ready(result)
    }
}
