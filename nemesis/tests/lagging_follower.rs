//! A gateway whose NATS server is a follower that fell behind must not answer from that
//! follower's stale copy. With `allow_direct`, every replica of an R3 stream answers
//! direct gets, and a follower cut off from its peers keeps answering them with what it
//! had. A gateway connected to it, asked a `PUT` with the current `If-Match`, must not
//! answer `412` naming the follower's older version: its verifying read goes to the
//! stream leader, which it cannot reach, so it answers 503 and the client retries.

use std::time::Duration;

use nemesis::services::{self, Shared};
use serde_json::{Value, json};
use test_support::{NatsCluster, NatsClusterOptions, READ_KEY, WRITE_KEY};

async fn send(request: reqwest::RequestBuilder) -> (u16, Option<u64>, Value) {
    let response = request
        .header("x-api-key", WRITE_KEY)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the gateway answers");
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_matches('"').parse().ok());
    (status, etag, response.json().await.unwrap_or(Value::Null))
}

fn body(name: &str) -> Value {
    json!({"name": name, "first_name": "Grace", "last_name": "Hopper"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_lagging_follower_never_refuses_with_the_followers_stale_version() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    if let Err(reason) = services::binary("command-gateway") {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "cannot run under CI: {reason}"
        );
        eprintln!("SKIPPED: {reason}");
        return;
    }
    // Routes pinged every second: a cut route is declared dead within seconds, after which
    // the follower alone serves the direct gets of its clients (before that, the server
    // sends a share of them over the dead route, and they time out).
    let mut cluster = NatsCluster::start(NatsClusterOptions {
        extra_config: "ping_interval: \"1s\"\nping_max: 2\n".into(),
        ..Default::default()
    })
    .await;
    let broker = cluster.broker().await;
    let stream = broker.names.event_stream();
    let leader = cluster
        .wait_stream_current(&broker.client, &stream, Duration::from_secs(30))
        .await;
    let follower = (leader + 1) % cluster.node_count();
    let others: Vec<String> = (0..cluster.node_count())
        .filter(|node| *node != follower)
        .map(|node| cluster.url(node))
        .collect();
    let shared = Shared {
        prefix: broker.names.prefix().to_owned(),
        api_keys: format!("write:{WRITE_KEY},read:{READ_KEY}"),
        database_url: String::new(),
        redis_url: String::new(),
        courses_store_url: None,
        log_dir: None,
    };
    let http = reqwest::Client::new();
    let mut healthy =
        services::gateway("gateway-healthy", &others.join(","), &shared).expect("gateway binary");
    let mut lagging = services::gateway("gateway-lagging", &cluster.url(follower), &shared)
        .expect("gateway binary");
    healthy.wait_ready(&http).await;
    lagging.wait_ready(&http).await;

    let (status, created, answer) = send(
        http.post(format!("{}/api/students", healthy.url()))
            .json(&body("Grace H")),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let id = answer["data"]["id"].as_str().expect("id").to_owned();
    let created = created.expect("ETag");
    // The follower has the creation, then falls behind.
    test_support::eventually(10, "the follower to store the creation", || async {
        (cluster.stream_last_seq_on(follower, &stream).await >= Some(created)).then_some(())
    })
    .await;
    cluster.isolate_from_peers(follower);
    let routez = format!("http://{}:8222/routez", cluster.ip(follower));
    test_support::eventually(30, "the follower to drop its routes", || async {
        let routes: Value = http.get(&routez).send().await.ok()?.json().await.ok()?;
        (routes["num_routes"].as_u64() == Some(0)).then_some(())
    })
    .await;
    let (status, renamed, answer) = send(
        http.put(format!("{}/api/students/{id}", healthy.url()))
            .json(&body("Grace B")),
    )
    .await;
    assert_eq!(
        status, 200,
        "the majority side accepts the rename: {answer}"
    );
    let renamed = renamed.expect("ETag");
    assert_eq!(
        cluster.stream_last_seq_on(follower, &stream).await,
        Some(created),
        "the follower missed the rename"
    );

    // The current version, through the gateway whose server lags.
    let (status, _, answer) = send(
        http.put(format!("{}/api/students/{id}", lagging.url()))
            .header("if-match", format!("\"{renamed}\""))
            .json(&body("Grace C")),
    )
    .await;
    eprintln!("the lagging gateway answered {status}: {answer}");
    cluster.rejoin_peers(follower);
    assert_ne!(
        status, 412,
        "refused the current version {renamed} from the lagging follower's copy: {answer}"
    );
    assert!(
        status == 503 || status == 200,
        "expected 503 (leader out of reach) or 200, got {status}: {answer}"
    );

    healthy.stop().await;
    lagging.stop().await;
}
