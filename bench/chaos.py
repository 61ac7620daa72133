"""Chaos: concurrent rollouts across several ``dmm serve`` processes while one after another is killed;
does every episode finish, and with the actions it would have had without the kills?

Starts ``--servers`` servers on one store (a fresh paper-size DMM, or ``--store``/``--name``) and
``--sessions`` lanes of episodes spread over ``--client-procs`` client processes. Each lane plays
episodes back to back through one ``PolicyClient`` given every server's address, one Act stream per
episode (what a robot runs), episode ``i`` reset with seed ``--seed + i``. Every ``--kill-every``
seconds one server (in turn) is SIGKILLed and restarted on the same port, for ``--duration`` seconds;
with ``--rolling`` the servers are instead SIGTERMed (drained) one after the other, each restarted
before the next drains. The clients' streams fail over and resume their episodes on a live server.

Reported: episodes completed and lost (a rollout that raised), failovers, resume latency as the
client sees it (from the failed request to its answer on another server, backoff included:
``RolloutResult.resume_seconds``), and whether each completed episode's return and length equal an
uninterrupted reference run of the same episodes on one fresh server (window mode: they must; the
servers run ``--max-batch 1`` by default, so no forward depends on which sessions shared it).

    python -m bench.chaos                               # 16 lanes, 2 servers, a kill every 20 s, 3 min
    python -m bench.chaos --rolling --duration 60       # a rolling restart of both servers
    python -m bench.chaos --quick
    python -m bench.chaos --mode recurrent --resume-after 999 --sessions 1   # resume latency only
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    header,
    markdown_table,
    new_figure,
    parse,
    parser,
    run_worker,
    serve_worker,
    write_report,
)
from bench.serve import FRESH_NAME

SCRIPT = "chaos"
DEFAULT_ENV = "halfcheetah-medium-sim-v4"  # never ends early: every episode runs its full length
MODULE = f"bench.{SCRIPT}"
SERVER_ENV = {"OMP_NUM_THREADS": "1"}  # servers and clients share a few cores: no spinning threads
STARTUP_TIMEOUT_S = 180.0
SETTINGS = (
    "servers",
    "sessions",
    "client_procs",
    "duration",
    "kill_every",
    "rolling",
    "mode",
    "env",
    "seed",
    "max_episode_steps",
    "max_batch",
    "failover_backoff",
    "max_reconnect_backoff_ms",
    "restart_delay",
    "resume_after",
    "rounds",
)


# ------------------------------------------------------------------------------------- clients


def _play_lane(spec: dict[str, Any], episodes: Iterable[int], stop: Callable[[], bool]) -> list[dict]:
    """Play ``episodes`` one after another until ``stop()``; one record per episode started."""
    from dmm.client import PolicyClient

    records = []
    first = spec["lane"] % len(spec["targets"])  # lanes start on different servers: the load is spread
    targets = spec["targets"][first:] + spec["targets"][:first]
    options = []
    if spec["max_reconnect_backoff_ms"] is not None:  # how soon a channel tries a restarted server again
        backoff_ms = spec["max_reconnect_backoff_ms"]
        options = [
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ]
    with PolicyClient(targets, failover_backoff_s=spec["failover_backoff_s"], options=options) as client:
        for index in episodes:
            if stop():
                break
            record: dict[str, Any] = {"episode": index}
            try:
                result = client.rollout(
                    env=spec["env"], episodes=1, num_envs=1, seed=spec["seed"] + index, model=spec["model"],
                    version=spec["version"], mode=spec["mode"], progress=False,
                    max_episode_steps=spec["max_episode_steps"], vectorized=False,
                )  # fmt: skip
            except Exception as err:
                record["error"] = f"{type(err).__name__}: {err}"
            else:
                record.update(
                    episode_return=result.returns[0], length=result.lengths[0],
                    failovers=result.failovers, resume_s=result.resume_seconds,
                )  # fmt: skip
            records.append(record)
    return records


def _client_work(spec: dict[str, Any]) -> dict[str, Any]:
    """A client process: its lanes in threads. Chaos lanes play episodes ``lane, lane + lanes, ...``
    until the stop file appears; reference lanes play the ``episodes`` listed, split between them."""
    stop_file = Path(spec["stop_file"]) if spec.get("stop_file") else None
    lanes: list[Iterable[int]]
    if spec.get("episodes") is not None:
        lanes = [spec["episodes"][lane :: spec["lanes_total"]] for lane in spec["lanes"]]
    else:
        lanes = [itertools.count(lane, spec["lanes_total"]) for lane in spec["lanes"]]
    with ThreadPoolExecutor(len(lanes), thread_name_prefix="chaos-lane") as pool:
        futures = [
            pool.submit(
                _play_lane,
                {**spec, "lane": lane},
                episodes,
                lambda: stop_file is not None and stop_file.exists(),
            )
            for lane, episodes in zip(spec["lanes"], lanes, strict=True)
        ]
        return {"records": [r for f in futures for r in f.result()]}


def _run_clients(spec: dict[str, Any], procs: int, lanes: int, timeout_s: float) -> list[dict]:
    """Run ``procs`` client processes sharing ``lanes`` lanes; their records, in episode order. A client
    process that fails ends the benchmark: its episodes were never measured."""
    specs = [{**spec, "lanes": list(range(k, lanes, procs)), "lanes_total": lanes} for k in range(procs)]
    specs = [s for s in specs if s["lanes"]]
    with ThreadPoolExecutor(len(specs)) as pool:
        reports = list(pool.map(lambda s: run_worker(MODULE, s, timeout_s), specs))
    failed = [r["error"] for r in reports if "error" in r]
    if failed:
        raise SystemExit(f"{MODULE}: a client process failed: {failed[0]}")
    return sorted((r for report in reports for r in report["records"]), key=lambda r: r["episode"])


# ------------------------------------------------------------------------------------- servers


class _Fleet:
    """The servers on one store: started on free ports, then killed or drained and restarted each on
    its own port, so the clients' channels find it again there."""

    def __init__(self, store: Path, args: argparse.Namespace, count: int) -> None:
        self.store = store
        self.args = ["--mode", args.mode, "--max-batch", str(args.max_batch), "--grace", str(args.grace)]
        self.servers = [self._start([]) for _ in range(count)]

    @property
    def targets(self) -> list[str]:
        return [s.target for s in self.servers]

    def _start(self, extra: list[str]) -> Any:
        from dmm.server.testing import ServerProcess

        server = ServerProcess(
            self.store, [*self.args, *extra], startup_timeout_s=STARTUP_TIMEOUT_S, env=SERVER_ENV
        )
        try:
            return server.start()
        except RuntimeError as err:
            raise SystemExit(f"{MODULE}: {err}") from err

    def _restart(self, i: int) -> float:
        """Start server ``i`` again on its port; seconds until it was SERVING."""
        t0 = time.monotonic()
        self.servers[i] = self._start(["--port", str(self.servers[i].port)])
        return time.monotonic() - t0

    def kill(self, i: int, restart_delay: float = 0.0) -> dict[str, Any]:
        """SIGKILL server ``i`` and restart it, ``restart_delay`` seconds later."""
        self.servers[i].kill()
        time.sleep(restart_delay)
        return {"server": i, "signal": "SIGKILL", "restart_s": restart_delay + self._restart(i)}

    def drain(self, i: int, grace_s: float) -> dict[str, Any]:
        """SIGTERM server ``i``, wait until its drain ends, and restart it."""
        t0 = time.monotonic()
        code = self.servers[i].terminate(timeout_s=grace_s + 60)
        drain_s = time.monotonic() - t0
        return {
            "server": i,
            "signal": "SIGTERM",
            "exit": code,
            "drain_s": drain_s,
            "restart_s": self._restart(i),
        }

    def close(self) -> None:
        for server in self.servers:
            server.kill()


def _kills(fleet: _Fleet, args: argparse.Namespace, started: float) -> list[dict[str, Any]]:
    """Every ``--kill-every`` seconds (or once the last restart is done, if later) SIGKILL the next
    server in turn and restart it, until ``--duration``."""
    events: list[dict[str, Any]] = []
    next_at = started + args.kill_every
    while next_at < started + args.duration:
        time.sleep(max(0.0, next_at - time.monotonic()))
        at = time.monotonic() - started
        events.append({"at_s": at, **fleet.kill(len(events) % len(fleet.servers), args.restart_delay)})
        print(f"{at:6.1f} s: killed and restarted server {events[-1]['server']}", file=sys.stderr, flush=True)
        next_at = max(next_at + args.kill_every, time.monotonic())
    time.sleep(max(0.0, started + args.duration - time.monotonic()))
    return events


def _rolling(fleet: _Fleet, args: argparse.Namespace, started: float) -> list[dict[str, Any]]:
    """After ``--kill-every`` seconds drain each server in turn (SIGTERM) and restart it before the
    next drains; the load goes on until ``--duration`` and at least ``--kill-every`` s after the last."""
    events: list[dict[str, Any]] = []
    time.sleep(args.kill_every)
    for i in range(len(fleet.servers)):
        at = time.monotonic() - started
        events.append({"at_s": at, **fleet.drain(i, args.grace)})
        print(f"{at:6.1f} s: drained and restarted server {i}", file=sys.stderr, flush=True)
    end = max(started + args.duration, time.monotonic() + args.kill_every)
    time.sleep(max(0.0, end - time.monotonic()))
    return events


# ------------------------------------------------------------------------- resume latency


def _session(
    spec: dict[str, Any], index: int, steps: int, barrier: threading.Barrier | None = None
) -> dict[str, Any]:
    """One Act stream on ``spec["targets"][0]``: ``steps`` steps of random states; with a ``barrier``,
    then (once the benchmark killed that server, past ``barrier``) one more step, which resumes on
    another server."""
    from dmm.client import PolicyClient
    from dmm.client.policy_client import _ActActor
    from dmm.envs import env_spec
    from dmm.episodes import Step
    from dmm.v1 import policy_pb2
    from dmm.v1.modes import MODE_ENUM

    dims = env_spec(spec["env"])
    start = policy_pb2.Start(model=spec["model"], mode=MODE_ENUM[spec["mode"]], state_dim=dims.obs_dim)
    rng = np.random.default_rng(spec["seed"] + index)
    one, no = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=bool)
    with PolicyClient(spec["targets"], failover_backoff_s=spec["failover_backoff_s"]) as client:
        actor = _ActActor(client._servers, start)
        actor.start(1)
        for t in range(steps + (barrier is not None)):
            if t == steps and barrier is not None:
                barrier.wait()  # every session has played its steps; the benchmark kills the server
                barrier.wait()
            states = rng.normal(size=(1, dims.obs_dim)).astype(np.float32)
            rewards = None if t == 0 else rng.normal(size=1)
            actor.act(Step(one, states, np.zeros(1), rewards, no))
        actor.cancel()
    stream = actor.resumable
    return {"resume_s": stream.resume_seconds, "failovers": stream.failovers}


def resume_latency(args: argparse.Namespace, store: Path, model: str) -> dict[str, Any]:
    """``--rounds`` rounds: ``--sessions`` Act streams play ``--resume-after`` steps on one server,
    which is SIGKILLed; each stream's next step resumes on another server. The killed server is
    restarted after the round (its start does not share the CPU with the resumes) and has served a
    session before the next round, which kills the next server."""
    fleet = _Fleet(store, args, args.servers)
    rounds = []
    try:
        for r in range(args.rounds):
            k = r % args.servers
            targets = fleet.targets[k:] + fleet.targets[:k]  # every session starts on server k
            spec = _spec(args, model, targets, resume_after=args.resume_after)
            barrier = threading.Barrier(args.sessions + 1, timeout=_timeout(args))
            with ThreadPoolExecutor(args.sessions, thread_name_prefix="resume") as pool:
                futures = [
                    pool.submit(_session, spec, i, args.resume_after, barrier) for i in range(args.sessions)
                ]
                barrier.wait()
                fleet.servers[k].kill()
                barrier.wait()
                sessions = [f.result() for f in futures]
            fleet.kill(k)  # already dead: restarted on its port
            # A server loads the model at its first session: one that has served for a while (as in the
            # chaos run) did that long ago.
            _session({**spec, "targets": [fleet.targets[k]]}, 0, 2)
            resumes = [t for s in sessions for t in s["resume_s"]]
            rounds.append({"server": k, "sessions": sessions, "resume_s": resumes})
            print(f"round {r}: server {k} killed, {len(resumes)} resumes", file=sys.stderr, flush=True)
    finally:
        fleet.close()
    return {"rounds": rounds}


def _report_resume_latency(
    args: argparse.Namespace, argv: Sequence[str], run: dict[str, Any], source: str
) -> int:
    resumes = np.asarray([t for r in run["rounds"] for t in r["resume_s"]])
    summary = {
        "mode": args.mode,
        "history_steps": args.resume_after,
        "sessions": args.sessions,
        "rounds": args.rounds,
        "resumes": int(resumes.size),
        "resume_p50_ms": _ms(resumes, 50),
        "resume_p99_ms": _ms(resumes, 99),
        "resume_max_ms": _ms(resumes, 100),
    }
    table = markdown_table(list(summary), [[_cell(v) for v in summary.values()]])
    fig, axes = new_figure()
    axes[0][0].hist(resumes * 1e3 if resumes.size else [0.0], bins=30)
    axes[0][0].set(xlabel="resume latency (ms)", ylabel="resumed requests", title="resume after a SIGKILL")
    payload = {**header(SCRIPT, argv), "model": source, "settings": {k: getattr(args, k) for k in SETTINGS}}
    payload |= {"summary": summary, "rounds": run["rounds"]}
    notes = [
        f"model: {source}; {args.servers} servers (`--mode {args.mode} --max-batch {args.max_batch}`, one "
        f"torch thread each); per round {args.sessions} Act streams (PolicyClient given every server, "
        f"each its own client) play {args.resume_after} steps of random states on one server, which is "
        "then SIGKILLed; each stream's next step resumes on another server with the episode so far",
        "resume latency: from the client seeing its stream fail to the answer to that step on another "
        "server (`RolloutResult.resume_seconds`); the killed server restarts after the round and serves "
        "one short session (it loads the model) before the next",
    ]
    write_report(args.out, SCRIPT, "Resume latency after a SIGKILL", table, payload, fig, notes)
    return 0 if resumes.size == args.sessions * args.rounds else 1


# ----------------------------------------------------------------------------------------- run


def _spec(args: argparse.Namespace, model: str, targets: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "targets": targets, "model": model, "env": args.env, "version": args.version, "mode": args.mode,
        "seed": args.seed, "max_episode_steps": args.max_episode_steps,
        "failover_backoff_s": args.failover_backoff,
        "max_reconnect_backoff_ms": args.max_reconnect_backoff_ms, **extra,
    }  # fmt: skip


def chaos(args: argparse.Namespace, store: Path, model: str, tmp: Path) -> dict[str, Any]:
    """The run under kills or drains: the clients' records, the schedule's events and the wall time."""
    stop_file = tmp / "stop"
    fleet = _Fleet(store, args, args.servers)
    try:
        spec = _spec(args, model, fleet.targets, stop_file=str(stop_file))
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            clients = pool.submit(_run_clients, spec, args.client_procs, args.sessions, _timeout(args))
            try:
                events = (_rolling if args.rolling else _kills)(fleet, args, started)
            finally:
                stop_file.touch()  # no new episodes; those in flight finish
            records = clients.result()
        wall_s = time.monotonic() - started
    finally:
        fleet.close()
    return {"records": records, "events": events, "wall_s": wall_s}


def reference(args: argparse.Namespace, store: Path, model: str, episodes: list[int]) -> list[dict]:
    """The same episodes (same seeds) on one fresh server that nothing interrupts."""
    if not episodes:
        return []
    fleet = _Fleet(store, args, 1)
    try:
        spec = _spec(args, model, fleet.targets, episodes=episodes)
        return _run_clients(spec, args.client_procs, args.sessions, _timeout(args))
    finally:
        fleet.close()


def _timeout(args: argparse.Namespace) -> float:
    """How long a client process may take: the run, the restarts, and time for the last episodes."""
    return args.duration + args.kill_every * (args.servers + 1) + 900.0


# -------------------------------------------------------------------------------------- report


def _ms(seconds: np.ndarray, q: float) -> float | None:
    return float(np.percentile(seconds, q) * 1e3) if seconds.size else None


def summarize(run: dict[str, Any], ref: list[dict]) -> dict[str, Any]:
    """Episodes completed and lost, failovers, resume latency, and how many completed episodes equal
    the reference run's (return and length: the env is deterministic, so equal actions give equal
    returns, and one different action almost surely does not)."""
    done = [r for r in run["records"] if "error" not in r]
    expected = {r["episode"]: (r["episode_return"], r["length"]) for r in ref if "error" not in r}
    compared = [r for r in done if r["episode"] in expected]
    equal = [r for r in compared if (r["episode_return"], r["length"]) == expected[r["episode"]]]
    resumes = np.asarray([t for r in done for t in r["resume_s"]])
    return {
        "events": len(run["events"]),
        "episodes": len(run["records"]),
        "completed": len(done),
        "lost": len(run["records"]) - len(done),
        "steps": sum(r["length"] for r in done),
        "failovers": sum(r["failovers"] for r in done),
        "episodes_resumed": sum(1 for r in done if r["resume_s"]),
        "resumes": int(resumes.size),
        "resume_p50_ms": _ms(resumes, 50),
        "resume_p99_ms": _ms(resumes, 99),
        "resume_max_ms": _ms(resumes, 100),
        "compared": len(compared),
        "equal_to_reference": len(equal),
        "resumed_equal_to_reference": sum(1 for r in equal if r["resume_s"]),
        "reference_lost": len(ref) - len(expected),
        "wall_s": run["wall_s"],
    }


def _report(
    args: argparse.Namespace, argv: Sequence[str], run: dict[str, Any], ref: list[dict], source: str
) -> int:
    summary = summarize(run, ref)
    lost = Counter(r["error"] for r in run["records"] if "error" in r)
    columns = ("events", "episodes", "completed", "lost", "failovers", "episodes_resumed", "resumes")
    columns += ("resume_p50_ms", "resume_p99_ms", "resume_max_ms", "compared", "equal_to_reference")
    cells = [_cell(summary[k]) for k in columns]
    schedule = "rolling restart (SIGTERM)" if args.rolling else f"SIGKILL every {args.kill_every:g} s"
    if args.restart_delay and not args.rolling:
        schedule += f", restart {args.restart_delay:g} s later"
    table = markdown_table(["schedule", *columns], [[schedule, *cells]])
    fig, axes = new_figure()
    resumes = [t * 1e3 for r in run["records"] for t in r.get("resume_s", [])]
    axes[0][0].hist(resumes or [0.0], bins=30)
    axes[0][0].set(xlabel="resume latency (ms)", ylabel="resumed requests", title=f"chaos: {schedule}")
    payload = {
        **header(SCRIPT, argv),
        "model": source,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "summary": summary,
        "events": run["events"],
        "lost": dict(lost),
        "records": run["records"],
    }
    notes = [
        f"model: {source}; env {args.env}; {args.servers} servers on one store (`--mode {args.mode} "
        f"--max-batch {args.max_batch}`, one torch thread each); {args.sessions} lanes of episodes over "
        f"{args.client_procs} client processes, one Act stream per episode, episode i seeded "
        f"{args.seed} + i; new episodes for {args.duration:g} s (the last episode ended "
        f"{summary['wall_s']:.0f} s in); client channels' reconnect backoff: "
        + (
            f"{args.max_reconnect_backoff_ms} ms"
            if args.max_reconnect_backoff_ms
            else "PolicyClient's default"
        ),
        f"schedule: {schedule}; each server restarted on its own port: "
        + ", ".join(_event_text(e) for e in run["events"]),
        "failovers: streams moved to another server (new episodes' starts included); resumes: requests "
        "answered on another server mid-episode; resume latency: from the client seeing its stream fail to "
        "that answer, backoff included (`RolloutResult.resume_seconds`)",
        f"reference: the completed episodes again on one fresh server with nothing interrupted; "
        f"{summary['equal_to_reference']} of {summary['compared']} equal in return and length "
        f"({summary['resumed_equal_to_reference']} of them resumed at least once)",
        *(f"lost: {k} x{v}" for k, v in lost.items()),
    ]
    write_report(args.out, SCRIPT, "Chaos: rollouts while servers die", table, payload, fig, notes)
    mismatched = args.mode == "window" and summary["equal_to_reference"] < summary["compared"]
    return 1 if summary["lost"] or summary["reference_lost"] or mismatched else 0


def _cell(value: Any) -> Any:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else value


def _event_text(event: dict[str, Any]) -> str:
    text = f"{event['signal']} server {event['server']} at {event['at_s']:.0f} s"
    if "drain_s" in event:
        text += f" (drained in {event['drain_s']:.1f} s, exit {event['exit']})"
    return text + f", SERVING again {event['restart_s']:.1f} s later"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(__doc__, SCRIPT, store=True)
    p.add_argument("--servers", type=int, default=2, help="dmm serve processes (default 2)")
    p.add_argument("--sessions", type=int, help="lanes of episodes in flight (default 16; 4 --quick)")
    p.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--duration", type=float, help="seconds of new episodes (default 180; 8 --quick)")
    p.add_argument("--kill-every", type=float, help="seconds between kills (default 20; 4 --quick)")
    p.add_argument("--rolling", action="store_true", help="drain (SIGTERM) each server once in turn instead")
    p.add_argument("--grace", type=float, default=10.0, help="the servers' --grace (default 10)")
    p.add_argument(
        "--restart-delay",
        type=float,
        default=0.0,
        help="seconds between a SIGKILL and the restart (default 0): a restart elsewhere (another node) "
        "does not take the CPU from the resumes",
    )
    p.add_argument("--mode", choices=("window", "recurrent"), default="window", help="default window")
    p.add_argument("--env", default=DEFAULT_ENV, help=f"episodes' env (default {DEFAULT_ENV})")
    p.add_argument("--seed", type=int, default=0, help="episode i resets with seed + i (default 0)")
    p.add_argument(
        "--max-episode-steps", type=int, help="cut episodes short (default: the env's limit; 200 --quick)"
    )
    p.add_argument("--max-batch", type=int, default=1, help="the servers' --max-batch (default 1)")
    p.add_argument(
        "--failover-backoff", type=float, default=0.05, help="PolicyClient's first backoff (default 0.05 s)"
    )
    p.add_argument(
        "--max-reconnect-backoff-ms",
        type=int,
        help="the client channels' reconnect backoff (default: PolicyClient's, 500 ms)",
    )
    p.add_argument(
        "--resume-after",
        type=int,
        help="instead of the chaos run, measure resume latency: --sessions streams play this many steps "
        "on one server, which is SIGKILLed, --rounds times (at most the model's max episode length - 1)",
    )
    p.add_argument("--rounds", type=int, default=10, help="rounds of --resume-after (default 10)")
    defaults = {"sessions": (16, 4), "duration": (180.0, 8.0), "kill_every": (20.0, 4.0)}
    defaults["max_episode_steps"] = (None, 200)
    positive = (
        "servers",
        "sessions",
        "client_procs",
        "max_episode_steps",
        "max_batch",
        "max_reconnect_backoff_ms",
        "resume_after",
        "rounds",
    )
    non_negative = ("failover_backoff", "grace", "restart_delay")
    args = parse(p, argv, defaults, positive=positive, non_negative=non_negative)
    if args.servers < 2:
        p.error("--servers must be at least 2: a killed server's episodes need another to go to")
    if not (args.duration > 0 and args.kill_every > 0):
        p.error("--duration and --kill-every must be > 0")
    return args


def prepare_store(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, str]:
    """(store, model name, description): ``--store``/``--name``, or a fresh paper-size DMM for ``--env``
    published to a store in ``tmp``."""
    from bench.common import fresh_policy
    from dmm.model import publish_policy
    from dmm.store import ModelStore

    if args.store is not None:
        return args.store, args.name, f"{args.name} from {args.store}"
    policy = fresh_policy("dmm", args.env, 0, "cpu")
    publish_policy(ModelStore(tmp / "store"), FRESH_NAME, policy.network, policy.meta)
    return tmp / "store", FRESH_NAME, "freshly initialized paper-size DMM (d=64, K=8)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if serve_worker(argv, _client_work):
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dmm-bench-chaos-") as tmp:
        store, model, source = prepare_store(args, Path(tmp))
        if args.resume_after is not None:
            return _report_resume_latency(args, argv, resume_latency(args, store, model), source)
        run = chaos(args, store, model, Path(tmp))
        done = [r["episode"] for r in run["records"] if "error" not in r]
        ref = reference(args, store, model, done)
    return _report(args, argv, run, ref, source)


if __name__ == "__main__":
    sys.exit(main())
