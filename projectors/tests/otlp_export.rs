//! Spans leave the processes over OTLP with their parent links intact: a command sent with
//! a `traceparent` gives a gateway span (parent: the caller's span) and, in the projectors
//! process, a span for applying its event (parent: the gateway's span), all in the
//! caller's trace, received by an OTLP/gRPC receiver this test starts.
//!
//! The gateway runs in this test process (its binary belongs to another package), with its
//! real router and the real exporter pointed at the receiver; the projectors run as their
//! binary with `OTEL_EXPORTER_OTLP_ENDPOINT`, exactly as deployed.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Projectors;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use test_support::{TestBroker, TestDatabase};

/// One received span: the exporting service, and the span's ids and name.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut spans = self.0.lock().expect("lock");
        for resource_spans in &request.get_ref().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Waits (≤ 30 s) for a span matching `wanted`.
    async fn span(&self, what: &str, wanted: impl Fn(&Received) -> bool) -> Received {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(span) = self.0.lock().expect("lock").iter().find(|s| wanted(s)) {
                return span.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} span received within 30 s; received: {:?}",
                self.0.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_its_projection_arrive_over_otlp_as_one_linked_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("receiver port");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let exporting =
        service_kit::otlp::init_with_endpoint("command-gateway", &endpoint).expect("exporter");
    let state = command_gateway::app_state(
        broker.client.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    )
    .await
    .expect("command side");
    let app = command_gateway::http::router(state, test_support::api_keys(), 64 * 1024);
    let gateway_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("gateway port");
    let gateway = format!("http://{}", gateway_listener.local_addr().expect("address"));
    tokio::spawn(command_gateway::run(
        gateway_listener,
        app,
        std::future::pending(),
    ));
    let mut projectors = Projectors::start_with(
        broker.names.prefix(),
        &db.url,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    );
    projectors.wait_started().await;

    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(format!("{gateway}/api/students"))
        .header("x-api-key", test_support::WRITE_KEY)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"name": "Ada L", "first_name": "Ada", "last_name": "Lovelace"}))
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);

    let request = receiver
        .span("gateway request", |s| {
            s.trace_id == trace_id && s.name == "POST /api/students"
        })
        .await;
    assert_eq!(request.parent_span_id, caller_span, "{request:?}");
    assert!(request.service.contains("command-gateway"), "{request:?}");
    let applied = receiver
        .span("projection", |s| {
            s.trace_id == trace_id && s.name == "apply StudentRegistered"
        })
        .await;
    assert_eq!(
        applied.parent_span_id, request.span_id,
        "the projection's span is a child of the gateway's request span: {applied:?}"
    );
    assert!(applied.service.contains("projectors"), "{applied:?}");
    assert_ne!(applied.span_id, request.span_id);

    exporting.shutdown().await;
    db.cleanup().await;
    broker.cleanup().await;
}
