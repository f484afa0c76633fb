# syntax=docker/dockerfile:1
# The wsgateway image: a Rust build stage, then a small Debian runtime.
#
#   docker build -t wsgateway .
#   docker run --rm -p 8001:8001 -p 9101:9101 --env-file wsgateway.env wsgateway
#
# The test suite checks this file statically (tests/it/packaging.rs: the
# instructions below are present, and the HEALTHCHECK command is run against
# a real gateway); it cannot build the image (no Docker daemon in CI).

# ---- build ----
# Debian bookworm on both sides, so the binary links against the runtime's
# glibc. The toolchain must be at least the one the crate needs (edition
# 2024 and let-chains); `rust:1-bookworm` is the newest stable 1.x.
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace (bench/ is a member, and must be there for the
# manifest to load); .dockerignore keeps target/, .git and node_modules out.
COPY . .
RUN cargo build --release --locked -p wsgateway \
 && install -D -m 0755 target/release/wsgateway /out/wsgateway

# ---- runtime ----
# debian:bookworm-slim rather than distroless: it has bash, which the
# HEALTHCHECK below needs for its HTTP request (/dev/tcp), and no curl or
# wget is added for it. ca-certificates: the roots for rediss:// and
# PostgreSQL with sslmode=verify-full.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 wsgateway \
 && useradd --system --uid 10001 --gid wsgateway --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin wsgateway
COPY --from=build /out/wsgateway /usr/local/bin/wsgateway

# A numeric user, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# The public port (WebSockets, health, publish API) and the metrics
# listener, which is off unless WSGATEWAY_METRICS_LISTEN is set: the image
# sets it, so metrics leave the public port (which then answers 404 on
# /ws/metrics). Publish 9101 only to Prometheus's network.
ENV WSGATEWAY_LISTEN=0.0.0.0:8001 \
    WSGATEWAY_METRICS_LISTEN=0.0.0.0:9101 \
    WSGATEWAY_LOG_FORMAT=json
EXPOSE 8001 9101

# GET /ws/health on the port of WSGATEWAY_LISTEN, with bash's /dev/tcp (the
# slim image has no curl, and the gateway has no health subcommand):
# healthy when the status line says 200, within the 3 s timeout.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "port=${WSGATEWAY_LISTEN##*:}; exec 3<>/dev/tcp/127.0.0.1/${port:-8001} && printf 'GET /ws/health HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && read -r -t 2 _ status _ <&3 && [ \"$status\" = 200 ]"]

# SIGTERM starts the gateway's drain (not ready, connections closed with
# 1012 spread over WSGATEWAY_DRAIN_S, default 30 s, then exit 0). Give the container
# more than the drain window to stop: `docker stop --time 45` (compose:
# stop_grace_period: 45s), or Docker kills it after its default 10 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["wsgateway"]
CMD ["serve"]
