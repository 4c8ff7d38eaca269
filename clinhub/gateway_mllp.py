"""`clinhub gateway mllp`: the MLLP gateway process (HL7 v2 from the institutions' LIS and HIS).

Builds one publisher per institution listener, the ACK ledger, the dead-letter producer and the metrics;
starts the listeners and the HTTP side (/metrics, /healthz, /readyz); stops on SIGTERM or SIGINT: stops
accepting, lets the messages in flight be answered, flushes the producers.

`start_mllp_gateway(settings)` runs the same gateway on a thread of its own (tests, demo, benchmark) and
returns a `RunningGateway` with its ports and `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from core import principals
from core.settings import HubSettings
from producers.gateways import mllp
from producers.gateways.common import kafka_and_registry_ready
from producers.gateways.ledger import AckLedger
from producers.publisher import make_publisher

log = logging.getLogger("clinhub.gateway.mllp")


@dataclass
class _Parts:
    publishers: dict[str, mllp.PublisherLike]
    dead_letters: mllp.DeadLetterSink
    ledger: AckLedger
    metrics: mllp.MLLPMetrics
    own_publishers: bool
    own_dead_letters: bool


def _build(
    settings: HubSettings,
    publishers: Mapping[str, mllp.PublisherLike] | None,
    dead_letters: mllp.DeadLetterSink | None,
) -> _Parts:
    gateway = settings.gateway
    timeout = gateway.publish_timeout_seconds
    built = {
        institution: make_publisher(settings, institution, delivery_timeout=timeout)
        for institution in gateway.mllp_listeners
        if publishers is None or institution not in publishers
    }
    return _Parts(
        publishers={**(publishers or {}), **built},
        dead_letters=dead_letters or mllp.make_dead_letters(settings, timeout),
        ledger=AckLedger(gateway.ledger_path, gateway.ledger_days),
        metrics=mllp.make_mllp_metrics(),
        own_publishers=publishers is None,
        own_dead_letters=dead_letters is None,
    )


@dataclass
class _Gateway:
    """The gateway's parts on one event loop."""

    settings: HubSettings
    parts: _Parts
    server: mllp.MLLPServer | None = None
    handler: mllp.MessageHandler | None = None
    http: Any = None
    http_task: asyncio.Task[Any] | None = None
    http_port: int = 0
    prune_task: asyncio.Task[Any] | None = None
    executors: list[ThreadPoolExecutor] = field(default_factory=list)

    async def start(self) -> None:
        gateway = self.settings.gateway
        workers = 8  # dead letters only: publishing runs on one thread per institution (PublishBatcher)
        publish_executor = ThreadPoolExecutor(workers, thread_name_prefix="mllp-deadletter")
        ledger_executor = ThreadPoolExecutor(1, thread_name_prefix="mllp-ledger")
        self.executors = [publish_executor, ledger_executor]
        self.handler = handler = mllp.MessageHandler(
            gateway,
            self.parts.publishers,
            self.parts.ledger,
            self.parts.dead_letters,
            self.parts.metrics,
            publish_executor,
            ledger_executor,
        )
        self.server = mllp.MLLPServer(
            gateway, handler, self.parts.metrics, mllp.make_server_ssl_context(gateway)
        )
        await self.server.start()
        kafka_config = self.settings.kafka.client_config()
        registry_config = self.settings.registry.client_config()
        app = mllp.make_http_app(
            self.parts.metrics, lambda: kafka_and_registry_ready(kafka_config, registry_config, timeout=2.0)
        )
        sock = mllp.bind_socket(gateway.host, gateway.mllp_http_port)
        self.http_port = int(sock.getsockname()[1])
        self.http = mllp.make_http_server(app, sock)
        self.http_task = asyncio.create_task(self.http.serve(sockets=[sock]))
        self.prune_task = asyncio.create_task(self._prune(ledger_executor))
        log.info(
            "MLLP gateway HTTP side (/metrics, /healthz, /readyz) on %s:%d", gateway.host, self.http_port
        )

    async def _prune(self, executor: ThreadPoolExecutor) -> None:
        while True:
            await asyncio.sleep(3600)
            removed = await asyncio.get_running_loop().run_in_executor(executor, self.parts.ledger.prune)
            if removed:
                log.info(
                    "ACK ledger: %d answers older than %s days forgotten",
                    removed,
                    self.settings.gateway.ledger_days,
                )

    async def stop(self) -> None:
        gateway = self.settings.gateway
        if self.server is not None:
            await self.server.stop(grace=gateway.publish_timeout_seconds + 15)
        if self.prune_task is not None:
            self.prune_task.cancel()
        if self.http is not None:
            self.http.should_exit = True
            if self.http_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.http_task, 10)
        loop = asyncio.get_running_loop()
        if self.handler is not None:
            await loop.run_in_executor(None, self.handler.close)
        await loop.run_in_executor(None, self._close_blocking)
        for executor in self.executors:
            executor.shutdown(wait=False, cancel_futures=True)
        log.info("MLLP gateway stopped")

    def _close_blocking(self) -> None:
        if self.parts.own_publishers:
            for institution, publisher in self.parts.publishers.items():
                try:
                    publisher.close()
                except Exception:
                    log.exception("publisher of %s: undelivered events at close", institution)
        if self.parts.own_dead_letters:
            closer = getattr(self.parts.dead_letters, "close", None)
            if closer is not None:
                closer()
        self.parts.ledger.close()


def run_mllp_gateway(settings: HubSettings) -> None:
    """The `clinhub gateway mllp` command: runs until SIGTERM or SIGINT."""

    async def main() -> None:
        as_gateways = settings.as_principal(principals.GATEWAYS)
        gateway = _Gateway(as_gateways, _build(as_gateways, None, None))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await gateway.start()
        assert gateway.server is not None  # noqa: S101 - set by start()
        listening = ", ".join(f"{i} :{p}" for i, p in gateway.server.ports.items())
        log.info(
            "MLLP gateway listening on %s (%s); HTTP :%d", settings.gateway.host, listening, gateway.http_port
        )
        await stop.wait()
        log.info("MLLP gateway stopping: no new connections, finishing the messages in flight")
        await gateway.stop()

    asyncio.run(main())


@dataclass
class RunningGateway:
    """A gateway on its own thread and event loop."""

    ports: dict[str, int]
    http_port: int
    metrics: mllp.MLLPMetrics
    ledger: AckLedger
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _gateway: _Gateway

    def stop(self, timeout: float = 60.0) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._gateway.stop(), self._loop)
        try:
            future.result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> RunningGateway:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_mllp_gateway(
    settings: HubSettings,
    publishers: Mapping[str, mllp.PublisherLike] | None = None,
    dead_letters: mllp.DeadLetterSink | None = None,
) -> RunningGateway:
    """Start the gateway in-process (listeners on the configured ports; 0 picks free ones)."""
    settings = settings.as_principal(principals.GATEWAYS)
    parts = _build(settings, publishers, dead_letters)
    gateway = _Gateway(settings, parts)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    async def boot() -> None:
        try:
            await gateway.start()
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        booting = loop.create_task(boot())
        loop.run_forever()
        booting.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="mllp-gateway", daemon=True)
    thread.start()
    started.wait(60)
    if failure or gateway.server is None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        raise RuntimeError("the MLLP gateway did not start") from (failure[0] if failure else None)
    return RunningGateway(
        ports=dict(gateway.server.ports),
        http_port=gateway.http_port,
        metrics=parts.metrics,
        ledger=parts.ledger,
        _loop=loop,
        _thread=thread,
        _gateway=gateway,
    )
