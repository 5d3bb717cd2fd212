//! Replays the corpus of the `event_decoding` fuzz target (`fuzz/corpus/event_decoding/`)
//! on stable Rust, through the same body the fuzzer runs
//! (`events::decode_properties::assert_decoding_properties`): every input the fuzzer kept,
//! and every crash once fixed (its input is added to the corpus), stays checked by the test
//! command. `scripts/fuzz` grows the corpus.
//!
//! The seeds (one encoded event of every type, from `seed_history`) are written with
//! `FUZZ_WRITE_SEEDS=1 cargo test -p events --test fuzz_corpus`.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use events::decode_properties::{assert_decoding_properties, seed_history};
use events::{decode, encode};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/event_decoding")
}

fn write_seeds() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    for (n, event) in seed_history().iter().enumerate() {
        let name = format!("seed-{n:02}-{}", event.payload.event_type());
        std::fs::write(dir.join(name), encode(event)).expect("write a seed");
    }
}

#[test]
fn every_input_of_the_event_decoding_corpus_keeps_the_decoding_properties() {
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
        write_seeds();
    }
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the fuzz corpus {} is missing ({e}): it is committed, and FUZZ_WRITE_SEEDS=1 \
             writes its seeds",
            dir.display()
        )
    });
    let mut inputs = 0;
    let mut accepted = 0;
    let mut event_types = BTreeSet::new();
    let mut failures = Vec::new();
    for entry in entries {
        let path = entry.expect("read the corpus directory").path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read a corpus input");
        inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| assert_decoding_properties(&bytes))) {
            Ok(true) => {
                accepted += 1;
                if let Ok(event) = decode(&bytes) {
                    event_types.insert(event.payload.event_type());
                }
            }
            Ok(false) => {}
            Err(_) => failures.push(path.display().to_string()),
        }
    }
    assert!(inputs > 0, "the fuzz corpus {} is empty", dir.display());
    assert!(
        failures.is_empty(),
        "{} of {inputs} corpus inputs break a decoding property (the panic of each is \
         printed above): {failures:#?}",
        failures.len()
    );
    assert!(
        accepted > 0,
        "none of the {inputs} corpus inputs decodes as an event"
    );
    let every_type: BTreeSet<_> = seed_history()
        .iter()
        .map(|event| event.payload.event_type())
        .collect();
    let missing: Vec<_> = every_type.difference(&event_types).collect();
    assert!(
        missing.is_empty(),
        "no corpus input decodes as {missing:?} ({accepted} of {inputs} decode)"
    );
}
