//! A batch of raw stream messages taken through what the projectors do with them before
//! any database sees them: decode the envelope (or set the message aside as a dead letter),
//! continue its trace context, name the cache entries it makes stale, and fold it into the
//! students' rows and the course documents. In memory, so a fuzzer can drive it: the body
//! of the `projector_batch` fuzz target (`fuzz/`) and of the replay of its corpus on stable
//! Rust (`tests/fuzz_corpus.rs`).
//!
//! Input framing (so one fuzz input is a whole batch): repeated
//! `[sequence step: u8][length: u16 little-endian][payload: length bytes]`; the stream
//! sequence of a message is the previous one plus `step + 1`, as in a stream, where
//! sequences only grow. A last frame cut short keeps the bytes that are there. A step of
//! `0xFF` is a redelivery instead: `[0xFF][back: u8]` delivers again the message
//! `back % count + 1` frames earlier (same sequence, same payload), as JetStream does when
//! a message outlives `ack_wait`; the batch goes through the consumer's
//! [`unique_in_stream_order`] like a real one.

use std::collections::BTreeMap;

use events::{AggregateKind, Event, StreamNames};
use service_kit::trace::SpanContext;
use uuid::Uuid;

use crate::consumer::{cache_keys, unique_in_stream_order};
use read_models::course_document::{self, CourseDocument};
use read_models::student_fold::{self, Touched};

/// The framed messages in delivery order: stream sequence and payload.
pub fn split_messages(mut input: &[u8]) -> Vec<(u64, &[u8])> {
    let mut messages: Vec<(u64, &[u8])> = Vec::new();
    let mut sequence = 0u64;
    while let [step, rest @ ..] = input {
        if *step == REDELIVERY {
            let (back, rest) = match rest {
                [back, rest @ ..] => (usize::from(*back), rest),
                [] => (0, rest),
            };
            if !messages.is_empty() {
                let earlier = messages[messages.len() - 1 - back % messages.len()];
                messages.push(earlier);
            }
            input = rest;
            continue;
        }
        let (payload, rest) = match rest {
            [low, high, rest @ ..] => {
                let length = usize::from(u16::from_le_bytes([*low, *high]));
                rest.split_at(length.min(rest.len()))
            }
            short => (short, &[][..]),
        };
        sequence += u64::from(*step) + 1;
        messages.push((sequence, payload));
        input = rest;
    }
    messages
}

/// The step byte that marks a redelivery.
const REDELIVERY: u8 = 0xFF;

/// Frames `messages` (one sequence step of 1 each) the way [`split_messages`] reads them:
/// how corpus seeds are written from real events. A payload longer than `u16::MAX` bytes
/// keeps its first `u16::MAX` (no event comes near that).
pub fn frame_messages<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut framed = Vec::new();
    for payload in messages {
        let length = u16::try_from(payload.len()).unwrap_or(u16::MAX);
        framed.push(0);
        framed.extend_from_slice(&length.to_le_bytes());
        framed.extend_from_slice(&payload[..usize::from(length)]);
    }
    framed
}

/// What a batch left behind, for assertions.
#[derive(Debug, Default)]
pub struct ProjectedBatch {
    pub dead_letters: usize,
    pub decoded: Vec<(u64, Event)>,
    pub students: BTreeMap<Uuid, Touched>,
    pub courses: BTreeMap<Uuid, Option<CourseDocument>>,
}

/// Projects one framed batch in memory and checks what must hold for any input; panics
/// (which is how a fuzzer notices) when something does not.
pub fn assert_batch_projects_in_memory(input: &[u8]) -> ProjectedBatch {
    let names = StreamNames::new("school");
    let mut batch = ProjectedBatch::default();
    let delivered = split_messages(input);
    let unique = unique_in_stream_order(delivered.iter().copied());
    assert!(
        unique.windows(2).all(|w| w[0].0 < w[1].0),
        "a batch not in stream order, or a sequence twice"
    );
    let distinct: std::collections::BTreeSet<u64> = delivered.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        unique.len(),
        distinct.len(),
        "a delivered sequence was dropped"
    );
    for (sequence, payload) in unique {
        match events::decode(payload) {
            Ok(event) => batch.decoded.push((sequence, event)),
            Err(_) => batch.dead_letters += 1,
        }
    }
    for (sequence, event) in &batch.decoded {
        // What the consume loop logs under: a malformed traceparent starts a new trace.
        if let Some(parent) = SpanContext::parse(&event.metadata.trace.traceparent) {
            let child = parent.child();
            assert_eq!(child.trace_id_hex(), parent.trace_id_hex());
        }
        let id = event.metadata.aggregate_id;
        match event.metadata.aggregate_kind {
            AggregateKind::Student => batch
                .students
                .entry(id)
                .or_insert_with(|| Touched::new(None))
                .apply(*sequence, event),
            AggregateKind::Course => {
                let document = batch.courses.entry(id).or_insert(None);
                *document = course_document::fold(document.take(), id, *sequence, &event.payload);
            }
        }
    }
    let keys = cache_keys(&names, &batch.decoded);
    for (_, event) in &batch.decoded {
        let meta = &event.metadata;
        assert!(
            keys.contains(&names.cache_key(meta.aggregate_kind, meta.aggregate_id)),
            "the cache entry of a changed aggregate is not invalidated"
        );
    }
    let last_sequence = batch.decoded.last().map_or(0, |(sequence, _)| *sequence);
    for (id, document) in &batch.courses {
        let Some(document) = document else { continue };
        assert_eq!(document.id, *id, "a course document under another id");
        assert!(
            document.version <= last_sequence,
            "a version from the future"
        );
        assert!(
            document.student_ids.windows(2).all(|w| w[0] < w[1]),
            "student ids are not sorted and unique"
        );
    }
    for (id, touched) in &batch.students {
        if let Some(row) = &touched.current {
            assert_eq!(row.id, *id, "a student row under another id");
            assert!(row.version <= last_sequence, "a version from the future");
        }
    }
    // Nothing was stored before the batch: every student it leaves is one upsert.
    let writes = student_fold::writes(batch.students.values());
    let current = batch
        .students
        .values()
        .filter(|t| t.current.is_some())
        .count();
    assert_eq!(
        writes.upserts.len(),
        current,
        "a current student is not written"
    );
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_sequences_only_grow() {
        let framed = frame_messages([&b"abc"[..], b"", b"xy"]);
        let messages = split_messages(&framed);
        assert_eq!(messages, vec![(1, &b"abc"[..]), (2, b""), (3, b"xy")]);
    }

    #[test]
    fn a_redelivery_repeats_an_earlier_message_and_is_applied_once_in_order() {
        let mut framed = frame_messages([&b"a"[..], b"b", b"c"]);
        framed.extend_from_slice(&[REDELIVERY, 1]); // "b" again
        framed.extend_from_slice(&[REDELIVERY, 5]); // 5 % 4 + 1 = 2 back: "c" again
        let delivered = split_messages(&framed);
        assert_eq!(
            delivered,
            vec![(1, &b"a"[..]), (2, b"b"), (3, b"c"), (2, b"b"), (3, b"c")]
        );
        assert_eq!(
            unique_in_stream_order(delivered),
            vec![(1, &b"a"[..]), (2, b"b"), (3, b"c")]
        );
        assert_eq!(
            split_messages(&[REDELIVERY, 0]),
            vec![],
            "nothing to redeliver yet"
        );
    }

    #[test]
    fn a_frame_cut_short_keeps_what_is_there() {
        assert_eq!(split_messages(&[4, 10, 0, b'a']), vec![(5, &b"a"[..])]);
        assert_eq!(split_messages(&[0, 7]), vec![(1, &b"\x07"[..])]);
    }
}
