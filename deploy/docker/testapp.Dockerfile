# syntax=docker/dockerfile:1
# Demo and load-test workload for `cargo xtask kind`: the testapp echo server
# and client, and loadgen. Build from the repository root:
#   docker build -f deploy/docker/testapp.Dockerfile -t ghcr.io/sealmesh/testapp:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package xtask --bin testapp --bin loadgen

FROM debian:bookworm-slim
COPY --from=build /src/target/release/testapp /src/target/release/loadgen /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/testapp"]
