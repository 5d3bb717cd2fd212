//! The gateway binary at start: without its key-encryption key it could seal no student's
//! names, so it does not start, and says which variable is missing or what is wrong with
//! the file (before it even tries NATS).

#[test]
fn without_a_kek_file_the_gateway_does_not_start_and_says_why() {
    test_support::assert_refuses_to_start_without_a_kek(
        env!("CARGO_BIN_EXE_command-gateway"),
        &[
            ("NATS_URL", "nats://127.0.0.1:1"),
            ("API_KEYS", "write:some-write-key"),
        ],
    );
}
