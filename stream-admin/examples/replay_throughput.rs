//! Measures `replay students` on the local stack's NATS and Postgres (`scripts/dev
//! services`): publishes a school of about N events on streams of its own, lets the live
//! projection apply them, then rebuilds the model and prints events/s. Not a test.
//!
//! `cargo run --release -p stream-admin --example replay_throughput -- 100000`

#[path = "../tests/common/mod.rs"]
mod common;

use stream_admin::replay::{ReplayOptions, replay};

#[tokio::main]
async fn main() {
    let wanted: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let live = common::Live::start().await;
    // `school` writes about 2.08 events per student.
    let events = common::school(wanted * 100 / 208);
    let started = std::time::Instant::now();
    let last = live.publish_all(&events).await;
    println!(
        "published {} events in {:.1} s",
        events.len(),
        started.elapsed().as_secs_f64()
    );
    let started = std::time::Instant::now();
    live.caught_up(last).await;
    println!(
        "live projection applied them in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let target = live.students.clone();
    let options = ReplayOptions {
        force: false,
        keep_old: false,
        restart: false,
        batch_size: 1000,
        progress: false,
    };
    let report = replay(
        &live.broker.client,
        &live.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        target,
        options,
    )
    .await
    .expect("replay");
    println!(
        "replay: {} events in {:.1} s = {:.0} events/s; verified {}",
        report.applied,
        report.elapsed.as_secs_f64(),
        report.events_per_second(),
        report.switch.next
    );
    live.cleanup().await;
}
