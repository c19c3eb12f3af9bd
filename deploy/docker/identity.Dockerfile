# syntax=docker/dockerfile:1
# The identity service image. Build from the repository root:
#   docker build -f deploy/docker/identity.Dockerfile -t ghcr.io/sealmesh/identity:0.1.0 .
# No eBPF here: the base image's stable toolchain builds it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The `dist` profile: release with fat LTO (Cargo.toml).
RUN cargo build --profile dist --locked --package sealmesh-identity --bin sealmesh-identity

FROM debian:bookworm-slim
COPY --from=build /src/target/dist/sealmesh-identity /usr/local/bin/sealmesh-identity
# Matches runAsUser in deploy/base/identity.yaml.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sealmesh-identity"]
