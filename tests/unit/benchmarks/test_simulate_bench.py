"""The simulate benchmark reads the command's own summary line."""

from __future__ import annotations

import pytest

from benchmarks.simulate_bench import achieved


def test_the_summary_of_clinhub_simulate_gives_sent_rate_and_confirmed() -> None:
    line = "published 50000 events at 4998.7 events/s (offered 5000/s); confirmed 49990 of 50000 in 10.31 s\n"
    assert achieved("some warning\n" + line) == (50000, 4998.7, 49990)


def test_no_summary_is_a_failure_naming_what_was_printed() -> None:
    with pytest.raises(SystemExit, match="no summary"):
        achieved("Traceback ...")
