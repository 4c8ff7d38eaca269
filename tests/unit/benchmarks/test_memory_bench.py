"""The memory benchmark's parts that need no services: its short-horizon reference data and table sizes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from benchmarks.memory_bench import OFFSET_KEY, short_horizon_reference, table_sizes
from streams.domain.expiry import expiry_horizon
from streams.domain.reference import load_reference


def test_the_short_horizon_reference_data_loads_and_expires_state_after_the_given_seconds(
    tmp_path: Path,
) -> None:
    reference = load_reference(short_horizon_reference(tmp_path / "ref", 90))
    horizon = expiry_horizon(reference.rulebook, reference.policy)
    assert abs(horizon - dt.timedelta(seconds=90)) < dt.timedelta(milliseconds=1)
    assert reference.policy.alert_within == reference.policy.suppression_window


def test_table_sizes_count_keys_across_partitions_without_the_offset_key(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    for name, keys in {"analyte-states-0": 3, "analyte-states-1": 2, "wards-0": 1}.items():
        db = Rdict(str(tmp_path / "app" / f"{name}.db"), options=Options(raw_mode=True))
        for n in range(keys):
            db[f"rp-{n}".encode()] = b"{}"
        db[OFFSET_KEY] = b"7"
        db.close()
    assert table_sizes(tmp_path) == {"analyte-states": 5, "wards": 1}
