"""Where a stage's time goes, from the collapsed stacks `stream_bench.py --profile DIR` leaves.

    .venv/bin/python benchmarks/profile_summary.py DIR/clinical.txt [--top 40] [--match streams/]
        [--us-per-event 120]

Prints each function's share of the samples: inclusive (the function or anything it called was
running) and self (the function itself). py-spy ran with --gil, so a share is of the time the process
held the GIL, which is what bounds a Python stage's throughput. `--us-per-event` (the stage's CPU per
event that stream_bench printed) also prints each share as microseconds per event.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LINE_NUMBER = re.compile(r":\d+\)")


def summarise(lines: list[str]) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, inclusive count by function, self count by function) of py-spy's raw format."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):  # a recursive function counts once per sample
            inclusive[frame] += samples
        own[frames[-1]] += samples
    return total, inclusive, own


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only functions whose frame contains this text")
    parser.add_argument(
        "--us-per-event", type=float, default=None, help="the stage's CPU per event: shares also as us/event"
    )
    args = parser.parse_args()
    total, inclusive, own = summarise(args.stacks.read_text().splitlines())
    if not total:
        raise SystemExit(f"{args.stacks}: no samples")
    print(f"{total} samples")
    for title, counts in (("inclusive", inclusive), ("self", own)):
        print(f"--- {title}")
        shown = [(frame, n) for frame, n in counts.most_common() if args.match in frame][: args.top]
        for frame, n in shown:
            print(f"{n / total:6.1%}  {_micros(n / total, args.us_per_event)}{frame[:140]}")


def _micros(share: float, us_per_event: float | None) -> str:
    return "" if us_per_event is None else f"{share * us_per_event:6.1f} us  "


if __name__ == "__main__":
    main()
