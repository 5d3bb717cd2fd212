//! NATS taken down and brought back (same port, same store) while the real gateway binary
//! takes a sustained command load: afterwards every command that got a 2xx is in the stream
//! exactly once, nothing is stored twice, and while the broker was away clients got `503`
//! problem+json with `Retry-After`, never a success for an event that was not stored.
//!
//! Short version (CI): one SIGKILL outage of 4 s in 15 s of load. `FAULTS_LONG=1`: 120 s of
//! load with four outages of 10 s, alternating SIGKILL and SIGTERM.

mod load;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use load::{Answer, GatewayProcess, Load, StreamAudit, Verdict, examples, long_version};
use test_support::{NatsServer, NatsStop};

struct Plan {
    load_for: Duration,
    /// (start after, down for, how)
    outages: Vec<(Duration, Duration, NatsStop)>,
    clients: usize,
    rate: u32,
}

fn plan() -> Plan {
    let s = Duration::from_secs;
    if long_version() {
        Plan {
            load_for: s(120),
            outages: vec![
                (s(15), s(10), NatsStop::Kill),
                (s(40), s(10), NatsStop::Graceful),
                (s(65), s(10), NatsStop::Kill),
                (s(90), s(10), NatsStop::Graceful),
            ],
            clients: 16,
            rate: 200,
        }
    } else {
        Plan {
            load_for: s(15),
            outages: vec![(s(4), s(4), NatsStop::Kill)],
            clients: 12,
            rate: 150,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_load_loses_no_accepted_command_and_answers_503_while_down() {
    let plan = plan();
    let mut nats = NatsServer::start().await;
    let broker = nats.broker().await;
    let gateway = GatewayProcess::start(&nats.url(), &broker.names).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        clients: plan.clients,
        rate: plan.rate,
        fresh_connections: false,
    };
    let started = Instant::now();
    let running = {
        let (url, stop) = (gateway.url.clone(), stop.clone());
        tokio::spawn(async move { load.run(&url, stop).await })
    };
    let mut windows = Vec::new();
    for (at, down_for, how) in &plan.outages {
        tokio::time::sleep((started + *at).saturating_duration_since(Instant::now())).await;
        let down_at = Instant::now();
        nats.stop(*how);
        tokio::time::sleep(*down_for).await;
        nats.restart().await;
        windows.push((down_at, Instant::now()));
    }
    tokio::time::sleep((started + plan.load_for).saturating_duration_since(Instant::now())).await;
    stop.store(true, Ordering::Relaxed);
    let attempts = running.await.expect("load");
    let held_for = started.elapsed();
    let sent_under_load = attempts.len();
    let audit = StreamAudit::read(&broker.client, &broker.names).await;
    let verdict = Verdict::of(&attempts, &audit);

    // Clients retry what was answered 503, with the same Idempotency-Key. A command whose
    // append the broker did store must get its first attempt's aggregate back, not a second
    // one (the audit counts a name created twice as duplicated).
    let http = reqwest::Client::new();
    let mut retries = Vec::new();
    for attempt in &attempts {
        if matches!(attempt.answer, Answer::Unavailable { .. }) {
            retries.push(load::send(&http, &gateway.url, attempt.sent.clone()).await);
        }
    }
    // A retry of a stored command must name what was stored; a retry of one that was not
    // stored is decided afresh, and a rule may refuse it by now (a course that filled up
    // meanwhile); nothing else is a right answer.
    let name_of = |sent: &load::Sent| match sent {
        load::Sent::CreateCourse { name } | load::Sent::RegisterStudent { name, .. } => {
            name.clone()
        }
    };
    let mut retried_accepted = 0;
    let mut refused_by_rule = 0;
    let mut wrong = Vec::new();
    for retry in &retries {
        let stored = audit.created_by_name.get(&name_of(&retry.sent));
        match (&retry.answer, stored) {
            (Answer::Accepted { id, .. }, Some(ids)) if ids.as_slice() == [*id] => {
                retried_accepted += 1;
            }
            (Answer::Accepted { .. }, None) => retried_accepted += 1,
            (Answer::Other { status: 409, body }, None)
                if body.contains("course-full") || body.contains("student-course-limit") =>
            {
                refused_by_rule += 1;
            }
            _ => wrong.push(format!(
                "{:?} (stored as {stored:?}) -> {:?}",
                retry.sent, retry.answer
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "retries after the outage answered wrongly:\n{}",
        wrong.join("\n")
    );
    let after_retries = {
        let audit = StreamAudit::read(&broker.client, &broker.names).await;
        let mut all = attempts.clone();
        all.extend(retries);
        Verdict::of(&all, &audit)
    };
    // A request overlapping an outage window met the broker's absence.
    let overlaps = |a: &load::Attempt, (from, to): &(Instant, Instant)| {
        a.started <= *to && a.finished >= *from
    };
    let unavailable_in_outage = attempts
        .iter()
        .filter(|a| {
            matches!(a.answer, Answer::Unavailable { .. }) && windows.iter().any(|w| overlaps(a, w))
        })
        .count();
    let outages_with_503 = windows
        .iter()
        .filter(|w| {
            attempts
                .iter()
                .any(|a| overlaps(a, w) && matches!(a.answer, Answer::Unavailable { .. }))
        })
        .count();
    let slowest_503 = attempts
        .iter()
        .filter(|a| matches!(a.answer, Answer::Unavailable { .. }))
        .map(|a| a.finished - a.started)
        .max()
        .unwrap_or_default();
    eprintln!(
        "RELIABILITY: scenario=nats-restart-under-load commands_per_s={:.0} duration_s={:.1} \
         faults={} (nats-server {}) commands={} accepted={} unavailable_503={} \
         (during outages {unavailable_in_outage}, slowest {}ms) stored_after_503={} retried_503s_accepted={retried_accepted} retried_503s_refused_by_rule={refused_by_rule} lost={} duplicated={} \
         false_success={} other_status={} transport_errors={}",
        sent_under_load as f64 / held_for.as_secs_f64(),
        held_for.as_secs_f64(),
        plan.outages.len(),
        plan.outages
            .iter()
            .map(|(_, d, how)| format!("{how:?} down {}s", d.as_secs()))
            .collect::<Vec<_>>()
            .join(", "),
        sent_under_load,
        verdict.accepted,
        verdict.unavailable,
        slowest_503.as_millis(),
        verdict.stored_without_success,
        after_retries.lost,
        after_retries.duplicated,
        after_retries.false_success,
        verdict.other_status,
        verdict.transport_refused + verdict.transport_cut,
    );

    assert_eq!(
        after_retries.lost, 0,
        "accepted commands missing from the stream"
    );
    assert_eq!(
        after_retries.duplicated, 0,
        "commands or events stored twice (a retry with the same key made a second one?)"
    );
    assert_eq!(
        after_retries.false_success, 0,
        "2xx answers whose events are not where the token says"
    );
    assert_eq!(
        verdict.unavailable_without_retry_after,
        0,
        "503 without Retry-After or problem+json:\n{}",
        examples(&attempts, |a| matches!(
            a,
            Answer::Unavailable {
                retry_after: false,
                ..
            } | Answer::Unavailable { problem: false, .. }
        ))
    );
    assert_eq!(
        verdict.other_status,
        0,
        "answers other than 2xx or 503:\n{}",
        examples(&attempts, |a| matches!(a, Answer::Other { .. }))
    );
    assert_eq!(
        verdict.transport_refused + verdict.transport_cut,
        0,
        "the gateway must answer every request while NATS is away:\n{}",
        examples(&attempts, |a| matches!(a, Answer::Transport { .. }))
    );
    assert_eq!(
        outages_with_503,
        windows.len(),
        "every outage must be seen by clients as 503"
    );
    assert!(
        verdict.accepted > attempts.len() / 2,
        "the gateway recovered and accepted most commands ({} of {})",
        verdict.accepted,
        attempts.len()
    );
    drop(gateway);
    drop(nats);
}
