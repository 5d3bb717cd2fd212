//! SIGTERM to the real gateway binary under a paced command load, round after round (a new
//! gateway each round, on the same streams): every request sent before the signal gets its
//! answer, the process exits 0 within its grace period, and the event stream holds every
//! accepted command exactly once (lost=0 duplicated=0 false_success=0).
//!
//! *Sent before the signal*, precisely: the client had issued the request (`Attempt::started`,
//! taken right before the request is handed to the HTTP client) before the test ran `kill
//! -TERM`. Every such request must be answered `2xx` (or `503`); a reset, a connection closed
//! before the answer or a refused connection for any of them fails the test. Requests issued
//! after the signal may be answered (the server drains for
//! `service_kit::shutdown::HTTP_DRAIN`, answering with `Connection: close`) or refused (then
//! the port closes); they are counted separately, and whatever they got, no command may be
//! stored without its client having been told (`accepted_but_cut`).
//!
//! Rounds alternate keep-alive connections (a proxy's upstream pool) and a fresh connection
//! per request. Right before each signal a burst of commands goes out at once, so that some
//! are still unanswered when `kill` has returned, i.e. when the signal has surely been
//! delivered (`in_flight_at_signal` counts those, and must not be 0: a command can take less
//! time than running `kill`). Short version (CI): 2 rounds of 4 s of load. `FAULTS_LONG=1`:
//! 10 rounds of 10 s.

mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use load::{
    Answer, Attempt, GatewayProcess, Load, Sent, StreamAudit, Verdict, examples, long_version,
};
use test_support::TestBroker;

/// The chart's `terminationGracePeriodSeconds` (30) minus its `preStop` sleep (5): the time
/// the process has between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(25);
/// Commands sent at once right before each signal.
const BURST: usize = 16;

struct Plan {
    rounds: usize,
    /// Load before each SIGTERM.
    load_for: Duration,
    clients: usize,
    rate: u32,
}

fn plan() -> Plan {
    if long_version() {
        Plan {
            rounds: 10,
            load_for: Duration::from_secs(10),
            clients: 16,
            rate: 200,
        }
    } else {
        Plan {
            rounds: 2,
            load_for: Duration::from_secs(4),
            clients: 12,
            rate: 150,
        }
    }
}

/// What one round's requests met, relative to the signal.
#[derive(Debug, Default)]
struct Round {
    /// Issued before the signal and not answered yet when it had been delivered (`kill`
    /// returned).
    in_flight_at_signal: usize,
    /// Issued before the signal, answered 2xx or 503.
    answered_before: usize,
    /// Issued before the signal, without an HTTP answer (reset, closed, refused).
    cut_before: usize,
    /// Issued before the signal, answered with another status.
    other_before: usize,
    /// Issued after the signal and still answered (2xx or 503).
    served_after: usize,
    /// Issued after the signal: connection refused.
    refused_after: usize,
    /// Issued after the signal: connection reset or closed before an answer.
    cut_after: usize,
}

impl Round {
    fn of(attempts: &[Attempt], signal_at: Instant, delivered_at: Instant) -> Round {
        let mut round = Round::default();
        for attempt in attempts {
            let answered = matches!(
                attempt.answer,
                Answer::Accepted { .. } | Answer::Unavailable { .. }
            );
            if attempt.started < signal_at {
                round.in_flight_at_signal += usize::from(attempt.finished > delivered_at);
                match &attempt.answer {
                    _ if answered => round.answered_before += 1,
                    Answer::Transport { .. } => round.cut_before += 1,
                    _ => round.other_before += 1,
                }
            } else {
                match &attempt.answer {
                    _ if answered => round.served_after += 1,
                    Answer::Transport { connect: true, .. } => round.refused_after += 1,
                    Answer::Transport { .. } => round.cut_after += 1,
                    // Counted by the verdict (`other_status`).
                    _ => {}
                }
            }
        }
        round
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_request_in_flight_and_exits_cleanly_in_time() {
    let plan = plan();
    let broker = TestBroker::start().await;
    let mut attempts = Vec::new();
    let mut totals = Round::default();
    let (mut loaded_for, mut slowest_exit) = (Duration::ZERO, Duration::ZERO);
    let mut before_signal_failures = Vec::new();
    for round in 0..plan.rounds {
        let mut gateway = GatewayProcess::start(&test_support::nats_url(), &broker.names).await;
        let load = Load {
            clients: plan.clients,
            rate: plan.rate,
            fresh_connections: round % 2 == 1,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let running = {
            let (url, stop, in_flight) = (gateway.url.clone(), stop.clone(), in_flight.clone());
            let tag = format!("R{round}");
            tokio::spawn(async move { load.run_counting(&url, stop, in_flight, &tag).await })
        };
        tokio::time::sleep(plan.load_for).await;
        // A burst right before the signal, so that requests are surely still in flight when
        // it lands: a command can take less time than running `kill`.
        let burst: Vec<_> = (0..BURST)
            .map(|n| {
                let (url, in_flight) = (gateway.url.clone(), in_flight.clone());
                let sent = Sent::CreateCourse {
                    name: format!("R{round}B{n}"),
                };
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let attempt = load::send(&http, &url, sent).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    attempt
                })
            })
            .collect();
        let wait_until = Instant::now() + Duration::from_secs(2);
        while in_flight.load(Ordering::SeqCst) < BURST && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let signal_at = Instant::now();
        gateway.process.sigterm();
        let delivered_at = Instant::now();
        let status = gateway.process.exit_within(GRACE).await;
        let took = signal_at.elapsed();
        // The load goes on a little after the exit: those requests meet a closed port.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let mut round_attempts = running.await.expect("load");
        for attempt in burst {
            round_attempts.push(attempt.await.expect("burst request"));
        }
        loaded_for += started.elapsed();
        let status =
            status.unwrap_or_else(|| panic!("round {round}: no exit within {GRACE:?} of SIGTERM"));
        assert!(
            status.success(),
            "round {round}: exit status after SIGTERM: {status:?}"
        );
        slowest_exit = slowest_exit.max(took);
        let counts = Round::of(&round_attempts, signal_at, delivered_at);
        if counts.cut_before + counts.other_before > 0 {
            before_signal_failures.push(format!(
                "round {round} ({}): {}",
                if round % 2 == 1 {
                    "fresh connections"
                } else {
                    "keep-alive"
                },
                round_attempts
                    .iter()
                    .filter(|a| a.started < signal_at
                        && !matches!(
                            a.answer,
                            Answer::Accepted { .. } | Answer::Unavailable { .. }
                        ))
                    .take(5)
                    .map(|a| format!(
                        "issued {}us before the signal, ended {}us after it: {:?} -> {:?}",
                        (signal_at - a.started).as_micros(),
                        a.finished.saturating_duration_since(signal_at).as_micros(),
                        a.sent,
                        a.answer
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        totals.in_flight_at_signal += counts.in_flight_at_signal;
        totals.answered_before += counts.answered_before;
        totals.cut_before += counts.cut_before;
        totals.other_before += counts.other_before;
        totals.served_after += counts.served_after;
        totals.refused_after += counts.refused_after;
        totals.cut_after += counts.cut_after;
        attempts.extend(round_attempts);
    }

    let audit = StreamAudit::read(&broker.client, &broker.names).await;
    let verdict = Verdict::of(&attempts, &audit);
    eprintln!(
        "RELIABILITY: scenario=gateway-sigterm-under-load commands_per_s={:.0} duration_s={:.1} \
         faults={} (SIGTERM, slowest exit {}ms, grace {}s) commands={} accepted={} \
         in_flight_at_signal={} answered_before_signal={} cut_before_signal={} \
         served_after_signal={} refused_after_signal={} cut_after_signal={} \
         accepted_but_cut={} lost={} duplicated={} false_success={}",
        attempts.len() as f64 / loaded_for.as_secs_f64(),
        loaded_for.as_secs_f64(),
        plan.rounds,
        slowest_exit.as_millis(),
        GRACE.as_secs(),
        attempts.len(),
        verdict.accepted,
        totals.in_flight_at_signal,
        totals.answered_before,
        totals.cut_before + totals.other_before,
        totals.served_after,
        totals.refused_after,
        totals.cut_after,
        verdict.accepted_but_cut,
        verdict.lost,
        verdict.duplicated,
        verdict.false_success,
    );

    assert!(
        before_signal_failures.is_empty(),
        "requests issued before SIGTERM must all be answered 2xx or 503:\n{}",
        before_signal_failures.join("\n")
    );
    assert_eq!(verdict.lost, 0, "accepted commands missing from the stream");
    assert_eq!(verdict.duplicated, 0, "commands or events stored twice");
    assert_eq!(
        verdict.false_success, 0,
        "2xx answers whose events are not where the token says"
    );
    assert_eq!(
        verdict.accepted_but_cut, 0,
        "commands stored although their client got no answer"
    );
    assert_eq!(
        verdict.other_status,
        0,
        "answers other than 2xx or 503:\n{}",
        examples(&attempts, |a| matches!(a, Answer::Other { .. }))
    );
    assert!(
        totals.in_flight_at_signal > 0,
        "no request was in flight at any SIGTERM: the test proved nothing"
    );
    assert!(
        verdict.accepted >= attempts.len() / 2,
        "the gateway accepted most commands ({} of {})",
        verdict.accepted,
        attempts.len()
    );
    broker.cleanup().await;
}
