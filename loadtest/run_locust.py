"""`make loadtest`: a short, bounded, headless Locust run against a fresh walletd.

    python -m loadtest.run_locust [--url URL] [--duration 20] [--users 50] [--min-acked-ops 100]

Starts `walletd serve` on a free port with a temporary data dir (unless --url), waits for
/readyz, runs Locust with the mixed user classes, stops walletd with SIGTERM and exits with
Locust's exit code (non-zero on a balance mismatch, on fewer acknowledged operations than
--min-acked-ops, or on a crossed threshold, see locustfile.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from loadtest.procs import REPO_ROOT, running_walletd

__all__ = ["locust_command", "main"]

USER_CLASSES = [
    "HotWalletUser",
    "UniformUser",
    "ReadHeavyUser",
    "OverdraftUser",
    "IdempotentRetryUser",
    "BulkUser",
    "TransferUser",
    "CreditLimitUser",
    "CurrencyUser",
]
STOP_TIMEOUT_S = 5
# Beyond the run time: wallet setup, the users' stop timeout and the read-back.
LOCUST_TIMEOUT_S_EXTRA = 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--url", default="", help="use this running walletd instead of starting one"
    )
    parser.add_argument("--walletd-cmd", default="", help="command that accepts `serve ...`")
    parser.add_argument("--duration", type=int, default=20, help="seconds of load")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=int, default=50)
    parser.add_argument("--classes", nargs="+", default=USER_CLASSES, choices=USER_CLASSES)
    parser.add_argument("--tags", nargs="*", default=[])
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument(
        "--min-acked-ops",
        type=int,
        default=100,
        help="fail unless at least this many operations were acknowledged",
    )
    parser.add_argument("--max-error-ratio", type=float, default=0.0)
    parser.add_argument("--max-p95-ms", type=float, default=0.0)
    return parser.parse_args(argv)


def locust_command(args: argparse.Namespace, url: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO_ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "-u",
        str(args.users),
        "-r",
        str(args.spawn_rate),
        "-t",
        f"{args.duration}s",
        # Let users finish their request on stop, so few outcomes are left unknown.
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--host",
        url,
        "--walletd-wallets",
        str(args.wallets),
        "--walletd-min-acked-ops",
        str(args.min_acked_ops),
        "--max-error-ratio",
        str(args.max_error_ratio),
        "--max-p95-ms",
        str(args.max_p95_ms),
    ]
    if args.tags:
        command += ["--tags", *args.tags]
    return [*command, *args.classes]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with running_walletd(args.url, args.walletd_cmd) as server:
        command = locust_command(args, server.url)
        print("+", " ".join(command), flush=True)
        try:
            completed = subprocess.run(
                command, cwd=REPO_ROOT, timeout=args.duration + LOCUST_TIMEOUT_S_EXTRA, check=False
            )
        except subprocess.TimeoutExpired:
            print("locust did not finish in time", file=sys.stderr)
            return 124
    print(f"locust exited with {completed.returncode}", flush=True)
    return completed.returncode


if __name__ == "__main__":
    raise SystemExit(main())
