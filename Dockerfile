# token-sidecar container image.
#
#   docker build -t token-sidecar:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:9901:9901 \
#     -e TOKEN_SIDECAR_UPSTREAM=https://login.example.com token-sidecar:0.1.0
#
# Two stages: a Debian 12 (bookworm) Rust toolchain builds a release binary, and a distroless
# image runs it. The builder must stay on bookworm: the binary links glibc dynamically, and
# distroless cc-debian12 ships bookworm's glibc, so a newer builder (trixie) would produce a
# binary that cannot start. See docs/DEPLOYMENT.md.

# The toolchain the project is built and tested with; rust-version in Cargo.toml is the floor.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change. The slim image already has gcc and libc6-dev, which is all `ring` needs (TLS is
# rustls, so no OpenSSL or pkg-config).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin token-sidecar \
    && rm -rf src

# The real sources. COPY keeps the files' own modification times, which can be older than the
# placeholder build above; touching the crate roots makes sure Cargo rebuilds the crate instead
# of shipping the placeholder binary.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin token-sidecar \
    && ./target/release/token-sidecar --version

# cc: glibc, libgcc and CA certificates, no shell, no package manager. The nonroot tag runs as
# uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="token-sidecar" \
      org.opencontainers.image.description="A sidecar proxy for OAuth 2.0 token endpoints: caches and coalesces client-credentials tokens and honours Retry-After." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /build/target/release/token-sidecar /usr/local/bin/token-sidecar
COPY config/token-sidecar.toml /etc/token-sidecar/token-sidecar.toml

# Inside a container the listeners must bind every interface to be reachable through a published
# port; outside one the defaults stay on loopback. These variables beat the config file (flag >
# env > file > default), so override them with -e or a flag, not in the file.
# NO_COLOR: container runtimes store logs as plain text; keep ANSI colour codes out of them.
# DL3064 flags the word TOKEN in these names; they hold addresses and a path, never a secret.
# hadolint ignore=DL3064
ENV TOKEN_SIDECAR_LISTEN=0.0.0.0:8080 \
    TOKEN_SIDECAR_ADMIN=0.0.0.0:9901 \
    TOKEN_SIDECAR_CONFIG=/etc/token-sidecar/token-sidecar.toml \
    NO_COLOR=1

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080 9901

# Exec form: distroless has no shell. `healthcheck` probes /readyz on TOKEN_SIDECAR_ADMIN (a
# wildcard address is probed on loopback) and exits 0 only on a 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/token-sidecar", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/token-sidecar"]
