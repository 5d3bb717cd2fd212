//! Any bytes as a message of the event stream: `events::decode` must answer an error or an
//! event that survives a round trip (`events::decode_properties`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    events::decode_properties::assert_decoding_properties(bytes);
});
