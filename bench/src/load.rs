//! Closed-loop load generators: a fixed number of workers, each sending its next request as
//! soon as the previous answer arrived, for a fixed time. Latencies go into HDR histograms
//! (microseconds, 3 significant digits); only answers with the expected status count.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use query_api::grpc::pb::GetStudentRequest;
use query_api::grpc::pb::school_query_client::SchoolQueryClient;
use tonic::transport::Channel;

/// What one load run measured.
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl LoadResult {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn p50_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.50) as f64 / 1000.0
    }

    pub fn p99_ms(&self) -> f64 {
        self.latency_us.value_at_quantile(0.99) as f64 / 1000.0
    }
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s is far wider than any answer here.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// Runs `workers` copies of `worker` (each given its index and the deadline) after a warm-up
/// of `warmup`, and merges what they measured.
pub async fn drive<W, Fut>(
    workers: usize,
    warmup: Duration,
    duration: Duration,
    worker: W,
) -> anyhow::Result<LoadResult>
where
    W: Fn(usize, Instant, Instant) -> Fut,
    Fut: Future<Output = anyhow::Result<(u64, u64, Histogram<u64>)>> + Send + 'static,
{
    let start = Instant::now() + warmup;
    let end = start + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|i| tokio::spawn(worker(i, start, end)))
        .collect();
    let mut result = LoadResult {
        ok: 0,
        errors: 0,
        elapsed: duration,
        latency_us: histogram(),
    };
    for task in tasks {
        let (ok, errors, latencies) = task.await.context("load worker panicked")??;
        result.ok += ok;
        result.errors += errors;
        result
            .latency_us
            .add(&latencies)
            .context("merging histograms")?;
    }
    Ok(result)
}

/// One HTTP request as the load generator sends it.
pub struct HttpRequest {
    pub method: hyper::Method,
    pub path: String,
    pub api_key: &'static str,
    /// A JSON body (with `content-type: application/json`), or none.
    pub body: Option<Bytes>,
}

/// GETs `path` from `addr` over `workers` HTTP/1.1 keep-alive connections.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    api_key: &'static str,
    workers: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let path = path.to_owned();
    http_load(
        addr,
        hyper::StatusCode::OK,
        workers,
        warmup,
        duration,
        move || HttpRequest {
            method: hyper::Method::GET,
            path: path.clone(),
            api_key,
            body: None,
        },
    )
    .await
}

/// Sends what `request` makes over `workers` HTTP/1.1 keep-alive connections, counting
/// answers with `expected` status.
pub async fn http_load<R>(
    addr: std::net::SocketAddr,
    expected: hyper::StatusCode,
    workers: usize,
    warmup: Duration,
    duration: Duration,
    request: R,
) -> anyhow::Result<LoadResult>
where
    R: Fn() -> HttpRequest + Clone + Send + Sync + 'static,
{
    drive(workers, warmup, duration, move |_, start, end| {
        let request = request.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await?;
            tokio::spawn(connection);
            let mut latencies = histogram();
            let (mut ok, mut errors) = (0, 0);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let HttpRequest {
                    method,
                    path,
                    api_key,
                    body,
                } = request();
                let mut builder = hyper::Request::builder()
                    .method(method)
                    .uri(path.as_str())
                    .header("host", addr.to_string())
                    .header("x-api-key", api_key);
                if body.is_some() {
                    builder = builder.header("content-type", "application/json");
                }
                let http_request = builder.body(Full::new(body.unwrap_or_default()))?;
                let response = sender.send_request(http_request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                if sent >= start {
                    if status == expected {
                        ok += 1;
                        latencies.saturating_record(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            Ok((ok, errors, latencies))
        }
    })
    .await
}

/// Calls `GetStudent(id)` from `workers` tasks sharing `connections` HTTP/2 connections.
pub async fn grpc_get_student(
    endpoint: &str,
    id: &str,
    api_key: &str,
    workers: usize,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(
            Channel::from_shared(endpoint.to_owned())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to {endpoint}"))?,
        );
    }
    let id = id.to_owned();
    let api_key: tonic::metadata::MetadataValue<_> = api_key.parse()?;
    drive(workers, warmup, duration, move |i, start, end| {
        let mut client = SchoolQueryClient::new(channels[i % channels.len()].clone());
        let id = id.clone();
        let api_key = api_key.clone();
        async move {
            let mut latencies = histogram();
            let (mut ok, mut errors) = (0, 0);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let mut request = tonic::Request::new(GetStudentRequest { id: id.clone() });
                request.metadata_mut().insert("x-api-key", api_key.clone());
                let answer = client.get_student(request).await;
                if sent >= start {
                    if answer.is_ok() {
                        ok += 1;
                        latencies.saturating_record(sent.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            Ok((ok, errors, latencies))
        }
    })
    .await
}
