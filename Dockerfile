# hypha-rtc in two stages: a Rust build (nasm gives openh264 its SIMD code), then a small
# Debian runtime with the binary, CA certificates and curl for health checks, run as an
# unprivileged user. Build: docker build -t hypha-rtc .
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends nasm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
COPY assets ./assets
RUN cargo build --release --locked --bin hypha-rtc

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/hypha-rtc --create-home hypha
COPY --from=build /src/target/release/hypha-rtc /usr/local/bin/hypha-rtc
COPY assets/DejaVuSans-LICENSE.txt /usr/share/doc/hypha-rtc/DejaVuSans-LICENSE.txt
USER 10001:10001
WORKDIR /var/lib/hypha-rtc
ENV HYPHA_HOST=0.0.0.0 \
    HYPHA_PORT=9527 \
    HYPHA_DATA_DIR=/var/lib/hypha-rtc
VOLUME ["/var/lib/hypha-rtc"]
EXPOSE 9527
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9527/health/readiness >/dev/null || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["hypha-rtc"]
