//! `status`, `events get | tail` and the command line itself.

mod common;

use common::{Live, registered, renamed};
use service_kit::event_reader::EventReader;
use stream_admin::inspect::{self, TailFrom};
use stream_admin::read_models::ReadModel;
use uuid::Uuid;

/// `events get` on sealed names: shown with the student's key, never after its erasure,
/// and with a key-less reader an error that names the reason, not the names.
#[tokio::test]
async fn events_get_shows_sealed_names_until_the_erasure_and_then_says_erased() {
    let live = Live::start().await;
    let ada = Uuid::now_v7();
    let at = live
        .publish_sealed(&registered(ada, "Zebulon Quixotic"))
        .await;
    // A reader of its own, as `stream-admin` is a process of its own: its copy of the key
    // block learns of the erasure through the bucket.
    let reader = EventReader::new(
        service_kit::data_keys::DataKeys::bind(
            &live.broker.jetstream,
            &live.broker.names,
            test_support::test_kek(),
        )
        .await
        .expect("bucket"),
    );
    let get = |reader: EventReader| {
        let live = &live;
        async move {
            inspect::get(&live.broker.jetstream, &live.broker.names, &reader, at)
                .await
                .expect("get")
        }
    };

    let opened = get(reader.clone()).await;
    assert_eq!(opened["personal_data"], "opened", "{opened}");
    assert_eq!(
        opened["event"]["payload"]["data"]["name"],
        "Zebulon Quixotic"
    );
    let keyless = get(EventReader::without_keys()).await;
    assert!(keyless["undecodable"].is_string(), "{keyless}");
    assert!(!keyless.to_string().contains("Zebulon"), "{keyless}");

    live.keys.destroy(ada).await;
    let erased = test_support::eventually(10, "the erasure to reach the reader", || async {
        let shown = get(reader.clone()).await;
        (shown["personal_data"] == "erased").then_some(shown)
    })
    .await;
    assert_eq!(erased["event"]["payload"]["type"], "StudentRegistered");
    assert!(!erased.to_string().contains("Zebulon"), "{erased}");
    live.cleanup().await;
}

#[tokio::test]
async fn status_reports_streams_applied_positions_lag_and_dead_letters() {
    let live = Live::start().await;
    let ada = Uuid::now_v7();
    live.publish(&registered(ada, "Ada L")).await;
    let last = live.publish(&renamed(ada, "Ada K")).await;
    live.caught_up(last).await;
    let models = vec![
        (
            events::Projection::Students,
            Some(ReadModel::Students(live.students.clone())),
        ),
        (events::Projection::Courses, None),
    ];
    let status = test_support::eventually(10, "the lag to drain", || async {
        let status = stream_admin::status::status(&live.broker.client, &live.broker.names, &models)
            .await
            .ok()?;
        (status.projections[0].lag == 0).then_some(status)
    })
    .await;
    assert_eq!(status.streams[0].name, live.broker.names.event_stream());
    assert_eq!(status.streams[0].messages, 2);
    assert_eq!(status.streams[0].last_sequence, last);
    let students = &status.projections[0];
    assert_eq!(students.applied_sequence, Some(last));
    assert_eq!(students.last_event_sequence, Some(last));
    assert_eq!(students.dead_letters, 0);
    let courses = &status.projections[1];
    assert_eq!(courses.applied_sequence, None, "no read model given");
    assert_eq!(courses.last_event_sequence, None, "no course events");
    let table = stream_admin::status::render(&status);
    assert!(
        table.contains("students") && table.contains("LAG"),
        "{table}"
    );
    live.cleanup().await;
}

#[tokio::test]
async fn events_are_decoded_to_json_by_position_and_by_tail() {
    let live = Live::start().await;
    let ada = Uuid::now_v7();
    let first = live.publish(&registered(ada, "Ada L")).await;
    let second = live.publish(&renamed(ada, "Ada K")).await;
    let subject = live
        .broker
        .names
        .aggregate_subject(events::AggregateKind::Student, ada);
    live.broker
        .jetstream
        .publish(subject.clone(), "not protobuf".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let reader = EventReader::without_keys();
    let got = inspect::get(&live.broker.jetstream, &live.broker.names, &reader, first)
        .await
        .expect("get");
    assert_eq!(got["sequence"], first);
    assert_eq!(got["subject"], subject);
    assert_eq!(got["event"]["payload"]["type"], "StudentRegistered");
    assert_eq!(got["event"]["payload"]["data"]["name"], "Ada L", "{got}");
    assert_eq!(got["personal_data"], "clear", "{got}");
    assert!(
        inspect::get(&live.broker.jetstream, &live.broker.names, &reader, 999)
            .await
            .is_err()
    );

    let mut tailed = Vec::new();
    inspect::tail(
        &live.broker.jetstream,
        &live.broker.names,
        &reader,
        None,
        TailFrom::Last(2),
        Some(2),
        |event| tailed.push(event),
    )
    .await
    .expect("tail");
    assert_eq!(tailed.len(), 2);
    assert_eq!(tailed[0]["sequence"], second);
    assert_eq!(
        tailed[0]["event"]["payload"]["data"]["name"], "Ada K",
        "{}",
        tailed[0]
    );
    assert!(tailed[1]["undecodable"].is_string(), "{}", tailed[1]);
    live.cleanup().await;
}

#[test]
fn every_command_has_help() {
    let binary = env!("CARGO_BIN_EXE_stream-admin");
    for args in [
        vec!["--help"],
        vec!["apply", "--help"],
        vec!["status", "--help"],
        vec!["replay", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "redrive", "--help"],
        vec!["dlq", "purge", "--help"],
        vec!["events", "tail", "--help"],
        vec!["events", "get", "--help"],
    ] {
        let output = std::process::Command::new(binary)
            .args(&args)
            .output()
            .expect("runs");
        assert!(output.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
    let bad = std::process::Command::new(binary)
        .args(["replay", "teachers"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown projection"));
}
