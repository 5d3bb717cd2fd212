//! The students' data-key bucket (`stream-admin apply` makes it) against a nats-server of
//! the test's own, whose store directory the test can search: a destroyed key is gone from
//! the bucket and from the server's files, never comes back, and a KEK rotation re-wraps
//! every key without changing what it opens.

use std::path::Path;
use std::sync::Arc;

use events::personal::{DataKey, KekRing, open, seal};
use service_kit::data_keys::{DataKeyError, DataKeys, KeyLookup, RewrapReport};
use test_support::unique_suffix;
use test_support::{NatsServer, NatsStop};
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
