//! Each figure of SPEC §10 and the raw ceiling it is compared with, measured the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use events::{AggregateKind, Enrollment, Event, EventPayload, StudentDetails};
use hyper::body::Bytes;
use projectors::{ProjectionProgress, ProjectionRunner};
use read_models::PgStudents;
use sqlx::AssertSqlSafe;
use stream_admin::replay::{ReplayOptions, replay};
use test_support::TestBroker;
use uuid::Uuid;

use crate::load::{self, HttpRequest, LoadResult, histogram};
use crate::world::{self, Process, World};

/// One measured run of a figure.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Operations (requests, events) per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU seconds of the measured side (0 when it runs inside the bench process).
    pub system_cpu: f64,
    /// CPU seconds of the bench process (load generator).
    pub load_cpu: f64,
    /// Figure-specific extra, e.g. reads served during a replay.
    pub note: String,
}

impl Run {
    fn from_load(result: &LoadResult, system_cpu: f64, load_cpu: f64) -> Run {
        Run {
            rate: result.per_second(),
            p50_ms: result.p50_ms(),
            p99_ms: result.p99_ms(),
            errors: result.errors,
            system_cpu,
            load_cpu,
            note: String::new(),
        }
    }
}

/// Measures `load` while reading the CPU time of `system` and of this process.
pub async fn measured(
    system: Option<&Process>,
    load: impl AsyncFnOnce() -> anyhow::Result<LoadResult>,
) -> anyhow::Result<Run> {
    let system_before = system.map_or(0.0, Process::cpu_seconds);
    let own_before = world::own_cpu_seconds();
    let result = load().await?;
    Ok(Run::from_load(
        &result,
        system.map_or(0.0, Process::cpu_seconds) - system_before,
        world::own_cpu_seconds() - own_before,
    ))
}

pub fn student_event(id: Uuid, payload: EventPayload) -> Event {
    test_support::event(AggregateKind::Student, id, payload)
}

fn details(i: usize) -> StudentDetails {
    StudentDetails {
        name: format!("Student {i}"),
        first_name: "Bench".into(),
        last_name: "Student".into(),
    }
}

// ---------------------------------------------------------------- commands

const CREATE_BODY: &str = r#"{"name":"Bench B","first_name":"Bench","last_name":"Student"}"#;

/// `POST /api/students` on the gateway.
pub async fn create_commands(
    gateway: &Process,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Run> {
    measured(Some(gateway), async || {
        load::http_load(
            gateway.http,
            hyper::StatusCode::CREATED,
            concurrency,
            warmup,
            duration,
            || HttpRequest {
                method: hyper::Method::POST,
                path: "/api/students".into(),
                api_key: world::WRITE_KEY,
                body: Some(Bytes::from_static(CREATE_BODY.as_bytes())),
            },
        )
        .await
    })
    .await
}

/// The ceiling of `create_commands`: JetStream publish-with-ack of the event the command
/// stores (same size, with `Nats-Msg-Id`), from as many concurrent tasks.
pub async fn publish_with_ack(
    broker: &TestBroker,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Run> {
    let jetstream = broker.jetstream.clone();
    let names = broker.names.clone();
    measured(None, async || {
        load::drive(concurrency, warmup, duration, move |i, start, end| {
            let jetstream = jetstream.clone();
            let names = names.clone();
            async move {
                let mut latencies = histogram();
                let (mut ok, mut errors) = (0, 0);
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let id = Uuid::now_v7();
                    let event = student_event(id, EventPayload::StudentRegistered(details(i)));
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", event.metadata.event_id.to_string().as_str());
                    let ack = async {
                        jetstream
                            .publish_with_headers(
                                names.aggregate_subject(AggregateKind::Student, id),
                                headers,
                                events::encode(&event).into(),
                            )
                            .await?
                            .await
                    }
                    .await;
                    if sent >= start {
                        if ack.is_ok() {
                            ok += 1;
                            latencies.saturating_record(sent.elapsed().as_micros() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                Ok((ok, errors, latencies))
            }
        })
        .await
    })
    .await
}

// ---------------------------------------------------------------- projection

/// Publishes with up to 1 000 acks outstanding; returns the last stream position.
pub async fn publish_all(broker: &TestBroker, events: &[Event]) -> anyhow::Result<u64> {
    let mut last = 0;
    for chunk in events.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for event in chunk {
            let subject = broker
                .names
                .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
            acks.push(
                broker
                    .jetstream
                    .publish(subject, events::encode(event).into())
                    .await?,
            );
        }
        for ack in acks {
            last = last.max(ack.await?.sequence);
        }
    }
    Ok(last)
}

/// Runs the live students projection in this process until `shutdown`.
/// Events per transaction of the projector here (its default, `BATCH_SIZE`), and so rows per
/// transaction of its UNNEST ceiling.
pub const PROJECTOR_BATCH: usize = 1000;

fn spawn_projection(world: &World, store: PgStudents) -> tokio::sync::watch::Sender<bool> {
    spawn_projection_with(
        world,
        store,
        service_kit::event_reader::EventReader::without_keys(),
    )
}

fn spawn_projection_with(
    world: &World,
    store: PgStudents,
    reader: service_kit::event_reader::EventReader,
) -> tokio::sync::watch::Sender<bool> {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let runner = ProjectionRunner {
        reader,
        jetstream: world.broker.jetstream.clone(),
        names: world.broker.names.clone(),
        store,
        batch_size: PROJECTOR_BATCH,
        cache: None,
        progress: Arc::new(ProjectionProgress::default()),
        lease: projectors::lease::LeaseSettings::default(),
    };
    tokio::spawn(runner.run(async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    }));
    stop
}

async fn wait_applied(store: &PgStudents, position: u64) -> anyhow::Result<()> {
    loop {
        if store.checkpoint().await? >= position {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What [`projection`] measures.
pub struct ProjectionRuns {
    /// The live projector applying the backlog.
    pub system: Run,
    /// The same rows upserted with raw UNNEST statements, Postgres alone on the machine.
    pub ceiling: Run,
    /// The same again while the broker delivers the stream at the projector's rate to a
    /// bare consumer: the ceiling with the broker's share of the projector's work.
    pub ceiling_with_broker: Run,
}

/// The live students projection applying a backlog of `events` registrations, and its
/// ceiling: the same rows upserted with one `INSERT … SELECT FROM UNNEST … ON CONFLICT`
/// per transaction of [`PROJECTOR_BATCH`], alone and with the broker busy.
pub async fn projection(events: usize) -> anyhow::Result<ProjectionRuns> {
    let world = World::new().await;
    // The projector's own pool (as the binary makes it); the ceilings write through it too.
    let store = PgStudents::connect(&world.db.url).await?;
    let backlog: Vec<Event> = (0..events)
        .map(|i| student_event(Uuid::now_v7(), EventPayload::StudentRegistered(details(i))))
        .collect();
    let last = publish_all(&world.broker, &backlog).await?;

    let started = Instant::now();
    let cpu = world::own_cpu_seconds();
    let stop = spawn_projection(&world, store.clone());
    wait_applied(&store, last).await?;
    let system = Run {
        rate: events as f64 / started.elapsed().as_secs_f64(),
        system_cpu: world::own_cpu_seconds() - cpu,
        ..Run::default()
    };
    let _ = stop.send(true);

    let ceiling = unnest_upserts(store.pool(), &backlog, "students_ceiling").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let drain = tokio::spawn(drain_stream(
        world.broker.jetstream.clone(),
        world.broker.names.event_stream().to_string(),
        system.rate,
        delivered.clone(),
    ));
    let started = Instant::now();
    let mut ceiling_with_broker =
        unnest_upserts(store.pool(), &backlog, "students_ceiling_busy").await;
    let (seconds, delivered) = (
        started.elapsed().as_secs_f64(),
        delivered.load(Ordering::Relaxed),
    );
    drain.abort();
    if let Ok(Err(error)) = drain.await {
        return Err(error.context("draining the stream beside the ceiling"));
    }
    if let Ok(run) = &mut ceiling_with_broker {
        run.note = format!(
            "{delivered} events delivered in {seconds:.1} s ({:.0}/s; the projector's rate: {:.0}/s)",
            delivered as f64 / seconds,
            system.rate
        );
    }
    world.cleanup().await;
    Ok(ProjectionRuns {
        system,
        ceiling,
        ceiling_with_broker: ceiling_with_broker?,
    })
}

/// The live projector on a backlog of registrations whose names are sealed as the gateway
/// seals them (schema version 2, a data key per student from the key-block bucket): the
/// cost of opening them, against [`projection`]'s plain backlog.
pub async fn sealed_projection(events: usize) -> anyhow::Result<Run> {
    let world = World::new().await;
    let store = PgStudents::connect(&world.db.url).await?;
    let keys = test_support::SealingKeys::bind(&world.broker.jetstream, &world.broker.names).await;
    let mut last = 0;
    for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let event = student_event(Uuid::now_v7(), EventPayload::StudentRegistered(details(i)));
            let subject = world
                .broker
                .names
                .aggregate_subject(event.metadata.aggregate_kind, event.metadata.aggregate_id);
            let payload = keys.encode(&event).await;
            acks.push(
                world
                    .broker
                    .jetstream
                    .publish(subject, payload.into())
                    .await?,
            );
        }
        for ack in acks {
            last = last.max(ack.await?.sequence);
        }
    }
    let reader = test_support::test_reader(&world.broker.jetstream, &world.broker.names);
    let started = Instant::now();
    let cpu = world::own_cpu_seconds();
    let stop = spawn_projection_with(&world, store.clone(), reader);
    wait_applied(&store, last).await?;
    let run = Run {
        rate: events as f64 / started.elapsed().as_secs_f64(),
        system_cpu: world::own_cpu_seconds() - cpu,
        ..Run::default()
    };
    let _ = stop.send(true);
    world.cleanup().await;
    Ok(run)
}

/// The projector's ceiling: `backlog`'s rows upserted into a copy of `students`, one
/// `INSERT … SELECT FROM UNNEST … ON CONFLICT` per transaction of [`PROJECTOR_BATCH`].
async fn unnest_upserts(
    pool: &sqlx::PgPool,
    backlog: &[Event],
    table: &str,
) -> anyhow::Result<Run> {
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (LIKE students INCLUDING ALL)"
    )))
    .execute(pool)
    .await?;
    let upsert = format!(
        "INSERT INTO {table} (id, name, first_name, last_name, version, created_at, updated_at)
         SELECT i, n, f, l, v, a, a FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                               $5::bigint[], $6::timestamptz[]) AS r(i, n, f, l, v, a)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, version = EXCLUDED.version"
    );
    let started = Instant::now();
    let cpu = world::own_cpu_seconds();
    for chunk in backlog.chunks(PROJECTOR_BATCH) {
        let mut tx = pool.begin().await?;
        let (mut ids, mut names, mut firsts, mut lasts, mut versions, mut ats) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for (i, event) in chunk.iter().enumerate() {
            if let EventPayload::StudentRegistered(d) = &event.payload {
                ids.push(event.metadata.aggregate_id);
                names.push(d.name.clone());
                firsts.push(d.first_name.clone());
                lasts.push(d.last_name.clone());
                versions.push(i as i64);
                ats.push(event.metadata.occurred_at);
            }
        }
        sqlx::query(AssertSqlSafe(upsert.as_str()))
            .bind(&ids)
            .bind(&names)
            .bind(&firsts)
            .bind(&lasts)
            .bind(&versions)
            .bind(&ats)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(Run {
        rate: backlog.len() as f64 / started.elapsed().as_secs_f64(),
        system_cpu: world::own_cpu_seconds() - cpu,
        ..Run::default()
    })
}

/// Reads the event stream the way the projector does — a pull consumer acked once per
/// batch, every event decoded — at `rate` events/s, from the start again whenever it
/// reaches the end, until aborted: the broker's share of the projector's work, and
/// nothing of Postgres's. `delivered` counts the events read.
async fn drain_stream(
    jetstream: async_nats::jetstream::Context,
    stream_name: String,
    rate: f64,
    delivered: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures::StreamExt;
    let stream = jetstream.get_stream(stream_name).await?;
    let started = Instant::now();
    loop {
        let consumer = stream
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(2 * PROJECTOR_BATCH)
            .messages()
            .await?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            let pending = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending;
            events::decode(&message.payload)?;
            let read = delivered.fetch_add(1, Ordering::Relaxed) + 1;
            if read.is_multiple_of(PROJECTOR_BATCH as u64) || pending == 0 {
                message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let due = started + Duration::from_secs_f64(read as f64 / rate.max(1.0));
                tokio::time::sleep_until(due.into()).await;
            }
            if pending == 0 {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- replay

/// About `events` events of a school (registrations, enrollments, renames).
pub fn school(events: usize) -> Vec<Event> {
    let students = events * 100 / 208;
    let courses: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    let mut out = Vec::with_capacity(events);
    for i in 0..students {
        let id = Uuid::now_v7();
        out.push(student_event(
            id,
            EventPayload::StudentRegistered(details(i)),
        ));
        if i % 4 != 0 {
            out.push(student_event(
                id,
                EventPayload::StudentEnrolled(Enrollment {
                    student_id: id,
                    course_id: courses[i % courses.len()],
                }),
            ));
        }
        if i % 3 == 0 {
            out.push(student_event(
                id,
                EventPayload::StudentUpdated(details(i + 1)),
            ));
        }
    }
    out
}

/// A full replay of a stream of about `events` events into a fresh model while a reader
/// polls query-api's REST API on the same database. `rate` is events/s, `p50_ms` holds the
/// replay's duration in seconds (reported as such), errors are failed reads.
pub async fn full_replay(events: usize) -> anyhow::Result<Run> {
    let world = World::new().await;
    let store = PgStudents::connect(&world.db.url).await?;
    let school = school(events);
    let last = publish_all(&world.broker, &school).await?;
    let stop = spawn_projection(&world, store.clone());
    wait_applied(&store, last).await?;

    let reader_stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let url = serve_reads(&world).await?;
    let reader = {
        let (reader_stop, ok, failed) = (reader_stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !reader_stop.load(Ordering::Relaxed) {
                let answer = http
                    .get(format!("{url}/api/students?limit=20"))
                    .header("x-api-key", world::READ_KEY)
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let target = store.clone();
    let options = ReplayOptions {
        force: false,
        keep_old: false,
        restart: false,
        batch_size: 2000,
        progress: false,
    };
    let cpu = world::own_cpu_seconds();
    let report = replay(
        &world.broker.client,
        &world.broker.names,
        &service_kit::event_reader::EventReader::without_keys(),
        target,
        options,
    )
    .await
    .context("replay")?;
    let cpu = world::own_cpu_seconds() - cpu;
    reader_stop.store(true, Ordering::Relaxed);
    reader.await?;
    let _ = stop.send(true);
    world.cleanup().await;
    Ok(Run {
        rate: report.events_per_second(),
        p50_ms: report.elapsed.as_secs_f64(),
        errors: failed.load(Ordering::Relaxed),
        system_cpu: cpu,
        note: format!(
            "{} events, {} reads served during the replay, {} failed",
            report.applied,
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        ),
        ..Run::default()
    })
}

/// query-api's REST router on a world's database, in this process (no cache, no NATS).
async fn serve_reads(world: &World) -> anyhow::Result<String> {
    let models = query_api::models::ReadModels {
        students: read_models::StudentReader::new(world.db.pool.clone()),
        courses: read_models::CourseStore::connect(&world.db.url).await?,
    };
    let consistency = query_api::consistency::Consistency::new(
        models.clone(),
        None,
        world.broker.names.clone(),
        Duration::from_secs(2),
    );
    let queries = query_api::Queries::new(
        models,
        query_api::cache::Cache::new(None)?,
        world.broker.names.clone(),
        consistency,
    );
    let keys = format!("read:{}", world::READ_KEY).parse()?;
    let app = query_api::http::router(queries, keys);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(query_api::run(listener, app, std::future::pending()));
    Ok(url)
}

// ---------------------------------------------------------------- command → visible

/// Commands at a fixed `rate` for `duration`; for each, the time from its `201` until the
/// students projection has applied its position (a watcher reads the checkpoint every
/// millisecond, as query-api's read-your-writes check does).
pub async fn accepted_to_visible(
    world: &World,
    gateway: &Process,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Run> {
    let (applied_tx, applied_rx) = tokio::sync::watch::channel(0u64);
    let pool = world.db.pool.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let position: Option<i64> = sqlx::query_scalar(
                "SELECT last_sequence FROM projection_checkpoints WHERE projection = 'students'",
            )
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten();
            if let Some(position) = position {
                applied_tx.send_if_modified(|current| {
                    let position = u64::try_from(position).unwrap_or(0);
                    let newer = position > *current;
                    if newer {
                        *current = position;
                    }
                    newer
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    let http = reqwest::Client::new();
    let url = format!("{}/api/students", gateway.url());
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    let gateway_cpu = gateway.cpu_seconds();
    let own_cpu = world::own_cpu_seconds();
    while Instant::now() < end {
        ticker.tick().await;
        let (http, url, mut applied) = (http.clone(), url.clone(), applied_rx.clone());
        tasks.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .header("x-api-key", world::WRITE_KEY)
                .header("content-type", "application/json")
                .body(CREATE_BODY)
                .send()
                .await
                .ok()?;
            let accepted = Instant::now();
            let token: u64 = response
                .headers()
                .get("x-consistency-token")?
                .to_str()
                .ok()?
                .parse()
                .ok()?;
            let visible =
                tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|p| *p >= token))
                    .await;
            matches!(visible, Ok(Ok(_))).then(|| accepted.elapsed())
        }));
    }
    let sent = tasks.len();
    let mut latencies = histogram();
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Some(latency)) => latencies.saturating_record(latency.as_micros() as u64),
            _ => errors += 1,
        }
    }
    watcher.abort();
    Ok(Run {
        rate: sent as f64 / duration.as_secs_f64(),
        p50_ms: latencies.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
        system_cpu: gateway.cpu_seconds() - gateway_cpu,
        load_cpu: world::own_cpu_seconds() - own_cpu,
        note: String::new(),
    })
}

/// The ceiling of `accepted_to_visible`: one JetStream publish-with-ack followed by one
/// Postgres commit, in sequence, `samples` times.
pub async fn round_trip_ceiling(world: &World, samples: usize) -> anyhow::Result<Run> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_commits (id uuid PRIMARY KEY, at timestamptz NOT NULL)",
    )
    .execute(&world.db.pool)
    .await?;
    let mut latencies = histogram();
    let started = Instant::now();
    for i in 0..samples {
        let sent = Instant::now();
        let id = Uuid::now_v7();
        let event = student_event(id, EventPayload::StudentRegistered(details(i)));
        world
            .broker
            .jetstream
            .publish(
                world
                    .broker
                    .names
                    .aggregate_subject(AggregateKind::Student, id),
                events::encode(&event).into(),
            )
            .await?
            .await?;
        let mut tx = world.db.pool.begin().await?;
        sqlx::query("INSERT INTO bench_commits (id, at) VALUES ($1, now())")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        latencies.saturating_record(sent.elapsed().as_micros() as u64);
    }
    Ok(Run {
        rate: samples as f64 / started.elapsed().as_secs_f64(),
        p50_ms: latencies.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
        ..Run::default()
    })
}
