//! Replays the corpus of the `projector_batch` fuzz target (`fuzz/corpus/projector_batch/`)
//! on stable Rust, through the same body the fuzzer runs
//! (`projectors::in_memory_batch::assert_batch_projects_in_memory`): every batch the fuzzer
//! kept, and every crash once fixed (its input is added to the corpus), stays checked by the
//! test command. No services: the batch is projected in memory. `scripts/fuzz` grows the
//! corpus.
//!
//! The seeds (framed batches of the events of `events::decode_properties::seed_history`) are
//! written with `FUZZ_WRITE_SEEDS=1 cargo test -p projectors --test fuzz_corpus`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use events::decode_properties::seed_history;
use events::{EventPayload, encode};
use projectors::in_memory_batch::{assert_batch_projects_in_memory, frame_messages};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/projector_batch")
}

fn write_seeds() {
    let history: Vec<Vec<u8>> = seed_history().iter().map(encode).collect();
    let alive: Vec<Vec<u8>> = seed_history()
        .iter()
        .filter(|e| {
            !matches!(
                e.payload,
                EventPayload::StudentDeleted | EventPayload::CourseDeleted
            )
        })
        .map(encode)
        .collect();
    let mut with_dead_letter = history.clone();
    with_dead_letter.insert(3, b"not an event".to_vec());
    // The same messages delivered again, later in the stream.
    let redelivered: Vec<Vec<u8>> = alive.iter().chain(&alive).cloned().collect();
    let seeds = [
        ("seed-history", history),
        ("seed-alive", alive),
        ("seed-dead-letter", with_dead_letter),
        ("seed-redelivered", redelivered),
    ];
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    for (name, messages) in seeds {
        let framed = frame_messages(messages.iter().map(Vec::as_slice));
        std::fs::write(dir.join(name), framed).expect("write a seed");
    }
}

#[test]
fn every_batch_of_the_projector_corpus_projects_in_memory() {
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
    let mut with_events = 0;
    let mut with_student = 0;
    let mut with_course = 0;
    let mut failures = Vec::new();
    for entry in entries {
        let path = entry.expect("read the corpus directory").path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read a corpus input");
        inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| assert_batch_projects_in_memory(&bytes))) {
            Ok(batch) => {
                with_events += usize::from(!batch.decoded.is_empty());
                with_student += usize::from(batch.students.values().any(|t| t.current.is_some()));
                with_course += usize::from(batch.courses.values().any(Option::is_some));
            }
            Err(_) => failures.push(path.display().to_string()),
        }
    }
    assert!(inputs > 0, "the fuzz corpus {} is empty", dir.display());
    assert!(
        failures.is_empty(),
        "{} of {inputs} corpus batches fail (the panic of each is printed above): \
         {failures:#?}",
        failures.len()
    );
    assert!(
        with_events > 0,
        "no batch of the {inputs} in the corpus holds a message that decodes as an event"
    );
    assert!(
        with_student > 0 && with_course > 0,
        "no corpus batch leaves a student row ({with_student}) or a course document \
         ({with_course}): the folds are not exercised"
    );
}
