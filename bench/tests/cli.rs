//! The bench command's argument parsing, run on the real binary. (This test is also why
//! `cargo test --no-run` builds the `bench` binary that the test command runs once, tiny.)

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .output()
        .expect("the bench binary runs")
}

#[test]
fn help_lists_the_all_command_and_its_options() {
    let out = bench(&["all", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in ["--tiny", "--seconds", "--runs", "--concurrency", "--output"] {
        assert!(
            help.contains(option),
            "`all --help` lacks {option}:\n{help}"
        );
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    for args in [&["nonsense"][..], &["all", "--runs", "many"], &[]] {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(2), "bench {args:?} was not refused");
        assert!(
            !out.stderr.is_empty(),
            "bench {args:?} was refused without saying why"
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("==>"),
            "bench {args:?} started measuring"
        );
    }
}
