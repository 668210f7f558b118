"""Serving fixtures: an engine on the session's trained checkpoint, a TestClient app, a real server."""

from __future__ import annotations

import pytest
from helpers import require_optional

require_optional("fastapi", "test")
require_optional("uvicorn", "test")
require_optional("httpx", "test")
require_optional("prometheus_client", "test")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from looped.config import ServeConfig  # noqa: E402
from looped.infer.engine import Engine  # noqa: E402
from looped.serve.app import create_app, run_in_thread  # noqa: E402

MODEL = "run"  # the session checkpoint is <tmp>/run/final


@pytest.fixture(scope="session")
def engine(trained):
    return Engine.from_checkpoint(trained)


def scrape(text: str) -> dict[str, dict]:
    """A /metrics page read by prometheus_client's own parser: {family name: {"type": ..., "samples":
    {(sample name, sorted labels): value}}}."""
    return {
        f.name: {
            "type": f.type,
            "samples": {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples},
        }
        for f in text_string_to_metric_families(text)
    }


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample of a /metrics page (KeyError when it has none)."""
    key = (name, tuple(sorted(labels.items())))
    for family in scrape(text).values():
        if key in family["samples"]:
            return family["samples"][key]
    raise KeyError(f"no sample {name}{labels or ''} in /metrics")


def client_for(engine, **serve) -> TestClient:
    return TestClient(create_app(engine, ServeConfig(**serve)))


@pytest.fixture(scope="module")
def client(engine):
    with client_for(engine) as c:
        yield c


@pytest.fixture(scope="module")
def server(engine):
    """A real uvicorn server on a free port of 127.0.0.1: (url, app)."""
    app = create_app(engine, ServeConfig(max_batch=8))
    srv, url = run_in_thread(app)
    yield url, app
    srv.should_exit = True
    srv.thread.join(timeout=10)
