//! The students' data-key bucket (`stream-admin apply` makes it) against a nats-server of
//! the test's own, whose store directory the test can search: a destroyed key is gone from
//! the bucket and from the server's files, never comes back, and a KEK rotation re-wraps
//! every key without changing what it opens.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::personal::{DataKey, KekRing, open, seal};
use service_kit::data_keys::{DataKeyError, DataKeys, KeyLookup, RewrapReport};
use test_support::unique_suffix;
use test_support::{NatsCluster, NatsClusterOptions, NatsServer, NatsStop};
use uuid::Uuid;

const KEK_OLD: &str = "old:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEK_NEW: &str = "new:f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";

fn ring(text: &str) -> Arc<KekRing> {
    Arc::new(KekRing::parse(text).expect("test KEKs"))
}

async fn applied(server: &NatsServer) -> (async_nats::jetstream::Context, events::StreamNames) {
    let client = async_nats::connect(server.url())
        .await
        .expect("the test's nats-server");
    let jetstream = async_nats::jetstream::new(client);
    let names = events::StreamNames::new(format!("k{}", unique_suffix()));
    stream_admin::apply(
        &jetstream,
        &stream_admin::desired(&names, 1),
        stream_admin::ApplyOptions::default(),
    )
    .await
    .expect("apply");
    (jetstream, names)
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

/// The wrapped key as the bucket stores it (what must vanish from the disk).
async fn stored_bytes(
    jetstream: &async_nats::jetstream::Context,
    names: &events::StreamNames,
    student: Uuid,
) -> Vec<u8> {
    let kv = jetstream
        .get_key_value(names.student_keys_bucket())
        .await
        .expect("bucket");
    kv.get(student.to_string())
        .await
        .expect("get")
        .expect("a key")
        .to_vec()
}

#[tokio::test]
async fn a_destroyed_key_leaves_no_trace_in_the_bucket_or_on_disk_and_never_comes_back() {
    let mut server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let student = Uuid::now_v7();
    let other = Uuid::now_v7();
    let key = keys.key_for_registration(student).await.expect("made");
    keys.key_for_registration(other).await.expect("made");
    let event = Uuid::now_v7();
    let sealed = seal(&key, event, "last_name", "Zebulon-Quixotic");
    let wrapped = stored_bytes(&jetstream, &names, student).await;
    let KeyLookup::Key(found) = keys.lookup(student).await.expect("lookup") else {
        panic!("the key just made is not found");
    };
    assert_eq!(
        open(&found, event, "last_name", &sealed).as_deref(),
        Ok("Zebulon-Quixotic")
    );
    // The search can find the key: files hold it before the erasure.
    assert!(
        !files_containing(&server.store_dir, &wrapped).is_empty(),
        "the wrapped key is not in the store directory before the erasure: the search cannot fail"
    );

    keys.destroy(student).await.expect("destroyed");
    keys.destroy(student)
        .await
        .expect("destroying again is fine");
    assert!(matches!(keys.lookup(student).await, Ok(KeyLookup::Erased)));
    assert!(
        matches!(
            keys.key_for_registration(student).await,
            Err(DataKeyError::Erased(id)) if id == student
        ),
        "an erased student got a key again"
    );
    // Another student's key is untouched.
    assert!(matches!(keys.lookup(other).await, Ok(KeyLookup::Key(_))));
    let hits = files_containing(&server.store_dir, &wrapped);
    assert!(
        hits.is_empty(),
        "the destroyed key is still on disk in {hits:?}"
    );

    // Also after a restart (the server rebuilds its indexes from the files).
    server.stop(NatsStop::Graceful);
    server.restart().await;
    let jetstream =
        async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("again"));
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    assert!(matches!(keys.lookup(student).await, Ok(KeyLookup::Erased)));
    let hits = files_containing(&server.store_dir, &wrapped);
    assert!(
        hits.is_empty(),
        "the destroyed key is back on disk in {hits:?}"
    );
}

#[tokio::test]
async fn a_retried_registration_gets_the_first_key() {
    let server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let student = Uuid::now_v7();
    let first = keys.key_for_registration(student).await.expect("made");
    let again = keys.key_for_registration(student).await.expect("found");
    let event = Uuid::now_v7();
    let sealed = seal(&first, event, "name", "Ada L");
    assert_eq!(open(&again, event, "name", &sealed).as_deref(), Ok("Ada L"));
    assert!(open(&DataKey::generate(), event, "name", &sealed).is_err());
}

#[tokio::test]
async fn a_kek_rotation_rewraps_every_key_and_they_still_open_old_fields() {
    let server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let before = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let event = Uuid::now_v7();
    let mut students = Vec::new();
    for n in 0..5 {
        let student = Uuid::now_v7();
        let key = before.key_for_registration(student).await.expect("made");
        students.push((student, seal(&key, event, "name", &format!("Kid {n}"))));
    }
    let erased = students[4].0;
    before.destroy(erased).await.expect("destroyed");

    let rotating = DataKeys::bind(&jetstream, &names, ring(&format!("{KEK_NEW}\n{KEK_OLD}")))
        .await
        .expect("bind");
    assert_eq!(
        rotating.rewrap_all().await.expect("rewrap"),
        RewrapReport {
            rewrapped: 4,
            already_current: 0
        }
    );
    assert_eq!(
        rotating.rewrap_all().await.expect("rewrap again"),
        RewrapReport {
            rewrapped: 0,
            already_current: 4
        }
    );
    // The old KEK can now be removed from the configuration.
    let after = DataKeys::bind(&jetstream, &names, ring(KEK_NEW))
        .await
        .expect("bind");
    for (n, (student, sealed)) in students.iter().enumerate() {
        match after.lookup(*student).await.expect("lookup") {
            KeyLookup::Key(key) => {
                assert_eq!(
                    open(&key, event, "name", sealed),
                    Ok(format!("Kid {n}")),
                    "student {n}"
                );
            }
            KeyLookup::Erased => assert_eq!(*student, erased, "student {n} reads as erased"),
            KeyLookup::Missing => panic!("student {n} lost its key in the rotation"),
        }
    }
}

/// Every replica of an R3 bucket holds the key, in its stream files and in its Raft log; a
/// destroyed key must be gone from the stream files of all of them at once. The Raft logs
/// (`_js_/`) keep the append until the group's next snapshot compacts them (nats-server
/// checks every 2 to 3 minutes): with `FAULTS_LONG=1` the test waits for that too.
#[tokio::test]
async fn on_a_three_node_cluster_a_destroyed_key_is_on_no_nodes_disk() {
    if NatsCluster::skip_if_unavailable() {
        return;
    }
    let cluster = NatsCluster::start(NatsClusterOptions::default()).await;
    let broker = cluster.broker().await;
    let keys = DataKeys::bind(&broker.jetstream, &broker.names, ring(KEK_OLD))
        .await
        .expect("bind");
    let student = Uuid::now_v7();
    keys.key_for_registration(student).await.expect("made");
    let wrapped = stored_bytes(&broker.jetstream, &broker.names, student).await;
    // (files in stream stores, files in Raft logs) that hold the wrapped key.
    let on_disk = || {
        let hits: Vec<String> = (0..cluster.node_count())
            .flat_map(|i| files_containing(cluster.store_dir(i), &wrapped))
            .collect();
        let in_raft = hits.iter().filter(|path| path.contains("/_js_/")).count();
        (hits.len() - in_raft, in_raft)
    };
    // Replication reaches the followers' files shortly after the ack.
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_disk().0 < cluster.node_count() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        on_disk().0 >= cluster.node_count(),
        "the wrapped key is not in every node's stream files before the erasure: the search cannot fail"
    );

    keys.destroy(student).await.expect("destroyed");
    let erased_at = Instant::now();
    assert!(matches!(keys.lookup(student).await, Ok(KeyLookup::Erased)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while on_disk().0 > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (in_streams, in_raft) = on_disk();
    assert_eq!(in_streams, 0, "the destroyed key is still in stream files");
    eprintln!("right after the erasure: {in_raft} Raft log files still hold the wrapped key");
    if std::env::var_os("FAULTS_LONG").is_none() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    while on_disk().1 > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (_, in_raft) = on_disk();
    eprintln!(
        "DATA KEYS: Raft logs held the destroyed key for {:.0} s ({in_raft} files left)",
        erased_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        in_raft, 0,
        "the Raft logs keep the destroyed key past a compaction"
    );
}

/// The one reading path: a sealed event opens with its student's key while the key lives,
/// reads as erased (no names) once it is destroyed, and waits (transient) for a key not
/// visible yet; a plaintext v1 event reads as before.
#[tokio::test]
async fn the_event_reader_opens_sealed_names_until_the_erasure_and_never_after() {
    use service_kit::event_reader::{EventReader, Personal, ReadError};
    let broker = test_support::TestBroker::start().await;
    let keys = DataKeys::bind(&broker.jetstream, &broker.names, ring(KEK_OLD))
        .await
        .expect("bind");
    let reader = EventReader::new(keys.clone());
    let student = Uuid::now_v7();
    let details = events::StudentDetails {
        name: "Zebulon Q".into(),
        first_name: "Zebulon".into(),
        last_name: "Quixotic".into(),
    };
    let registered = test_support::event(
        events::AggregateKind::Student,
        student,
        events::EventPayload::StudentRegistered(details.clone()),
    );
    let key = keys.key_for_registration(student).await.expect("made");
    let sealed = events::encode_sealed(&registered, &key);

    let read = reader.read(&sealed).await.expect("opens");
    assert_eq!(read.personal, Personal::Opened);
    assert_eq!(read.event, registered);
    let plain = reader.read(&events::encode(&registered)).await.expect("v1");
    assert_eq!(plain.personal, Personal::Clear);

    keys.destroy(student).await.expect("destroyed");
    let read = reader.read(&sealed).await.expect("reads as erased");
    assert_eq!(read.personal, Personal::Erased);
    assert_eq!(read.event.metadata, registered.metadata);
    let shown = format!("{:?}", read.event);
    assert!(
        !shown.contains("Zebulon") && !shown.contains("Quixotic"),
        "{shown}"
    );

    let unknown = Uuid::now_v7();
    let orphan = test_support::event(
        events::AggregateKind::Student,
        unknown,
        events::EventPayload::StudentRegistered(details),
    );
    let error = reader
        .read(&events::encode_sealed(&orphan, &DataKey::generate()))
        .await
        .expect_err("no key yet");
    assert!(
        matches!(error, ReadError::KeyMissing(id) if id == unknown),
        "{error}"
    );
    assert!(error.is_transient());
    broker.cleanup().await;
}
