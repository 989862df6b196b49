# The two quick-start commands (see README): `make up` runs livesync, `make test` runs
# every test. Both prepare the machine first (.ci/prepare-machine: packages,
# cargo-pgrx, PostgreSQL and Redis running), which is quick when nothing is missing.

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PSQL      ?= psql -X -q -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1

# The demo bridge logs in as livesync_bridge (livesync_reader + livesync_maintainer) and
# runs clients' writes and snapshots as livesync_demo_app (sql/examples/todos.sql).
BRIDGE_ENV ?= DATABASE_URL=postgres://livesync_bridge@127.0.0.1:5432/livesync \
              LIVESYNC_DEFAULT_ROLE=livesync_demo_app

.PHONY: up test prepare install demo bridge lint extension-test regress isolation e2e bridge-test client-test js-test bench demo-build browser-test

## up: install the extension, load the demo (database `livesync`), run the bridge
up: install demo bridge demo-build
	@echo
	@echo "livesync is installed; the demo table public.todos in database 'livesync' is tracked."
	@echo "  psql -h 127.0.0.1 -U postgres livesync -c \"INSERT INTO todos (title) VALUES ('try livesync')\""
	@echo "The bridge runs below (Ctrl-C stops it); the demo board is at http://127.0.0.1:8080/ (open two windows)."
	@echo "Or connect a WebSocket client to ws://127.0.0.1:8080/ws"
	@echo "and send {\"type\":\"hello\",\"client_id\":\"me\",\"protocol\":1} then"
	@echo "{\"type\":\"subscribe\",\"id\":\"1\",\"channel\":\"table:public.todos\"} (docs/protocol.md)."
	@echo
	$(BRIDGE_ENV) LIVESYNC_DEMO_DIR=demo/dist cargo run --release -q -p livesync-bridge

bridge:
	cargo build --release -q -p livesync-bridge

## test: lint, the extension's in-process tests, then the pg_regress suite and the
## isolation specs (each on a throwaway cluster of its own), the end-to-end tests, the
## bridge's tests, the clients' tests and the demo in a real browser (these against the
## real server)
test: install lint extension-test regress isolation e2e bridge-test client-test js-test browser-test

prepare:
	.ci/prepare-machine

install: prepare
	.ci/install-extension

demo:
	$(PSQL) -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'livesync'" | grep -q 1 \
	    || $(PSQL) -d postgres -c 'CREATE DATABASE livesync'
	$(PSQL) -d livesync -f sql/examples/todos.sql >/dev/null

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## extension-test: the extension's unit and property tests and its #[pg_test]s, in a
## throwaway cluster of a private PostgreSQL copy under target/ (never the system's)
extension-test: prepare
	extension/run-tests

## regress, isolation: on a throwaway cluster (sql/throwaway-cluster) running the
## PostgreSQL of PG_CONFIG with the livesync installed there
regress:
	PG_CONFIG=$(PG_CONFIG) sql/regress/run

isolation:
	PG_CONFIG=$(PG_CONFIG) sql/isolation/run

e2e:
	cargo test -p livesync-e2e

bridge-test:
	cargo test -p livesync-bridge

client-test:
	cargo test -p livesync-client

## js-test: the TypeScript client's unit tests, then its tests against the bridge binary
js-test: demo-build
	cargo build -q -p livesync-bridge
	cd clients/js && npm test && npm run test:integration

## bench: the benchmarks; each prints ratios to a baseline measured in the same run
bench: install
	cargo run --release -q -p livesync-bench --bin doorbell
	cargo run --release -q -p livesync-bench --bin batch
	cargo run --release -q -p livesync-bench --bin reader
	cargo run --release -q -p livesync-bench --bin bridge_latency
	cargo run --release -q -p livesync-bench --bin bridge_tournament
	cargo run --release -q -p livesync-bench --bin bridge_fanout
	cargo run --release -q -p livesync-bench --bin bridge_memory
	cargo run --release -q -p livesync-bench --bin bridge_catchup
	cargo run --release -q -p livesync-bench --bin bridge_presence
	bench/capture/run
	bench/writes/run

## demo-build: the demo page (demo/) and the TypeScript client, bundled into demo/dist
demo-build:
	demo/build

## browser-test: the demo in headless Chromium (two windows; screenshots in demo/test-artifacts)
browser-test: demo-build
	cargo build -q -p livesync-bridge
	cd demo && { [ -d node_modules/playwright-core ] || npm ci --no-audit --no-fund --loglevel=error; } \
	    && node --test --test-concurrency=1 test/browser.test.mjs
