"""Weighted routing of new sessions between versions of a model: canary rollouts.

A session that names a model but no version normally gets the latest version. With a route, it gets
one of the route's versions, drawn with the route's weights (``--route hopper=3:90,4:10``); sessions
that name a version, and sessions already running, are not affected. Routes can change without a
restart: ``routes.json`` at the root of a local store (``{"hopper": {"3": 90, "4": 10}}``) is read again
when it changes and overrides ``--route`` for the models it names; a file that does not parse is
refused (logged) and the routes in force stay. An S3 store has no routes file: ``--route`` only.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path

from dmm.errors import ConfigError
from dmm.server import logs

ROUTES_FILE = "routes.json"


@dataclass(frozen=True)
class Route:
    versions: tuple[int, ...]
    weights: tuple[float, ...]

    def describe(self) -> str:
        return ",".join(f"{v}:{w:g}" for v, w in zip(self.versions, self.weights, strict=True))


def describe_routes(routes: dict[str, Route]) -> str:
    """``hopper=3:90,4:10; other=1:1`` (or ``none``), for the log."""
    return "; ".join(f"{model}={route.describe()}" for model, route in routes.items()) or "none"


def _route(model: str, shares: dict[str, object]) -> Route:
    """A route from {version: weight}; ConfigError naming what is wrong."""
    if not shares:
        raise ConfigError(f"route of {model!r} names no version")
    versions, weights = [], []
    for version, weight in shares.items():
        if not str(version).isdigit() or int(version) < 1:
            raise ConfigError(f"route of {model!r}: version {version!r} is not a positive integer")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ConfigError(f"route of {model!r}: weight {weight!r} of version {version} is not > 0")
        versions.append(int(version))
        weights.append(float(weight))
    return Route(tuple(versions), tuple(weights))


def parse_route(text: str) -> tuple[str, Route]:
    """``NAME=V1:W1,V2:W2`` (the form of ``--route``)."""
    usage = ConfigError(f"--route {text!r}: use NAME=VERSION:WEIGHT[,VERSION:WEIGHT...]")
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise usage
    shares: dict[str, object] = {}
    for part in spec.split(","):
        version, sep, weight = part.partition(":")
        if not sep:
            raise usage
        try:
            shares[version.strip()] = float(weight)
        except ValueError:
            raise ConfigError(f"--route {text!r}: weight {weight!r} is not a number") from None
    return name, _route(name, shares)


class Router:
    """The routes in force: ``--route`` ones, overridden per model by the routes file in ``store_root``
    (None: a store without one, such as S3)."""

    def __init__(
        self, store_root: Path | None, routes: dict[str, Route], rng: random.Random | None = None
    ) -> None:
        self.path = None if store_root is None else store_root / ROUTES_FILE
        self._cli = dict(routes)
        self._file: dict[str, Route] = {}
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # picks run in executor threads

    def describe(self) -> str:
        """The ``--route`` routes (the file's are logged when it is read)."""
        return describe_routes(self._cli)

    def pick(self, model: str) -> int | None:
        """A version for a new session of ``model`` that names none; None: no route (the latest)."""
        with self._lock:
            self._refresh()
            route = self._file.get(model) or self._cli.get(model)
            return self._rng.choices(route.versions, route.weights)[0] if route else None

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self._seen is not None:
                self._seen, self._file = None, {}
                logs.event(logging.INFO, "routes file removed", path=self.path)
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ConfigError('expected {"model": {"version": weight, ...}, ...}')
            routes = {str(model): _route(model, shares) for model, shares in data.items()}
        except (OSError, ValueError, ConfigError) as err:
            logs.event(logging.WARNING, "routes file refused", path=self.path, error=str(err))
            return
        self._file = routes
        logs.event(logging.INFO, "routes loaded", path=self.path, routes=describe_routes(routes))
