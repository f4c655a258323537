# Build and run tokenledger (used by docker-compose.yml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tokenledger /usr/local/bin/tokenledger
COPY --from=build /src/config /app/config
WORKDIR /app
ENTRYPOINT ["tokenledger"]
CMD ["serve", "--migrate"]
