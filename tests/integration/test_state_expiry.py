"""Analyte state expiry on the real broker: an old patient's state leaves the table with a tombstone on its
changelog, so a worker recovering from the changelog does not bring it back; a patient whose alert still
escalates keeps it. The horizon is seconds here (reference data in a test folder), not 14 days."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.memory_bench import OFFSET_KEY, short_horizon_reference
from producers.publisher import make_publisher
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.test_clinical import alerts_for
from tests.integration.test_lab_path import wait_for

HORIZON_SECONDS = 30  # delta windows, suppression and alert memory of 10 s each


def changelog(hub: HubEnv) -> str:
    return f"{hub.settings.stream.app_id}-analyte-states-changelog"


def latest_by_key(hub: HubEnv, timeout: float = 3) -> dict[bytes, dict[str, Any] | None]:
    """Each key's latest record on the analyte-states changelog (None: a tombstone)."""
    latest: dict[bytes, dict[str, Any] | None] = {}
    for message in sorted(
        hub.consume_all(changelog(hub), timeout, lambda m: False), key=lambda m: m.offset()
    ):
        value = message.value()
        latest[message.key()] = None if value is None else json.loads(value)
    return latest


def key_with_value(latest: dict[bytes, dict[str, Any] | None], value: float) -> bytes | None:
    return next((k for k, v in latest.items() if v is not None and v.get("last_value") == value), None)


def local_keys(state_dir: Path) -> set[bytes]:
    """The keys of a stopped worker's analyte-states RocksDB stores."""
    from rocksdict import AccessType, Options, Rdict

    keys: set[bytes] = set()
    for path in state_dir.rglob("analyte-states-*.db"):
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only(False))
        keys |= {bytes(key) for key in db.keys() if key != OFFSET_KEY}  # type: ignore[arg-type]  # noqa: SIM118
        db.close()
    return keys


def test_an_old_patients_state_is_tombstoned_and_an_escalating_ones_is_kept(
    hub: HubEnv, tmp_path: Path
) -> None:
    state_dir = tmp_path / "worker-state"
    env = {
        "CLINHUB_STREAM_REFERENCE_DIR": str(short_horizon_reference(tmp_path / "ref", HORIZON_SECONDS)),
        "CLINHUB_STREAM_STATE_EXPIRY_CHECK_SECONDS": "0.5",
        "CLINHUB_STREAM_TABLE_STORE": "rocksdb://",
        "CLINHUB_STREAM_DATA_DIR": str(state_dir),
    }
    worker = hub.start_worker(env)
    publisher = make_publisher(hub.settings, "H001")
    warm = lab_record("H001", "K", 4.4, "mmol/L", mrn="MRN-WARM")
    publisher.publish_lab(warm)
    wait_for(lambda: key_with_value(latest_by_key(hub), 4.4) is not None, hub, 120, what="the first state")

    # the worker is up: published now, both are judged within the 10 s alert memory
    quiet = lab_record("H001", "K", 4.2, "mmol/L", mrn="MRN-QUIET")
    paged = lab_record("H001", "K", 6.9, "mmol/L", mrn="MRN-PAGED")  # critical: alerted, never acknowledged
    publisher.publish_lab(quiet)
    publisher.publish_lab(paged)
    publisher.close()
    alerts_for(hub, {paged["envelope"]["event_id"]})
    latest = latest_by_key(hub)
    quiet_key, paged_key = key_with_value(latest, 4.2), key_with_value(latest, 6.9)
    assert quiet_key is not None and paged_key is not None
    quiet_state = latest[quiet_key]
    assert quiet_state is not None and quiet_state["updated_ms"] > 0, "written with its write time"

    def tombstoned(key: bytes) -> bool:
        latest = latest_by_key(hub)
        return key in latest and latest[key] is None

    wait_for(lambda: tombstoned(quiet_key), hub, 120, what="the quiet patient's state expired")
    latest = latest_by_key(hub)
    assert latest[paged_key] is not None, "the state of an alert still escalating is kept"

    # a worker that recovers the table from the changelog alone does not bring the expired state back
    hub.stop_worker(worker)
    assert quiet_key not in local_keys(state_dir) and paged_key in local_keys(state_dir)
    shutil.rmtree(state_dir)
    worker = hub.start_worker(env)
    after = make_publisher(hub.settings, "H001")
    probe = lab_record("H001", "K", 4.6, "mmol/L", mrn="MRN-PROBE")
    after.publish_lab(probe)
    after.close()
    wait_for(
        lambda: key_with_value(latest_by_key(hub), 4.6) is not None, hub, 120, what="the recovered worker"
    )
    hub.stop_worker(worker)
    recovered = local_keys(state_dir)
    assert paged_key in recovered and quiet_key not in recovered
