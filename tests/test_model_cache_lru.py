"""`SLMB_MODEL_CACHE` (README: models kept in memory, 4 by default): the API keeps that many generators and, when
one more is needed, loads it and evicts the least recently used."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from toy import toy_request

from slmb.api import model_cache
from slmb.api.app import Settings, create_app
from slmb.api.serve import free_port
from slmb.core.trainer import train


@pytest.fixture
def three_models():
    for name in ("a", "b", "c"):
        train(toy_request(name=name, max_steps=1), track=False)


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names of the models the cache loads from disk, in order."""
    loaded: list[str] = []
    real = model_cache.load_generator

    def counting(name, *args, **kwargs):
        loaded.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(model_cache, "load_generator", counting)
    return loaded


def test_cache_keeps_n_models_and_evicts_the_least_recently_used(three_models, loads):
    cache = model_cache.ModelCache(2)
    a, b = cache.get("a"), cache.get("b")
    assert cache.get("a") is a and cache.get("b") is b and loads == ["a", "b"]
    assert cache.get("a") is a  # a is now the most recently used
    c = cache.get("c")  # a third model: b goes
    assert cache.get("a") is a and cache.get("c") is c and loads == ["a", "b", "c"]
    assert cache.get("b") is not b and loads == ["a", "b", "c", "b"]  # loaded again; a was least recent
    assert cache.get("c") is c
    assert cache.get("a") is not a and loads == ["a", "b", "c", "b", "a"]


def test_api_honours_slmb_model_cache(three_models, loads, monkeypatch):
    monkeypatch.setenv("SLMB_MODEL_CACHE", "2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    app = create_app(Settings.from_env(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # no Redis needed here
    with TestClient(app, raise_server_exceptions=False) as client:
        assert app.state.models.size == 2
        for name in ("a", "b", "a", "c", "a", "b"):
            resp = client.post("/api/v1/generate-text", json={"model_name": name, "input_text": "hi",
                                                              "max_length": 2, "seed": 0})
            assert resp.status_code == 200, resp.text
    assert loads == ["a", "b", "c", "b"]  # c evicted b (a had been used since); b's return evicted c


def test_default_cache_size_is_four(monkeypatch):
    monkeypatch.delenv("SLMB_MODEL_CACHE", raising=False)
    assert Settings.from_env().model_cache_size == 4
