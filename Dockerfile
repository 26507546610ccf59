# synthome-gateway container image.
#
# Build: docker build -t synthome-gateway .
# Run:   docker run -p 50051:50051 -p 9090:9090 -e SYNTHOME_API_KEY=sy_live_... synthome-gateway
#
# Build stage: the pinned toolchain compiles a release binary with OTLP trace export.
# protox compiles the proto, so no protoc is needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --features otlp --bin synthome-gateway

# Runtime stage: the binary alone on a small base, as an unprivileged user. TLS roots for
# the upstream come from ca-certificates.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /src/target/release/synthome-gateway /usr/local/bin/synthome-gateway
USER 10001:10001

# Both listeners on every interface of the container: gRPC for clients, and the
# operations listener (webhooks, /metrics, /healthz, /readyz) for the platform.
ENV SYNTHOME_GATEWAY_LISTEN=0.0.0.0:50051 \
    SYNTHOME_GATEWAY_ADMIN_LISTEN=0.0.0.0:9090 \
    SYNTHOME_GATEWAY_LOG_FORMAT=json
EXPOSE 50051 9090

# The probe asks gRPC health on the local listener and exits 0 only on SERVING. With TLS
# on, give it the same trust: SYNTHOME_GATEWAY_ADDR=https://..., --tls-ca and so on.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["synthome-gateway", "health", "--timeout", "2s"]

# SIGTERM drains: health turns NOT_SERVING, watches end with UNAVAILABLE, and the process
# exits within --shutdown-grace (10s by default; keep the orchestrator's grace above it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["synthome-gateway"]
CMD ["serve"]
