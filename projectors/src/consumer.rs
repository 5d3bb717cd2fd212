//! The consume loop of one projection: pull a batch, decode, apply in one transaction, ack,
//! invalidate the cache.
//!
//! Ordering and exactly-once: the checkpoint (last applied stream sequence) is committed with
//! the data. Every (re)subscription first resets the durable consumer to `checkpoint + 1`
//! (ADR-60, nats-server >= 2.14), so delivery restarts gapless and in stream order; otherwise
//! a message left unacked by a crash would be redelivered only after `ack_wait`, behind newer
//! ones, and the checkpoint would then skip it. Within a subscription a failed batch is
//! retried in place, never skipped: a read model that is down is waited for; events the read
//! model refuses again and again are isolated and dead-lettered one by one.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Stream as MessageStream;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind, Message};
use events::{AggregateKind, Event, EventPayload, Projection, StreamNames};
use futures::{FutureExt, StreamExt};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use service_kit::event_reader::{EventReader, ReadError, ReadEvent};
use service_kit::metrics;
use service_kit::trace::SpanContext;

use crate::dead_letters::DeadLetters;
use crate::lease::{HeldLease, LeaseSettings, Leases, RenewError, Watch};
use crate::redis_cache::RedisInvalidator;
use read_models::store::{ProjectionStore, StoreError};

/// Pause between attempts after a failure (read model or broker unavailable).
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Backoff between failed subscriptions (no stream or consumer yet, NATS away): doubling
/// from the first to the last, reset once a subscription succeeds.
const FIRST_RESUBSCRIBE_DELAY: Duration = Duration::from_millis(250);
const MAX_RESUBSCRIBE_DELAY: Duration = Duration::from_secs(5);
/// A batch the read model refuses this many times is applied event by event, and an event
/// refused this many times on its own is dead-lettered.
pub const MAX_REFUSALS: u32 = 3;
/// A batch the read model has not taken for this long (unavailable) makes `/readyz` fail.
const UNREADY_AFTER_UNAVAILABLE: Duration = Duration::from_secs(10);
/// How long a batch waits for a message the server said was pending before it is applied
/// as it is. Bounds the delay a batch can add when delivery stalls.
const BATCH_FILL_WAIT: Duration = Duration::from_millis(20);

/// Everything one projection's loop needs.
pub struct ProjectionRunner<S> {
    /// Opens sealed personal fields (or reads them as erased): the one reading path.
    pub reader: EventReader,
    pub jetstream: jetstream::Context,
    pub names: StreamNames,
    pub store: S,
    pub batch_size: usize,
    /// Deletes the query side's cache entries after each commit; `None` without Redis.
    pub cache: Option<Arc<RedisInvalidator>>,
    pub progress: Arc<ProjectionProgress>,
    /// Active/standby timings: only the replica holding the projection's lease applies it.
    pub lease: LeaseSettings,
}

/// Live figures of the projections, read by `/metrics` and `/readyz`.
#[derive(Default)]
pub struct ProjectionProgress {
    figures: std::sync::Mutex<HashMap<&'static str, Figures>>,
}

#[derive(Clone)]
struct Figures {
    checkpoint: u64,
    pending: u64,
    /// `None` while the projection is subscribed and consuming, or standing by for it;
    /// otherwise why it is not (for `/readyz`).
    not_consuming: Option<String>,
    /// Whether this replica holds the projection's lease.
    active: bool,
    /// This replica's name in the lease.
    replica: String,
}

impl Default for Figures {
    fn default() -> Self {
        Figures {
            checkpoint: 0,
            pending: 0,
            not_consuming: Some("not subscribed yet".to_owned()),
            active: false,
            replica: String::new(),
        }
    }
}

impl ProjectionProgress {
    fn record(&self, projection: Projection, checkpoint: u64, pending: u64) {
        if let Ok(mut figures) = self.figures.lock() {
            // A batch of redelivered messages only carries sequences already applied: the
            // checkpoint it reports must not move the gauge back.
            let figures = figures.entry(projection.as_str()).or_default();
            figures.checkpoint = figures.checkpoint.max(checkpoint);
            figures.pending = pending;
        }
    }

    /// Marks a projection as consuming (`None`) or not, with the reason.
    fn set_consuming(&self, projection: Projection, not_consuming: Option<String>) {
        if let Ok(mut figures) = self.figures.lock() {
            figures
                .entry(projection.as_str())
                .or_default()
                .not_consuming = not_consuming;
        }
    }

    fn set_active(&self, projection: Projection, active: bool) {
        if let Ok(mut figures) = self.figures.lock() {
            figures.entry(projection.as_str()).or_default().active = active;
        }
    }

    fn set_replica(&self, projection: Projection, replica: &str) {
        if let Ok(mut figures) = self.figures.lock() {
            figures.entry(projection.as_str()).or_default().replica = replica.to_owned();
        }
    }

    /// Whether `projection` is subscribed and consuming; `Err` says why not. A projection
    /// that has not started yet, cannot subscribe (no stream or consumer, a server too old)
    /// or has stopped is not ready.
    pub fn consuming(&self, projection: Projection) -> Result<(), String> {
        let figures = self
            .figures
            .lock()
            .map_err(|_| "progress lock poisoned".to_owned())?;
        match figures.get(projection.as_str()) {
            Some(Figures {
                not_consuming: None,
                ..
            }) => Ok(()),
            Some(Figures {
                not_consuming: Some(reason),
                ..
            }) => Err(reason.clone()),
            None => Err("not started".to_owned()),
        }
    }

    /// `(projection, applied sequence, events delivered to it but not yet applied)`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64, u64)> {
        self.figures
            .lock()
            .map(|figures| {
                figures
                    .iter()
                    .map(|(name, f)| (*name, f.checkpoint, f.pending))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Registers the lag gauges (once per process).
    pub fn register_gauges(self: &Arc<Self>) {
        let lag = self.clone();
        let applied = self.clone();
        let roles = self.clone();
        let meter = metrics::meter();
        // The instruments live as long as the meter provider; their handles can go.
        let _lag = meter
            .u64_observable_gauge("projection.lag")
            .with_unit("{event}")
            .with_description("Events of the projection's subjects in the stream not yet applied")
            .with_callback(move |observer| {
                for (name, _, pending) in lag.snapshot() {
                    observer.observe(pending, &[KeyValue::new("projection", name)]);
                }
            })
            .build();
        let _active = meter
            .u64_observable_gauge("projection.active")
            .with_description("1 on the replica that applies the projection, 0 on a standby")
            .with_callback(move |observer| {
                if let Ok(figures) = roles.figures.lock() {
                    for (name, f) in figures.iter() {
                        observer.observe(
                            u64::from(f.active),
                            &[
                                KeyValue::new("projection", *name),
                                KeyValue::new("replica", f.replica.clone()),
                            ],
                        );
                    }
                }
            })
            .build();
        let _applied = meter
            .u64_observable_gauge("projection.applied.sequence")
            .with_description("Stream sequence up to which the projection has applied every event")
            .with_callback(move |observer| {
                for (name, checkpoint, _) in applied.snapshot() {
                    observer.observe(checkpoint, &[KeyValue::new("projection", name)]);
                }
            })
            .build();
    }
}

struct RunnerMetrics {
    applied: Counter<u64>,
    takeovers: Counter<u64>,
    dead_letters: Counter<u64>,
    batch_size: Histogram<u64>,
    apply_duration: Histogram<f64>,
}

impl RunnerMetrics {
    fn new() -> Self {
        let meter = metrics::meter();
        RunnerMetrics {
            applied: meter
                .u64_counter("projection.events.applied")
                .with_description("Events applied to the read model")
                .build(),
            takeovers: meter
                .u64_counter("projection.takeovers")
                .with_description("Times this replica became the active one for the projection")
                .build(),
            dead_letters: meter
                .u64_counter("projection.dead.letters")
                .with_description("Events moved to the dead-letter stream, by reason")
                .build(),
            batch_size: meter
                .u64_histogram("projection.batch.size")
                .with_unit("{event}")
                .with_description("Events per applied batch")
                .with_boundaries(vec![
                    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
                ])
                .build(),
            apply_duration: metrics::seconds_histogram(
                "projection.apply.duration",
                "Time to apply and commit one batch",
            ),
        }
    }
}

/// Why a subscription ended.
enum SubscriptionEnd {
    /// Shutdown, or the lease was lost (the caller tells which).
    ShutdownRequested,
    Failed(anyhow::Error),
    /// The store refused a batch: another replica claimed the projection.
    Fenced(String),
}

/// How standing by ended.
enum Standby {
    Acquired(HeldLease),
    Shutdown,
    Fatal(anyhow::Error),
}

/// Why a replica stopped being active.
enum ActiveEnd {
    Shutdown,
    LeaseLost(String),
    Fatal(anyhow::Error),
}

/// The lease of the active replica, renewed in the background until stopped or lost.
struct ActiveLease {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Option<HeldLease>>,
    /// `Some(reason)` once the lease is lost.
    lost: tokio::sync::watch::Receiver<Option<String>>,
}

impl ActiveLease {
    fn start(leases: Leases, mut lease: HeldLease) -> Self {
        let (lost_tx, lost) = tokio::sync::watch::channel(None);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(leases.settings.renew_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut stopped => return Some(lease),
                    _ = tick.tick() => {}
                }
                // Bounded: a request to an unreachable server would otherwise hold the
                // renewal (and the self-demotion below) for the client's request timeout.
                let renewed =
                    tokio::time::timeout(leases.settings.renew_every, leases.renew(&mut lease))
                        .await
                        .unwrap_or_else(|_| {
                            Err(RenewError::Unreachable("renewal timed out".into()))
                        });
                match renewed {
                    Ok(()) => {}
                    Err(RenewError::Lost(reason)) => {
                        let _ = lost_tx.send(Some(reason));
                        return None;
                    }
                    Err(RenewError::Unreachable(error)) if leases.expired_for_holder(&lease) => {
                        let _ = lost_tx.send(Some(format!(
                            "the lease could not be renewed in time: {error}"
                        )));
                        // Still ours in the bucket, maybe: standing by, this replica takes
                        // it back at once if nobody else has (see `try_acquire`).
                        return None;
                    }
                    Err(RenewError::Unreachable(error)) => {
                        tracing::warn!(%error, "renewing the projection lease failed; retrying");
                    }
                }
            }
        });
        ActiveLease {
            stop: Some(stop),
            task,
            lost,
        }
    }

    fn lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Stops renewing; the lease if it is still held.
    async fn stop(&mut self) -> Option<HeldLease> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.ok().flatten()
    }
}

/// What would make a subscription skip events without noticing: a delivery that never
/// arrived (a jump in the consumer sequence, e.g. in flight during a reconnect, later acked
/// by the ack-all of a newer one) or a reconnect of the client. Either ends the
/// subscription, and the next one starts from the checkpoint.
struct Continuity {
    statistics: Arc<async_nats::Statistics>,
    connects: u64,
    next_delivery: Option<u64>,
}

impl Continuity {
    fn new(statistics: Arc<async_nats::Statistics>) -> Self {
        let connects = statistics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        Continuity {
            statistics,
            connects,
            next_delivery: None,
        }
    }

    fn expect_first(&mut self, consumer_sequence: u64) {
        self.next_delivery = Some(consumer_sequence);
    }

    /// Whether `delivered` is the delivery after the previous one.
    fn follows(&mut self, delivered: &Delivered) -> Result<(), anyhow::Error> {
        let Ok(position) = &delivered.position else {
            return Ok(()); // refused when its batch is processed
        };
        if let Some(expected) = self.next_delivery
            && position.consumer_sequence != expected
        {
            return Err(anyhow::anyhow!(
                "delivery gap: consumer sequence {} arrived where {expected} was next",
                position.consumer_sequence
            ));
        }
        self.next_delivery = Some(position.consumer_sequence + 1);
        Ok(())
    }

    fn same_connection(&self) -> Result<(), anyhow::Error> {
        let connects = self
            .statistics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        if connects == self.connects {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "the NATS connection was re-established during the subscription"
            ))
        }
    }
}

type Shutdown<'a, F> = std::pin::Pin<&'a mut F>;

impl<S: ProjectionStore> ProjectionRunner<S> {
    fn projection(&self) -> Projection {
        self.store.projection()
    }

    /// One debug line per applied event, in a span continuing the event's trace (the
    /// command's span is its parent), so a request can be followed into the projection;
    /// with OTLP export on, the same span is exported (from `started`, when the batch
    /// began to apply, to now). Debug only for the logs: at tens of thousands of events per
    /// second a line each is a cost.
    fn observe_applied(&self, applied: &[(u64, Event)], started: std::time::SystemTime) {
        let log = tracing::enabled!(tracing::Level::DEBUG);
        let export = service_kit::otlp::enabled();
        if !log && !export {
            return;
        }
        let finished = std::time::SystemTime::now();
        for (position, event) in applied {
            let parent = SpanContext::parse(&event.metadata.trace.traceparent);
            let span = parent.map_or_else(SpanContext::root, |p| p.child());
            if log {
                tracing::debug_span!(
                    "apply",
                    trace_id = %span.trace_id_hex(),
                    span_id = %span.span_id_hex(),
                    parent_span_id = parent.map(|p| p.span_id_hex()),
                )
                .in_scope(|| {
                    tracing::debug!(
                        projection = self.projection().as_str(),
                        position,
                        event_id = %event.metadata.event_id,
                        event_type = event.payload.event_type(),
                        "event applied"
                    );
                });
            }
            if export {
                service_kit::otlp::record(service_kit::otlp::FinishedSpan {
                    name: format!("apply {}", event.payload.event_type()).into(),
                    kind: opentelemetry::trace::SpanKind::Consumer,
                    context: span,
                    parent,
                    start: started,
                    end: finished,
                    attributes: vec![
                        KeyValue::new("projection", self.projection().as_str()),
                        KeyValue::new("messaging.system", "nats"),
                        KeyValue::new("stream.sequence", *position as i64),
                        KeyValue::new("event.id", event.metadata.event_id.to_string()),
                    ],
                    error: None,
                });
            }
        }
    }

    fn labels(&self) -> [KeyValue; 1] {
        [KeyValue::new("projection", self.projection().as_str())]
    }

    /// Runs the projection until `shutdown` completes: standby until this replica holds the
    /// projection's lease, then active (claims the store for the lease's token, consumes)
    /// until the lease is lost, then standby again. A batch in flight at shutdown is
    /// finished (committed and acked) first, and the lease released.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let projection = self.projection();
        let metrics = RunnerMetrics::new();
        // Series exist before the first dead letter, so dashboards show 0, not "no data".
        for reason in ["undecodable", "refused"] {
            metrics.dead_letters.add(
                0,
                &[
                    KeyValue::new("projection", projection.as_str()),
                    KeyValue::new("reason", reason),
                ],
            );
        }
        metrics.takeovers.add(0, &self.labels());
        let leases = Leases::new(
            self.jetstream.clone(),
            self.names.projection_lease_bucket(),
            self.lease
                .replica
                .clone()
                .unwrap_or_else(Leases::default_replica_name),
            self.lease.clone(),
        );
        self.progress.set_replica(projection, &leases.holder);
        tokio::pin!(shutdown);
        let result = loop {
            let lease = match self.stand_by(&leases, &mut shutdown).await {
                Standby::Acquired(lease) => lease,
                Standby::Shutdown => break Ok(()),
                Standby::Fatal(error) => break Err(error),
            };
            let token = lease.token;
            // Recorded with the checkpoint: from now on a batch of an older token fails.
            let claimed = tokio::select! {
                () = &mut shutdown => Err(StoreError::Unavailable("shutting down".into())),
                claimed = self.store.claim(token) => claimed,
            };
            if let Err(error) = claimed {
                tracing::warn!(%error, projection = projection.as_str(), token, "claiming the read model failed; standing by");
                leases.release(lease).await;
                self.progress.set_consuming(
                    projection,
                    Some(format!("claiming the read model: {error}")),
                );
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                }
                continue;
            }
            metrics.takeovers.add(1, &self.labels());
            self.progress.set_active(projection, true);
            tracing::info!(
                projection = projection.as_str(),
                token,
                replica = leases.holder,
                "active"
            );
            let mut active = ActiveLease::start(leases.clone(), lease);
            let end = self.run_active(&mut active, &metrics, &mut shutdown).await;
            self.progress.set_active(projection, false);
            let lease = active.stop().await;
            match end {
                ActiveEnd::Shutdown => {
                    if let Some(lease) = lease {
                        leases.release(lease).await;
                    }
                    break Ok(());
                }
                ActiveEnd::LeaseLost(reason) => {
                    tracing::warn!(
                        projection = projection.as_str(),
                        token,
                        reason,
                        "no longer active; standing by"
                    );
                    if let Some(lease) = lease {
                        leases.release(lease).await;
                    }
                }
                ActiveEnd::Fatal(error) => {
                    if let Some(lease) = lease {
                        leases.release(lease).await;
                    }
                    break Err(error);
                }
            }
        };
        self.progress
            .set_consuming(projection, Some("stopped".to_owned()));
        tracing::info!(projection = projection.as_str(), "projection stopped");
        result
    }

    /// Waits until this replica holds the projection's lease. Standing by counts as ready;
    /// a bucket that cannot be read does not.
    async fn stand_by<F: std::future::Future<Output = ()>>(
        &self,
        leases: &Leases,
        shutdown: &mut Shutdown<'_, F>,
    ) -> Standby {
        let projection = self.projection();
        let mut watch = Watch::default();
        let mut retry_delay = FIRST_RESUBSCRIBE_DELAY;
        loop {
            // A server too old to reset consumers can never be consumed from correctly:
            // stop (the process exits non-zero) instead of retrying forever while ready.
            if let Err(line) = service_kit::nats::check_connected_server(&self.jetstream.client()) {
                self.progress.set_consuming(projection, Some(line.clone()));
                tracing::error!(projection = projection.as_str(), "{line}");
                return Standby::Fatal(anyhow::anyhow!(line));
            }
            let attempt = tokio::select! {
                () = shutdown.as_mut() => return Standby::Shutdown,
                attempt = leases.try_acquire(projection, &mut watch) => attempt,
            };
            let pause = match attempt {
                Ok(Some(lease)) => return Standby::Acquired(lease),
                Ok(None) => {
                    self.progress.set_consuming(projection, None);
                    retry_delay = FIRST_RESUBSCRIBE_DELAY;
                    leases.settings.poll_every
                }
                Err(error) => {
                    let error = format!("{error:#}");
                    tracing::warn!(%error, projection = projection.as_str(), "reading the projection lease failed");
                    self.progress.set_consuming(projection, Some(error));
                    let pause = retry_delay;
                    retry_delay = (retry_delay * 2).min(MAX_RESUBSCRIBE_DELAY);
                    pause
                }
            };
            tokio::select! {
                () = shutdown.as_mut() => return Standby::Shutdown,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Consumes while this replica holds the lease, resubscribing from the checkpoint after
    /// every failure.
    async fn run_active<F: std::future::Future<Output = ()>>(
        &self,
        active: &mut ActiveLease,
        metrics: &RunnerMetrics,
        shutdown: &mut Shutdown<'_, F>,
    ) -> ActiveEnd {
        let projection = self.projection();
        let mut retry_delay = FIRST_RESUBSCRIBE_DELAY;
        loop {
            if let Some(reason) = active.lost() {
                return ActiveEnd::LeaseLost(reason);
            }
            // After a reconnect the server may be another one (a rolling up- or downgrade).
            if let Err(line) = service_kit::nats::check_connected_server(&self.jetstream.client()) {
                self.progress.set_consuming(projection, Some(line.clone()));
                tracing::error!(projection = projection.as_str(), "{line}");
                return ActiveEnd::Fatal(anyhow::anyhow!(line));
            }
            let subscription = {
                // Stops at shutdown, or as soon as the lease is lost.
                let mut lost = active.lost.clone();
                let stop = async {
                    tokio::select! {
                        () = shutdown.as_mut() => {}
                        _ = lost.wait_for(Option::is_some) => {}
                    }
                };
                tokio::pin!(stop);
                let subscribed = tokio::select! {
                    () = &mut stop => None,
                    result = self.subscribe() => Some(result),
                };
                match subscribed {
                    None => SubscriptionEnd::ShutdownRequested,
                    Some(Ok((messages, acks, continuity))) => {
                        self.progress.set_consuming(projection, None);
                        retry_delay = FIRST_RESUBSCRIBE_DELAY;
                        self.consume(messages, acks, continuity, metrics, &mut stop)
                            .await
                    }
                    Some(Err(error)) => SubscriptionEnd::Failed(error),
                }
            };
            match subscription {
                SubscriptionEnd::ShutdownRequested => {
                    return match active.lost() {
                        Some(reason) => ActiveEnd::LeaseLost(reason),
                        None => ActiveEnd::Shutdown,
                    };
                }
                SubscriptionEnd::Fenced(reason) => return ActiveEnd::LeaseLost(reason),
                SubscriptionEnd::Failed(error) => {
                    let error = format!("{error:#}");
                    tracing::warn!(
                        %error,
                        projection = projection.as_str(),
                        retry_in_ms = retry_delay.as_millis() as u64,
                        "subscription failed; resubscribing from the checkpoint"
                    );
                    self.progress.set_consuming(projection, Some(error));
                    let mut lost = active.lost.clone();
                    tokio::select! {
                        () = shutdown.as_mut() => return ActiveEnd::Shutdown,
                        _ = lost.wait_for(Option::is_some) => {}
                        () = tokio::time::sleep(retry_delay) => {}
                    }
                    retry_delay = (retry_delay * 2).min(MAX_RESUBSCRIBE_DELAY);
                }
            }
        }
    }

    /// Resets the durable consumer to just after the checkpoint and opens a message stream.
    async fn subscribe(&self) -> anyhow::Result<(MessageStream, Acks, Continuity)> {
        let projection = self.projection();
        // Taken before the reset: a reconnect from here on ends the subscription.
        let mut continuity = Continuity::new(self.jetstream.client().statistics());
        let consumer_name = self.names.projection_consumer(projection);
        let checkpoint = self.store.checkpoint().await?;
        self.progress.record(projection, checkpoint, 0);
        let stream = self
            .jetstream
            .get_stream_no_info(self.names.event_stream())
            .await?;
        let reset = stream
            .reset_consumer(&consumer_name, Some(checkpoint + 1))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "resetting consumer {consumer_name} (run `stream-admin apply`?): {e}"
                )
            })?;
        // The reset restarts the consumer's delivery count: our first delivery must be the
        // next one. If it is not, another client's pull (an old subscription's, or a paused
        // replica's still registered with the server) took the first events after the reset,
        // and applying from our first one would skip them.
        continuity.expect_first(reset.info.delivered.consumer_sequence + 1);
        let consumer: PullConsumer = stream
            .get_consumer(&consumer_name)
            .await
            .map_err(|e| anyhow::anyhow!("opening consumer {consumer_name}: {e}"))?;
        let acks = match consumer.cached_info().config.ack_policy {
            AckPolicy::All => Acks::LastOfBatch,
            _ => Acks::EachMessage,
        };
        // Two batches in flight: the next one arrives while this one is applied.
        let messages = consumer
            .stream()
            .max_messages_per_batch(2 * self.batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        tracing::info!(projection = projection.as_str(), checkpoint, "subscribed");
        Ok((messages, acks, continuity))
    }

    async fn consume<F: std::future::Future<Output = ()>>(
        &self,
        mut messages: MessageStream,
        acks: Acks,
        mut continuity: Continuity,
        metrics: &RunnerMetrics,
        shutdown: &mut Shutdown<'_, F>,
    ) -> SubscriptionEnd {
        let dead_letters = DeadLetters::new(self.jetstream.clone(), &self.names, self.projection());
        // Messages that arrived (and were decoded) while the previous batch was applied: the
        // next batch's start.
        let mut arrived: Vec<Delivered> = Vec::with_capacity(self.batch_size);
        loop {
            let mut batch = std::mem::replace(&mut arrived, Vec::with_capacity(self.batch_size));
            if batch.is_empty() {
                // Wait for the first message of a batch, or for shutdown between batches.
                let first = tokio::select! {
                    () = shutdown.as_mut() => return SubscriptionEnd::ShutdownRequested,
                    next = messages.next() => next,
                };
                match first {
                    Some(Ok(message)) => {
                        let delivered = Delivered::decode(message, &self.reader);
                        if let Err(gap) = continuity.follows(&delivered) {
                            return SubscriptionEnd::Failed(gap);
                        }
                        batch.push(delivered);
                    }
                    Some(Err(error)) => return SubscriptionEnd::Failed(error.into()),
                    None => {
                        return SubscriptionEnd::Failed(anyhow::anyhow!("message stream ended"));
                    }
                }
            }
            // Then fill the batch: what is already buffered, and, while the server says more
            // of this consumer's messages are waiting, those too (they are on their way).
            // Without that wait a backlog is applied in slivers of what happened to have
            // arrived, a transaction each. Caught up (nothing pending), nothing waits.
            while batch.len() < self.batch_size {
                let next = match messages.next().now_or_never() {
                    Some(next) => next,
                    None if more_pending(&batch) => {
                        match tokio::time::timeout(BATCH_FILL_WAIT, messages.next()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                    None => break,
                };
                match next {
                    Some(Ok(message)) => {
                        let delivered = Delivered::decode(message, &self.reader);
                        if let Err(gap) = continuity.follows(&delivered) {
                            return SubscriptionEnd::Failed(gap);
                        }
                        batch.push(delivered);
                    }
                    Some(Err(error)) => return SubscriptionEnd::Failed(error.into()),
                    None => break,
                }
            }
            // A reconnect can lose deliveries that were in flight; the next ones would then
            // ack them (ack all) and the checkpoint would skip them. Start over from the
            // checkpoint instead (this batch is redelivered).
            if let Err(reconnected) = continuity.same_connection() {
                return SubscriptionEnd::Failed(reconnected);
            }
            // Apply the batch while the next one arrives. Messages still only count once
            // their batch commits; any left here at a failure or shutdown are redelivered
            // from the checkpoint on the next subscription.
            let applying = self.process_batch(&dead_letters, batch, acks, metrics, shutdown);
            tokio::pin!(applying);
            let mut stream_failed = None;
            let applied = loop {
                tokio::select! {
                    biased;
                    applied = &mut applying => break applied,
                    next = messages.next(),
                        if arrived.len() < self.batch_size && stream_failed.is_none() =>
                    {
                        match next {
                            Some(Ok(message)) => {
                                let delivered = Delivered::decode(message, &self.reader);
                                match continuity.follows(&delivered) {
                                    Ok(()) => arrived.push(delivered),
                                    Err(gap) => stream_failed = Some(gap),
                                }
                            }
                            Some(Err(error)) => stream_failed = Some(error.into()),
                            None => stream_failed = Some(anyhow::anyhow!("message stream ended")),
                        }
                    }
                }
            };
            if let Err(end) = applied {
                return end;
            }
            if let Some(error) = stream_failed {
                return SubscriptionEnd::Failed(error);
            }
        }
    }

    /// Decodes, applies and acks one batch. Undecodable events go to the dead-letter stream.
    async fn process_batch<F: std::future::Future<Output = ()>>(
        &self,
        dead_letters: &DeadLetters,
        mut batch: Vec<Delivered>,
        acks: Acks,
        metrics: &RunnerMetrics,
        shutdown: &mut Shutdown<'_, F>,
    ) -> Result<(), SubscriptionEnd> {
        let mut pending = 0;
        let mut delivered = Vec::with_capacity(batch.len());
        for (index, d) in batch.iter().enumerate() {
            let position = d.position.as_ref().map_err(|e| {
                SubscriptionEnd::Failed(anyhow::anyhow!("message without JetStream metadata: {e}"))
            })?;
            pending = position.pending;
            delivered.push((position.stream_sequence, index));
        }
        let delivered = unique_in_stream_order(delivered);
        let last_sequence = delivered.last().map_or(0, |(sequence, _)| *sequence);
        let outcomes: Vec<(u64, usize, Option<Decoded>)> = delivered
            .iter()
            .map(|&(sequence, index)| (sequence, index, batch[index].event.take()))
            .collect();
        let batch = batch;
        let mut decoded: Vec<(u64, Event)> = Vec::with_capacity(delivered.len());
        for (sequence, index, outcome) in outcomes {
            let message = &batch[index].message;
            let opened =
                match outcome.unwrap_or_else(|| decode_ahead(&message.payload, &self.reader)) {
                    Ok(Ahead::Read(read)) => Ok(read),
                    Ok(Ahead::Sealed(sealed)) => {
                        Ok(self.reader.open(events::Decoded::Sealed(sealed)).await)
                    }
                    Err(error) => Err(error),
                };
            let read = match opened {
                Ok(opened) => match opened {
                    Ok(read) => Ok(read.event),
                    // The key not visible yet, the bucket out of reach, no KEK given or
                    // not the KEK that wraps the key's block: the batch is not applied and
                    // comes again from the checkpoint.
                    Err(error) if error.is_transient() || error.is_configuration() => {
                        return Err(SubscriptionEnd::Failed(anyhow::anyhow!(
                            "event {sequence} cannot be opened yet: {error}"
                        )));
                    }
                    Err(error) => Err(error.to_string()),
                },
                Err(error) => Err(error.to_string()),
            };
            match read {
                Ok(event) => decoded.push((sequence, event)),
                Err(error) => {
                    dead_letters
                        .send(message, sequence, &format!("undecodable: {error}"))
                        .await
                        .map_err(SubscriptionEnd::Failed)?;
                    metrics.dead_letters.add(
                        1,
                        &[
                            KeyValue::new("projection", self.projection().as_str()),
                            KeyValue::new("reason", "undecodable"),
                        ],
                    );
                }
            }
        }
        // Before the batch is applied: once applied, it is never delivered again, and the
        // key of an erasure in it must not outlive a failure here.
        if let Err(error) = self
            .reader
            .destroy_erased_keys(service_kit::event_reader::erased_keys(
                decoded.iter().map(|(_, event)| event),
            ))
            .await
        {
            return Err(SubscriptionEnd::Failed(anyhow::anyhow!(
                "an erased student's data key: {error}"
            )));
        }
        let started = Instant::now();
        let started_at = std::time::SystemTime::now();
        let applied = self
            .apply_with_retries(&decoded, last_sequence, &batch, shutdown)
            .await;
        let applied = match applied {
            Ok(applied) => {
                self.observe_applied(&decoded, started_at);
                applied
            }
            Err(Unapplied::Fenced(reason)) => return Err(SubscriptionEnd::Fenced(reason)),
            Err(Unapplied::Isolate(_)) => {
                let by_sequence: HashMap<u64, &Message> = delivered
                    .iter()
                    .map(|&(sequence, index)| (sequence, &batch[index].message))
                    .collect();
                self.apply_one_by_one(
                    dead_letters,
                    &decoded,
                    last_sequence,
                    &by_sequence,
                    metrics,
                    &batch,
                    shutdown,
                )
                .await?
            }
        }
        .ok_or(SubscriptionEnd::ShutdownRequested)?;
        metrics
            .apply_duration
            .record(started.elapsed().as_secs_f64(), &self.labels());
        metrics
            .batch_size
            .record(decoded.len() as u64, &self.labels());
        metrics.applied.add(applied as u64, &self.labels());
        self.progress
            .record(self.projection(), last_sequence, pending);
        // Ack only after commit. A lost ack only means a redelivery that the checkpoint skips.
        let to_ack: Vec<&Delivered> = match acks {
            // The message of the batch's highest stream sequence acks every one below it (a
            // redelivered copy can be the batch's last delivery with a lower sequence).
            Acks::LastOfBatch => delivered
                .last()
                .map(|&(_, index)| &batch[index])
                .into_iter()
                .collect(),
            Acks::EachMessage => batch.iter().collect(),
        };
        for Delivered { message, .. } in to_ack {
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "ack failed; the events will be redelivered and skipped");
            }
        }
        if let Some(cache) = &self.cache {
            cache
                .invalidate(last_sequence, cache_keys(&self.names, &decoded))
                .await;
        }
        Ok(())
    }

    /// Applies the batch, waiting out an unavailable read model. `Ok(None)`: shutdown came
    /// first. `Err(Isolate)`: the read model refused the batch [`MAX_REFUSALS`] times.
    async fn apply_with_retries<F: std::future::Future<Output = ()>>(
        &self,
        decoded: &[(u64, Event)],
        through: u64,
        batch: &[Delivered],
        shutdown: &mut Shutdown<'_, F>,
    ) -> Result<Option<usize>, Unapplied> {
        let mut refusals = 0;
        let mut unavailable_since: Option<Instant> = None;
        loop {
            match self.store.apply_batch(decoded, through).await {
                Ok(outcome) => {
                    if unavailable_since.is_some() {
                        self.progress.set_consuming(self.projection(), None);
                    }
                    return Ok(Some(outcome.applied));
                }
                Err(StoreError::Fenced(reason)) => return Err(Unapplied::Fenced(reason)),
                Err(StoreError::Refused(reason)) => {
                    refusals += 1;
                    tracing::error!(
                        reason,
                        refusals,
                        events = decoded.len(),
                        "the read model refused the batch"
                    );
                    if refusals >= MAX_REFUSALS {
                        return Err(Unapplied::Isolate(reason));
                    }
                }
                Err(StoreError::Unavailable(reason)) => {
                    tracing::warn!(
                        reason,
                        events = decoded.len(),
                        "read model unavailable; retrying the batch"
                    );
                    // Waited for, never dead-lettered; but a wait that lasts shows on
                    // `/readyz` (a held lock, a full disk: the read model answers pings).
                    let since = *unavailable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNREADY_AFTER_UNAVAILABLE {
                        self.progress.set_consuming(
                            self.projection(),
                            Some(format!(
                                "retrying a batch for {} s: {reason}",
                                since.elapsed().as_secs()
                            )),
                        );
                    }
                }
            }
            // Keep the broker from redelivering while we retry.
            for Delivered { message, .. } in batch {
                let _ = message.ack_with(AckKind::Progress).await;
            }
            tokio::select! {
                () = shutdown.as_mut() => return Ok(None),
                () = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }

    /// Applies a refused batch event by event; an event refused [`MAX_REFUSALS`] times on its
    /// own goes to the dead-letter stream and the projection moves past it.
    #[allow(clippy::too_many_arguments)]
    async fn apply_one_by_one<F: std::future::Future<Output = ()>>(
        &self,
        dead_letters: &DeadLetters,
        decoded: &[(u64, Event)],
        through: u64,
        by_sequence: &HashMap<u64, &Message>,
        metrics: &RunnerMetrics,
        batch: &[Delivered],
        shutdown: &mut Shutdown<'_, F>,
    ) -> Result<Option<usize>, SubscriptionEnd> {
        let mut applied = 0;
        for (index, (sequence, _)) in decoded.iter().enumerate() {
            let single = &decoded[index..=index];
            let started_at = std::time::SystemTime::now();
            match self
                .apply_with_retries(single, *sequence, batch, shutdown)
                .await
            {
                Ok(Some(count)) => {
                    self.observe_applied(single, started_at);
                    applied += count;
                }
                Ok(None) => return Ok(None),
                Err(Unapplied::Fenced(reason)) => return Err(SubscriptionEnd::Fenced(reason)),
                Err(Unapplied::Isolate(reason)) => {
                    let Some(message) = by_sequence.get(sequence) else {
                        continue;
                    };
                    dead_letters
                        .send(
                            message,
                            *sequence,
                            &format!("refused by the read model {MAX_REFUSALS} times: {reason}"),
                        )
                        .await
                        .map_err(SubscriptionEnd::Failed)?;
                    metrics.dead_letters.add(
                        1,
                        &[
                            KeyValue::new("projection", self.projection().as_str()),
                            KeyValue::new("reason", "refused"),
                        ],
                    );
                    // Move the checkpoint past the dead letter.
                    match self
                        .apply_with_retries(&[], *sequence, batch, shutdown)
                        .await
                    {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(None),
                        Err(Unapplied::Fenced(reason)) => {
                            return Err(SubscriptionEnd::Fenced(reason));
                        }
                        Err(Unapplied::Isolate(_)) => {
                            return Err(SubscriptionEnd::Failed(anyhow::anyhow!(
                                "the read model refuses to move its checkpoint"
                            )));
                        }
                    }
                }
            }
        }
        match self.apply_with_retries(&[], through, batch, shutdown).await {
            Ok(result) => Ok(result.map(|_| applied)),
            Err(Unapplied::Fenced(reason)) => Err(SubscriptionEnd::Fenced(reason)),
            Err(Unapplied::Isolate(_)) => Err(SubscriptionEnd::Failed(anyhow::anyhow!(
                "the read model refuses to move its checkpoint"
            ))),
        }
    }
}

/// Whether the server had more of the consumer's messages waiting when it delivered the
/// batch's last one.
fn more_pending(batch: &[Delivered]) -> bool {
    batch
        .last()
        .and_then(|d| d.position.as_ref().ok())
        .is_some_and(|position| position.pending > 0)
}

/// What decoding ahead made of a message: read through (plain, or opened with a key this
/// process holds), or still sealed (its key is fetched when the batch is applied).
enum Ahead {
    Read(Result<ReadEvent, ReadError>),
    Sealed(events::SealedEvent),
}

type Decoded = Result<Ahead, events::DecodeError>;

/// Decodes, and opens what the keys at hand open, so that work overlaps the previous
/// batch's commit.
fn decode_ahead(bytes: &[u8], reader: &EventReader) -> Decoded {
    Ok(match events::decode_sealed(bytes)? {
        events::Decoded::Plain(event) => Ahead::Read(Ok(ReadEvent {
            event,
            personal: service_kit::event_reader::Personal::Clear,
            key: None,
        })),
        events::Decoded::Sealed(sealed) => match reader.open_cached(sealed) {
            Ok(read) => Ahead::Read(read),
            Err(sealed) => Ahead::Sealed(sealed),
        },
    })
}

/// A delivered message with its event, decoded as it arrived: while the batch before it
/// was being applied, when it arrived then.
struct Delivered {
    message: Message,
    /// From the JetStream reply subject; an error names what was wrong with it.
    position: Result<Position, String>,
    /// Taken when the batch is applied.
    event: Option<Decoded>,
}

/// Where a delivered message stands in its stream and consumer.
struct Position {
    stream_sequence: u64,
    /// The delivery's number in the consumer: one more for every delivery, redeliveries
    /// included, so a jump means a delivery that never arrived.
    consumer_sequence: u64,
    /// Messages of the consumer still waiting after this one.
    pending: u64,
}

impl Delivered {
    fn decode(message: Message, reader: &EventReader) -> Self {
        let position = message
            .info()
            .map(|info| Position {
                stream_sequence: info.stream_sequence,
                consumer_sequence: info.consumer_sequence,
                pending: info.pending,
            })
            .map_err(|e| e.to_string());
        let event = Some(decode_ahead(&message.payload, reader));
        Delivered {
            message,
            position,
            event,
        }
    }
}

/// How a batch is acked, from the consumer's ack policy.
#[derive(Clone, Copy)]
enum Acks {
    /// `AckPolicy::All` (what `stream-admin` creates): one ack per batch.
    LastOfBatch,
    /// `AckPolicy::Explicit` (consumers created before): every message.
    EachMessage,
}

/// Why a batch was not applied.
enum Unapplied {
    /// Refused too often (with the last reason): apply it event by event.
    Isolate(String),
    /// Another replica claimed the projection: stop applying.
    Fenced(String),
}

/// A batch's messages, each stream sequence once, in stream order.
///
/// One batch can hold a message twice: delivered, then redelivered because it waited in the
/// client's buffer past `ack_wait` (a stalled read model). The checkpoint cannot skip the
/// second copy (both are above it), and applied after the events that follow it, it would
/// roll them back. Every copy is still acked (the whole batch is); the event is applied once.
pub fn unique_in_stream_order<T>(messages: impl IntoIterator<Item = (u64, T)>) -> Vec<(u64, T)> {
    let mut by_sequence = std::collections::BTreeMap::new();
    for (sequence, message) in messages {
        by_sequence.entry(sequence).or_insert(message);
    }
    by_sequence.into_iter().collect()
}

/// The cache entries a batch made stale: every aggregate it touched, on both sides of an
/// enrollment (a course's cached entry lists its students, and the other way round).
pub fn cache_keys(names: &StreamNames, batch: &[(u64, Event)]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (_, event) in batch {
        let meta = &event.metadata;
        keys.insert(names.cache_key(meta.aggregate_kind, meta.aggregate_id));
        if let EventPayload::StudentEnrolled(e) | EventPayload::StudentUnenrolled(e) =
            &event.payload
        {
            keys.insert(names.cache_key(AggregateKind::Student, e.student_id));
            keys.insert(names.cache_key(AggregateKind::Course, e.course_id));
        }
    }
    keys
}
