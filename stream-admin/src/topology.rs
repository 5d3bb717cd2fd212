//! The declarative definition of everything the system needs on the broker: streams,
//! durable consumers and KV buckets. `apply` makes the server match it.

use std::time::Duration;

use async_nats::jetstream::{consumer, kv, stream};
use events::{Projection, StreamNames};

/// Broker-side dedup window for `Nats-Msg-Id`. Modest on purpose: the server keeps every id
/// of the window in memory, and a client retry happens within seconds, not minutes.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a first outcome per `Idempotency-Key` is kept (SPEC: at least 24 h).
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A projector that holds a message this long without acking gets it redelivered.
pub const PROJECTION_ACK_WAIT: Duration = Duration::from_secs(30);
/// Unacked messages a projection consumer may have out; bounds a projector's batch size.
pub const PROJECTION_MAX_ACK_PENDING: i64 = 10_000;

/// A durable consumer on a stream.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    pub config: consumer::pull::Config,
}

/// A KV bucket, and whether single messages of it may be erased.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub config: kv::Config,
    /// Turns the bucket stream's `deny_delete` (on for every KV bucket) off, so a message
    /// can be erased: a purge alone leaves the purged value's bytes in the store's files,
    /// and a destroyed data key must leave none.
    pub erasable: bool,
}

/// Everything the system needs on the broker.
#[derive(Debug, Clone)]
pub struct Topology {
    pub streams: Vec<stream::Config>,
    pub consumers: Vec<ConsumerSpec>,
    pub buckets: Vec<BucketSpec>,
}

/// The topology for one deployment; `replicas` is 1 locally and 3 in the chart.
pub fn desired(names: &StreamNames, replicas: usize) -> Topology {
    let events = stream::Config {
        name: names.event_stream(),
        description: Some("School events: the source of truth".into()),
        subjects: vec![names.event_subjects()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        // Multi-aggregate commands append all their events or none.
        allow_atomic_publish: true,
        // Aggregate loads read the last message of one subject from any replica.
        allow_direct: true,
        // Events are never removed: the stream is the source of truth.
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    };
    let dead_letters = stream::Config {
        name: names.dead_letter_stream(),
        description: Some("Events a projection could not apply, with the reason".into()),
        subjects: vec![names.dead_letter_subjects()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let consumers = Projection::ALL
        .iter()
        .map(|&projection| {
            let name = names.projection_consumer(projection);
            ConsumerSpec {
                stream: names.event_stream(),
                config: consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    name: Some(name),
                    description: Some(format!("Feeds the {} projection", projection.as_str())),
                    filter_subject: names.aggregate_kind_subjects(projection.source_aggregate()),
                    deliver_policy: consumer::DeliverPolicy::All,
                    // One ack per batch covers it: the checkpoint, not the ack, says what is
                    // applied, so acking every message only costs the broker work.
                    ack_policy: consumer::AckPolicy::All,
                    ack_wait: PROJECTION_ACK_WAIT,
                    // Unlimited: the projector itself dead-letters an event after N failures,
                    // so it can record why.
                    max_deliver: -1,
                    max_ack_pending: PROJECTION_MAX_ACK_PENDING,
                    ..Default::default()
                },
            }
        })
        .collect();
    let idempotency = kv::Config {
        bucket: names.idempotency_bucket(),
        description: "First outcome of each command Idempotency-Key".into(),
        history: 1,
        max_age: IDEMPOTENCY_TTL,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    // Replicated like the stream: a lease that one node's loss could erase would let two
    // projectors believe they are active (the store's fence still refuses the older one).
    let leases = kv::Config {
        bucket: names.projection_lease_bucket(),
        description: "Which projectors replica applies each projection (active/standby)".into(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    Topology {
        streams: vec![events, dead_letters],
        consumers,
        buckets: vec![
            BucketSpec {
                config: idempotency,
                erasable: false,
            },
            BucketSpec {
                config: leases,
                erasable: false,
            },
            BucketSpec {
                config: service_kit::data_keys::bucket_config(names, replicas),
                erasable: true,
            },
        ],
    }
}
