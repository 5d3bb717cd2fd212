//! `apply` against a real JetStream: idempotent, dry runs change nothing, changed definitions
//! are applied and reported, destructive ones are refused unless allowed.

use std::time::Duration;

use stream_admin::{ApplyOptions, DestructiveChanges, Outcome, apply, desired, summary};
use test_support::{nats_url, unique_suffix};

async fn jetstream() -> async_nats::jetstream::Context {
    let client = async_nats::connect(nats_url())
        .await
        .expect("NATS of the test stack");
    async_nats::jetstream::new(client)
}

fn names() -> events::StreamNames {
    events::StreamNames::new(format!("a{}", unique_suffix()))
}

const DRY_RUN: ApplyOptions = ApplyOptions {
    dry_run: true,
    allow_destructive: false,
};

#[tokio::test]
async fn a_dry_run_changes_nothing_and_a_second_apply_reports_no_change() {
    let jetstream = jetstream().await;
    let names = names();
    let topology = desired(&names, 1);

    let planned = apply(&jetstream, &topology, DRY_RUN)
        .await
        .expect("dry run");
    assert!(
        planned.iter().all(|c| c.outcome == Outcome::Created),
        "{planned:?}"
    );
    assert!(
        jetstream.get_stream(names.event_stream()).await.is_err(),
        "a dry run created the stream"
    );

    let first = apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("apply");
    assert_eq!(first.len(), planned.len());
    assert!(first.iter().all(|c| c.outcome == Outcome::Created));
    let second = apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("again");
    assert!(
        second.iter().all(|c| c.outcome == Outcome::Unchanged),
        "{second:?}"
    );
    assert!(summary(&second, false).starts_with("no changes"));

    for stream in [
        names.event_stream(),
        names.dead_letter_stream(),
        format!("KV_{}", names.idempotency_bucket()),
    ] {
        let _ = jetstream.delete_stream(stream).await;
    }
}

#[tokio::test]
async fn a_changed_definition_is_applied_and_reported() {
    let jetstream = jetstream().await;
    let names = names();
    let mut topology = desired(&names, 1);
    apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("apply");

    topology.streams[0].duplicate_window = Duration::from_secs(60);
    topology.consumers[0].config.ack_wait = Duration::from_secs(45);
    let planned = apply(&jetstream, &topology, DRY_RUN)
        .await
        .expect("dry run");
    let updated: Vec<String> = planned
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Updated(_)))
        .map(ToString::to_string)
        .collect();
    assert_eq!(updated.len(), 2, "{planned:?}");
    assert!(updated[0].contains("duplicate_window"), "{updated:?}");
    assert!(updated[1].contains("ack_wait"), "{updated:?}");

    apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("apply the change");
    let info = jetstream
        .get_stream(names.event_stream())
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .duplicate_window;
    assert_eq!(info, Duration::from_secs(60));
    let again = apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("again");
    assert!(
        again.iter().all(|c| c.outcome == Outcome::Unchanged),
        "{again:?}"
    );

    for stream in [
        names.event_stream(),
        names.dead_letter_stream(),
        format!("KV_{}", names.idempotency_bucket()),
    ] {
        let _ = jetstream.delete_stream(stream).await;
    }
}

#[tokio::test]
async fn destructive_changes_are_refused_unless_allowed() {
    let jetstream = jetstream().await;
    let names = names();
    let mut topology = desired(&names, 1);
    apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("apply");
    let subject = names.aggregate_subject(events::AggregateKind::Student, uuid::Uuid::now_v7());
    jetstream
        .publish(subject, "kept".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    // Messages older than a day would be deleted: refused, and nothing changes.
    topology.streams[0].max_age = Duration::from_secs(24 * 3600);
    let error = apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect_err("refused");
    let refused = error
        .downcast_ref::<DestructiveChanges>()
        .expect("a destructive-change refusal");
    assert_eq!(refused.0.len(), 1);
    assert!(error.to_string().contains("--allow-destructive"), "{error}");
    let mut stream = jetstream
        .get_stream(names.event_stream())
        .await
        .expect("stream");
    assert_eq!(
        stream.info().await.expect("info").config.max_age,
        Duration::ZERO
    );

    let applied = apply(
        &jetstream,
        &topology,
        ApplyOptions {
            dry_run: false,
            allow_destructive: true,
        },
    )
    .await
    .expect("allowed");
    assert!(applied.iter().any(|c| !c.destructive.is_empty()));
    let info = stream.info().await.expect("info").clone();
    assert_eq!(info.config.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(info.state.messages, 1, "a young message survives");

    for stream in [
        names.event_stream(),
        names.dead_letter_stream(),
        format!("KV_{}", names.idempotency_bucket()),
    ] {
        let _ = jetstream.delete_stream(stream).await;
    }
}

/// Consumers made before projectors acked one message per batch used explicit acks; a plain
/// `apply` (the chart's upgrade hook) recreates them, since projectors rebuild a consumer's
/// delivery state from their checkpoints.
#[tokio::test]
async fn a_consumer_with_explicit_acks_is_recreated_without_allow_destructive() {
    use async_nats::jetstream::consumer::AckPolicy;
    let jetstream = jetstream().await;
    let names = names();
    let mut topology = desired(&names, 1);
    for consumer in &mut topology.consumers {
        consumer.config.ack_policy = AckPolicy::Explicit;
    }
    apply(&jetstream, &topology, ApplyOptions::default())
        .await
        .expect("apply the old definition");

    let changes = apply(&jetstream, &desired(&names, 1), ApplyOptions::default())
        .await
        .expect("the new definition needs no --allow-destructive");
    let recreated: Vec<_> = changes
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Recreated(_)))
        .collect();
    assert_eq!(recreated.len(), topology.consumers.len(), "{changes:?}");
    assert!(recreated.iter().all(|c| c.destructive.is_empty()));
    let stream = jetstream
        .get_stream_no_info(names.event_stream())
        .await
        .expect("stream");
    for spec in &topology.consumers {
        let name = spec.config.durable_name.clone().expect("durable");
        let info = stream.consumer_info(&name).await.expect("consumer");
        assert_eq!(info.config.ack_policy, AckPolicy::All, "{name}");
    }

    for stream in [
        names.event_stream(),
        names.dead_letter_stream(),
        format!("KV_{}", names.idempotency_bucket()),
    ] {
        let _ = jetstream.delete_stream(stream).await;
    }
}
