# One image for every role of rebalancer (run, gateway, demo-server, loadgen, …).
# Multi-stage: build with the Rust toolchain, ship the binary on a slim Debian.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY agent agent
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin rebalancer

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/rebalancer /usr/local/bin/rebalancer
COPY pipelines /etc/rebalancer/pipelines
USER nobody
ENTRYPOINT ["rebalancer"]
CMD ["run", "--pipeline", "/etc/rebalancer/pipelines/default.toml"]
