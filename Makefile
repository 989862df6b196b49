# The two quick-start commands (see README): `make up` runs livesync, `make test` runs
# every test. Both prepare the machine first (.ci/prepare-machine: packages,
# cargo-pgrx, PostgreSQL and Redis running), which is quick when nothing is missing.

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PSQL      ?= psql -X -q -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1

.PHONY: up test prepare install demo lint regress e2e bench

## up: install the extension into the local PostgreSQL and load the demo (database `livesync`)
up: install demo
	@echo
	@echo "livesync is installed; the demo table public.todos in database 'livesync' is tracked."
	@echo "  psql -h 127.0.0.1 -U postgres livesync"
	@echo "  livesync=# INSERT INTO todos (title) VALUES ('try livesync');"
	@echo "  livesync=# SELECT * FROM livesync.changes_since(0);"

## test: lint, then the pg_regress suite and the end-to-end tests against the real server
test: install lint regress e2e

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

regress:
	sql/regress/run

e2e:
	cargo test -p livesync-e2e

## bench: the benchmarks; each prints ratios to a baseline measured in the same run
bench: install
	cargo run --release -q -p livesync-bench --bin doorbell
	cargo run --release -q -p livesync-bench --bin batch
	bench/capture/run
	bench/writes/run
