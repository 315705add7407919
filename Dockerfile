# secrets-webhook image: a static (musl) binary on distroless, running as uid 65532.
#   docker build -t secrets-webhook:dev .
# TLS is rustls with ring (no OpenSSL), so the binary needs no C library at run time.

FROM rust:1-bookworm AS build
# ring compiles C and assembly for the target: musl-gcc comes from musl-tools.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so a source change does not rebuild them: build a stub with the real manifests.
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares [[bench]] targets: their sources must exist for any build.
COPY benches ./benches
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl \
 && rm -rf src
COPY src ./src
# touch: the stub's artefacts are newer than the copied sources' mtimes.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/secrets-webhook /secrets-webhook

# static: no libc, CA roots for Vault are in the image; nonroot = uid/gid 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /secrets-webhook /secrets-webhook
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/secrets-webhook"]
CMD ["serve"]
