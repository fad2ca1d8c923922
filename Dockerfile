# capd-inplace container image.
#
#   make image            (docker build -t capd-inplace:dev .)
#
# Without a registry to pull the base images from, use scripts/build-image-local.sh: it builds
# the same runtime layout from the host's cargo build and `docker import`s it.
#
# Docker socket: the extension talks to the Docker Engine through /var/run/docker.sock, which is
# owned by root (group `docker`, mode 0660, a GID that differs from host to host). The image
# runs as the unprivileged user 65532 by default, so give it access in one of two ways:
#   - run as root without extra capabilities, as config/manager/manager.yaml does (CAPD's own
#     manager runs as root too, and privileged);
#   - keep 65532 and add the socket's group: `docker run --group-add "$(stat -c %g /var/run/docker.sock)"`
#     or, in Kubernetes, securityContext.supplementalGroups: [<that GID>].
# docs/deploy.md explains both.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# --- planner: reduce the source tree to what decides the dependency build -----------------------
# Every Cargo.toml, the lock file, build scripts, and a placeholder for each target root. The
# skeleton is byte-identical until a manifest or the set of targets changes, so the builder's
# dependency layer below stays cached across ordinary source edits (cargo-chef's idea, no tool).
FROM ${RUST_IMAGE} AS planner
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.lock /skeleton/; \
    find . -name Cargo.toml -not -path '*/target/*' | sort | while read -r manifest; do \
      dir="$(dirname "$manifest")"; \
      mkdir -p "/skeleton/$dir"; \
      cp "$manifest" "/skeleton/$manifest"; \
      if [ -f "$dir/build.rs" ]; then cp "$dir/build.rs" "/skeleton/$dir/build.rs"; fi; \
      for target in "$dir"/src/main.rs "$dir"/src/lib.rs "$dir"/src/bin/*.rs \
                    "$dir"/benches/*.rs "$dir"/tests/*.rs "$dir"/examples/*.rs; do \
        if [ -f "$target" ]; then \
          mkdir -p "/skeleton/$(dirname "$target")"; \
          echo 'fn main() { std::process::exit(99) }' > "/skeleton/$target"; \
        fi; \
      done; \
    done

# --- builder ------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY --from=planner /skeleton/ ./
# Dependencies only: the placeholders compile in a second, the crates.io graph is the slow part.
RUN cargo build --release --locked --bin capd-inplace
COPY . .
# COPY keeps the files' original mtimes, which can be older than the placeholders' build, and
# cargo would then keep the placeholder binary. Touch the sources so cargo rebuilds our crates.
# The placeholder exits 99, so the --help check proves the real binary was built.
RUN find . -name '*.rs' -not -path './target/*' -exec touch {} + \
 && cargo build --release --locked --bin capd-inplace \
 && ./target/release/capd-inplace --help >/dev/null \
 && mkdir -p /out/var/cache/capd-inplace \
 && cp target/release/capd-inplace /out/capd-inplace

# --- runtime ------------------------------------------------------------------------------------
# distroless/cc: glibc, libgcc_s, CA certificates and a `nonroot` user (65532), no shell.
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="capd-inplace" \
      org.opencontainers.image.description="In-place Kubernetes upgrades for Cluster API's Docker provider (CAPD)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/capd-inplace /usr/local/bin/capd-inplace
# The default --artifact-cache-dir, writable by the default user when no volume is mounted.
COPY --from=builder --chown=65532:65532 /out/var/cache/capd-inplace /var/cache/capd-inplace
USER 65532:65532
# 9443: hooks (HTTPS); 8080: /metrics; 8081: /healthz and /readyz.
EXPOSE 9443 8080 8081
ENTRYPOINT ["/usr/local/bin/capd-inplace"]
CMD ["serve"]
