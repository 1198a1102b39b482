"""``python -m bench <scenario> [--smoke] [--out DIR]``: run benchmarks, print their tables.

Each scenario is ``bench/<scenario>.py`` with ``async def run(options) -> Outcome``; ``all``
runs every one in turn (a failing scenario is reported and the others still run). Exit
status 0 when every scenario ran (targets missed are reported, not failures), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import DEFAULT_OUT, SCENARIOS, Options, Outcome, run_loop


def run_scenario(name: str, options: Options) -> Outcome:
    module = importlib.import_module(f"bench.{name}")
    print(f"=== {name}{' (smoke)' if options.smoke else ''} ===", flush=True)
    started = time.perf_counter()
    outcome: Outcome = run_loop(module.run(options))
    outcome.seconds = time.perf_counter() - started
    outcome.smoke = options.smoke
    print(outcome.render(), flush=True)
    print(flush=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds each (CI); no timing claims"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="charts go here")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    failed: list[str] = []
    for name in names:
        try:
            outcomes.append(run_scenario(name, Options(out=args.out, smoke=args.smoke)))
        except Exception:
            traceback.print_exc()
            print(f"[{name}] FAILED", flush=True)
            failed.append(name)
    if len(names) > 1:
        print("=== summary ===")
        for outcome in outcomes:
            met = sum(t.met for t in outcome.targets)
            total = len(outcome.targets)
            print(f"{outcome.name:12} {outcome.seconds:6.1f}s  targets met {met}/{total}")
            for target in outcome.targets:
                print(f"    {target.render()}")
        for name in failed:
            print(f"{name:12} FAILED")
        print(f"total {time.perf_counter() - started:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
