//! Personal data in events, sealed so that it can be erased (crypto-shredding).
//!
//! Each student has a data key of its own. A personal field is sealed with it
//! (XChaCha20-Poly1305, a random 24-byte nonce per field, the event id and the field name as
//! associated data, so a sealed value cannot be moved to another event or field unnoticed).
//! Data keys are stored outside the stream, wrapped by a key-encryption key (KEK) from
//! configuration; destroying a student's data key makes every sealed field of that student
//! unreadable for good, in every copy of the stream.
//!
//! This module is pure: generating, wrapping and using keys. Where wrapped keys are kept and
//! where the KEKs come from is the services' concern.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Bytes of a data key and of a KEK (256-bit keys).
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
/// Version byte in front of every sealed value and wrapped key, so the format can change.
const FORMAT: u8 = 1;
/// Associated-data prefixes: a sealed field can never be opened as a wrapped key or back.
const FIELD_CONTEXT: &[u8] = b"school/personal-field/v1";
const WRAP_CONTEXT: &[u8] = b"school/data-key/v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Not produced by [`seal`] or [`KekRing::wrap`]: truncated or of an unknown format.
    #[error("not a sealed value of a known format")]
    Malformed,
    /// The key is not the one it was sealed with, or the bytes or their context (event id,
    /// field, student) were changed.
    #[error("does not open with this key in this context")]
    Rejected,
    /// Wrapped by a KEK the configuration no longer holds.
    #[error("wrapped by key-encryption key `{0}`, which is not configured")]
    UnknownKek(String),
    #[error("the sealed text is not UTF-8")]
    NotText,
}

/// One student's data key. Zeroed when dropped; never printed.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&key);
        DataKey(bytes)
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        DataKey(Zeroizing::new(bytes))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.0[..]))
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Seals one personal field of one event: `FORMAT || nonce || ciphertext+tag`.
pub fn seal(key: &DataKey, event_id: Uuid, field: &str, plaintext: &str) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = field_context(event_id, field);
    let sealed = key
        .cipher()
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext.as_bytes(),
                aad: &aad,
            },
        )
        // Encryption fails only for messages beyond 2^38 bytes; fields are validated to a
        // few hundred bytes at the edge.
        .unwrap_or_default();
    framed(&nonce, &sealed)
}

/// Opens what [`seal`] produced for the same event and field.
pub fn open(
    key: &DataKey,
    event_id: Uuid,
    field: &str,
    sealed: &[u8],
) -> Result<String, OpenError> {
    let (nonce, ciphertext) = unframe(sealed)?;
    let aad = field_context(event_id, field);
    let plaintext = key
        .cipher()
        .decrypt(
            nonce,
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| OpenError::Rejected)?;
    String::from_utf8(plaintext).map_err(|_| OpenError::NotText)
}

fn field_context(event_id: Uuid, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(FIELD_CONTEXT.len() + 16 + field.len());
    aad.extend_from_slice(FIELD_CONTEXT);
    aad.extend_from_slice(event_id.as_bytes());
    aad.extend_from_slice(field.as_bytes());
    aad
}

fn framed(nonce: &XNonce, ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(FORMAT);
    out.extend_from_slice(nonce);
    out.extend_from_slice(ciphertext);
    out
}

fn unframe(bytes: &[u8]) -> Result<(&XNonce, &[u8]), OpenError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => split_nonce(rest),
        _ => Err(OpenError::Malformed),
    }
}

/// `nonce || ciphertext+tag` into its parts.
fn split_nonce(bytes: &[u8]) -> Result<(&XNonce, &[u8]), OpenError> {
    if bytes.len() < NONCE_LEN + 16 {
        return Err(OpenError::Malformed);
    }
    let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
    Ok((XNonce::from_slice(nonce), ciphertext))
}

/// Longest KEK id (it is written, with its length in one byte, in front of each wrapped key).
const MAX_KEK_ID: usize = 64;

/// A key-encryption key and the name it is configured under (written next to every key it
/// wraps, so a rotation knows which KEK opens which key).
struct Kek {
    id: String,
    key: DataKey,
}

/// Why a KEK configuration is refused (at start: a service without its KEK does not run).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KekConfigError {
    #[error("names no key-encryption key (expected lines `<id>:<64 hex digits>`)")]
    Empty,
    #[error(
        "line {line}: expected `<id>:<64 hex digits>` (an id of at most {MAX_KEK_ID} letters, digits, `-`, `_` or `.`; a 256-bit key)"
    )]
    BadLine { line: usize },
    #[error("key-encryption key `{0}` is named twice")]
    Duplicate(String),
}

/// The configured KEKs: the first wraps new and re-wrapped keys, every one unwraps.
///
/// Configured as text, one KEK per line, `<id>:<64 hex digits>`; blank lines and lines
/// starting with `#` are ignored. Rotation: put the new KEK first, keep the old ones below
/// until every wrapped key was re-wrapped, then remove them.
pub struct KekRing {
    keks: Vec<Kek>,
}

impl std::fmt::Debug for KekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keks.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KekRing").field("ids", &ids).finish()
    }
}

impl KekRing {
    pub fn parse(text: &str) -> Result<Self, KekConfigError> {
        let mut keks: Vec<Kek> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = KekConfigError::BadLine { line: index + 1 };
            let (id, hex) = line.split_once(':').ok_or(bad.clone())?;
            let id = id.trim();
            let valid_id = !id.is_empty()
                && id.len() <= MAX_KEK_ID
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            let key = decode_hex_key(hex.trim()).ok_or(bad.clone())?;
            if !valid_id {
                return Err(bad);
            }
            if keks.iter().any(|k| k.id == id) {
                return Err(KekConfigError::Duplicate(id.to_owned()));
            }
            keks.push(Kek {
                id: id.to_owned(),
                key: DataKey(key),
            });
        }
        if keks.is_empty() {
            return Err(KekConfigError::Empty);
        }
        Ok(KekRing { keks })
    }

    /// The id of the KEK that wraps new keys.
    pub fn current_id(&self) -> &str {
        &self.keks[0].id
    }

    /// Wraps `key` for `student` with the current KEK: `FORMAT || id length || id || nonce ||
    /// ciphertext+tag`, the student id and KEK id bound as associated data.
    pub fn wrap(&self, student: Uuid, key: &DataKey) -> Vec<u8> {
        let kek = &self.keks[0];
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = wrap_context(student, &kek.id);
        let wrapped = kek
            .key
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: &key.0[..],
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let id = kek.id.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + wrapped.len());
        out.push(FORMAT);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&wrapped);
        out
    }

    /// Unwraps what [`KekRing::wrap`] produced for `student`, with whichever configured KEK
    /// wrapped it.
    pub fn unwrap(&self, student: Uuid, wrapped: &[u8]) -> Result<DataKey, OpenError> {
        let (id, sealed) = split_wrapped(wrapped)?;
        let kek = self
            .keks
            .iter()
            .find(|k| k.id.as_bytes() == id)
            .ok_or_else(|| OpenError::UnknownKek(String::from_utf8_lossy(id).into_owned()))?;
        let (nonce, ciphertext) = split_nonce(sealed)?;
        let aad = wrap_context(student, &kek.id);
        let bytes = Zeroizing::new(
            kek.key
                .cipher()
                .decrypt(
                    nonce,
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| OpenError::Rejected)?,
        );
        let key: [u8; KEY_LEN] = bytes[..].try_into().map_err(|_| OpenError::Malformed)?;
        Ok(DataKey::from_bytes(key))
    }

    /// `Some(rewrapped)` when `wrapped` was wrapped by an older KEK, `None` when the current
    /// one already wraps it. Events are untouched: only the wrapping changes.
    pub fn rewrap(&self, student: Uuid, wrapped: &[u8]) -> Result<Option<Vec<u8>>, OpenError> {
        let (id, _) = split_wrapped(wrapped)?;
        if id == self.current_id().as_bytes() {
            return Ok(None);
        }
        let key = self.unwrap(student, wrapped)?;
        Ok(Some(self.wrap(student, &key)))
    }
}

/// `(kek id, nonce || ciphertext+tag)` of a wrapped key.
fn split_wrapped(wrapped: &[u8]) -> Result<(&[u8], &[u8]), OpenError> {
    let [format, id_len, rest @ ..] = wrapped else {
        return Err(OpenError::Malformed);
    };
    let id_len = usize::from(*id_len);
    if *format != FORMAT || rest.len() < id_len {
        return Err(OpenError::Malformed);
    }
    Ok(rest.split_at(id_len))
}

fn wrap_context(student: Uuid, kek_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_CONTEXT.len() + 16 + kek_id.len());
    aad.extend_from_slice(WRAP_CONTEXT);
    aad.extend_from_slice(student.as_bytes());
    aad.extend_from_slice(kek_id.as_bytes());
    aad
}

fn decode_hex_key(hex: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let digits = hex.as_bytes();
    if digits.len() != 2 * KEY_LEN {
        return None;
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = (high * 16 + low) as u8;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEK_A: &str =
        "kek-2026a:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEK_B: &str =
        "kek-2026b:f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";

    #[test]
    fn a_sealed_field_opens_with_its_key_in_its_context_only() {
        let key = DataKey::generate();
        let event = Uuid::now_v7();
        let sealed = seal(&key, event, "first_name", "Ada");
        assert!(!sealed.windows(3).any(|w| w == b"Ada"), "plaintext visible");
        assert_eq!(
            open(&key, event, "first_name", &sealed).as_deref(),
            Ok("Ada")
        );
        // Another key (an erased student's key is gone; any other key fails the same way).
        assert_eq!(
            open(&DataKey::generate(), event, "first_name", &sealed),
            Err(OpenError::Rejected)
        );
        // Moved to another field or another event.
        assert_eq!(
            open(&key, event, "last_name", &sealed),
            Err(OpenError::Rejected)
        );
        assert_eq!(
            open(&key, Uuid::now_v7(), "first_name", &sealed),
            Err(OpenError::Rejected)
        );
        // Tampered, truncated, of another format.
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            open(&key, event, "first_name", &flipped),
            Err(OpenError::Rejected)
        );
        assert_eq!(
            open(&key, event, "first_name", &sealed[..20]),
            Err(OpenError::Malformed)
        );
        let mut other_format = sealed;
        other_format[0] = 9;
        assert_eq!(
            open(&key, event, "first_name", &other_format),
            Err(OpenError::Malformed)
        );
    }

    #[test]
    fn the_same_name_seals_differently_every_time() {
        let key = DataKey::generate();
        let event = Uuid::now_v7();
        assert_ne!(
            seal(&key, event, "name", "Ada L"),
            seal(&key, event, "name", "Ada L")
        );
    }

    #[test]
    fn a_rotated_ring_rewraps_keys_that_still_open_old_fields() {
        let old = KekRing::parse(KEK_A).expect("one kek");
        let rotated = KekRing::parse(&format!("# new first\n{KEK_B}\n\n{KEK_A}\n")).expect("two");
        assert_eq!(rotated.current_id(), "kek-2026b");
        let student = Uuid::now_v7();
        let event = Uuid::now_v7();
        let key = DataKey::generate();
        let sealed = seal(&key, event, "name", "Ada L");
        let wrapped = old.wrap(student, &key);

        let rewrapped = rotated
            .rewrap(student, &wrapped)
            .expect("opens")
            .expect("was wrapped by the old kek");
        assert_eq!(
            rotated.rewrap(student, &rewrapped),
            Ok(None),
            "already current"
        );
        let only_new = KekRing::parse(KEK_B).expect("one kek");
        let key_again = only_new
            .unwrap(student, &rewrapped)
            .expect("the new kek opens it");
        assert_eq!(
            open(&key_again, event, "name", &sealed).as_deref(),
            Ok("Ada L")
        );
        // Once the old KEK is removed, keys it alone wraps are refused by name.
        assert_eq!(
            only_new.unwrap(student, &wrapped).map(|_| ()),
            Err(OpenError::UnknownKek("kek-2026a".into()))
        );
        // A wrapped key is bound to its student.
        assert_eq!(
            rotated.unwrap(Uuid::now_v7(), &rewrapped).map(|_| ()),
            Err(OpenError::Rejected)
        );
    }

    #[test]
    fn kek_configuration_errors_say_what_is_wrong() {
        assert_eq!(KekRing::parse("").map(|_| ()), Err(KekConfigError::Empty));
        assert_eq!(
            KekRing::parse("# only a comment\n").map(|_| ()),
            Err(KekConfigError::Empty)
        );
        assert_eq!(
            KekRing::parse("kek:0011").map(|_| ()),
            Err(KekConfigError::BadLine { line: 1 })
        );
        let not_hex = format!("{}zz", &KEK_A[..KEK_A.len() - 2]);
        assert_eq!(
            KekRing::parse(&format!("\n{not_hex}")).map(|_| ()),
            Err(KekConfigError::BadLine { line: 2 })
        );
        assert_eq!(
            KekRing::parse(&format!("{KEK_A}\n{KEK_A}")).map(|_| ()),
            Err(KekConfigError::Duplicate("kek-2026a".into()))
        );
        let no_id = &KEK_A[KEK_A.find(':').unwrap_or_default()..];
        assert_eq!(
            KekRing::parse(no_id).map(|_| ()),
            Err(KekConfigError::BadLine { line: 1 })
        );
        // Keys never reach a log line through Debug.
        let ring = KekRing::parse(KEK_A).expect("one kek");
        assert!(!format!("{ring:?}").contains("0001020304"), "{ring:?}");
        assert_eq!(format!("{:?}", DataKey::generate()), "DataKey(..)");
    }

    #[test]
    fn garbage_never_opens_and_never_panics() {
        let ring = KekRing::parse(KEK_A).expect("one kek");
        let key = DataKey::generate();
        let student = Uuid::now_v7();
        for bytes in [&b""[..], &[1], &[1, 200, 3], &[1, 0], &[0; 80], &[1; 80]] {
            assert!(ring.unwrap(student, bytes).is_err(), "{bytes:?}");
            assert!(open(&key, student, "name", bytes).is_err(), "{bytes:?}");
        }
    }
}
