# Porthole relay image: build with cargo, run on a slim Debian as a non-root user.
#   docker build -t porthole .
#   docker run -p 8080:8080 porthole
# The configuration is /etc/porthole/relay.toml (conf/relay.toml from this
# repository); mount your own over it, or override keys with PORTHOLE__... variables.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p porthole-relay

FROM debian:bookworm-slim
# The system CA roots: https:// routes, via_tls and [uplink] tls without a
# `ca` of their own verify against them (without them the relay exits 64).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin porthole
COPY --from=build /src/target/release/porthole-relay /usr/local/bin/porthole-relay
COPY conf/relay.toml /etc/porthole/relay.toml
# In a container the aggregate port must listen on every interface; the admin
# listener stays on loopback (the health check runs inside the container).
ENV PORTHOLE__RELAY__LISTEN=0.0.0.0:8080 \
    PORTHOLE__RELAY__ADMIN_LISTEN=127.0.0.1:9090
USER porthole
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/porthole-relay", "--config", "/etc/porthole/relay.toml", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/porthole-relay", "--config", "/etc/porthole/relay.toml"]
