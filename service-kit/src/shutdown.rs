//! The shutdown signal: SIGTERM (Kubernetes, `scripts/dev down`) or Ctrl-C.

/// Completes when the process is asked to stop.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
}

/// How long an HTTP server keeps answering after the shutdown signal before it stops
/// accepting (see [`serve_http`]).
pub const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` completes, then stops without cutting a request
/// a client had already sent.
///
/// Stopping at once (axum's graceful shutdown alone) resets requests that were sent but not
/// yet read: it closes kept-alive connections that look idle while a request is on its way,
/// drops accepted connections whose first bytes are not read yet, and drops the listener with
/// connections waiting in its backlog. So after the signal the server first drains for
/// [`HTTP_DRAIN`]: it keeps accepting and answering, every answer with `Connection: close`,
/// so each client leaves its connection after its answer. Then it stops accepting, closes the
/// connections that stayed idle and finishes the requests in flight.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let draining = Arc::new(AtomicBool::new(false));
    let closing = draining.clone();
    let app = app.layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let closing = closing.clone();
            async move {
                if closing.load(Ordering::Relaxed) {
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                response
            }
        },
    ));
    let drained = async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        tracing::info!(drain = ?HTTP_DRAIN, "draining HTTP connections");
        tokio::time::sleep(HTTP_DRAIN).await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(drained)
        .await
}
