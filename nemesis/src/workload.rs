//! The clients: random commands through any gateway, each retried with its
//! `Idempotency-Key` until it gets an answer that is not a server error, and reads of
//! their own writes (with the write's token) through any query-api, over REST or gRPC.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use events::AggregateKind;
use query_api::grpc::pb::school_query_client::SchoolQueryClient;
use query_api::grpc::pb::{GetCourseRequest, GetStudentRequest};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::history::{CommandKind, CommandRecord, Outcome, ReadRecord, Target};

/// Courses at the front of the pool: never deleted, half of all enrollments.
const HOT_COURSES: usize = 2;
/// How long one request may take before the client counts it as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a keyed command is retried before the run fails: long enough to outlast every
/// fault the nemesis injects (each heals within seconds).
const RETRY_FOR: Duration = Duration::from_secs(90);

/// Where the clients send requests.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub gateways: Vec<String>,
    pub query_rest: Vec<String>,
    pub query_grpc: Vec<String>,
    pub write_key: String,
    pub read_key: String,
}

/// What every client appends to.
#[derive(Default)]
pub struct History {
    pub commands: Mutex<Vec<CommandRecord>>,
    pub reads: Mutex<Vec<ReadRecord>>,
    /// Ids created so far, for later commands to address.
    students: Mutex<Vec<Uuid>>,
    courses: Mutex<Vec<Uuid>>,
}

/// A small deterministic generator (a seed per client makes a run repeatable in shape).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

/// One client: a loop of commands until `until`.
pub struct Client<'a> {
    pub endpoints: &'a Endpoints,
    pub history: &'a History,
    pub http: reqwest::Client,
    pub grpc: Vec<SchoolQueryClient<Channel>>,
    pub rng: Lcg,
}

impl Client<'_> {
    /// Sends commands one after another while `go_on` says so.
    pub async fn run_while(mut self, go_on: impl Fn() -> bool) {
        while go_on() {
            self.one_command().await;
        }
    }

    /// Any id after the first `skip`.
    fn pick_after(&mut self, ids: &Mutex<Vec<Uuid>>, skip: usize) -> Option<Uuid> {
        let ids = ids.lock().ok()?;
        let candidates = ids.len().checked_sub(skip).filter(|n| *n > 0)?;
        ids.get(skip + self.rng.below(candidates as u64) as usize)
            .copied()
    }

    fn pick(&mut self, ids: &Mutex<Vec<Uuid>>, hot: usize) -> Option<Uuid> {
        let ids = ids.lock().ok()?;
        if ids.is_empty() {
            return None;
        }
        // Half of the picks go to the first `hot` ids, so limits and races are reached.
        let range = if self.rng.below(2) == 0 {
            ids.len().min(hot)
        } else {
            ids.len()
        };
        ids.get(self.rng.below(range as u64) as usize).copied()
    }

    async fn one_command(&mut self) {
        let roll = self.rng.below(100);
        let student = self.pick(&self.history.students, 20);
        // The first two courses are never deleted and get half of the enrollments, so the
        // limit of 60 students is reached and defended.
        let course = self.pick(&self.history.courses, HOT_COURSES);
        let deletable_course = self.pick_after(&self.history.courses, HOT_COURSES);
        let n = self.rng.below(1000);
        // Without a deletable course, a course deletion becomes a creation.
        let roll = if roll >= 98 && deletable_course.is_none() {
            20
        } else {
            roll
        };
        let (kind, method, path, body, target) = match (roll, student, course) {
            (0..20, _, _) | (_, None, _) => {
                let courses: Vec<Uuid> = course.into_iter().collect();
                (
                    CommandKind::CreateStudent,
                    Method::POST,
                    "/api/students".to_owned(),
                    Some(
                        json!({"name": format!("Kid {n}"), "first_name": "Kid", "last_name": "Last", "course_ids": courses}),
                    ),
                    None,
                )
            }
            (20..28, _, _) | (_, _, None) => (
                CommandKind::CreateCourse,
                Method::POST,
                "/api/courses".to_owned(),
                Some(
                    json!({"name": format!("Course {n}"), "description": "Numbers and proofs", "discipline": "Maths", "teacher": "Noether"}),
                ),
                None,
            ),
            (28..43, Some(s), Some(c)) => (
                CommandKind::ReplaceStudent,
                Method::PUT,
                format!("/api/students/{s}"),
                Some(
                    json!({"name": format!("Renamed {n}"), "first_name": "Kid", "last_name": "Last", "course_ids": [c]}),
                ),
                Some(student_target(s)),
            ),
            (43..80, Some(s), Some(c)) => (
                CommandKind::Enroll,
                Method::PUT,
                format!("/api/students/{s}/courses/{c}"),
                None,
                Some(student_target(s)),
            ),
            (80..95, Some(s), Some(c)) => (
                CommandKind::Unenroll,
                Method::DELETE,
                format!("/api/students/{s}/courses/{c}"),
                None,
                Some(student_target(s)),
            ),
            (95..98, Some(s), _) => (
                CommandKind::DeleteStudent,
                Method::DELETE,
                format!("/api/students/{s}"),
                None,
                Some(student_target(s)),
            ),
            (_, _, Some(hot)) => {
                let c = deletable_course.unwrap_or(hot);
                (
                    CommandKind::DeleteCourse,
                    Method::DELETE,
                    format!("/api/courses/{c}"),
                    None,
                    Some(Target {
                        kind: AggregateKind::Course,
                        id: c,
                    }),
                )
            }
        };
        // Four in five commands carry a key and are retried until answered.
        let keyed = self.rng.below(5) != 0;
        let record = self.send(kind, method, &path, body, target, keyed).await;
        if let Outcome::Accepted { version, token } = record.outcome {
            if kind.is_create() {
                let ids = match record.target.kind {
                    AggregateKind::Student => &self.history.students,
                    AggregateKind::Course => &self.history.courses,
                };
                if let Ok(mut ids) = ids.lock() {
                    ids.push(record.target.id);
                }
            }
            let gone = matches!(kind, CommandKind::DeleteStudent | CommandKind::DeleteCourse);
            if gone {
                let ids = match record.target.kind {
                    AggregateKind::Student => &self.history.students,
                    AggregateKind::Course => &self.history.courses,
                };
                if let Ok(mut ids) = ids.lock() {
                    ids.retain(|id| *id != record.target.id);
                }
            }
            self.read_own_write(record.target, token, (!gone).then_some(version))
                .await;
        }
        if let Ok(mut commands) = self.history.commands.lock() {
            commands.push(record);
        }
    }

    async fn send(
        &mut self,
        kind: CommandKind,
        method: Method,
        path: &str,
        body: Option<Value>,
        target: Option<Target>,
        keyed: bool,
    ) -> CommandRecord {
        let correlation_id = Uuid::now_v7();
        let key = Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut attempts = Vec::new();
        let mut target = target;
        let mut pause = Duration::from_millis(100);
        let outcome = loop {
            let gateway = &self.endpoints.gateways
                [self.rng.below(self.endpoints.gateways.len() as u64) as usize];
            let mut request = self
                .http
                .request(method.clone(), format!("{gateway}{path}"))
                .timeout(REQUEST_TIMEOUT)
                .header("x-api-key", &self.endpoints.write_key)
                .header("x-correlation-id", correlation_id.to_string());
            if keyed {
                request = request.header("idempotency-key", &key);
            }
            if let Some(body) = &body {
                request = request.json(body);
            }
            let (status, answer) = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let header = |name: &str| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(|v| v.trim_matches('"').to_owned())
                    };
                    let version = header("etag").and_then(|v| v.parse::<u64>().ok());
                    let token = header("x-consistency-token").and_then(|v| v.parse::<u64>().ok());
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    (status, Some((version, token, body)))
                }
                // No answer (refused, reset, timed out): the command may or may not be stored.
                Err(_) => (StatusCode::BAD_GATEWAY, None),
            };
            attempts.push(if answer.is_some() { status.as_u16() } else { 0 });
            let retry = answer.is_none()
                || status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || (status == StatusCode::CONFLICT
                    && answer.as_ref().is_some_and(|(_, _, body)| {
                        body["type"]
                            .as_str()
                            .is_some_and(|t| t.ends_with("idempotency-key-in-use"))
                    }));
            if !retry {
                let (version, token, body) = answer.unwrap_or_default();
                if status.is_success() {
                    if target.is_none() {
                        let id = body["data"]["id"]
                            .as_str()
                            .and_then(|id| Uuid::parse_str(id).ok());
                        target = id.map(|id| Target {
                            kind: created_kind(kind),
                            id,
                        });
                    }
                    match (version, token) {
                        (Some(version), Some(token)) => break Outcome::Accepted { version, token },
                        _ => {
                            break Outcome::Unknown {
                                last_error: format!("{status} without ETag or token: {body}"),
                            };
                        }
                    }
                }
                break Outcome::Refused {
                    status: status.as_u16(),
                    problem: body["type"].as_str().unwrap_or_default().to_owned(),
                };
            }
            if !keyed || started.elapsed() > RETRY_FOR {
                break Outcome::Unknown {
                    last_error: format!("{status} after {} attempts", attempts.len()),
                };
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        };
        CommandRecord {
            correlation_id,
            kind,
            target: target.unwrap_or(Target {
                kind: created_kind(kind),
                id: Uuid::nil(),
            }),
            keyed,
            attempts,
            outcome,
        }
    }

    /// Reads `target` at `token` through a random query-api and protocol. A read that is
    /// answered 503 (the read side out of reach during a fault) is retried; what it finally
    /// returns is recorded.
    async fn read_own_write(&mut self, target: Target, token: u64, must_see: Option<u64>) {
        let use_grpc = self.rng.below(2) == 0 && !self.grpc.is_empty();
        let deadline = Instant::now() + RETRY_FOR;
        let saw = loop {
            let result = if use_grpc {
                let index = self.rng.below(self.grpc.len() as u64) as usize;
                grpc_version(
                    &mut self.grpc[index],
                    &self.endpoints.read_key,
                    target,
                    token,
                )
                .await
            } else {
                let index = self.rng.below(self.endpoints.query_rest.len() as u64) as usize;
                rest_version(
                    &self.http,
                    &self.endpoints.query_rest[index],
                    &self.endpoints.read_key,
                    target,
                    token,
                )
                .await
            };
            match result {
                Err(Retry) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Retry) => break Err("never answered".to_owned()),
                Ok(seen) => break seen,
            }
        };
        if let Ok(mut reads) = self.history.reads.lock() {
            reads.push(ReadRecord {
                target,
                protocol: if use_grpc { "grpc" } else { "rest" },
                token,
                must_see,
                saw,
            });
        }
    }
}

/// A read answered "unavailable, retry".
struct Retry;

/// `Ok(Ok(Some(version)))` found, `Ok(Ok(None))` not found, `Ok(Err)` an unexpected answer.
async fn rest_version(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    target: Target,
    token: u64,
) -> Result<Result<Option<u64>, String>, Retry> {
    let collection = match target.kind {
        AggregateKind::Student => "students",
        AggregateKind::Course => "courses",
    };
    let response = http
        .get(format!("{base}/api/{collection}/{}", target.id))
        .timeout(REQUEST_TIMEOUT)
        .header("x-api-key", key)
        .header("x-consistency-token", token.to_string())
        .send()
        .await
        .map_err(|_| Retry)?;
    match response.status() {
        StatusCode::NOT_FOUND => Ok(Ok(None)),
        status if status.is_server_error() => Err(Retry),
        StatusCode::OK => Ok(response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_matches('"').parse().ok())
            .map(Some)
            .ok_or_else(|| "200 without ETag".to_owned())),
        status => Ok(Err(format!("answered {status}"))),
    }
}

async fn grpc_version(
    client: &mut SchoolQueryClient<Channel>,
    key: &str,
    target: Target,
    token: u64,
) -> Result<Result<Option<u64>, String>, Retry> {
    fn with_metadata<T>(message: T, key: &str, token: u64) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let (Ok(key), Ok(token)) = (key.parse(), token.to_string().parse()) {
            request.metadata_mut().insert("x-api-key", key);
            request.metadata_mut().insert("x-consistency-token", token);
        }
        request
    }
    let id = target.id.to_string();
    let answer = match target.kind {
        AggregateKind::Student => client
            .get_student(with_metadata(GetStudentRequest { id }, key, token))
            .await
            .map(|r| r.into_inner().version),
        AggregateKind::Course => client
            .get_course(with_metadata(GetCourseRequest { id }, key, token))
            .await
            .map(|r| r.into_inner().version),
    };
    match answer {
        Ok(version) => Ok(Ok(Some(version))),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(Ok(None)),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ) =>
        {
            Err(Retry)
        }
        Err(status) => Ok(Err(format!(
            "answered {:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

fn student_target(id: Uuid) -> Target {
    Target {
        kind: AggregateKind::Student,
        id,
    }
}

fn created_kind(kind: CommandKind) -> AggregateKind {
    match kind {
        CommandKind::CreateCourse | CommandKind::DeleteCourse => AggregateKind::Course,
        _ => AggregateKind::Student,
    }
}
