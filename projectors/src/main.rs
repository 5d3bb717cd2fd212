use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use projectors::redis_cache::RedisInvalidator;
use projectors::{Config, HealthState, ProjectionProgress, ProjectionRunner};
use read_models::{CourseStore, PgStudents};
use tokio::sync::watch;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    service_kit::logging::init();
    // The students' names are sealed: without the KEK no event of theirs can be applied, so
    // the process does not start.
    let kek = service_kit::event_reader::load_kek_ring(config.kek_file.as_deref())?;
    let exporting = service_kit::otlp::init("projectors")?;
    // In the background: NATS may come up after this process (a first install), and until
    // then the projections retry, unready, instead of the process exiting.
    let nats = config.nats.connect_in_background("projectors").await?;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let students = PgStudents::connect(&config.database_url)
        .await
        .context("connecting to DATABASE_URL and migrating")?;
    let courses_url = config
        .courses_store_url
        .as_deref()
        .unwrap_or(&config.database_url);
    let courses = CourseStore::connect(courses_url)
        .await
        .context("connecting to COURSES_STORE_URL")?;
    let cache = |projection: &'static str| -> anyhow::Result<Option<Arc<RedisInvalidator>>> {
        config
            .redis_url
            .as_deref()
            .map(|url| RedisInvalidator::new(url, projection).map(Arc::new))
            .transpose()
            .context("REDIS_URL")
    };
    let progress = Arc::new(ProjectionProgress::default());
    progress.register_gauges();

    if let Some(addr) = config.metrics_listen_addr {
        service_kit::metrics::serve_on_own_port(addr).await?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let health = axum::serve(
        listener,
        projectors::health_router(HealthState {
            nats: nats.clone(),
            students: students.clone(),
            courses: courses.clone(),
            progress: progress.clone(),
        }),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let health = tokio::spawn(async move { health.await });

    let batch_size = usize::from(config.batch_size);
    let lease = projectors::lease::LeaseSettings {
        replica: config.projector_replica_name.clone(),
        ..projectors::lease::LeaseSettings::with_ttl(std::time::Duration::from_millis(
            config.projection_lease_ms,
        ))
    };
    let reader = service_kit::event_reader::EventReader::lazy(
        jetstream.clone(),
        config.stream_prefix.clone(),
        kek,
    );
    let students_runner = ProjectionRunner {
        reader: reader.clone(),
        jetstream: jetstream.clone(),
        names: config.stream_prefix.clone(),
        store: students,
        batch_size,
        cache: cache("students")?,
        progress: progress.clone(),
        lease: lease.clone(),
    };
    let courses_runner = ProjectionRunner {
        reader,
        jetstream,
        names: config.stream_prefix.clone(),
        store: courses,
        batch_size,
        cache: cache("courses")?,
        progress,
        lease,
    };
    tracing::info!(addr = %config.listen_addr, "projectors running");
    let mut students_task = tokio::spawn(students_runner.run(stopped(stop_rx.clone())));
    let mut courses_task = tokio::spawn(courses_runner.run(stopped(stop_rx)));

    // A projection only ends on shutdown. One that ends before (an error it cannot retry,
    // a panic) ends the process non-zero, so the orchestrator restarts it: a process that
    // stays up while one of its projections is dead would look alive and apply nothing.
    let died = tokio::select! {
        () = service_kit::shutdown::signal() => None,
        result = &mut students_task => Some(("students", result)),
        result = &mut courses_task => Some(("courses", result)),
    };
    let _ = stop_tx.send(true);
    if let Some((projection, result)) = died {
        let cause = match result {
            Ok(Ok(())) => anyhow::anyhow!("the {projection} projection stopped unasked"),
            Ok(Err(error)) => error.context(format!("the {projection} projection stopped")),
            Err(panic) => anyhow::anyhow!("the {projection} projection panicked: {panic}"),
        };
        tracing::error!(error = format!("{cause:#}"), "exiting");
        // Let the other projection finish its batch in flight; its result adds nothing.
        let other = if projection == "students" {
            courses_task
        } else {
            students_task
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), other).await;
        let _ = nats.flush().await;
        return Err(cause);
    }
    let students_result = students_task
        .await
        .context("students projection panicked")?;
    let courses_result = courses_task.await.context("courses projection panicked")?;
    health.await.context("health task panicked")??;
    // Acks are fire-and-forget publishes: flush them before exiting.
    nats.flush().await.context("flushing acks")?;
    if let Some(exporting) = exporting {
        exporting.shutdown().await;
    }
    students_result.and(courses_result)
}
