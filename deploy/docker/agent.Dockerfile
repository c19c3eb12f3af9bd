# syntax=docker/dockerfile:1
# The node agent image. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t ghcr.io/sealmesh/agent:0.1.0 .
# The builder compiles the eBPF programs too, so it needs what
# `cargo xtask setup --build-only` installs: the nightly pinned in
# agent-ebpf/rust-toolchain.toml with rust-src, and bpf-linker (built from
# crates.io against that nightly's LLVM).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit cache mounts keep the downloaded crates and the build directory
# from one image build to the next, so a source change rebuilds only what it
# touches; the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo xtask setup --build-only
# The `dist` profile: release with fat LTO (Cargo.toml).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --profile dist --locked --package sealmesh-agent --bin sealmesh-agent \
    && cp target/dist/sealmesh-agent /usr/local/bin/sealmesh-agent

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/sealmesh-agent /usr/local/bin/sealmesh-agent
# Root with a few capabilities (see deploy/base/agent.yaml), not privileged.
USER 0
ENTRYPOINT ["/usr/local/bin/sealmesh-agent"]
