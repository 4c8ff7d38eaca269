# The two commands of the README: `make demo` (the hub end to end) and `make test` (every test).
# Both install what they need first (scripts/bootstrap.sh is idempotent).
.PHONY: bootstrap demo test unit lint typecheck format infra-up infra-down bench clean

VENV := .venv/bin

bootstrap:
	bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/clinhub demo

test: bootstrap
	$(VENV)/python -m pytest

unit: bootstrap
	$(VENV)/python -m pytest tests/unit

lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy clinhub producers streams schemas sinks

format:
	$(VENV)/ruff format .
	$(VENV)/ruff check --fix .

infra-up: bootstrap
	$(VENV)/clinhub infra up

infra-down:
	$(VENV)/clinhub infra down

clean:
	-$(VENV)/clinhub infra down
	rm -rf .infra .data
