//! Erasure end to end, with the real binaries: a student with unmistakable names goes
//! through every path that could keep a copy of them (a keyed create and rename, cached
//! reads over REST and gRPC, a replay that keeps the old generation, a dead letter and its
//! redrive, `events get`), is erased, both projections are replayed, and then the NATS
//! store directory, a `pg_dump`, a snapshot of Redis, the MongoDB stand-in's files, every
//! service's log (at debug level) and every tool's output are searched for the names: zero
//! hits. Before the erasure the same search finds them, so the search can fail.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nemesis::services::{self, Service, Shared};
use query_api::grpc::pb::GetStudentRequest;
use query_api::grpc::pb::school_query_client::SchoolQueryClient;
use reqwest::StatusCode;
use serde_json::{Value, json};
use test_support::{ERASE_KEY, NatsServer, READ_KEY, RedisServer, TestDatabase, WRITE_KEY};

/// The names one student is given, each unmistakable (the run's tag in every one).
struct Names {
    name: String,
    first_name: String,
    last_name: String,
}

impl Names {
    /// `first` and `last` of 4 to 9 letters: every field stays within 20 characters.
    fn new(first: &str, last: &str, tag: &str) -> Names {
        Names {
            name: format!("{}{}{tag}", &first[..4], &last[..4]),
            first_name: format!("{first}{tag}"),
            last_name: format!("{last}{tag}"),
        }
    }

    fn body(&self, courses: &[&str]) -> Value {
        json!({"name": self.name, "first_name": self.first_name, "last_name": self.last_name, "course_ids": courses})
    }

    fn all(&self) -> [&str; 3] {
        [&self.name, &self.first_name, &self.last_name]
    }
}

struct System {
    nats: NatsServer,
    database: TestDatabase,
    redis: RedisServer,
    shared: Shared,
    gateway: Service,
    query: Service,
    projectors: Service,
    http: reqwest::Client,
    /// Everything the tools printed.
    tool_output: String,
    scratch: PathBuf,
}

impl System {
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value, String) {
        let response = request.send().await.expect("a request to a service");
        let status = response.status();
        let token = response
            .headers()
            .get("x-consistency-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.expect("a body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            token,
        )
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        key: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> (StatusCode, Value, String) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.gateway.url()))
            .header("x-api-key", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(idempotency_key) = idempotency_key {
            request = request.header("idempotency-key", idempotency_key);
        }
        self.send(request).await
    }

    async fn read(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (status, body, _) = self
            .send(
                self.http
                    .get(format!("{}{path}", self.query.url()))
                    .header("x-api-key", READ_KEY)
                    .header("x-consistency-token", token),
            )
            .await;
        (status, body)
    }

    async fn grpc_student(&self, id: &str, token: &str) -> Result<String, tonic::Code> {
        let port = self.query.grpc_port.expect("query-api's gRPC port");
        let mut client = SchoolQueryClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .expect("gRPC connection");
        let mut request = tonic::Request::new(GetStudentRequest { id: id.to_owned() });
        request
            .metadata_mut()
            .insert("x-api-key", READ_KEY.parse().expect("ascii"));
        request
            .metadata_mut()
            .insert("x-consistency-token", token.parse().expect("ascii"));
        client
            .get_student(request)
            .await
            .map(|r| format!("{:?}", r.into_inner()))
            .map_err(|status| status.code())
    }

    /// Runs `stream-admin` with the system's configuration; its output is kept for the search.
    fn admin(&mut self, args: &[&str]) -> String {
        let output = std::process::Command::new(services::binary("stream-admin").expect("built"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NATS_URL", self.nats.url())
            .env("STREAM_PREFIX", &self.shared.prefix)
            .env("DATABASE_URL", &self.shared.database_url)
            .env(
                "COURSES_STORE_URL",
                self.shared
                    .courses_store_url
                    .as_deref()
                    .unwrap_or(&self.shared.database_url),
            )
            .env("KEK_FILE", test_support::test_kek_file())
            .env("RUST_LOG", services::VERBOSE_LOG)
            .args(args)
            .output()
            .expect("running stream-admin");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "stream-admin {args:?} failed: {text}"
        );
        self.tool_output.push_str(&text);
        text
    }

    /// Every place a copy could be, each as (what, bytes).
    fn copies(&self, stage: &str) -> Vec<(String, Vec<u8>)> {
        let mut places = Vec::new();
        files_under(&self.nats.store_dir, &mut places);
        if let Some(dir) = self.shared.log_dir.as_deref() {
            files_under(dir, &mut places);
        }
        match std::env::var_os("MONGODB_STANDIN_DATA") {
            Some(dir) => files_under(Path::new(&dir), &mut places),
            None if std::env::var_os("MONGODB_STANDIN").is_some() && under_ci() => {
                panic!("MONGODB_STANDIN_DATA is not set under CI: `scripts/dev test` sets it")
            }
            None => eprintln!(
                "NOTE: the MongoDB server's files are not searched: MONGODB_STANDIN_DATA is unset \
                 (a real server's files are not this test's to read)"
            ),
        }
        places.push(("pg_dump".into(), self.pg_dump()));
        places.push((
            format!("Redis snapshot ({stage})"),
            self.redis_snapshot(stage),
        ));
        places.push(("tool output".into(), self.tool_output.clone().into_bytes()));
        places
    }

    fn pg_dump(&self) -> Vec<u8> {
        let bin = std::env::var("PG_BIN_DIR").map_or_else(
            |_| PathBuf::from("pg_dump"),
            |dir| PathBuf::from(dir).join("pg_dump"),
        );
        let output = std::process::Command::new(&bin)
            .arg("--dbname")
            .arg(&self.database.url)
            .output()
            .unwrap_or_else(|e| panic!("{} does not run: {e}", bin.display()));
        assert!(
            output.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    /// Redis as an uncompressed RDB snapshot (`redis-cli --rdb`), every key and value in it.
    fn redis_snapshot(&self, stage: &str) -> Vec<u8> {
        let file = self.scratch.join(format!("redis-{stage}.rdb"));
        let port = self.redis.port.to_string();
        let rdb = file.to_str().expect("a utf-8 path");
        for args in [
            vec!["CONFIG", "SET", "rdbcompression", "no"],
            vec!["--rdb", rdb],
        ] {
            let output = std::process::Command::new("redis-cli")
                .args(["-p", &port])
                .args(&args)
                .output()
                .expect("redis-cli (installed with redis-server)");
            assert!(
                output.status.success() && !output.stdout.starts_with(b"ERR"),
                "redis-cli {args:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::fs::read(&file).expect("the Redis snapshot")
    }
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

/// Where any of `needles` occurs in `places`.
fn hits(places: &[(String, Vec<u8>)], needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (place, bytes) in places {
        for needle in needles {
            if bytes
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
            {
                found.push(format!("{needle:?} in {place}"));
            }
        }
    }
    found
}

async fn start() -> Option<System> {
    let mongo_url = test_support::mongo::mongo_url("erasure_no_copy")?;
    let nats = NatsServer::start().await;
    let broker = nats.broker().await;
    let database = TestDatabase::create().await;
    let redis = RedisServer::start(test_support::free_port());
    redis.ready().await;
    let scratch =
        std::env::temp_dir().join(format!("erasure-no-copy-{}", test_support::unique_suffix()));
    let log_dir = scratch.join("logs");
    std::fs::create_dir_all(&log_dir).expect("the log directory");
    let shared = Shared {
        prefix: broker.names.prefix().to_owned(),
        api_keys: format!("write:{WRITE_KEY},read:{READ_KEY},erase:{ERASE_KEY}"),
        database_url: database.url.clone(),
        redis_url: redis.url(),
        courses_store_url: Some(mongo_url),
        log_dir: Some(log_dir),
    };
    let start = |result: Result<Service, String>| result.expect("starting a service");
    let nats_url = nats.url();
    let mut projectors = start(services::projectors("projectors", &nats_url, &shared));
    let mut gateway = start(services::gateway("gateway", &nats_url, &shared));
    let mut query = start(services::query_api("query-api", &nats_url, &shared));
    let http = reqwest::Client::new();
    for service in [&mut projectors, &mut gateway, &mut query] {
        service.wait_ready(&http).await;
    }
    Some(System {
        nats,
        database,
        redis,
        shared,
        gateway,
        query,
        projectors,
        http,
        tool_output: String::new(),
        scratch,
    })
}

#[tokio::test]
async fn after_an_erasure_no_copy_of_the_names_is_left_anywhere() {
    let Some(mut system) = start().await else {
        return;
    };
    let tag = &test_support::unique_suffix()[..8];
    let first = Names::new("Quillon", "Vexmarrow", tag);
    let renamed = Names::new("Ottoline", "Zarkhaven", tag);
    let poisoned = Names::new("Brisendra", "Mollycrak", tag);
    use reqwest::Method;

    let (status, course, _) = system
        .command(
            Method::POST,
            "/api/courses",
            WRITE_KEY,
            Some(json!({"name": "Alchemy", "description": "Of metals", "discipline": "Science", "teacher": "Teacher"})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{course}");
    let course = course["data"]["id"].as_str().expect("course id").to_owned();

    // A keyed create and a keyed rename: their outcomes are stored for 24 h.
    let (status, created, token) = system
        .command(
            Method::POST,
            "/api/students",
            WRITE_KEY,
            Some(first.body(&[&course])),
            Some("create-key"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let student = created["data"]["id"].as_str().expect("id").to_owned();

    // Cached reads of every kind.
    let (status, read) = system
        .read(&format!("/api/students/{student}"), &token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["data"]["name"], first.name.as_str());
    system.read("/api/students?limit=100", &token).await;
    system
        .read(&format!("/api/courses/{course}/students"), &token)
        .await;
    let grpc = system.grpc_student(&student, &token).await;
    assert!(
        grpc.as_ref().is_ok_and(|s| s.contains(&first.first_name)),
        "{grpc:?}"
    );

    // A replay that keeps the old generation, holding the first names. (Courses hold no
    // names, and are replayed once, below: a second replay of a collection fails on the
    // MongoDB stand-in, "index idx_… already exists" creating the next generation's index,
    // which MongoDB, whose index names are per collection, does not do.)
    system.admin(&["replay", "students", "--keep-old"]);

    let (status, updated, token) = system
        .command(
            Method::PUT,
            &format!("/api/students/{student}"),
            WRITE_KEY,
            Some(renamed.body(&[&course])),
            Some("rename-key"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    let (status, read) = system
        .read(&format!("/api/students/{student}"), &token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["data"]["last_name"], renamed.last_name.as_str());
    assert!(system.grpc_student(&student, &token).await.is_ok());

    // A dead letter: the read model refuses this student's names (think of a bad
    // migration); the letter and its reason stay in the dead-letter stream.
    // The name is the test's own (letters and hex digits).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE students ADD CONSTRAINT refuses_one CHECK (last_name <> '{}')",
        poisoned.last_name
    )))
    .execute(&system.database.pool)
    .await
    .expect("the constraint");
    let (status, refused, _) = system
        .command(
            Method::POST,
            "/api/students",
            WRITE_KEY,
            Some(poisoned.body(&[])),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{refused}");
    let refused = refused["data"]["id"].as_str().expect("id").to_owned();
    let mut letters = String::new();
    for _ in 0..100 {
        letters = system.admin(&["dlq", "list", "--json"]);
        if letters.contains(&refused) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(letters.contains(&refused), "no dead letter: {letters}");

    let every_name: Vec<&str> = first
        .all()
        .into_iter()
        .chain(renamed.all())
        .chain(poisoned.all())
        .collect();
    let before = hits(&system.copies("before"), &every_name);
    eprintln!("before the erasure: {before:#?}");
    for place in ["pg_dump", "Redis snapshot"] {
        assert!(
            before.iter().any(|hit| hit.contains(place)),
            "no name in the {place} before the erasure: {before:?}"
        );
    }
    for needle in first.all().into_iter().chain(renamed.all()) {
        assert!(
            before
                .iter()
                .any(|hit| hit.starts_with(&format!("{needle:?}"))),
            "the search does not find {needle:?} before the erasure, so it proves nothing: {before:?}"
        );
    }

    // The erasure.
    let mut token = String::new();
    for id in [&student, &refused] {
        let (status, body, erased) = system
            .command(
                Method::POST,
                &format!("/api/students/{id}/erasure"),
                ERASE_KEY,
                None,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        token = erased;
    }
    let (status, _) = system
        .read(&format!("/api/students/{student}"), &token)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        system.grpc_student(&student, &token).await,
        Err(tonic::Code::NotFound)
    );
    let (status, listed) = system
        .read(&format!("/api/courses/{course}/students"), &token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!listed.to_string().contains(&student), "{listed}");
    let (status, replayed, _) = system
        .command(
            Method::PUT,
            &format!("/api/students/{student}"),
            WRITE_KEY,
            Some(renamed.body(&[&course])),
            Some("rename-key"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert!(replayed["data"]["name"].is_null(), "{replayed}");

    // Every tool reads the erased events as erased.
    sqlx::query("ALTER TABLE students DROP CONSTRAINT refuses_one")
        .execute(&system.database.pool)
        .await
        .expect("the constraint dropped");
    system.admin(&["dlq", "redrive", "--all"]);
    let dumped = system.admin(&["events", "tail", "--from-start", "--count", "6"]);
    assert!(dumped.contains(&student), "{dumped}");
    system.admin(&["replay", "students", "--keep-old"]);
    system.admin(&["replay", "courses", "--keep-old"]);

    // Let the services write what they will, then stop them so their logs are complete.
    for service in [
        &mut system.gateway,
        &mut system.query,
        &mut system.projectors,
    ] {
        service.stop().await;
    }
    let after = hits(&system.copies("after"), &every_name);
    assert!(
        after.is_empty(),
        "copies left after the erasure: {after:#?}"
    );
    let _ = std::fs::remove_dir_all(&system.scratch);
}
