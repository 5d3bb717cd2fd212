//! Moves events a projection cannot apply to the dead-letter stream, with the reason.

use async_nats::jetstream::{self, AckKind, Message};
use async_nats::{HeaderMap, HeaderValue};
use events::{Projection, StreamNames};

/// Headers describing a dead letter (their names are part of the wire format, in `events`).
pub use events::dead_letter_headers::{
    ORIGINAL_SEQUENCE as ORIGINAL_SEQUENCE_HEADER, ORIGINAL_SUBJECT as ORIGINAL_SUBJECT_HEADER,
    PROJECTION as PROJECTION_HEADER, REASON as REASON_HEADER,
};

/// The longest reason kept in [`REASON_HEADER`], in characters.
pub const MAX_REASON_CHARS: usize = 1024;

#[derive(Clone)]
pub struct DeadLetters {
    jetstream: jetstream::Context,
    subject: String,
    projection: Projection,
}

impl DeadLetters {
    pub fn new(jetstream: jetstream::Context, names: &StreamNames, projection: Projection) -> Self {
        DeadLetters {
            jetstream,
            subject: names.dead_letter_subject(projection),
            projection,
        }
    }

    /// Stores a copy of `message` with `reason`, then terminates it on the event stream so it
    /// is never redelivered. The copy is deduplicated by original sequence, so a crash between
    /// the two steps does not store it twice.
    pub async fn send(&self, message: &Message, sequence: u64, reason: &str) -> anyhow::Result<()> {
        // Every value goes through `header_value`: async-nats panics on a value with CR or
        // LF, and a reason is error text from anywhere (a database message, a decoder).
        let mut headers = HeaderMap::new();
        headers.insert(REASON_HEADER, reason_header_value(reason));
        headers.insert(
            ORIGINAL_SEQUENCE_HEADER,
            header_value(&sequence.to_string(), usize::MAX),
        );
        headers.insert(
            ORIGINAL_SUBJECT_HEADER,
            header_value(message.subject.as_str(), usize::MAX),
        );
        headers.insert(
            PROJECTION_HEADER,
            header_value(self.projection.as_str(), usize::MAX),
        );
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            header_value(
                &format!("{}-{sequence}", self.projection.as_str()),
                usize::MAX,
            ),
        );
        self.jetstream
            .publish_with_headers(self.subject.clone(), headers, message.payload.clone())
            .await?
            .await?;
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| anyhow::anyhow!("terminating dead-lettered message: {e}"))?;
        tracing::warn!(
            projection = self.projection.as_str(),
            sequence,
            reason,
            "event moved to the dead-letter stream"
        );
        Ok(())
    }
}

/// What [`REASON_HEADER`] holds for `reason`: see [`header_value`], at most
/// [`MAX_REASON_CHARS`] characters.
pub fn reason_header_value(reason: &str) -> HeaderValue {
    header_value(reason, MAX_REASON_CHARS)
}

/// `text` as a header value, for any text, without panicking: its first `max_chars`
/// characters, with every control character (CR and LF end a header line on the wire and
/// make async-nats panic; NUL, tabs, escapes and the C1 controls such as NEL garble logs and
/// tools) and the Unicode line and paragraph separators replaced by spaces, and trimmed
/// (NATS trims header values when it parses them, so the stored value reads back the same).
/// Empty text becomes `-`, so the header is never blank.
pub fn header_value(text: &str, max_chars: usize) -> HeaderValue {
    let clean: String = text
        .chars()
        .take(max_chars)
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                ' '
            } else {
                c
            }
        })
        .collect();
    let clean = match clean.trim() {
        "" => "-",
        trimmed => trimmed,
    };
    // Cannot fail: the only characters async-nats 0.51 refuses in a value are CR and LF.
    clean.parse().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(text: &str) -> String {
        reason_header_value(text).as_str().to_owned()
    }

    #[test]
    fn line_breaks_and_control_characters_become_spaces() {
        assert_eq!(
            reason("refused:\r\nERROR: duplicate key"),
            "refused:  ERROR: duplicate key"
        );
        assert_eq!(reason("first line\nsecond line"), "first line second line");
        assert_eq!(reason("nul\0byte"), "nul byte");
        assert_eq!(
            reason("tab\tescape\u{1b}[0m del\u{7f}"),
            "tab escape [0m del"
        );
        assert_eq!(reason("next\u{85}line\u{2028}sep"), "next line sep");
        assert_eq!(reason("\r\n  padded \n"), "padded");
        assert_eq!(reason(""), "-");
        assert_eq!(reason("\r\n"), "-");
        // What async-nats would have panicked on is now a valid value of a header map.
        let mut headers = HeaderMap::new();
        headers.insert(
            REASON_HEADER,
            reason_header_value("a\r\nPUB attack 0\r\n\r\n"),
        );
        assert_eq!(
            headers.get(REASON_HEADER).map(HeaderValue::as_str),
            Some("a  PUB attack 0")
        );
    }

    #[test]
    fn a_long_multibyte_reason_is_cut_at_a_character_boundary() {
        let long: String = "é€😀\n".repeat(1250); // 5000 characters, 4 of them per repeat
        assert_eq!(long.chars().count(), 5000);
        let value = reason(&long);
        assert_eq!(
            value.chars().count(),
            MAX_REASON_CHARS - 1,
            "the cut ends on a space"
        );
        assert!(long.replace('\n', " ").starts_with(&value));
        assert!(!value.contains(['\r', '\n']));
        let exact: String = "ü".repeat(MAX_REASON_CHARS + 10);
        assert_eq!(reason(&exact).chars().count(), MAX_REASON_CHARS);
        assert_eq!(reason("short"), "short");
    }

    #[test]
    fn every_character_gives_a_value_async_nats_accepts() {
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            let text = format!("x{c}y");
            let value = header_value(&text, usize::MAX);
            assert!(!value.as_str().contains(['\r', '\n']), "{:?}", c);
            assert!(value.as_str().parse::<HeaderValue>().is_ok(), "{:?}", c);
        }
    }
}
