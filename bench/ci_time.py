"""The whole CI (``.ci/run``) on a clean clone, timed: wall clock, CPU, how busy the cores were, and each file's time.

Method: ``git clone`` of this checkout's HEAD into a scratch folder, then ``.ci/run`` there (bootstrap, ruff, mypy,
import contracts, ``scripts/test``), with
- the wall clock of the whole run and of the suite (pytest's own "in N s"), and the user + system CPU of the whole
  process tree (``os.wait4`` of the run);
- the machine's busy cores, sampled from ``/proc/stat`` every 2 s and averaged per 20 s of the run, so that a phase
  where a worker only waits (a service restarting, a server starting) shows as less than all cores busy;
- each test file's time from the suite's JUnit report, summed over its tests: ``--schedule`` prints them as the
  ``SECONDS`` table of ``tests/support/schedule.py`` (every file over 4 s).

Everything else on the machine counts against the run: measure on a quiet machine. ``--workers N`` sets
``UNDERPAINT_TEST_WORKERS`` (the default is one more than the cores). Pass/fail against the 10-minute budget of
issue 18. Results: bench/README.md, "Suite time".

    .venv/bin/python bench/ci_time.py [--work /tmp/ci-time] [--workers N] [--schedule] [--cold-mypy]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 600.0


def cpu_busy_sampler(samples: list[tuple[float, float]], stop: threading.Event, period: float = 2.0) -> None:
    """Appends ``(time, busy cores)`` every ``period`` seconds, from the aggregate line of ``/proc/stat``."""

    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    cores = os.cpu_count() or 1
    last = read()
    while not stop.wait(period):
        now = read()
        total, idle = now[0] - last[0], now[1] - last[1]
        samples.append((time.monotonic(), cores * (1 - idle / total) if total else 0.0))
        last = now


def file_seconds(junit: Path) -> list[tuple[str, float]]:
    """Each file's summed test time, the longest first."""
    seconds: dict[str, float] = collections.defaultdict(float)
    for case in ET.parse(junit).iter("testcase"):
        seconds[case.get("classname", "").replace(".", "/") + ".py"] += float(case.get("time", 0))
    return sorted(seconds.items(), key=lambda item: -item[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ci-time"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--schedule", action="store_true", help="print the SECONDS table for tests/support/schedule.py")
    parser.add_argument(
        "--cold-mypy", action="store_true", help="an empty mypy cache (MYPY_CACHE_DIR), as on a new CI machine"
    )
    args = parser.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(args.work)], check=True)
    junit = args.work / "tests" / "output" / "ci-time-junit.xml"
    env = {**os.environ, "PYTEST_ADDOPTS": f"--junitxml={junit}"}
    if args.workers is not None:
        env["UNDERPAINT_TEST_WORKERS"] = str(args.workers)
    if args.cold_mypy:
        cache = args.work.parent / f"{args.work.name}-mypy-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env["MYPY_CACHE_DIR"] = str(cache)
    log = args.work.parent / f"{args.work.name}.log"

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=cpu_busy_sampler, args=(samples, stop), daemon=True)
    start = time.monotonic()
    sampler.start()
    with log.open("wb") as out:
        proc = subprocess.Popen(["./.ci/run"], cwd=args.work, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stop.set()
    code = os.waitstatus_to_exitcode(status)

    text = log.read_text(errors="replace")
    suite = re.findall(r"(\d+) passed.* in ([\d.]+)s", text)
    print(f"commit {subprocess.run(['git', '-C', str(args.work), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}, "
          f"{os.cpu_count()} cores, load before {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f".ci/run exit {code}; wall {wall:.0f} s ({int(wall // 60)}:{int(wall % 60):02d})")
    print(f"CPU: {usage.ru_utime:.0f} s user + {usage.ru_stime:.0f} s system; {100 * (usage.ru_utime + usage.ru_stime) / wall:.0f} % of one core")  # fmt: skip
    if suite:
        tests, seconds = suite[-1]
        print(
            f"suite: {tests} passed in {float(seconds):.0f} s; everything else (set-up, linters) about "
            f"{wall - float(seconds):.0f} s"
        )
    print("busy cores per 20 s of the run:")
    buckets: dict[int, list[float]] = collections.defaultdict(list)
    for t, busy in samples:
        buckets[int((t - start) // 20) * 20].append(busy)
    print("  " + " ".join(f"{k}s:{sum(v) / len(v):.1f}" for k, v in sorted(buckets.items())))
    if junit.is_file():
        seconds_by_file = file_seconds(junit)
        if args.schedule:
            print("SECONDS: dict[str, float] = {")
            for name, s in seconds_by_file:
                if s >= 4:
                    print(f'    "{name}": {round(s)},')
            print("}")
        else:
            for name, s in seconds_by_file[:10]:
                print(f"  {s:6.1f} s  {name}")
    verdict = "PASS" if code == 0 and wall <= BUDGET_S else "FAIL"
    print(f"{verdict}: {wall:.0f} s against {BUDGET_S:.0f} s")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
