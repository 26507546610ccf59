# Build stage: the pinned toolchain compiles a release binary. protox compiles the proto,
# so no protoc is needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
RUN cargo build --release --locked --bin synthome-gateway

# Runtime stage: the binary alone on a small base, as an unprivileged user. TLS roots for
# the upstream come from ca-certificates.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home gateway
COPY --from=build /src/target/release/synthome-gateway /usr/local/bin/synthome-gateway
USER 10001
ENV SYNTHOME_GATEWAY_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["synthome-gateway"]
CMD ["serve"]
