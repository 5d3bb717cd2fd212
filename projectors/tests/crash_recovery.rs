//! The projectors process killed with SIGKILL again and again while commands stream in, then
//! left to catch up: the read models must equal the state the accepted commands produced
//! (taken from the command side, not from the stream), with nothing lost and nothing doubled.

mod common;

use std::sync::Arc;
use std::time::Duration;

use command_gateway::commands::CommandService;
use common::{
    Expected, Lcg, Projectors, context, create_courses, differences, random_command, read_models,
};
use read_models::{CourseStore, PgStudents};
use test_support::{TestBroker, TestDatabase};
use uuid::Uuid;

async fn supervisor_result(handle: &mut tokio::task::JoinHandle<u64>) -> u64 {
    handle.await.expect("supervisor finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_under_load_loses_and_doubles_nothing() {
    sigkill_mid_batch_under_load(None).await;
}

/// The same with the courses in MongoDB (the chart's default): no transaction spans the
/// documents and the checkpoint there, so a kill between the two is the case to survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_with_courses_in_mongodb_loses_and_doubles_nothing() {
    let Some(url) = test_support::mongo::mongo_url("the projectors SIGKILL test on MongoDB") else {
        return;
    };
    sigkill_mid_batch_under_load(Some(url)).await;
}

async fn sigkill_mid_batch_under_load(courses_url: Option<String>) {
    let started = std::time::Instant::now();
    let env: Vec<(&'static str, String)> = courses_url
        .iter()
        .map(|url| ("COURSES_STORE_URL", url.clone()))
        .collect();
    let start = move |prefix: &str, db_url: &str| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Projectors::start_with(prefix, db_url, &env)
    };
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let state = command_gateway::app_state(
        broker.client.clone(),
        broker.names.clone(),
        test_support::test_kek(),
    )
    .await
    .expect("command side");
    let commands: Arc<CommandService> = state.commands.clone();
    // While the first half of the load streams in, a supervisor starts the projectors,
    // lets them consume for a moment and kills them with SIGKILL, over and over.
    let stop_killing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut supervisor_handle = {
        let stop = stop_killing.clone();
        let (prefix, db_url) = (broker.names.prefix().to_owned(), db.url.clone());
        let start = start.clone();
        tokio::spawn(async move {
            let mut kills = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut projectors = start(&prefix, &db_url);
                projectors.wait_started().await;
                tokio::time::sleep(Duration::from_millis(20 + 25 * (kills % 4))).await;
                projectors.process.kill();
                kills += 1;
            }
            kills
        })
    };
    let mut expected = Expected::default();
    let mut random = Lcg(42);
    let courses = create_courses(&commands, &mut expected, 8).await;
    let mut students: Vec<Uuid> = Vec::new();
    let mut accepted_commands = 0;
    let mut live_kills = 0;
    let mut attempted = 0;
    for n in 0..800 {
        let Some(command) = random_command(&mut random, n, &students, &courses) else {
            continue;
        };
        if n == 400 {
            // The second half piles up as a backlog with no projector running.
            stop_killing.store(true, std::sync::atomic::Ordering::Relaxed);
            live_kills = supervisor_result(&mut supervisor_handle).await;
            assert!(
                live_kills >= 3,
                "only {live_kills} kills during the live load"
            );
        }
        attempted += 1;
        if let Ok(accepted) = commands.execute(&command, &context(), None).await {
            accepted_commands += 1;
            expected.merge(&accepted.snapshot);
            if let command_gateway::domain::Command::RegisterStudent { student_id, .. } = command {
                students.push(student_id);
            }
        }
    }
    assert!(
        accepted_commands > 500,
        "the load ran: {accepted_commands} accepted"
    );
    // Kill restarted projectors in the middle of catching up with the backlog, then let the
    // last one finish.
    for delay in [15, 40, 80, 30] {
        let mut projectors = start(broker.names.prefix(), &db.url);
        projectors.wait_started().await;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        projectors.process.kill();
    }
    let mut projectors = start(broker.names.prefix(), &db.url);

    let students_store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("students store");
    let courses_store = CourseStore::connect(courses_url.as_deref().unwrap_or(&db.url))
        .await
        .expect("courses store");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let model = read_models(&students_store, &courses_store).await;
        if model.students == expected.students && model.courses == expected.courses {
            break model;
        }
        if std::time::Instant::now() > deadline {
            eprintln!(
                "the last projectors process: {:?}",
                projectors.process.exited()
            );
            panic!(
                "read models differ from the accepted commands after 60 s:\n{}",
                differences(&model, &expected)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!settled.students.is_empty() && !settled.courses.is_empty());
    let enrollment_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM student_courses")
        .fetch_one(students_store.pool())
        .await
        .expect("count");
    let expected_rows: usize = expected.students.values().map(|(_, c)| c.len()).sum();
    assert_eq!(enrollment_rows as usize, expected_rows, "nothing doubled");
    let held_for = started.elapsed();
    eprintln!(
        "RELIABILITY: scenario=projectors-sigkill-under-load{} commands_per_s={:.0} duration_s={:.1} \
         faults={} (SIGKILL: {live_kills} during the live load, 4 while catching up) commands={attempted} \
         accepted={accepted_commands} students={} courses={} enrollment_rows={enrollment_rows} \
         lost=0 duplicated=0 false_success=0 (read models equal the accepted commands)",
        if courses_url.is_some() {
            "-courses-on-mongodb-standin"
        } else {
            ""
        },
        f64::from(attempted) / held_for.as_secs_f64(),
        held_for.as_secs_f64(),
        live_kills + 4,
        settled.students.len(),
        settled.courses.len(),
    );

    // SIGTERM: the last projectors process finishes its batch, acks, and exits cleanly.
    projectors.wait_started().await;
    let asked = std::time::Instant::now();
    projectors.process.sigterm();
    let status = projectors
        .process
        .exit_within(Duration::from_secs(10))
        .await
        .expect("no exit within 10 s of SIGTERM");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    eprintln!("projectors exited {:?} after SIGTERM", asked.elapsed());
    db.cleanup().await;
    broker.cleanup().await;
}
