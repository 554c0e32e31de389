# sluice: multi-stage build, small non-root runtime image with the example config baked in.
# Build: docker build -t sluice .
# Run:   docker run -p 8081:8081 -p 8080:8080 sluice
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin sluice

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home sluice
WORKDIR /app
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
# envoyproxy/ratelimit's image runs /bin/ratelimit (Envoy Gateway's Deployment names it as the
# command): run by that name, sluice reads that project's environment (README, "Replacing
# envoyproxy/ratelimit").
RUN ln -s /usr/local/bin/sluice /bin/ratelimit
COPY config/sluice.yaml /app/config/sluice.yaml
COPY config/limits /app/config/limits
USER 10001
# gRPC (Envoy RLS v3) and HTTP (metrics, health, config, JSON API).
EXPOSE 8081 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve", "--config", "/app/config/sluice.yaml"]
