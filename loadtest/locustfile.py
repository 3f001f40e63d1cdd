"""Locust scenarios for walletd, with a money reconciliation at the end of every test.

Pick scenarios by user class (and narrow them by tags):

    locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 30s --host http://127.0.0.1:8000 \
        HotWalletUser UniformUser ReadHeavyUser OverdraftUser IdempotentRetryUser CreditLimitUser
    locust -f loadtest/locustfile.py ... --tags deposit          # only deposit tasks
    locust -f loadtest/locustfile.py ... --max-error-ratio 0.001 --max-p95-ms 50

| class               | wallets                     | traffic                                      |
| ------------------- | --------------------------- | -------------------------------------------- |
| HotWalletUser       | the one hot wallet          | deposits                                     |
| UniformUser         | --walletd-wallets (1000)    | deposits, some withdrawals                   |
| ReadHeavyUser       | --walletd-wallets           | 9 GETs (wallet, history) per deposit         |
| OverdraftUser       | --walletd-overdraft-wallets | deposits and larger withdrawals: 409 is fine |
| IdempotentRetryUser | --walletd-wallets           | every op sent twice with one Idempotency-Key |
| BulkUser            | --walletd-wallets           | bulk requests of --walletd-bulk-items ops    |
| TransferUser        | --walletd-wallets           | transfers between random pairs, and payments |
|                     |                             | of two postings (all or nothing): 409 is fine|
|                     |                             | refunds of them (part or all of a transfer,  |
|                     |                             | every posting of a payment), and reversals   |
|                     |                             | of its own deposits and withdrawals          |
| CreditLimitUser     | --walletd-credit-wallets    | withdrawals into each wallet's overdraft     |
|                     | (limit --walletd-credit-    | limit (set by PATCH at setup: the key needs  |
|                     | limit, 50.00)               | admin) and deposits: balances go below zero, |
|                     |                             | never below -limit; 409 is fine              |
| CurrencyUser        | 8 wallets, USD and JPY      | deposits, transfers in one currency, and     |
|                     |                             | across two: 422 CURRENCY_MISMATCH expected   |

Life of a test:

    test_start (local/master)      users (every process)          test_stop
    create wallets, read their --> POST/GET, tally per wallet --> read balances back and compare
    initial balances               in integer cents (Ledger)      with initial + acked deposits
                                                                  - acked withdrawals; and the
                                                                  global sum, which transfers
                                                                  must not change (one sum per
                                                                  currency: money never moves
                                                                  between two)

Distributed mode (`--master` plus N `--worker` processes, e.g.
`locust -f loadtest/locustfile.py --master --headless --expect-workers 4 -u 200 -r 200 -t 60s
--host URL` and 4x `locust -f loadtest/locustfile.py --worker --master-host 127.0.0.1`):
wallet ids are derived from a run id that the master picks and Locust forwards to the workers
with the other custom options, so all processes share the same wallets; the master creates
them before it dispatches users. Each worker keeps its own ledger and, when its users have
stopped, sends it to the master (`walletd_ledger` message). The master's test_stop asks any
worker that has not reported yet to stop (`walletd_stop`), waits for every ledger (bounded),
merges them and reconciles. Thresholds are checked on the master only, because only it sees
the aggregated statistics.

Exit code (set at quitting on the master/local runner): 1 when a balance does not match, when
fewer operations than --walletd-min-acked-ops were acknowledged, when
the failure ratio is above --max-error-ratio (default 0: any failed request, e.g. any 5xx,
fails the run), when p95 is above --max-p95-ms (0 disables it), when a user raised, or when no
request was made; otherwise 0.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from locust import FastHttpUser, constant, events, tag, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.event import EventHook
from locust.rpc.protocol import Message
from locust.runners import MasterRunner, WorkerRunner

from loadtest.ledger import (
    Ledger,
    Outcome,
    format_cents,
    parse_cents,
    reconcile,
    reconcile_total,
)

log = logging.getLogger("walletd.loadtest")

API = "/api/v1/wallets"
BULK_PATH = "/api/v1/operations/bulk"
MSG_LEDGER = "walletd_ledger"
MSG_STOP = "walletd_stop"
# Bounds: every wait in this file ends.
WALLETS_READY_WAIT_S_MAX = 120.0
SETUP_HTTP_TIMEOUT_S = 10.0
WORKER_LEDGER_WAIT_S_EXTRA = 30.0
MISMATCHES_LOGGED_MAX = 20
# The COMPLETED transfers and payments a process remembers to refund (the newest): enough
# that refunds of one race now and then, bounded.
REFUNDABLE_MAX = 1000
WALLETS_MAX = 1_000_000
# CurrencyUser's wallets: this many, their currencies in turn (walletd's default is USD).
CURRENCY_WALLETS = 8
CURRENCIES = ("USD", "JPY")
DEFAULT_CURRENCY = "USD"


@dataclass(slots=True)
class RunState:
    """Everything one Locust process shares between its users and its event handlers."""

    run_id: str = ""
    hot_wallet: str = ""
    uniform_wallets: list[str] = field(default_factory=list)
    overdraft_wallets: list[str] = field(default_factory=list)
    # Wallets with an overdraft limit (CreditLimitUser), and that limit in cents.
    credit_wallets: list[str] = field(default_factory=list)
    credit_limit_cents: int = 0
    # CurrencyUser's wallets and their currencies (every other wallet is the default, USD).
    currency_of: dict[str, str] = field(default_factory=dict)
    initial_cents: dict[str, int] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    worker_ledgers: dict[str, Ledger] = field(default_factory=dict)
    expected_workers: set[str] = field(default_factory=set)
    ledger_sent: bool = False
    reconciled_ok: bool | None = None
    acked_ops: int = 0
    setup_ok: bool = True
    ready: threading.Event = field(default_factory=threading.Event)

    def all_wallets(self) -> list[str]:
        return [
            self.hot_wallet, *self.uniform_wallets, *self.overdraft_wallets,
            *self.credit_wallets, *self.currency_of,
        ]  # fmt: skip


STATE = RunState()


def _listen(hook: EventHook, handler: Callable[..., None]) -> None:
    """Typed front of Locust's untyped add_listener."""
    hook.add_listener(handler)  # type: ignore[no-untyped-call]


def wallet_id(run_id: str, group: str, index: int) -> str:
    """Deterministic ids, so every worker of one run addresses the same wallets."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"walletd-loadtest/{run_id}/{group}/{index}"))


def plan_wallets(
    state: RunState,
    run_id: str,
    uniform_count: int,
    overdraft_count: int,
    credit_count: int = 8,
    credit_limit_cents: int = 5_000,
) -> None:
    assert 0 < uniform_count <= WALLETS_MAX, uniform_count
    assert 0 < overdraft_count <= WALLETS_MAX, overdraft_count
    assert 0 < credit_count <= WALLETS_MAX, credit_count
    assert credit_limit_cents > 0, credit_limit_cents
    state.credit_wallets = [wallet_id(run_id, "credit", i) for i in range(credit_count)]
    state.credit_limit_cents = credit_limit_cents
    state.run_id = run_id
    state.hot_wallet = wallet_id(run_id, "hot", 0)
    state.uniform_wallets = [wallet_id(run_id, "uniform", i) for i in range(uniform_count)]
    state.overdraft_wallets = [wallet_id(run_id, "overdraft", i) for i in range(overdraft_count)]
    state.currency_of = {
        wallet_id(run_id, "currency", i): CURRENCIES[i % len(CURRENCIES)]
        for i in range(CURRENCY_WALLETS)
    }


# ---------------------------------------------------------------------------------------------
# Command line


def _add_options(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.0,
        help="fail the run when failed/total requests is above this (default 0)",
    )
    parser.add_argument(
        "--max-p95-ms",
        type=float,
        default=0.0,
        help="fail the run when the aggregated p95 latency is above this (0 = off)",
    )
    parser.add_argument(
        "--walletd-min-acked-ops",
        type=int,
        default=0,
        help="fail the run when fewer operations than this were acknowledged (default 0)",
    )
    parser.add_argument("--walletd-wallets", type=int, default=1000, help="uniform wallet count")
    parser.add_argument("--walletd-overdraft-wallets", type=int, default=8)
    parser.add_argument(
        "--walletd-credit-wallets", type=int, default=8, help="CreditLimitUser wallet count"
    )
    parser.add_argument(
        "--walletd-credit-limit", default="50.00", help="their overdraft limit (set by PATCH)"
    )
    parser.add_argument("--walletd-run-id", default="", help="wallet id namespace (default random)")
    parser.add_argument("--walletd-api-key", default="", is_secret=True, help="Bearer token")
    parser.add_argument("--walletd-setup-concurrency", type=int, default=32)
    parser.add_argument(
        "--walletd-bulk-items", type=int, default=100, help="operations per BulkUser request"
    )


def _option(environment: Environment, name: str, default: Any) -> Any:
    options = environment.parsed_options
    return getattr(options, name, default) if options is not None else default


def _auth_headers(environment: Environment) -> dict[str, str]:
    key = str(_option(environment, "walletd_api_key", ""))
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------------------------
# Setup and read-back over plain urllib (gevent makes it cooperative); runs outside users so
# that it does not pollute the statistics.


def _http_json(
    method: str, url: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=SETUP_HTTP_TIMEOUT_S) as response:
            return int(response.status), orjson.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        payload = error.read()
        return int(error.code), orjson.loads(payload) if payload else None


def _read_balance_cents(host: str, headers: dict[str, str], wallet: str) -> int | None:
    try:
        status, body = _http_json("GET", f"{host}{API}/{wallet}", headers)
    except (OSError, orjson.JSONDecodeError) as error:
        log.error("reading wallet %s failed: %s", wallet, error)
        return None
    if status != 200:
        log.error("reading wallet %s: HTTP %s %s", wallet, status, body)
        return None
    return parse_cents(str(body["balance"]))


def _create_wallet(host: str, headers: dict[str, str], wallet: str) -> int | None:
    """Creates one wallet (or finds it) and returns its starting balance in cents (of its
    currency's unit: a JPY wallet's "1000" is 100000, exact; only whole units move)."""
    post_headers = {**headers, "Content-Type": "application/json"}
    fields = {"id": wallet}
    if wallet in STATE.currency_of:
        fields["currency"] = STATE.currency_of[wallet]
    try:
        body_bytes = orjson.dumps(fields)
        status, body = _http_json("POST", f"{host}{API}", post_headers, body_bytes)
    except (OSError, orjson.JSONDecodeError) as error:
        log.error("creating wallet %s failed: %s", wallet, error)
        return None
    if status == 201:
        return parse_cents(str(body["balance"]))
    if status == 409 and isinstance(body, dict) and body.get("code") == "WALLET_ALREADY_EXISTS":
        # A reused --walletd-run-id: start from whatever the wallet holds now.
        return _read_balance_cents(host, headers, wallet)
    log.error("creating wallet %s: HTTP %s %s", wallet, status, body)
    return None


def _set_limit(host: str, headers: dict[str, str], wallet: str, limit: str) -> int | None:
    """PATCHes the wallet's overdraft limit (idempotent: the same limit again changes
    nothing); 1 when set, None when not (the key lacks the admin scope, say)."""
    patch_headers = {**headers, "Content-Type": "application/json"}
    try:
        body_bytes = orjson.dumps({"overdraft_limit": limit})
        status, body = _http_json("PATCH", f"{host}{API}/{wallet}", patch_headers, body_bytes)
    except (OSError, orjson.JSONDecodeError) as error:
        log.error("setting the limit of wallet %s failed: %s", wallet, error)
        return None
    if status != 200:
        log.error("setting the limit of wallet %s: HTTP %s %s", wallet, status, body)
        return None
    return 1


def _map_wallets(
    fn: Callable[[str], int | None], wallets: Iterable[str], concurrency: int
) -> dict[str, int | None]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        wallet_list = list(wallets)
        return dict(zip(wallet_list, pool.map(fn, wallet_list), strict=True))


def _create_all_wallets(environment: Environment) -> None:
    host, headers = str(environment.host or "").rstrip("/"), _auth_headers(environment)
    concurrency = int(_option(environment, "walletd_setup_concurrency", 32))
    started = time.monotonic()
    results = _map_wallets(
        lambda w: _create_wallet(host, headers, w), STATE.all_wallets(), concurrency
    )
    limit = format_cents(STATE.credit_limit_cents)
    limited = _map_wallets(
        lambda w: _set_limit(host, headers, w, limit), STATE.credit_wallets, concurrency
    )
    results.update({w: None for w, ok in limited.items() if ok is None})
    failed = [w for w, cents in results.items() if cents is None]
    STATE.initial_cents = {w: cents for w, cents in results.items() if cents is not None}
    STATE.setup_ok = not failed
    log.info(
        "walletd: %d wallets ready in %.1fs (%d failed), run id %s",
        len(STATE.initial_cents),
        time.monotonic() - started,
        len(failed),
        STATE.run_id,
    )


# ---------------------------------------------------------------------------------------------
# Lifecycle


def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(MSG_STOP, _on_stop_request, concurrent=True)
    elif isinstance(runner, MasterRunner):
        runner.register_message(MSG_LEDGER, _on_worker_ledger)
    if environment.parsed_options is not None and not environment.parsed_options.walletd_run_id:
        # Chosen once on the master (or local runner); Locust forwards custom options to the
        # workers with every spawn message, so they derive the same wallet ids.
        environment.parsed_options.walletd_run_id = uuid.uuid4().hex


def _on_test_start(environment: Environment, **_: Any) -> None:
    global STATE
    STATE = RunState()
    plan_wallets(
        STATE,
        str(_option(environment, "walletd_run_id", "")) or uuid.uuid4().hex,
        int(_option(environment, "walletd_wallets", 1000)),
        int(_option(environment, "walletd_overdraft_wallets", 8)),
        int(_option(environment, "walletd_credit_wallets", 8)),
        parse_cents(str(_option(environment, "walletd_credit_limit", "50.00"))),
    )
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        STATE.expected_workers = {client.id for client in runner.clients.all}
    if not isinstance(runner, WorkerRunner):
        # Runs before the users are spawned (and before the master dispatches them).
        _create_all_wallets(environment)
    STATE.ready.set()


def _on_test_stop(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        _send_ledger(runner)
        return
    if isinstance(runner, MasterRunner):
        _collect_worker_ledgers(environment, runner)
    _reconcile(environment)


def _send_ledger(runner: WorkerRunner) -> None:
    if STATE.ledger_sent:
        return
    STATE.ledger_sent = True
    runner.send_message(MSG_LEDGER, {"ledger": STATE.ledger.to_wire()})


def _on_stop_request(environment: Environment, msg: Message, **_: Any) -> None:
    runner = environment.runner
    assert isinstance(runner, WorkerRunner)
    runner.stop()  # fires test_stop, which sends the ledger once the users are gone
    _send_ledger(runner)


def _on_worker_ledger(environment: Environment, msg: Message, **_: Any) -> None:
    STATE.worker_ledgers[str(msg.node_id)] = Ledger.from_wire(msg.data["ledger"])


def _collect_worker_ledgers(environment: Environment, runner: MasterRunner) -> None:
    """Waits, bounded, until every worker of this test has sent its acknowledged totals."""
    missing = STATE.expected_workers - set(STATE.worker_ledgers)
    for client_id in missing:
        # On `quit` the master only waits 0.5 s for workers; ask them to stop now instead.
        runner.send_message(MSG_STOP, None, client_id=client_id)
    deadline = time.monotonic() + float(environment.stop_timeout or 0) + WORKER_LEDGER_WAIT_S_EXTRA
    while STATE.expected_workers - set(STATE.worker_ledgers) and time.monotonic() < deadline:
        time.sleep(0.1)  # gevent-patched: lets the master's receive loop run
    still_missing = STATE.expected_workers - set(STATE.worker_ledgers)
    if still_missing:
        log.error("walletd: no ledger from workers %s; cannot reconcile", sorted(still_missing))
        STATE.reconciled_ok = False
    for ledger in STATE.worker_ledgers.values():
        STATE.ledger.merge(ledger)


def _reconcile(environment: Environment) -> None:
    if not STATE.initial_cents:
        log.error("walletd: no wallet was set up; nothing to reconcile")
        STATE.reconciled_ok = False
        return
    host, headers = str(environment.host or "").rstrip("/"), _auth_headers(environment)
    concurrency = int(_option(environment, "walletd_setup_concurrency", 32))
    balances = _map_wallets(
        lambda w: _read_balance_cents(host, headers, w), STATE.initial_cents, concurrency
    )
    floors = {wallet: -STATE.credit_limit_cents for wallet in STATE.credit_wallets}
    mismatches = reconcile(STATE.ledger, balances, STATE.initial_cents, floors)
    total_problem = None
    for currency in sorted({DEFAULT_CURRENCY, *STATE.currency_of.values()}):
        # One sum per currency: transfers move money within one, never between two.
        mine = {w: b for w, b in balances.items()
                if STATE.currency_of.get(w, DEFAULT_CURRENCY) == currency}  # fmt: skip
        initial = {w: STATE.initial_cents[w] for w in mine}
        problem = reconcile_total(STATE.ledger, mine, initial, wallets=set(mine))
        if problem is not None:
            total_problem = f"{currency}: {problem}"
            log.error("walletd: SUM MISMATCH %s", total_problem)
    acked = sum(t.acked_ops for t in STATE.ledger.wallets.values())
    STATE.acked_ops = acked
    uncertain = sum(t.uncertain_ops for t in STATE.ledger.wallets.values())
    for mismatch in mismatches[:MISMATCHES_LOGGED_MAX]:
        log.error("walletd: BALANCE MISMATCH %s", mismatch.describe())
    ok = (
        not mismatches
        and total_problem is None
        and STATE.setup_ok
        and STATE.reconciled_ok is not False
    )
    STATE.reconciled_ok = ok
    log.info(
        "walletd: reconciliation %s: %d wallets, %d acknowledged ops, %d uncertain ops,"
        " %d mismatches",
        "PASSED" if ok else "FAILED",
        len(balances),
        acked,
        uncertain,
        len(mismatches),
    )


def _on_quitting(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return
    problems = _threshold_problems(environment)
    if STATE.reconciled_ok is not True:
        problems.append("balance reconciliation failed or did not run")
    acked_ops_min = int(_option(environment, "walletd_min_acked_ops", 0))
    if STATE.acked_ops < acked_ops_min:
        # A run that acknowledged next to nothing reconciles trivially: it proves nothing.
        problems.append(
            f"only {STATE.acked_ops} acknowledged operations, fewer than"
            f" --walletd-min-acked-ops {acked_ops_min}"
        )
    if runner.exceptions:
        problems.append(f"{len(runner.exceptions)} distinct exceptions in user code")
    for problem in problems:
        log.error("walletd: FAIL: %s", problem)
    environment.process_exit_code = 1 if problems else 0


def _threshold_problems(environment: Environment) -> list[str]:
    total = environment.stats.total
    if total.num_requests == 0:
        return ["no request was made"]
    problems: list[str] = []
    max_error_ratio = float(_option(environment, "max_error_ratio", 0.0))
    if total.fail_ratio > max_error_ratio:
        problems.append(f"error ratio {total.fail_ratio:.5f} > --max-error-ratio {max_error_ratio}")
    max_p95_ms = float(_option(environment, "max_p95_ms", 0.0))
    p95_ms = total.get_response_time_percentile(0.95)
    if max_p95_ms > 0 and p95_ms > max_p95_ms:
        problems.append(f"p95 {p95_ms} ms > --max-p95-ms {max_p95_ms}")
    return problems


# ---------------------------------------------------------------------------------------------
# Judging responses. Each returns what the response says about the operation's effect.


def _succeed(response: ResponseContextManager) -> None:
    response.success()  # type: ignore[no-untyped-call]


def _fail(response: ResponseContextManager, why: str) -> None:
    response.failure(why)  # type: ignore[no-untyped-call]


def _problem_code(response: ResponseContextManager) -> str:
    try:
        body = orjson.loads(response.content or b"")
    except orjson.JSONDecodeError:
        return ""
    return str(body.get("code", "")) if isinstance(body, dict) else ""


def judge_operation(
    response: ResponseContextManager, wallet: str, refusal_ok: bool, floor_cents: int = 0
) -> tuple[Outcome, Any]:
    """Marks the request success/failure and classifies the operation's effect; a balance
    below ``floor_cents`` (0, or minus the wallet's overdraft limit) is a failure."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            body = orjson.loads(response.content or b"")
            balance_ok = body["id"] == wallet and parse_cents(str(body["balance"])) >= floor_cents
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            _fail(response, f"bad wallet JSON: {error}")
            return Outcome.APPLIED, None
        if balance_ok:
            _succeed(response)
        else:
            _fail(response, f"wrong wallet or negative balance: {body}")
        return Outcome.APPLIED, body
    if status == 409 and refusal_ok and _problem_code(response) == "INSUFFICIENT_FUNDS":
        _succeed(response)  # the expected outcome of an overdraft
        return Outcome.REFUSED, None
    if 400 <= status < 500:
        _fail(response, f"HTTP {status} {_problem_code(response)}")
        return Outcome.REFUSED, None
    # 5xx, or status 0 (connection error / timeout): the commit may or may not have happened.
    _fail(
        response,
        f"HTTP {status} {_problem_code(response)} {getattr(response, 'error', None) or ''}".strip(),
    )
    return Outcome.UNKNOWN, None


def judge_replay(
    response: ResponseContextManager, first_status: int, first_body: Any
) -> tuple[Outcome, Any]:
    """The retry of an applied operation must replay the first answer, byte-for-meaning."""
    headers = response.headers
    replayed = str(headers.get("Idempotent-Replayed", "")) if headers is not None else ""
    try:
        body = orjson.loads(response.content or b"")
    except orjson.JSONDecodeError:
        body = None
    if response.status_code != first_status:
        _fail(response, f"replay status {response.status_code} != {first_status}")
    elif replayed.lower() != "true":
        _fail(response, f"missing Idempotent-Replayed: true (got {replayed!r})")
    elif body != first_body:
        _fail(response, "replayed body differs from the first response")
    else:
        _succeed(response)
    return Outcome.APPLIED, body


# ---------------------------------------------------------------------------------------------
# Users


def _random_cents(low: int, high: int) -> int:
    return random.randint(low, high)


class WalletdUser(FastHttpUser):
    """Shared plumbing: wait for wallets, send an operation, tally its outcome."""

    abstract = True
    wait_time = constant(0)  # closed loop: the user count is the concurrency

    def on_start(self) -> None:
        if not STATE.ready.wait(timeout=WALLETS_READY_WAIT_S_MAX):
            raise RuntimeError("walletd wallets were not ready in time")
        self.auth = _auth_headers(self.environment)

    def _post(
        self, wallet: str, delta_cents: int, name: str, idempotency_key: str | None
    ) -> ResponseContextManager:
        operation = "DEPOSIT" if delta_cents > 0 else "WITHDRAW"
        headers = dict(self.auth)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        result: ResponseContextManager = self.client.post(
            f"{API}/{wallet}/operation",
            json={"operation_type": operation, "amount": format_cents(abs(delta_cents))},
            headers=headers,
            name=name,
            catch_response=True,
        )
        return result

    def operate(
        self,
        wallet: str,
        delta_cents: int,
        name: str,
        refusal_ok: bool = False,
        floor_cents: int = 0,
    ) -> None:
        outcome = Outcome.UNKNOWN
        try:
            with self._post(wallet, delta_cents, name, None) as response:
                outcome, _ = judge_operation(response, wallet, refusal_ok, floor_cents)
        finally:
            # Also on GreenletExit: a user killed mid-request leaves the outcome unknown.
            STATE.ledger.record(wallet, delta_cents, outcome)

    def read(self, wallet: str) -> None:
        with self.client.get(
            f"{API}/{wallet}", headers=self.auth, name="GET wallet", catch_response=True
        ) as response:
            if response.status_code != 200:
                _fail(response, f"HTTP {response.status_code} {_problem_code(response)}")
                return
            try:
                parse_cents(str(orjson.loads(response.content or b"")["balance"]))
                _succeed(response)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                _fail(response, f"bad wallet JSON: {error}")


class HotWalletUser(WalletdUser):
    """Every user deposits into one wallet: the single-wallet contention case."""

    @tag("hot", "deposit")
    @task
    def deposit_hot(self) -> None:
        self.operate(STATE.hot_wallet, _random_cents(1, 10_000), "POST deposit [hot]")


class UniformUser(WalletdUser):
    """Operations spread over many wallets."""

    @tag("uniform", "deposit")
    @task(4)
    def deposit(self) -> None:
        wallet = random.choice(STATE.uniform_wallets)
        self.operate(wallet, _random_cents(1, 10_000), "POST deposit [uniform]")

    @tag("uniform", "withdraw")
    @task(1)
    def withdraw(self) -> None:
        wallet = random.choice(STATE.uniform_wallets)
        self.operate(wallet, -_random_cents(1, 1_000), "POST withdraw [uniform]", refusal_ok=True)


class ReadHeavyUser(WalletdUser):
    """Mostly reads: balances and history pages, with an occasional deposit."""

    @tag("read")
    @task(7)
    def get_wallet(self) -> None:
        self.read(random.choice(STATE.uniform_wallets))

    @tag("read", "history")
    @task(2)
    def get_history(self) -> None:
        wallet = random.choice(STATE.uniform_wallets)
        with self.client.get(
            f"{API}/{wallet}/operations?limit=20",
            headers=self.auth,
            name="GET history",
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                _succeed(response)
            else:
                _fail(response, f"HTTP {response.status_code} {_problem_code(response)}")

    @tag("deposit")
    @task(1)
    def deposit(self) -> None:
        wallet = random.choice(STATE.uniform_wallets)
        self.operate(wallet, _random_cents(1, 10_000), "POST deposit [read-heavy]")


class OverdraftUser(WalletdUser):
    """Withdrawals larger than deposits on few wallets: 409 INSUFFICIENT_FUNDS is expected."""

    @tag("overdraft", "deposit")
    @task
    def deposit(self) -> None:
        wallet = random.choice(STATE.overdraft_wallets)
        self.operate(wallet, _random_cents(1, 500), "POST deposit [overdraft]")

    @tag("overdraft", "withdraw")
    @task
    def withdraw(self) -> None:
        wallet = random.choice(STATE.overdraft_wallets)
        self.operate(wallet, -_random_cents(1, 1_000), "POST withdraw [overdraft]", refusal_ok=True)


class CreditLimitUser(WalletdUser):
    """Wallets with an overdraft limit: withdrawals take balances below zero, down to
    -limit and never further (a balance below it fails the request; past it, 409
    INSUFFICIENT_FUNDS is expected), deposits bring them back."""

    @tag("credit", "deposit")
    @task(2)
    def deposit(self) -> None:
        wallet = random.choice(STATE.credit_wallets)
        self.operate(
            wallet, _random_cents(1, 1_000), "POST deposit [credit]",
            floor_cents=-STATE.credit_limit_cents,
        )  # fmt: skip

    @tag("credit", "withdraw")
    @task(3)
    def withdraw(self) -> None:
        wallet = random.choice(STATE.credit_wallets)
        self.operate(
            wallet, -_random_cents(1, 1_500), "POST withdraw [credit]", refusal_ok=True,
            floor_cents=-STATE.credit_limit_cents,
        )  # fmt: skip


class IdempotentRetryUser(WalletdUser):
    """Sends each operation twice with one Idempotency-Key; the second must be a replay."""

    @tag("idempotent", "deposit")
    @task(4)
    def deposit_twice(self) -> None:
        self.operate_twice(random.choice(STATE.uniform_wallets), _random_cents(1, 10_000))

    @tag("idempotent", "withdraw")
    @task(1)
    def withdraw_twice(self) -> None:
        self.operate_twice(random.choice(STATE.uniform_wallets), -_random_cents(1, 1_000))

    def operate_twice(self, wallet: str, delta_cents: int) -> None:
        key = uuid.uuid4().hex
        outcome = Outcome.UNKNOWN
        try:
            with self._post(wallet, delta_cents, "POST op [idem first]", key) as response:
                outcome, first_body = judge_operation(response, wallet, refusal_ok=True)
                first_status = response.status_code
            with self._post(wallet, delta_cents, "POST op [idem retry]", key) as response:
                if outcome is Outcome.APPLIED:
                    judge_replay(response, first_status, first_body)
                else:
                    # A refused request does not consume its key, and an unknown one is
                    # resolved by the retry: either way the retry's own outcome is the truth.
                    outcome, _ = judge_operation(response, wallet, refusal_ok=True)
        finally:
            STATE.ledger.record(wallet, delta_cents, outcome)


class BulkUser(WalletdUser):
    """Bulk requests of --walletd-bulk-items deposits and withdrawals over many wallets, each
    item with its own key; every item's result is tallied (a 409 withdrawal is fine)."""

    @tag("bulk", "deposit", "withdraw")
    @task
    def bulk(self) -> None:
        size = int(_option(self.environment, "walletd_bulk_items", 100))
        plan = [
            (
                random.choice(STATE.uniform_wallets),
                _random_cents(1, 10_000) if random.random() < 0.8 else -_random_cents(1, 1_000),
            )
            for _ in range(size)
        ]
        items = [
            {
                "wallet_id": wallet,
                "operation_type": "DEPOSIT" if delta > 0 else "WITHDRAW",
                "amount": format_cents(abs(delta)),
                "idempotency_key": uuid.uuid4().hex,
            }
            for wallet, delta in plan
        ]
        outcomes = [Outcome.UNKNOWN] * size
        try:
            with self.client.post(
                BULK_PATH,
                json={"items": items},
                headers=self.auth,
                name="POST bulk",
                catch_response=True,
            ) as response:
                outcomes = judge_bulk(response, plan)
        finally:
            for (wallet, delta), outcome in zip(plan, outcomes, strict=True):
                STATE.ledger.record(wallet, delta, outcome)


def judge_bulk(response: ResponseContextManager, plan: list[tuple[str, int]]) -> list[Outcome]:
    """Each item's outcome from a bulk answer; the request fails on anything unexpected."""
    unknown = [Outcome.UNKNOWN] * len(plan)
    if response.status_code != 200:
        _fail(response, f"HTTP {response.status_code} {_problem_code(response)}")
        # A refused bulk request (4xx, 503 OVERLOADED) queued nothing; other failures may
        # hide commits.
        refused = 400 <= response.status_code < 500 or _problem_code(response) == "OVERLOADED"
        return [Outcome.REFUSED] * len(plan) if refused else unknown
    try:
        results = orjson.loads(response.content or b"")["results"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as error:
        _fail(response, f"bad bulk JSON: {error}")
        return unknown
    outcomes: list[Outcome] = []
    problems: list[str] = []
    for (_wallet, delta), result in zip(plan, results, strict=True):
        status = result.get("status")
        if status == 200:
            outcomes.append(Outcome.APPLIED)
        elif status == 409 and delta < 0 and result["body"].get("code") == "INSUFFICIENT_FUNDS":
            outcomes.append(Outcome.REFUSED)
        elif status == 503:
            outcomes.append(Outcome.UNKNOWN)
            problems.append("item 503")
        else:
            outcomes.append(Outcome.REFUSED)
            problems.append(f"item {status} {result['body'].get('code')}")
    if problems:
        _fail(response, "; ".join(sorted(set(problems))))
    else:
        _succeed(response)
    return outcomes


# (sender, receiver, cents) of COMPLETED transfers by id, and the postings of COMPLETED
# payments by id: what TransferUser refunds (per process; a refund's outcome is tallied
# like any movement, so other processes' refunds need not be known).
_TRANSFERS_DONE: deque[tuple[str, str, str, int]] = deque(maxlen=REFUNDABLE_MAX)
_PAYMENTS_DONE: deque[tuple[str, list[tuple[str, str, int]]]] = deque(maxlen=REFUNDABLE_MAX)


class TransferUser(WalletdUser):
    """Transfers between random pairs of wallets (POST /api/v1/transfers), and payments of
    two postings from one wallet to two others (POST /api/v1/payments): each one moves money
    without changing the global sum; 409 INSUFFICIENT_FUNDS is an expected refusal. A
    payment's postings share its one outcome (all applied, or none), which the per-wallet
    reconciliation checks. Refunds give money back the other way: part or all of a
    transfer (POST /transfers/{id}/refunds), every posting of a payment (POST
    /payments/{id}/refunds, each posting's refund tallied on its own); reversals take a
    deposit back out or put a withdrawal back (POST .../operations/{seq}/reversal). 409
    REFUND_EXCEEDS_TRANSFER (refunds of one transfer racing) and the receiver's
    INSUFFICIENT_FUNDS are expected refusals."""

    @tag("transfer", "payment")
    @task
    def payment(self) -> None:
        sender, merchant, platform = random.sample(STATE.uniform_wallets, 3)
        postings = [(merchant, _random_cents(1, 2_000)), (platform, _random_cents(1, 100))]
        outcome = Outcome.UNKNOWN
        try:
            with self.client.post(
                "/api/v1/payments",
                json={
                    "postings": [
                        {
                            "from_wallet_id": sender,
                            "to_wallet_id": receiver,
                            "amount": format_cents(cents),
                        }
                        for receiver, cents in postings
                    ]
                },
                headers=self.auth,
                name="POST payment",
                catch_response=True,
            ) as response:
                outcome = judge_transfer(response)
                if outcome is Outcome.APPLIED:
                    _remember_payment(response, sender, postings)
        finally:
            for receiver, cents in postings:
                STATE.ledger.record(sender, -cents, outcome)
                STATE.ledger.record(receiver, cents, outcome)

    @tag("transfer")
    @task
    def transfer(self) -> None:
        sender, receiver = random.sample(STATE.uniform_wallets, 2)
        cents = _random_cents(1, 2_000)
        outcome = Outcome.UNKNOWN
        try:
            with self.client.post(
                "/api/v1/transfers",
                json={
                    "from_wallet_id": sender,
                    "to_wallet_id": receiver,
                    "amount": format_cents(cents),
                },
                headers=self.auth,
                name="POST transfer",
                catch_response=True,
            ) as response:
                outcome = judge_transfer(response)
                if outcome is Outcome.APPLIED:
                    transfer_id = _json_field(response, "id")
                    if transfer_id is not None:
                        _TRANSFERS_DONE.append((transfer_id, sender, receiver, cents))
        finally:
            # Both sides of one transfer share its outcome; an unknown one may also be
            # PENDING at the end (debited, not yet credited): within the per-wallet bounds.
            STATE.ledger.record(sender, -cents, outcome)
            STATE.ledger.record(receiver, cents, outcome)

    @tag("transfer", "refund")
    @task
    def refund(self) -> None:
        """Part of a COMPLETED transfer (sometimes more than is left: 409), or all that is
        left (no amount: the answer says how much)."""
        if not _TRANSFERS_DONE:
            return
        transfer_id, sender, receiver, total = random.choice(_TRANSFERS_DONE)
        cents = None if random.random() < 0.25 else _random_cents(1, total)
        moved, outcome = cents or total, Outcome.UNKNOWN
        try:
            with self.client.post(
                f"/api/v1/transfers/{transfer_id}/refunds",
                json={} if cents is None else {"amount": format_cents(cents)},
                headers={**self.auth, "Idempotency-Key": str(uuid.uuid4())},
                name="POST refund",
                catch_response=True,
            ) as response:
                outcome = judge_refund(response)
                if outcome is Outcome.APPLIED:
                    moved = _refunded_cents(response, moved)
        finally:
            # Back from the receiver to the sender; an unknown outcome within its bound
            # (at most the transfer's amount).
            STATE.ledger.record(receiver, -moved, outcome)
            STATE.ledger.record(sender, moved, outcome)

    @tag("payment", "refund")
    @task
    def refund_payment(self) -> None:
        """Every posting of a COMPLETED payment, all that is left of each: a result per
        posting (a posting's receiver may be short: that posting alone is refused)."""
        if not _PAYMENTS_DONE:
            return
        payment_id, postings = random.choice(_PAYMENTS_DONE)
        outcomes = [(Outcome.UNKNOWN, cents) for _sender, _receiver, cents in postings]
        try:
            with self.client.post(
                f"/api/v1/payments/{payment_id}/refunds",
                headers={**self.auth, "Idempotency-Key": str(uuid.uuid4())},
                name="POST payment refund",
                catch_response=True,
            ) as response:
                outcomes = judge_payment_refund(response, outcomes)
        finally:
            for (sender, receiver, _cents), (outcome, moved) in zip(
                postings, outcomes, strict=True
            ):
                STATE.ledger.record(receiver, -moved, outcome)
                STATE.ledger.record(sender, moved, outcome)

    @tag("reversal")
    @task
    def reverse(self) -> None:
        """A deposit (or a withdrawal) of one of the wallets, then its reversal: the
        deposit's may be refused (409 INSUFFICIENT_FUNDS: others spent it meanwhile)."""
        wallet = random.choice(STATE.uniform_wallets)
        cents = _random_cents(1, 500) * (1 if random.random() < 0.7 else -1)
        outcome, seq = Outcome.UNKNOWN, None
        try:
            with self._post(wallet, cents, "POST operation (to reverse)", None) as response:
                outcome, _ = judge_operation(response, wallet, True, 0)
                if outcome is Outcome.APPLIED:
                    seq = _etag_seq(response)
        finally:
            STATE.ledger.record(wallet, cents, outcome)
        if seq is None:
            return
        outcome = Outcome.UNKNOWN
        try:
            with self.client.post(
                f"{API}/{wallet}/operations/{seq}/reversal",
                json={"reason": "load test"},
                headers={**self.auth, "Idempotency-Key": str(uuid.uuid4())},
                name="POST reversal",
                catch_response=True,
            ) as response:
                outcome = judge_reversal(response)
        finally:
            STATE.ledger.record(wallet, -cents, outcome)


class CurrencyUser(WalletdUser):
    """Wallets in two currencies (USD, JPY): deposits of whole units, and transfers between
    random pairs. Within one currency they move money (409 INSUFFICIENT_FUNDS is fine);
    across two they must be refused 422 CURRENCY_MISMATCH with nothing moved. The end
    check reconciles every wallet and each currency's sum on its own."""

    @tag("currency")
    @task
    def deposit(self) -> None:
        wallet = random.choice(list(STATE.currency_of))
        self.operate(wallet, random.randint(1, 50) * 100, "POST deposit (currency)")

    @tag("currency", "transfer")
    @task(2)
    def transfer(self) -> None:
        sender, receiver = random.sample(list(STATE.currency_of), 2)
        cents = random.randint(1, 20) * 100  # whole units: every currency holds them
        across = STATE.currency_of[sender] != STATE.currency_of[receiver]
        outcome = Outcome.UNKNOWN
        try:
            with self.client.post(
                "/api/v1/transfers",
                json={
                    "from_wallet_id": sender,
                    "to_wallet_id": receiver,
                    "amount": str(cents // 100),
                },
                headers=self.auth,
                name="POST transfer (across currencies)" if across else "POST transfer (currency)",
                catch_response=True,
            ) as response:
                outcome = judge_currency_transfer(response, across)
        finally:
            STATE.ledger.record(sender, -cents, outcome)
            STATE.ledger.record(receiver, cents, outcome)


def judge_currency_transfer(response: ResponseContextManager, across: bool) -> Outcome:
    """Across two currencies only 422 CURRENCY_MISMATCH is right (nothing moved); within
    one, as any transfer."""
    if not across:
        return judge_transfer(response)
    if response.status_code == 422 and _problem_code(response) == "CURRENCY_MISMATCH":
        _succeed(response)
        return Outcome.REFUSED
    _fail(response, f"across currencies: HTTP {response.status_code} {_problem_code(response)}")
    return Outcome.REFUSED if 400 <= response.status_code < 500 else Outcome.UNKNOWN


def _json_field(response: ResponseContextManager, name: str) -> str | None:
    try:
        value = orjson.loads(response.content or b"")[name]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return str(value)


def _remember_payment(
    response: ResponseContextManager, sender: str, postings: list[tuple[str, int]]
) -> None:
    try:
        body = orjson.loads(response.content or b"")
        payment_id = str(body["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return
    _PAYMENTS_DONE.append((payment_id, [(sender, receiver, cents) for receiver, cents in postings]))


def _refunded_cents(response: ResponseContextManager, bound: int) -> int:
    amount = _json_field(response, "amount")
    try:
        return bound if amount is None else parse_cents(amount)
    except ValueError:
        return bound


def _etag_seq(response: ResponseContextManager) -> int | None:
    """The wallet's seq after an operation (its ETag, "<seq>"): the operation's row."""
    etag = None if response.headers is None else response.headers.get("ETag")
    if not isinstance(etag, str):
        return None
    digits = etag.strip('"')
    return int(digits) if digits.isdigit() else None


# A refund or reversal refused for money (not applied, nothing owed): the receiver short,
# or the refunds of the transfer at its amount already (another user's refund raced).
_MONEY_REFUSALS = frozenset({"INSUFFICIENT_FUNDS", "REFUND_EXCEEDS_TRANSFER"})


def _judge_undo(response: ResponseContextManager, applied_status: int) -> Outcome:
    """A refund (201) or a reversal (200): applied, refused for money, or a failure."""
    status = response.status_code
    if status == applied_status:
        _succeed(response)
        return Outcome.APPLIED
    if status == 409 and _problem_code(response) in _MONEY_REFUSALS:
        _succeed(response)
        return Outcome.REFUSED
    _fail(response, f"HTTP {status} {_problem_code(response)}")
    return Outcome.REFUSED if 400 <= status < 500 else Outcome.UNKNOWN


def judge_refund(response: ResponseContextManager) -> Outcome:
    return _judge_undo(response, 201)


def judge_payment_refund(
    response: ResponseContextManager, unknown: list[tuple[Outcome, int]]
) -> list[tuple[Outcome, int]]:
    """Each posting's (outcome, cents moved) from its result; every posting unknown (at
    most its amount) without a 200."""
    status = response.status_code
    if status != 200:
        _fail(response, f"HTTP {status} {_problem_code(response)}")
        if 400 <= status < 500:
            return [(Outcome.REFUSED, cents) for _outcome, cents in unknown]
        return unknown
    try:
        results = orjson.loads(response.content or b"")["results"]
        outcomes: list[tuple[Outcome, int]] = []
        problems: list[str] = []
        for result, (_outcome, bound) in zip(results, unknown, strict=True):
            item_status, body = int(result["status"]), result["body"]
            if item_status == 201:
                outcomes.append((Outcome.APPLIED, parse_cents(str(body["amount"]))))
            elif item_status == 409 and body.get("code") in _MONEY_REFUSALS:
                outcomes.append((Outcome.REFUSED, bound))
            else:
                problems.append(f"posting: HTTP {item_status} {body.get('code')}")
                known = 400 <= item_status < 500
                outcomes.append((Outcome.REFUSED if known else Outcome.UNKNOWN, bound))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        _fail(response, f"bad payment refund JSON: {error}")
        return unknown
    if problems:
        _fail(response, "; ".join(problems))
    else:
        _succeed(response)
    return outcomes


def judge_reversal(response: ResponseContextManager) -> Outcome:
    return _judge_undo(response, 200)


def judge_transfer(response: ResponseContextManager) -> Outcome:
    status = response.status_code
    if status == 201:
        try:
            completed = orjson.loads(response.content or b"")["status"] == "COMPLETED"
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            _fail(response, f"bad transfer or payment JSON: {error}")
            return Outcome.APPLIED
        if completed:
            _succeed(response)
        else:
            _fail(response, "a 201 transfer or payment that is not COMPLETED")
        return Outcome.APPLIED
    if status == 409 and _problem_code(response) == "INSUFFICIENT_FUNDS":
        _succeed(response)
        return Outcome.REFUSED
    if 400 <= status < 500:
        _fail(response, f"HTTP {status} {_problem_code(response)}")
        return Outcome.REFUSED
    _fail(response, f"HTTP {status} {_problem_code(response)}")
    return Outcome.UNKNOWN


_listen(events.init_command_line_parser, _add_options)
_listen(events.init, _on_init)
_listen(events.test_start, _on_test_start)
_listen(events.test_stop, _on_test_stop)
_listen(events.quitting, _on_quitting)
