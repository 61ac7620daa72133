"""Weighted routing of new sessions between versions (canary rollouts): --route and routes.json."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import grpc
import pytest
from serving_fixtures import Stream, publish_tiny

from dmm.errors import ConfigError
from dmm.server.routes import ROUTES_FILE, Route, Router, parse_route
from dmm.server.testing import ServerProcess


def test_parse_route_reads_versions_and_weights_and_names_what_is_wrong():
    assert parse_route("hopper=3:90,4:10") == ("hopper", Route((3, 4), (90.0, 10.0)))
    for bad, words in (
        ("hopper", "use NAME=VERSION:WEIGHT"),
        ("hopper=3", "use NAME=VERSION:WEIGHT"),
        ("hopper=x:1", "version 'x' is not a positive integer"),
        ("hopper=3:-1", "weight -1.0 of version 3 is not > 0"),
        ("hopper=3:lots", "weight 'lots' is not a number"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_route(bad)


def test_router_draws_with_the_weights_and_follows_the_file(tmp_path: Path):
    router = Router(tmp_path, {"m": Route((1, 2), (3.0, 1.0))}, random.Random(0))
    draws = Counter(router.pick("m") for _ in range(4000))
    assert set(draws) == {1, 2} and 0.70 < draws[1] / 4000 < 0.80
    assert router.pick("other") is None  # no route: the latest version
    (tmp_path / ROUTES_FILE).write_text(json.dumps({"m": {"5": 1}}))
    assert {router.pick("m") for _ in range(20)} == {5}
    (tmp_path / ROUTES_FILE).write_text("{not json")
    assert router.pick("m") == 5  # a broken file is refused; the routes in force stay
    (tmp_path / ROUTES_FILE).unlink()
    assert router.pick("m") in (1, 2)


def _versions(server: ServerProcess, n: int, **start: object) -> Counter:
    got: Counter = Counter()
    with grpc.insecure_channel(server.target) as channel:
        for _ in range(n):
            stream = Stream(channel)
            got[stream.start(model="tiny", **start).version] += 1
            assert stream.finish() == grpc.StatusCode.OK
    return got


def test_a_served_route_splits_new_sessions_and_changes_without_a_restart(tmp_path: Path):
    for seed in (0, 1):
        publish_tiny(tmp_path, seed=seed)
    with ServerProcess(tmp_path, ["--route", "tiny=1:1,2:1"]) as server:
        assert set(_versions(server, 30)) == {1, 2}  # P(one version only) = 2**-29
        assert _versions(server, 5, version=1) == {1: 5}  # a named version is not routed
        (tmp_path / ROUTES_FILE).write_text(json.dumps({"tiny": {"1": 1}}))
        assert _versions(server, 10) == {1: 10}
    log = "".join(server.output)
    assert "routes=tiny=1:1,2:1" in log and "routes loaded" in log


def test_dmm_serve_refuses_a_malformed_route(tmp_path: Path):
    publish_tiny(tmp_path)
    with pytest.raises(RuntimeError, match="--route 'tiny=1'"):
        ServerProcess(tmp_path, ["--route", "tiny=1"], startup_timeout_s=30).start()
