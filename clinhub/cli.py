"""`clinhub`: one command for the hub's jobs. Settings are read here, once, and passed inward."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from core import principals
from core.exceptions import HubError
from core.settings import HubSettings, load_settings

app = typer.Typer(help="Regional clinical event hub.", no_args_is_help=True, add_completion=False)
infra_app = typer.Typer(help="Local Kafka, schema registry and PostgreSQL.", no_args_is_help=True)
db_app = typer.Typer(help="The regional store's schema.", no_args_is_help=True)
stream_app = typer.Typer(help="The Faust stream processor.", no_args_is_help=True)
schemas_app = typer.Typer(help="The regional Avro standard in the schema registry.", no_args_is_help=True)
app.add_typer(infra_app, name="infra")
app.add_typer(db_app, name="db")
app.add_typer(stream_app, name="stream")
app.add_typer(schemas_app, name="schemas")
users_app = typer.Typer(help="Console accounts.", no_args_is_help=True)
app.add_typer(users_app, name="users")
gateway_app = typer.Typer(help="Gateways for what hospitals already send.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")
import_app = typer.Typer(help="Import institutions' exports.", no_args_is_help=True)
app.add_typer(import_app, name="import")
institutions_app = typer.Typer(help="Institutions' Kafka principals.", no_args_is_help=True)
app.add_typer(institutions_app, name="institutions")


def _settings() -> HubSettings:
    return load_settings()


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@infra_app.command("up")
def infra_up(
    kafka: Annotated[bool, typer.Option(help="Start Kafka (KRaft).")] = True,
    registry: Annotated[bool, typer.Option(help="Start the schema registry.")] = True,
    postgres: Annotated[bool, typer.Option(help="Start a local PostgreSQL cluster.")] = False,
) -> None:
    """Fetch (first time only) and start the local services; returns when they answer."""
    from clinhub.infra import kafka as kafka_service
    from clinhub.infra import postgres as pg_service
    from clinhub.infra import registry as registry_service
    from clinhub.services import stack_for

    settings = _settings()
    stack = stack_for(settings.infra)
    names = [*principals.SERVICE_PRINCIPALS, *settings.stream.institutions]
    if kafka:
        started = time.monotonic()
        kafka_service.start(stack.kafka)
        kafka_service.ensure_principals(stack.kafka, names)
        secured = f"SASL_SSL, principals in {stack.kafka.secrets_dir}" if stack.kafka.secure else "plaintext"
        typer.echo(f"kafka     up at {stack.kafka.bootstrap}, {secured} ({time.monotonic() - started:.1f}s)")
    if registry:
        started = time.monotonic()
        registry_service.start(stack.registry, names)
        typer.echo(f"registry  up at {stack.registry.url} ({time.monotonic() - started:.1f}s)")
    if postgres:
        started = time.monotonic()
        pg_service.start(stack.postgres)
        typer.echo(
            f"postgres  up at {stack.postgres.url()}, TLS and scram-sha-256, roles' passwords in "
            f"{stack.postgres.secrets_dir} ({time.monotonic() - started:.1f}s); use it with "
            f"CLINHUB_DATABASE_URL={stack.postgres.url()}"
        )


@infra_app.command("fetch")
def infra_fetch() -> None:
    """Fetch Kafka and the registry from Maven Central (once; later runs reuse them)."""
    from clinhub.infra import kafka, registry
    from clinhub.services import stack_for

    stack = stack_for(_settings().infra)
    kafka.ensure_jars(stack.kafka.lib_dir)
    typer.echo(f"kafka     jars in {stack.kafka.lib_dir}")
    registry.ensure_built(stack.registry.app_dir)
    typer.echo(f"registry  in {stack.registry.app_dir}")


@infra_app.command("down")
def infra_down() -> None:
    """Stop every local service this project started."""
    from clinhub.infra import kafka, postgres, registry
    from clinhub.services import stack_for

    stack = stack_for(_settings().infra)
    for name, stopped in (
        ("registry", registry.stop(stack.registry)),
        ("kafka", kafka.stop(stack.kafka)),
        ("postgres", postgres.stop(stack.postgres)),
    ):
        typer.echo(f"{name:9} {'stopped' if stopped else 'was not running'}")


@infra_app.command("status")
def infra_status() -> None:
    from clinhub.infra import kafka, postgres, registry
    from clinhub.services import stack_for

    stack = stack_for(_settings().infra)
    for name, pid in (
        ("kafka", kafka.running_pid(stack.kafka)),
        ("registry", registry.running_pid(stack.registry)),
        ("postgres", postgres.running_pid(stack.postgres)),
    ):
        typer.echo(f"{name:9} {f'running (pid {pid})' if pid else 'stopped'}")


@infra_app.command("secrets")
def infra_secrets(
    directory: Annotated[Path, typer.Argument(help="The docker-compose.yml `secrets` volume.")],
    kafka_host: Annotated[
        list[str] | None, typer.Option(help="A broker's host name, repeated (default kafka-1..3).")
    ] = None,
    registry_proxy_host: Annotated[
        str, typer.Option(help="The registry proxy's host name.")
    ] = "registry-proxy",
    registry_upstream: Annotated[str, typer.Option(help="Apicurio's host:port.")] = "registry:8080",
    postgres_host: Annotated[str, typer.Option(help="PostgreSQL's host name.")] = "postgres",
    institution: Annotated[
        list[str] | None,
        typer.Option(help="A simulated institution, repeated (default CLINHUB_STREAM_INSTITUTIONS)."),
    ] = None,
    rotate: Annotated[
        list[str] | None,
        typer.Option(help="A new password for kafka/<principal>, registry/<principal> or postgres/<role>."),
    ] = None,
) -> None:
    """The compose stack's CA, certificates and passwords, each service's in its own directory (made
    once; a second run keeps them). docker-compose.yml's one-shot `secrets` service runs it."""
    from clinhub.infra.compose_secrets import Topology, make

    topology = Topology(
        kafka=tuple(kafka_host or Topology.kafka),
        registry_proxy=registry_proxy_host,
        registry_upstream=registry_upstream,
        postgres=postgres_host,
        institutions=tuple(institution or _settings().stream.institutions),
    )
    for line in make(directory, topology, rotate=rotate or ()).lines():
        typer.echo(line)


@infra_app.command("credentials")
def infra_credentials(
    replace: Annotated[
        list[str] | None, typer.Option(help="Set this principal's credentials again from its file (rotated).")
    ] = None,
) -> None:
    """As the admin: SCRAM credentials on Kafka for every principal with a password file in
    CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR and none on the cluster yet (docker-compose.yml's `init`)."""
    from clinhub.infra.compose_secrets import ensure_kafka_credentials

    done = ensure_kafka_credentials(_settings(), replace or ())
    typer.echo(f"kafka credentials created: {', '.join(done.created) or '-'}")
    if done.replaced:
        typer.echo(f"kafka credentials replaced: {', '.join(done.replaced)}")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the store's schema (Alembic)."""
    from sinks.privileges import OWNER
    from sinks.store import current_revision, engine_for, upgrade

    engine = engine_for(_settings().database.for_role(OWNER))  # the migration role owns the schema
    upgrade(engine, revision)
    typer.echo(f"database at revision {current_revision(engine)}")


@db_app.command("check")
def db_check() -> None:
    """Exit non-zero when the store's schema is behind the code."""
    from sinks.privileges import OWNER
    from sinks.store import engine_for, ensure_current

    ensure_current(engine_for(_settings().database.for_role(OWNER)))
    typer.echo("database schema is current")


@app.command("topics")
def topics_create() -> None:
    """Create the hub's topics (raw per institution, alerts, dead letters) and every principal's ACLs,
    if missing (as the admin)."""
    from clinhub.provision import provision

    done = provision(_settings())
    typer.echo(f"created {len(done.topics_created)} topic(s): {', '.join(done.topics_created) or '-'}")
    typer.echo(f"ACLs: {done.acls} in place")


@institutions_app.command("add")
def institutions_add(institution: str) -> None:
    """A principal for an institution, its raw topics, its ACLs; prints the settings to hand over."""
    from clinhub.infra import registry_proxy
    from clinhub.provision import add_institution
    from clinhub.services import stack_for

    settings = _settings()
    proxy = stack_for(settings.infra).registry.proxy  # the local stack's; another registry: its own users
    added = add_institution(settings, institution, lambda name: registry_proxy.add_user(proxy, name))
    kafka = settings.kafka
    typer.echo(f"{institution}: may write {', '.join(added.topics)} and read nothing.")
    typer.echo("Hand these client settings over once, over a safe channel (the password is not shown again):")
    typer.echo(f"  CLINHUB_KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers}")
    typer.echo(f"  CLINHUB_KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}")
    typer.echo(f"  CLINHUB_KAFKA_SASL_MECHANISM={kafka.sasl_mechanism}")
    typer.echo(f"  CLINHUB_KAFKA_SASL_USERNAME={institution}")
    typer.echo(f"  CLINHUB_KAFKA_SASL_PASSWORD={added.password}")
    if kafka.ssl_ca_location is not None:
        typer.echo(f"  CLINHUB_KAFKA_SSL_CA_LOCATION=<a copy of {kafka.ssl_ca_location}>")
    if proxy.password_file(institution).exists():
        typer.echo(f"  CLINHUB_REGISTRY_URL={settings.registry.url}")
        typer.echo(f"  CLINHUB_REGISTRY_BASIC_AUTH_USER={institution}")
        registry_password = proxy.password_file(institution).read_text().strip()
        typer.echo(f"  CLINHUB_REGISTRY_BASIC_AUTH_PASSWORD={registry_password}")


@institutions_app.command("revoke")
def institutions_revoke(institution: str) -> None:
    """Remove an institution's ACLs (it can publish nothing from now on) and its credentials."""
    from clinhub.provision import revoke_institution

    removed = revoke_institution(_settings(), institution)
    typer.echo(f"{institution}: {removed} ACL(s) removed and its credentials deleted")


@schemas_app.command("register")
def schemas_register() -> None:
    """Register every record schema of the standard (BACKWARD_TRANSITIVE) and report what changed."""
    from schemas.registration import register_standard
    from schemas.wire import ConfluentRegistry

    admin = _settings().as_principal(principals.ADMIN)  # registering is the admin's alone
    for change in register_standard(ConfluentRegistry(admin.registry.client_config())):
        typer.echo(f"{change.subject}: {change.describe()}")


@schemas_app.command("list")
def schemas_list() -> None:
    """Subjects and versions in the registry."""
    from schemas.wire import ConfluentRegistry

    registry = ConfluentRegistry(_settings().as_principal(principals.ADMIN).registry.client_config())
    for subject in registry.subjects():
        typer.echo(f"{subject}: versions {registry.versions(subject)}")


@schemas_app.command("release")
def schemas_release() -> None:
    """Record changed schemas as new versions in schemas/history, after proving they read every older one."""
    from schemas import governance, standard

    for name in standard.record_names():
        released = governance.release(name)
        typer.echo(f"{name}: {f'released v{released.version}' if released else 'unchanged'}")


@schemas_app.command("docs")
def schemas_docs() -> None:
    """Regenerate docs/standard.md from the schemas."""
    from schemas import docs

    typer.echo(f"wrote {docs.write()}")


@stream_app.command("worker")
def stream_worker(
    loglevel: str = "info",
    role: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this stage (normaliser, clinical, store); repeat for several. "
            "Default: CLINHUB_STREAM_ROLES, else all three."
        ),
    ] = None,
) -> None:
    """Run the Faust stream processor until interrupted."""
    import faulthandler

    from prometheus_client import REGISTRY, start_http_server

    from clinhub.worker import build_components
    from core.contract import TopicNames
    from core.exceptions import AccessDeniedError
    from core.kafka_errors import refusal_in
    from streams.runtime.app import ROLES, app_id_for, create_app, source_topics
    from streams.runtime.membership import claim_instance_id, group_instance_id
    from streams.runtime.startup import settle_worker_heap
    from streams.runtime.topics import check_access, raw_topics_in

    unknown = sorted(set(role or ()) - set(ROLES))
    if unknown:
        raise typer.BadParameter(
            f"{', '.join(unknown)}: a stage is one of {', '.join(ROLES)}", param_hint="--role"
        )

    faulthandler.enable()  # a crash in native code (librdkafka, RocksDB) logs every thread's stack
    # where a (re)start's seconds go, with Faust's own lines after (tests/integration/test_kill_points.py)
    start_up = logging.getLogger("clinhub.worker.start_up")
    start_up.info("modules imported")
    settings = _settings()
    if settings.infra.metrics_port:
        start_http_server(settings.infra.metrics_port, addr=settings.infra.metrics_host, registry=REGISTRY)
    roles = tuple(role) if role else settings.stream.roles
    # its static group member id, held by one live worker only (streams/runtime/membership.py)
    claim_instance_id(group_instance_id(settings.stream, app_id_for(settings.stream, roles)))
    settings = settings.as_principal(principals.worker_principal(roles))
    topics = TopicNames(prefix=settings.stream.topic_prefix)
    # wrong credentials or missing ACLs: exit non-zero naming the principal and topic, not wait silently
    client = settings.kafka.client_config()
    listed = check_access(client, settings.kafka.sasl_username, source_topics(topics, settings.stream, roles))
    raw_topics = raw_topics_in(listed, topics)
    start_up.info("Kafka access checked")
    components = build_components(settings, REGISTRY, roles)
    start_up.info("components built")
    faust_app = create_app(settings.kafka, settings.stream, components, raw_topics=raw_topics, roles=roles)
    worker = faust_worker(faust_app, loglevel)
    settle_worker_heap()  # frozen, and the worker's collector thresholds (streams/runtime/startup.py)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        # Faust exits 1 after a crash without a word; Kafka refusing the principal meanwhile (its ACLs or
        # credentials revoked) is said as at start-up: non-zero, naming the principal (main)
        reason = worker.crash_reason  # or the database refusing the store stage's role
        refused = (
            reason
            if isinstance(reason, AccessDeniedError)
            else refusal_in(reason, settings.kafka.sasl_username)
        )
        if refused is not None:
            raise refused from None
        raise


def faust_worker(faust_app: Any, loglevel: str) -> Any:
    """Faust's worker without its terminal spinner.

    At --loglevel warning and above Faust feeds the spinner every log record by setting the root
    logger to DEBUG, so each debug call in aiokafka and Faust built a record: 7% of the clinical
    stage's time under load.
    """
    import faust

    worker = faust.Worker(faust_app, loglevel=loglevel, override_logging=True)
    worker.spinner = None
    return worker


@app.command("simulate")
def simulate(
    count: Annotated[int, typer.Option(help="Number of events.")] = 40,
    seed: Annotated[int, typer.Option(help="Same seed, same traffic.")] = 7,
    critical_share: Annotated[float, typer.Option(help="Share of critical lab values.")] = 0.15,
    abnormal_share: Annotated[float, typer.Option(help="Share of abnormal, not critical, lab values.")] = 0.2,
    labs_only: Annotated[
        bool, typer.Option(help="Lab results only, no vitals, ADT, orders, diagnoses.")
    ] = False,
    rate: Annotated[float, typer.Option(help="Events per second (0 = as fast as possible).")] = 0.0,
    max_in_flight: Annotated[
        int, typer.Option(help="Events awaiting their confirmation at most, per institution.")
    ] = 10_000,
) -> None:
    """Publish realistic traffic from the simulated institutions at --rate (event i due at start +
    i/rate), without waiting for each confirmation; every event is confirmed by Kafka or reported."""
    from producers.pacing import publish_paced
    from producers.publisher import PublishStream, make_publisher
    from producers.simulator import simulate_events

    settings = _settings()
    events = simulate_events(
        seed, count, critical_share, abnormal_share, kinds={"lab": 1.0} if labs_only else None
    )
    institutions = sorted({record["envelope"]["institution_id"] for _kind, record in events})
    publishers = {institution: make_publisher(settings, institution) for institution in institutions}
    for publisher in publishers.values():  # before the schedule: its first events are not held back
        publisher.connect()
    streams: dict[str, PublishStream] = {
        institution: publisher.stream(max_in_flight) for institution, publisher in publishers.items()
    }

    def send(kind: str, record: dict[str, Any]) -> None:
        streams[record["envelope"]["institution_id"]].send(kind, record)

    started = time.perf_counter()
    run = publish_paced(events, send, rate)
    outcomes = [stream.close() for stream in streams.values()]
    confirmed_after = time.perf_counter() - started
    for publisher in publishers.values():
        publisher.close()
    confirmed = sum(outcome.confirmed for outcome in outcomes)
    failures = [failure for outcome in outcomes for failure in outcome.failures]
    offered = f"{rate:g}/s" if rate > 0 else "unpaced"
    typer.echo(
        f"published {run.sent} events at {run.rate:.1f} events/s (offered {offered}); "
        f"confirmed {confirmed} of {len(events)} in {confirmed_after:.2f} s"
    )
    for failure in failures[:5]:
        typer.echo(f"not delivered: {failure}", err=True)
    if failures or confirmed != len(events):
        raise typer.Exit(1)


@app.command("demo")
def demo(
    count: Annotated[int, typer.Option(help="Events to publish.")] = 40,
    keep_running: Annotated[bool, typer.Option(help="Leave Kafka and the registry running.")] = False,
    seed: Annotated[
        int | None, typer.Option(help="Simulator seed (default: the clock), to replay a run.")
    ] = None,
) -> None:
    """The main job end to end on embedded defaults (SQLite): services, processor, three institutions."""
    from clinhub.demo import run_demo

    run_demo(_settings(), count, keep_running, seed)


@app.command("console")
def console_serve(
    host: Annotated[str | None, typer.Option(help="Default: CLINHUB_CONSOLE_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: CLINHUB_CONSOLE_PORT.")] = None,
) -> None:
    """Run the clinician console (web + JSON API + notifications) until interrupted."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from clinhub.console_service import build_console

    settings = _settings()
    parts = build_console(settings, CollectorRegistry())
    bind_host, bind_port = host or settings.console.host, port or settings.console.port
    typer.echo(f"console at http://{bind_host}:{bind_port}/")
    uvicorn.run(parts.app, host=bind_host, port=bind_port, log_level="warning", access_log=False)


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@users_app.command("add")
def users_add(
    username: str,
    role: Annotated[str, typer.Option(help="clinician, integration, operator or admin.")],
    institution: Annotated[str | None, typer.Option(help="Institution id (clinician, integration).")] = None,
    wards: Annotated[str | None, typer.Option(help="Comma-separated wards; none: every ward.")] = None,
    chain_level: Annotated[
        int | None,
        typer.Option(help="Place in the escalation chain: 0 responsible clinician, 1 attending..."),
    ] = None,
    display_name: Annotated[str | None, typer.Option(help="Shown in the console.")] = None,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from standard input.")] = False,
) -> None:
    """Create a console account (argon2id password hash)."""
    import datetime as dt

    from clinhub.console_service import accounts_for

    account = accounts_for(_settings()).add(
        username,
        _password(password_stdin),
        role,
        display_name=display_name,
        institution_id=institution,
        wards=wards,
        chain_level=chain_level,
        now=dt.datetime.now(dt.UTC),
    )
    where = f", {account.institution_id}" if account.institution_id else ""
    typer.echo(f"added {account.username} ({account.role}{where})")


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Disable an account and end its sessions and API tokens at once."""
    import datetime as dt

    from clinhub.console_service import accounts_for

    accounts_for(_settings()).set_disabled(username, True, dt.datetime.now(dt.UTC))
    typer.echo(f"disabled {username}")


@users_app.command("enable")
def users_enable(username: str) -> None:
    import datetime as dt

    from clinhub.console_service import accounts_for

    accounts_for(_settings()).set_disabled(username, False, dt.datetime.now(dt.UTC))
    typer.echo(f"enabled {username}")


@users_app.command("list")
def users_list() -> None:
    from clinhub.console_service import accounts_for

    for account in accounts_for(_settings()).list():
        wards = ",".join(sorted(account.wards)) or "*"
        state = "disabled" if account.disabled else "active"
        typer.echo(
            f"{account.username:20} {account.role:12} {account.institution_id or '-':8} wards={wards} "
            f"level={account.chain_level} {state}"
        )


@gateway_app.command("mllp")
def gateway_mllp() -> None:
    """HL7 v2 over MLLP: one listener per institution (CLINHUB_GATEWAY_MLLP_LISTENERS), until interrupted."""
    from clinhub.gateway_mllp import run_mllp_gateway

    run_mllp_gateway(_settings())


@gateway_app.command("fhir")
def gateway_fhir() -> None:
    """FHIR R4 over HTTP on CLINHUB_GATEWAY_FHIR_PORT, until interrupted."""
    from clinhub.gateway_fhir import run_fhir_gateway

    run_fhir_gateway(_settings())


@import_app.command("csv")
def import_csv(
    file: Annotated[Path, typer.Argument(help="The export to import.", exists=True, dir_okay=False)],
    institution: Annotated[str, typer.Option(help="Institution the export comes from.")],
    mapping: Annotated[Path, typer.Option(help="The column mapping (TOML).", exists=True, dir_okay=False)],
    rejects: Annotated[
        Path | None, typer.Option(help="Where to write rejected rows (default: FILE.rejects.csv).")
    ] = None,
) -> None:
    """Validate each row, publish the good ones, write the rejects; a re-run publishes no duplicate."""
    from clinhub.csv_command import run_csv_import

    run_csv_import(_settings(), file, institution, mapping, rejects)


def main() -> None:
    _logging(os.environ.get("CLINHUB_LOG_LEVEL", "WARNING"))
    try:
        app()
    except HubError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
