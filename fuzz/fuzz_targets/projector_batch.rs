//! Any bytes as a batch of stream messages taken through the projectors' decoding, trace
//! continuation, cache invalidation and folds (`projectors::in_memory_batch`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    projectors::in_memory_batch::assert_batch_projects_in_memory(input);
});
