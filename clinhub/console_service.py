"""What the console service is built from, made at the command's edge: the database engine, the ack
publisher (Kafka + registry), the escalation policy, the notifier and the metrics. `console/` receives
them as plain objects."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from console.runtime.accounts import Accounts
from console.runtime.acks import build_ack_publisher
from console.runtime.alert_source import notify_group
from console.runtime.audit import AuditLog
from console.runtime.metrics import register_closed_loop_metrics
from console.runtime.notify import ChannelHealth, Notifier, build_notifier, delivery_overview
from console.runtime.service import AckSink, Console, ConsoleOptions, Terms
from console.runtime.store import ConsoleReads
from console.web.app import create_app
from core import principals
from core.settings import HubSettings
from sinks import privileges
from sinks.store import engine_for, ensure_current
from streams.domain.reference import DATA_DIR, load_reference


@dataclass(frozen=True)
class ConsoleParts:
    app: FastAPI
    console: Console
    engine: Any


def console_options(settings: HubSettings) -> ConsoleOptions:
    c = settings.console
    return ConsoleOptions(
        session_lifetime=dt.timedelta(hours=c.session_hours),
        api_token_lifetime=dt.timedelta(days=c.api_token_days),
        no_action_after=dt.timedelta(minutes=c.no_action_after_minutes),
    )


def accounts_for(settings: HubSettings) -> Accounts:
    engine = engine_for(settings.database.for_role(privileges.CONSOLE))
    ensure_current(engine)
    return Accounts(engine)


def build_console(
    settings: HubSettings, metrics: CollectorRegistry, acks: AckSink | None = None, notify: bool = True
) -> ConsoleParts:
    """The console app. `acks` replaces the Kafka publisher (tests of pure web behaviour only)."""
    from core.contract import TopicNames

    settings = settings.as_principal(principals.CONSOLE)
    engine = engine_for(settings.database.for_role(privileges.CONSOLE))
    ensure_current(engine)
    reads = ConsoleReads(engine)
    reference = load_reference(settings.stream.reference_dir or DATA_DIR)
    policy = reference.policy.escalation
    publisher = None
    if acks is None:
        publisher = build_ack_publisher(
            settings.kafka, settings.registry.client_config(), TopicNames(settings.stream.topic_prefix)
        )
        acks = publisher
    console = Console(
        reads,
        Accounts(engine),
        AuditLog(engine),
        acks,
        policy,
        console_options(settings),
        terms=Terms.from_reference(reference),
    )
    register_closed_loop_metrics(metrics, reads, policy)
    notifier = _notifier(settings, engine, metrics) if notify else None

    async def start() -> None:
        if notifier is not None:
            await notifier.start()

    async def stop() -> None:
        if notifier is not None:
            await notifier.stop()
        if publisher is not None:
            publisher.close()

    app = create_app(
        console,
        metrics,
        secure_cookies=settings.console.secure_cookies,
        feed_poll_seconds=settings.console.feed_poll_seconds,
        on_start=start,
        on_stop=stop,
        notifications=_overview(engine) if settings.console.notifications_file else None,
    )
    return ConsoleParts(app, console, engine)


def _notifier(settings: HubSettings, engine: Any, metrics: CollectorRegistry) -> Notifier | None:
    from core.contract import TopicNames

    return build_notifier(
        settings.console,
        settings.kafka,
        settings.registry.client_config(),
        TopicNames(settings.stream.topic_prefix),
        notify_group(settings.stream.app_id),
        engine,
        metrics,
    )


def _overview(engine: Any) -> Callable[[str | None], list[ChannelHealth]]:
    """Per channel: delivered, pending, failed and the last error, for the console's pages."""

    def overview(institution_id: str | None) -> list[ChannelHealth]:
        return list(delivery_overview(engine, institution_id).channels)

    return overview
