# syntax=docker/dockerfile:1
#
# One image for the whole system: the four binaries in /usr/local/bin, the command picks one.
#
#   docker build -t school:dev .
#   docker run --rm school:dev stream-admin --help
#   docker run --rm -e NATS_URL=… -e API_KEYS=… school:dev command-gateway
#
# The image has no default command on purpose: every container names the binary it runs
# (docker-compose.yml and the Helm chart do).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- build
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# No system libraries are needed: protobuf is compiled by protox (pure Rust) in build.rs,
# and every TLS stack (NATS, Postgres, MongoDB) is rustls; the C parts of `ring` build with
# the gcc the Rust image ships.
COPY . .

# The cache mounts keep the registry and target/ between builds; the binaries are copied
# out of target/ in the same step because a cache mount is not part of the image.
RUN --mount=type=cache,id=school-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=school-target,target=/src/target \
    cargo build --release --locked \
        --package command-gateway \
        --package projectors \
        --package query-api \
        --package stream-admin \
    && mkdir -p /out \
    && cp target/release/command-gateway target/release/projectors \
          target/release/query-api target/release/stream-admin /out/

# ---------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime

# ca-certificates: TLS to managed databases and NATS. Nothing else: the services download
# nothing at run time. (bash, already in the base image, runs the compose health checks.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 school \
    && useradd --system --uid 10001 --gid school --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin school

COPY --from=builder /out/ /usr/local/bin/

# Numeric, so Kubernetes can check runAsNonRoot without resolving a name.
USER 10001:10001
ENV RUST_LOG=info

# HTTP (all services), gRPC (query-api), metrics when METRICS_LISTEN_ADDR is set.
EXPOSE 8080 9000 9090

LABEL org.opencontainers.image.title="school" \
      org.opencontainers.image.description="Event-sourced school system over NATS JetStream: command-gateway, projectors, query-api, stream-admin" \
      org.opencontainers.image.licenses="MIT"
