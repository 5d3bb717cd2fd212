//! The projectors process killed with SIGKILL again and again while commands stream in, then
//! left to catch up: the read models must equal the state the accepted commands produced
//! (taken from the command side, not from the stream), with nothing lost and nothing doubled.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use command_gateway::commands::{CommandContext, CommandService};
use command_gateway::domain::{Command as DomainCommand, CourseDraft, Snapshot, StudentDraft};
use projectors::{CourseStore, PgStudents};
use test_support::{TestBroker, TestDatabase, free_port};
use uuid::Uuid;

/// One projectors process on this test's streams and database.
struct Projectors {
    child: Child,
    port: u16,
}

impl Projectors {
    fn start(prefix: &str, database_url: &str) -> Projectors {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_projectors"))
            .env("NATS_URL", test_support::nats_url())
            .env("DATABASE_URL", database_url)
            .env("STREAM_PREFIX", prefix)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("BATCH_SIZE", "50")
            .env(
                "RUST_LOG",
                std::env::var("PROJECTORS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("REDIS_URL")
            .env_remove("COURSES_STORE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("projectors binary");
        Projectors { child, port }
    }

    /// Waits until the process has connected everything and started consuming (its health
    /// listener is bound right before the projections start).
    async fn wait_started(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                self.child.try_wait().ok().flatten().is_none(),
                "projectors exited at start"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "projectors did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

/// What the command side says the world is, merged from every accepted command's result.
#[derive(Default)]
struct Expected {
    students: BTreeMap<Uuid, (String, BTreeSet<Uuid>)>,
    courses: BTreeMap<Uuid, BTreeSet<Uuid>>,
}

impl Expected {
    fn merge(&mut self, snapshot: &Snapshot) {
        for (id, state) in &snapshot.students {
            match state.active() {
                Some(s) => {
                    self.students
                        .insert(*id, (s.details.name.clone(), s.course_ids.clone()));
                }
                None => {
                    self.students.remove(id);
                }
            }
        }
        for (id, state) in &snapshot.courses {
            match state.active() {
                Some(c) => {
                    self.courses.insert(*id, c.student_ids.clone());
                }
                None => {
                    self.courses.remove(id);
                }
            }
        }
    }
}

struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn context() -> CommandContext {
    let id = Uuid::now_v7();
    CommandContext {
        command_id: id,
        correlation_id: id,
        trace: Default::default(),
    }
}

async fn read_models(students: &PgStudents, courses: &CourseStore) -> Expected {
    let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, name FROM students")
        .fetch_all(students.pool())
        .await
        .expect("students");
    let links: Vec<(Uuid, Uuid)> =
        sqlx::query_as("SELECT student_id, course_id FROM student_courses")
            .fetch_all(students.pool())
            .await
            .expect("enrollments");
    let mut model = Expected::default();
    for (id, name) in rows {
        model.students.insert(id, (name, BTreeSet::new()));
    }
    for (student, course) in links {
        if let Some(entry) = model.students.get_mut(&student) {
            entry.1.insert(course);
        }
    }
    let mut after = None;
    loop {
        let page = courses.list(after, 100).await.expect("courses");
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for doc in page {
            model
                .courses
                .insert(doc.id, doc.student_ids.into_iter().collect());
        }
    }
    model
}

/// A readable account of where the read models and the expectation disagree.
fn differences(model: &Expected, expected: &Expected) -> String {
    let mut out = Vec::new();
    for (id, want) in &expected.students {
        match model.students.get(id) {
            None => out.push(format!("student {id} missing (expected {want:?})")),
            Some(got) if got != want => {
                out.push(format!("student {id}: got {got:?}, expected {want:?}"))
            }
            Some(_) => {}
        }
    }
    for id in model
        .students
        .keys()
        .filter(|id| !expected.students.contains_key(id))
    {
        out.push(format!("student {id} should not exist"));
    }
    for (id, want) in &expected.courses {
        match model.courses.get(id) {
            None => out.push(format!("course {id} missing")),
            Some(got) if got != want => out.push(format!(
                "course {id}: got {} students, expected {}; missing {:?}, extra {:?}",
                got.len(),
                want.len(),
                want.difference(got).collect::<Vec<_>>(),
                got.difference(want).collect::<Vec<_>>()
            )),
            Some(_) => {}
        }
    }
    out.truncate(20);
    out.join("\n")
}

async fn supervisor_result(handle: &mut tokio::task::JoinHandle<u64>) -> u64 {
    handle.await.expect("supervisor finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_under_load_loses_and_doubles_nothing() {
    let broker = TestBroker::start().await;
    let db = TestDatabase::create().await;
    let state = command_gateway::app_state(broker.client.clone(), broker.names.clone())
        .await
        .expect("command side");
    let commands: Arc<CommandService> = state.commands.clone();
    // While the first half of the load streams in, a supervisor starts the projectors,
    // lets them consume for a moment and kills them with SIGKILL, over and over.
    let stop_killing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut supervisor_handle = {
        let stop = stop_killing.clone();
        let (prefix, db_url) = (broker.names.prefix().to_owned(), db.url.clone());
        tokio::spawn(async move {
            let mut kills = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut projectors = Projectors::start(&prefix, &db_url);
                projectors.wait_started().await;
                tokio::time::sleep(Duration::from_millis(20 + 25 * (kills % 4))).await;
                projectors.kill();
                kills += 1;
            }
            kills
        })
    };
    let mut expected = Expected::default();
    let mut random = Lcg(42);
    let mut courses = Vec::new();
    for n in 0..8 {
        let draft = CourseDraft::parse(
            Some(&format!("Course {n}")),
            Some("About it"),
            Some("Maths"),
            Some("Teacher"),
            &[],
        )
        .expect("valid");
        let command = DomainCommand::CreateCourse {
            course_id: Uuid::now_v7(),
            draft,
        };
        let accepted = commands
            .execute(&command, &context(), None)
            .await
            .expect("created");
        courses.push(command.target().id);
        expected.merge(&accepted.snapshot);
    }
    let mut students: Vec<Uuid> = Vec::new();
    let mut accepted_commands = 0;
    for n in 0..800 {
        let command = match random.below(10) {
            0..=4 => {
                let picked: Vec<String> = (0..random.below(3))
                    .map(|_| courses[random.below(courses.len() as u64) as usize].to_string())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let draft = StudentDraft::parse(
                    Some(&format!("Student {n}")),
                    Some("First"),
                    Some("Last"),
                    &picked,
                )
                .expect("valid");
                DomainCommand::RegisterStudent {
                    student_id: Uuid::now_v7(),
                    draft,
                }
            }
            5..=6 if !students.is_empty() => DomainCommand::Enroll {
                student_id: students[random.below(students.len() as u64) as usize],
                course_id: courses[random.below(courses.len() as u64) as usize],
            },
            7 if !students.is_empty() => DomainCommand::Unenroll {
                student_id: students[random.below(students.len() as u64) as usize],
                course_id: courses[random.below(courses.len() as u64) as usize],
            },
            8 if !students.is_empty() => DomainCommand::DeleteStudent {
                student_id: students[random.below(students.len() as u64) as usize],
            },
            _ if !students.is_empty() => {
                let draft = StudentDraft::parse(
                    Some(&format!("Renamed {n}")),
                    Some("First"),
                    Some("Last"),
                    &[],
                )
                .expect("valid");
                DomainCommand::ReplaceStudent {
                    student_id: students[random.below(students.len() as u64) as usize],
                    draft,
                }
            }
            _ => continue,
        };
        if n == 400 {
            // The second half piles up as a backlog with no projector running.
            stop_killing.store(true, std::sync::atomic::Ordering::Relaxed);
            let kills = supervisor_result(&mut supervisor_handle).await;
            assert!(kills >= 3, "only {kills} kills during the live load");
        }
        if let Ok(accepted) = commands.execute(&command, &context(), None).await {
            accepted_commands += 1;
            expected.merge(&accepted.snapshot);
            if let DomainCommand::RegisterStudent { student_id, .. } = command {
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
        let mut projectors = Projectors::start(broker.names.prefix(), &db.url);
        projectors.wait_started().await;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        projectors.kill();
    }
    let mut projectors = Projectors::start(broker.names.prefix(), &db.url);

    let students_store = PgStudents::with_pool(db.pool.clone())
        .await
        .expect("students store");
    let courses_store = CourseStore::connect(&db.url).await.expect("courses store");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let model = read_models(&students_store, &courses_store).await;
        if model.students == expected.students && model.courses == expected.courses {
            break model;
        }
        if std::time::Instant::now() > deadline {
            eprintln!(
                "the last projectors process: {:?}",
                projectors.child.try_wait()
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

    // SIGTERM: the last projectors process finishes its batch, acks, and exits cleanly.
    projectors.wait_started().await;
    let asked = std::time::Instant::now();
    let terminated = Command::new("kill")
        .args(["-TERM", &projectors.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(terminated.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = projectors.child.try_wait().expect("status") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    eprintln!("projectors exited {:?} after SIGTERM", asked.elapsed());
    db.cleanup().await;
    broker.cleanup().await;
}
