//! What the projectors' fault tests share: the real projectors binary as a process, a random
//! command mix executed by the real command side, and the expectation those commands imply
//! (taken from the command side's own results, not from the stream), compared with the
//! read models.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use command_gateway::commands::{CommandContext, CommandService};
use command_gateway::domain::{Command as DomainCommand, CourseDraft, Snapshot, StudentDraft};
use read_models::{CourseStore, PgStudents};
use test_support::{ServiceProcess, free_port};
use uuid::Uuid;

/// `FAULTS_LONG=1` selects the long version of a fault scenario.
pub fn long_version() -> bool {
    std::env::var("FAULTS_LONG").is_ok_and(|v| v == "1")
}

/// One projectors process on a test's streams and database.
pub struct Projectors {
    pub process: ServiceProcess,
    pub port: u16,
}

impl Projectors {
    pub fn start(prefix: &str, database_url: &str) -> Projectors {
        Projectors::start_with(prefix, database_url, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_with(prefix: &str, database_url: &str, env: &[(&str, &str)]) -> Projectors {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_projectors"));
        command
            .env("NATS_URL", test_support::nats_url())
            .env("DATABASE_URL", database_url)
            .env("STREAM_PREFIX", prefix)
            .env("KEK_FILE", test_support::test_kek_file())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("BATCH_SIZE", "50")
            .env(
                "RUST_LOG",
                std::env::var("PROJECTORS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("REDIS_URL")
            .env_remove("COURSES_STORE_URL")
            // One replica restarted again and again (as a container in its pod): it takes
            // its leases back at once. Tests of several replicas name each one.
            .env("PROJECTOR_REPLICA_NAME", "test-replica")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        Projectors {
            process: ServiceProcess::spawn("projectors", &mut command),
            port,
        }
    }

    /// Waits until the process has connected everything and started consuming (its health
    /// listener is bound right before the projections start).
    pub async fn wait_started(&mut self) {
        let port = self.port;
        self.process
            .wait_until(|| async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await;
    }

    /// `/readyz`: `Some(status)`, or `None` when it did not answer within `timeout`.
    pub async fn readyz(&self, http: &reqwest::Client, timeout: Duration) -> Option<u16> {
        http.get(format!("http://127.0.0.1:{}/readyz", self.port))
            .timeout(timeout)
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// The sum of a counter's samples on `/metrics` whose labels contain `label`.
    pub async fn metric(&self, http: &reqwest::Client, name: &str, label: &str) -> Option<f64> {
        let text = http
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let samples: Vec<f64> = text
            .lines()
            .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
            .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }
}

/// What the command side says the world is, merged from every accepted command's result.
#[derive(Default, Clone, PartialEq, Eq, Debug)]
pub struct Expected {
    pub students: BTreeMap<Uuid, (String, BTreeSet<Uuid>)>,
    pub courses: BTreeMap<Uuid, BTreeSet<Uuid>>,
}

impl Expected {
    pub fn merge(&mut self, snapshot: &Snapshot) {
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

    /// Enrollment rows the students read model must hold.
    pub fn enrollment_rows(&self) -> usize {
        self.students.values().map(|(_, c)| c.len()).sum()
    }
}

/// A deterministic pseudo-random sequence (the same load every run).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

pub fn context() -> CommandContext {
    let id = Uuid::now_v7();
    CommandContext {
        command_id: id,
        correlation_id: id,
        trace: Default::default(),
    }
}

/// Creates `count` courses through the command side and returns their ids.
pub async fn create_courses(
    commands: &CommandService,
    expected: &mut Expected,
    count: usize,
) -> Vec<Uuid> {
    let mut courses = Vec::new();
    for n in 0..count {
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
    courses
}

/// The random command mix: half registrations (with up to two courses), then enrollments,
/// unenrollments, deletions and renames of registered students. `None`: nothing to do yet.
pub fn random_command(
    random: &mut Lcg,
    n: u64,
    students: &[Uuid],
    courses: &[Uuid],
) -> Option<DomainCommand> {
    let pick = |random: &mut Lcg, ids: &[Uuid]| ids[random.below(ids.len() as u64) as usize];
    Some(match random.below(10) {
        0..=4 => {
            let picked: Vec<String> = (0..random.below(3))
                .map(|_| pick(random, courses).to_string())
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
            student_id: pick(random, students),
            course_id: pick(random, courses),
        },
        7 if !students.is_empty() => DomainCommand::Unenroll {
            student_id: pick(random, students),
            course_id: pick(random, courses),
        },
        8 if !students.is_empty() => DomainCommand::DeleteStudent {
            student_id: pick(random, students),
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
                student_id: pick(random, students),
                draft,
            }
        }
        _ => return None,
    })
}

/// The random mix against the real command side, with the expectation it implies.
pub struct CommandLoad {
    pub random: Lcg,
    pub students: Vec<Uuid>,
    pub courses: Vec<Uuid>,
    pub expected: Expected,
    pub attempted: u64,
    pub accepted: u64,
}

impl CommandLoad {
    /// Creates `courses` courses first.
    pub async fn new(commands: &CommandService, seed: u64, courses: usize) -> CommandLoad {
        let mut expected = Expected::default();
        let courses = create_courses(commands, &mut expected, courses).await;
        CommandLoad {
            random: Lcg(seed),
            students: Vec::new(),
            courses,
            expected,
            attempted: 0,
            accepted: 0,
        }
    }

    /// Executes the next random command (a rule violation is a normal outcome of the mix).
    pub async fn step(&mut self, commands: &CommandService) {
        let n = self.attempted;
        self.attempted += 1;
        let Some(command) = random_command(&mut self.random, n, &self.students, &self.courses)
        else {
            return;
        };
        if let Ok(accepted) = commands.execute(&command, &context(), None).await {
            self.accepted += 1;
            self.expected.merge(&accepted.snapshot);
            if let DomainCommand::RegisterStudent { student_id, .. } = command {
                self.students.push(student_id);
            }
        }
    }

    /// Runs at `rate` commands/s until `stop` is set (bounded by the caller's flag).
    pub async fn run_until(
        mut self,
        commands: &CommandService,
        rate: u32,
        stop: &std::sync::atomic::AtomicBool,
    ) -> CommandLoad {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            ticks.tick().await;
            self.step(commands).await;
        }
        self
    }
}

/// Both read models, in the expectation's shape.
pub async fn read_models(students: &PgStudents, courses: &CourseStore) -> Expected {
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

pub async fn enrollment_rows(students: &PgStudents) -> usize {
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM student_courses")
        .fetch_one(students.pool())
        .await
        .expect("count");
    usize::try_from(rows).unwrap_or_default()
}

/// Counts of disagreement between the read models and the expectation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Expected items absent or different in the read model.
    pub lost: usize,
    /// Items present that should not be (a deleted one back, or one never accepted).
    pub unexpected: usize,
}

pub fn mismatch(model: &Expected, expected: &Expected) -> Mismatch {
    let lost = expected
        .students
        .iter()
        .filter(|(id, want)| model.students.get(id) != Some(want))
        .count()
        + expected
            .courses
            .iter()
            .filter(|(id, want)| model.courses.get(id) != Some(want))
            .count();
    let unexpected = model
        .students
        .keys()
        .filter(|id| !expected.students.contains_key(id))
        .count()
        + model
            .courses
            .keys()
            .filter(|id| !expected.courses.contains_key(id))
            .count();
    Mismatch { lost, unexpected }
}

/// A readable account of where the read models and the expectation disagree.
pub fn differences(model: &Expected, expected: &Expected) -> String {
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

/// Waits (up to `seconds`) until the read models equal `expected`; returns how long it
/// took, or the last model on timeout.
pub async fn wait_for_read_models(
    students: &PgStudents,
    courses: &CourseStore,
    expected: &Expected,
    seconds: u64,
) -> Result<Duration, Expected> {
    let started = Instant::now();
    loop {
        let model = read_models(students, courses).await;
        if model == *expected {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(seconds) {
            return Err(model);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
