# The two commands of the README: `make demo` (the hub end to end) and `make test` (every check and test).
# Both install what they need first (scripts/bootstrap.sh is idempotent); only `make test` also needs
# Docker Compose v2 (`compose`), to check docker-compose.yml.
.PHONY: bootstrap compose demo test unit lint typecheck layers format infra-up infra-down bench clean

VENV := .venv/bin
TYPED_PACKAGES := core clinhub console producers streams schemas sinks

bootstrap:
	bash scripts/bootstrap.sh

# Compose v2 for tests/integration/test_compose.py: found, or built once from the Go module proxy
# (a few minutes the first time, under a second afterwards). Nothing else needs it.
compose:
	bash scripts/validate-compose.sh --install-only

demo: bootstrap
	$(VENV)/clinhub demo

# What CI runs (.ci/run): lint, types and import layers first (a minute), then every test.
test: lint compose
	$(VENV)/python -m pytest

unit: bootstrap
	$(VENV)/python -m pytest tests/unit

# Lint only, no tests: ruff, ruff format, mypy, import layers ([tool.importlinter] in pyproject.toml).
lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy $(TYPED_PACKAGES)
	$(VENV)/lint-imports --no-logo --no-cache

typecheck: bootstrap
	$(VENV)/mypy $(TYPED_PACKAGES)

layers: bootstrap
	$(VENV)/lint-imports --no-logo --no-cache

format:
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

infra-up: bootstrap
	$(VENV)/clinhub infra up

infra-down:
	$(VENV)/clinhub infra down

# The README's benchmark suite: starts its own services (Kafka and the registry, PostgreSQL), prints its figures
# and writes them to .data/bench/ (results.json, results.md, latency.png). BENCH_ARGS=--quick for a smoke run.
bench: bootstrap
	$(VENV)/python -m benchmarks.suite $(BENCH_ARGS)

clean:
	-$(VENV)/clinhub infra down
	rm -rf .infra .data
