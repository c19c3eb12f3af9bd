# syntax=docker/dockerfile:1
# The identity service image. Build from the repository root:
#   docker build -f deploy/docker/identity.Dockerfile -t ghcr.io/sealmesh/identity:0.1.0 .
# No eBPF here: the base image's stable toolchain builds it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The `dist` profile: release with fat LTO (Cargo.toml). BuildKit cache
# mounts keep the crates and the build directory between image builds; the
# binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile dist --locked --package sealmesh-identity --bin sealmesh-identity \
    && cp target/dist/sealmesh-identity /usr/local/bin/sealmesh-identity

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/sealmesh-identity /usr/local/bin/sealmesh-identity
# Matches runAsUser in deploy/base/identity.yaml.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sealmesh-identity"]
