//! The students' data-key bucket (`stream-admin apply` makes it) against a nats-server of
//! the test's own, whose store directory the test can search: a destroyed key is gone from
//! the bucket and from the server's files (its block's older revision too), its neighbours
//! in the block are untouched, and a KEK rotation re-wraps every block without changing
//! what it opens.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::personal::{BLOCK_SLOTS, DataKey, DataKeyRef, KekRing, open, seal};
use service_kit::data_keys::{DataKeys, KeyLookup, RewrapReport};
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

/// The wrapped block as the bucket stores it now (what must vanish from the disk once a
/// key in it is destroyed).
async fn stored_bytes(
    jetstream: &async_nats::jetstream::Context,
    names: &events::StreamNames,
    block: Uuid,
) -> Vec<u8> {
    let kv = jetstream
        .get_key_value(names.student_keys_bucket())
        .await
        .expect("bucket");
    kv.get(block.to_string())
        .await
        .expect("get")
        .expect("a block")
        .to_vec()
}

const FIELDS: [&str; 1] = ["last_name"];

fn sealed_name(key: &DataKey, event: Uuid, name: &str) -> Vec<u8> {
    seal(key, event, &[("last_name", name)])
}

fn opened(key: &DataKey, event: Uuid, sealed: &[u8]) -> Option<String> {
    open(key, event, &FIELDS, sealed).ok()?.pop()
}

async fn key(keys: &DataKeys, at: DataKeyRef) -> DataKey {
    match keys.lookup(at).await.expect("lookup") {
        KeyLookup::Key(key) => key,
        other => panic!("{at:?}: {other:?}"),
    }
}

#[tokio::test]
async fn a_destroyed_key_leaves_no_trace_in_the_bucket_or_on_disk_and_never_comes_back() {
    let mut server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let (student, student_key) = keys.allocate().await.expect("made");
    let (other, other_original) = keys.allocate().await.expect("made");
    assert_eq!(student.block, other.block, "one block serves many students");
    let event = Uuid::now_v7();
    let sealed = sealed_name(&student_key, event, "Zebulon-Quixotic");
    let other_sealed = sealed_name(&other_original, event, "Grace-Hopper");
    let wrapped = stored_bytes(&jetstream, &names, student.block).await;
    let found = key(&keys, student).await;
    assert_eq!(
        opened(&found, event, &sealed).as_deref(),
        Some("Zebulon-Quixotic")
    );
    // The search can find the block: files hold it before the erasure.
    assert!(
        !files_containing(&server.store_dir, &wrapped).is_empty(),
        "the wrapped block is not in the store directory before the erasure: the search cannot fail"
    );

    keys.destroy(student).await.expect("destroyed");
    keys.destroy(student)
        .await
        .expect("destroying again is fine");
    assert!(matches!(keys.lookup(student).await, Ok(KeyLookup::Erased)));
    // Another student's key in the same block is untouched.
    let other_key = key(&keys, other).await;
    assert_eq!(
        opened(&other_key, event, &other_sealed).as_deref(),
        Some("Grace-Hopper")
    );
    let hits = files_containing(&server.store_dir, &wrapped);
    assert!(
        hits.is_empty(),
        "the block revision holding the destroyed key is still on disk in {hits:?}"
    );

    // Also after a restart (the server rebuilds its indexes from the files), for a process
    // that never saw the key.
    server.stop(NatsStop::Graceful);
    server.restart().await;
    let jetstream =
        async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("again"));
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    assert!(matches!(keys.lookup(student).await, Ok(KeyLookup::Erased)));
    assert!(matches!(keys.lookup(other).await, Ok(KeyLookup::Key(_))));
    let hits = files_containing(&server.store_dir, &wrapped);
    assert!(
        hits.is_empty(),
        "the destroyed key is back on disk in {hits:?}"
    );
}

/// A crash between a block's rewrite and the erasure of its old revision leaves that
/// revision (with the destroyed key) in the bucket's history; the next destruction in that
/// block, or `stream-admin keys sweep`, erases it.
#[tokio::test]
async fn a_revision_left_behind_by_a_crash_is_erased_by_the_sweep() {
    let server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let (student, _) = keys.allocate().await.expect("made");
    let before = stored_bytes(&jetstream, &names, student.block).await;
    // The crash: a rewrite stored, its old revision not erased (what `destroy` does in two
    // steps, done here by hand with the first step only).
    let kv = jetstream
        .get_key_value(names.student_keys_bucket())
        .await
        .expect("bucket");
    let entry = kv
        .entry(student.block.to_string())
        .await
        .expect("entry")
        .expect("block");
    kv.update(
        student.block.to_string(),
        before.clone().into(),
        entry.revision,
    )
    .await
    .expect("rewritten");
    assert!(
        !files_containing(&server.store_dir, &before).is_empty(),
        "the old revision is not on disk: the test cannot fail"
    );
    assert_eq!(keys.sweep().await.expect("sweep"), 1);
    assert_eq!(keys.sweep().await.expect("sweep again"), 0);
    // The block itself lives on, one revision of it.
    assert!(matches!(keys.lookup(student).await, Ok(KeyLookup::Key(_))));
    let history = kv
        .history(student.block.to_string())
        .await
        .expect("history");
    use futures::StreamExt;
    assert_eq!(history.count().await, 1);
}

#[tokio::test]
async fn a_process_hands_out_each_slot_once_and_writes_a_new_block_when_one_is_used_up() {
    let server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let keys = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..=BLOCK_SLOTS {
        let (at, _) = keys.allocate().await.expect("made");
        assert!(seen.insert(at), "{at:?} handed out twice");
    }
    let blocks: std::collections::HashSet<Uuid> = seen.iter().map(|at| at.block).collect();
    assert_eq!(blocks.len(), 2, "one block per {BLOCK_SLOTS} students");
    // Another process (a second gateway) writes blocks of its own.
    let other = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let (at, _) = other.allocate().await.expect("made");
    assert!(!blocks.contains(&at.block));
}

#[tokio::test]
async fn a_kek_rotation_rewraps_every_block_and_they_still_open_old_fields() {
    let server = NatsServer::start().await;
    let (jetstream, names) = applied(&server).await;
    let before = DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
        .await
        .expect("bind");
    let event = Uuid::now_v7();
    let mut students = Vec::new();
    for n in 0..5 {
        // Two processes, so two blocks.
        let writer = if n % 2 == 0 {
            before.clone()
        } else {
            DataKeys::bind(&jetstream, &names, ring(KEK_OLD))
                .await
                .expect("bind")
        };
        let (at, key) = writer.allocate().await.expect("made");
        students.push((at, sealed_name(&key, event, &format!("Kid {n}"))));
    }
    let erased = students[4].0;
    before.destroy(erased).await.expect("destroyed");
    let blocks = students
        .iter()
        .map(|(at, _)| at.block)
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;

    let rotating = DataKeys::bind(&jetstream, &names, ring(&format!("{KEK_NEW}\n{KEK_OLD}")))
        .await
        .expect("bind");
    assert_eq!(
        rotating.rewrap_all().await.expect("rewrap"),
        RewrapReport {
            rewrapped: blocks,
            already_current: 0
        }
    );
    assert_eq!(
        rotating.rewrap_all().await.expect("rewrap again"),
        RewrapReport {
            rewrapped: 0,
            already_current: blocks
        }
    );
    // The old KEK can now be removed from the configuration.
    let after = DataKeys::bind(&jetstream, &names, ring(KEK_NEW))
        .await
        .expect("bind");
    for (n, (at, sealed)) in students.iter().enumerate() {
        match after.lookup(*at).await.expect("lookup") {
            KeyLookup::Key(key) => {
                assert_eq!(
                    opened(&key, event, sealed),
                    Some(format!("Kid {n}")),
                    "student {n}"
                );
            }
            KeyLookup::Erased => assert_eq!(*at, erased, "student {n} reads as erased"),
            KeyLookup::Missing => panic!("student {n} lost its key in the rotation"),
        }
    }
}

/// Every replica of an R3 bucket holds the block, in its stream files and in its Raft log;
/// the revision with a destroyed key must be gone from the stream files of all of them at
/// once. The Raft logs (`_js_/`) keep the append until the group's next snapshot compacts
/// them (nats-server checks every 2 to 3 minutes): with `FAULTS_LONG=1` the test waits for
/// that too.
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
    let (student, _) = keys.allocate().await.expect("made");
    let wrapped = stored_bytes(&broker.jetstream, &broker.names, student.block).await;
    // (files in stream stores, files in Raft logs) that hold the wrapped block.
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
        "the wrapped block is not in every node's stream files before the erasure: the search cannot fail"
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
    eprintln!("right after the erasure: {in_raft} Raft log files still hold the old block");
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
/// reads as erased (no names) once it is destroyed — also in another process, whose copy of
/// the block the bucket's watch brings up to date — and waits (transient) for a block not
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
    let (at, key) = keys.allocate().await.expect("made");
    let sealed = events::encode_sealed(&registered, at, &key);

    let read = reader.read(&sealed).await.expect("opens");
    assert_eq!(read.personal, Personal::Opened);
    assert_eq!(read.event, registered);
    assert_eq!(read.key, Some(at));
    let plain = reader.read(&events::encode(&registered)).await.expect("v1");
    assert_eq!(plain.personal, Personal::Clear);
    // Another process that has read the block (its copy is kept).
    let elsewhere = EventReader::new(
        DataKeys::bind(&broker.jetstream, &broker.names, ring(KEK_OLD))
            .await
            .expect("bind"),
    );
    assert_eq!(
        elsewhere.read(&sealed).await.expect("opens").personal,
        Personal::Opened
    );

    keys.destroy(at).await.expect("destroyed");
    let read = reader.read(&sealed).await.expect("reads as erased");
    assert_eq!(read.personal, Personal::Erased);
    assert_eq!(read.event.metadata, registered.metadata);
    let shown = format!("{:?}", read.event);
    assert!(
        !shown.contains("Zebulon") && !shown.contains("Quixotic"),
        "{shown}"
    );
    let started = Instant::now();
    test_support::eventually(10, "the other process to learn of the erasure", || async {
        (elsewhere.read(&sealed).await.ok()?.personal == Personal::Erased).then_some(())
    })
    .await;
    eprintln!(
        "another process read the key as erased {} ms after the destruction",
        started.elapsed().as_millis()
    );

    let orphan = test_support::event(
        events::AggregateKind::Student,
        Uuid::now_v7(),
        events::EventPayload::StudentRegistered(details),
    );
    let nowhere = DataKeyRef {
        block: Uuid::now_v7(),
        slot: 0,
    };
    let error = reader
        .read(&events::encode_sealed(
            &orphan,
            nowhere,
            &DataKey::generate(),
        ))
        .await
        .expect_err("no block yet");
    assert!(
        matches!(error, ReadError::KeyMissing { key, .. } if key == nowhere),
        "{error}"
    );
    assert!(error.is_transient());
    broker.cleanup().await;
}
