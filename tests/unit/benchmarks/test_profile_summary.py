"""The profile summary's arithmetic over py-spy's raw (collapsed) format."""

from __future__ import annotations

from benchmarks.profile_summary import summarise


def test_inclusive_and_self_shares_of_collapsed_stacks() -> None:
    lines = [
        "main (cli.py:10);handle (app.py:20);decode (wire.py:30) 6",
        "main (cli.py:10);handle (app.py:21) 3",
        "main (cli.py:11);walk (a.py:1);walk (a.py:2) 1",  # recursion counts once
        "",
        "not a sample line",
    ]
    total, inclusive, own = summarise(lines)
    assert total == 10
    assert inclusive["main (cli.py)"] == 10
    assert inclusive["handle (app.py)"] == 9
    assert inclusive["walk (a.py)"] == 1
    assert own == {"decode (wire.py)": 6, "handle (app.py)": 3, "walk (a.py)": 1}
