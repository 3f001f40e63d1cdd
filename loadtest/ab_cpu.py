"""Side-by-side CPU per request of two walletd builds, both up at once (A/B).

    python -m loadtest.ab_cpu --b-pythonpath /tmp/base-pkg [--rounds 4] [--duration 8]

A is this tree; B is the package a PYTHONPATH puts first (e.g. a `git archive` of an older
commit, linked as ``walletd`` in a folder). Each build runs ``walletd serve`` with its own
embedded PostgreSQL; the rounds alternate A, B, A, B ... with wrk's ``hot`` scenario (single
DEPOSITs to one wallet), and each run reads the CPU time (utime + stime, /proc) of walletd
and of its PostgreSQL's processes before and after. Prints, per build, the median and the
spread of walletd and PostgreSQL µs of CPU per request and of rps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadtest.procs import Server, free_port, wait_ready

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_WRK_LUA = Path(__file__).with_name("wrk_walletd.lua")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found: list[int] = []
    if children.exists():
        for child in children.read_text().split():
            found.append(int(child))
            found.extend(_descendants(int(child)))
    return found


def _postgres_pids(data_dir: Path) -> list[int]:
    postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()[0])
    return [postmaster, *_descendants(postmaster)]


def _total_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        # A backend may end between listing and reading.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += _cpu_s(pid)
    return total


def _post(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


class Build:
    def __init__(self, name: str, pythonpath: str | None, folder: Path) -> None:
        self.name = name
        self.data_dir = folder / name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        env.pop("WALLETD_DATABASE_URL", None)
        env.pop("DATABASE_URL", None)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.log = (folder / f"{name}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "walletd.cli.main", "serve", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_ready(Server(self.url, self.process, Path(self.log.name)))
        wallet = _post(self.url + "/api/v1/wallets")
        self.ids_file = folder / f"{name}.ids"
        self.ids_file.write_text(f"{wallet['id']}\n")
        self.walletd_us: list[float] = []
        self.postgres_us: list[float] = []
        self.rps: list[float] = []
        self.others = 0

    def run(self, duration_s: float, connections: int) -> None:
        pg = _postgres_pids(self.data_dir)
        before = (_cpu_s(self.process.pid), _total_cpu_s(pg))
        output = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{int(duration_s)}s", "-s", str(_WRK_LUA),
             self.url, "--", "hot", str(self.ids_file), "0.01"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        after = (_cpu_s(self.process.pid), _total_cpu_s(_postgres_pids(self.data_dir)))
        match = re.search(r"WRKJSON (\{.*\})", output)
        assert match is not None, output
        statuses = json.loads(match.group(1))["statuses"]
        ok = sum(count for status, count in statuses.items() if str(status).startswith("2"))
        # Per acknowledged deposit; other answers (a 503 on a busy machine) are counted.
        self.others += sum(statuses.values()) - ok
        self.walletd_us.append((after[0] - before[0]) / ok * 1e6)
        self.postgres_us.append((after[1] - before[1]) / ok * 1e6)
        self.rps.append(ok / duration_s)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()

    def summary(self) -> str:
        def fmt(values: list[float]) -> str:
            return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"

        return (
            f"{self.name}: walletd {fmt(self.walletd_us)} µs/req, PostgreSQL "
            f"{fmt(self.postgres_us)} µs/req, {fmt(self.rps)} rps, {self.others} non-2xx"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b-pythonpath", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="walletd-ab-") as temp:
        folder = Path(temp)
        builds = [Build("A", None, folder), Build("B", args.b_pythonpath, folder)]
        try:
            for build in builds:  # warm-up, unmeasured
                build.run(3, args.connections)
                for values in (build.walletd_us, build.postgres_us, build.rps):
                    values.clear()
            for _ in range(args.rounds):
                for build in builds:
                    time.sleep(args.settle)
                    build.run(args.duration, args.connections)
        finally:
            for build in builds:
                build.stop()
        for build in builds:
            print(build.summary())
        a, b = builds
        print(
            "A/B medians: walletd "
            f"{statistics.median(a.walletd_us) / statistics.median(b.walletd_us):.3f}, "
            f"PostgreSQL {statistics.median(a.postgres_us) / statistics.median(b.postgres_us):.3f}"
        )


if __name__ == "__main__":
    main()
