"""Bearer token, CORS and error handling, on the app in-process (TestClient, or uvicorn in a thread where a real
browser-like request matters) with the test stack's Redis."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from slmb.api import model_cache
from slmb.api.app import Settings, create_app

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import serve_in_thread  # noqa: E402

pytest_plugins = ["service_fixtures"]
TOKEN = "s3cret-token"


@pytest.fixture
def app_client(service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)

    def make(**settings) -> TestClient:
        app = create_app(Settings(**{"redis_url": service.redis_url, **settings}))
        return TestClient(app, raise_server_exceptions=False)

    return make


def test_bearer_token_guards_every_api_route(app_client):
    with app_client(api_token=TOKEN) as client:
        for method, path in (("GET", "/api/v1/completed-models"), ("POST", "/api/v1/stop-training"),
                             ("POST", "/api/v1/train-complete-model"), ("POST", "/api/v1/generate-text"),
                             ("GET", "/api/v1/events/some-task")):
            resp = client.request(method, path, json={})
            assert resp.status_code == 401, path
            assert resp.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        ok = client.get("/api/v1/completed-models", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and "models" in ok.json()
        # EventSource cannot set headers: the SSE route also takes ?token= (404: past auth, unknown task) ...
        assert client.get(f"/api/v1/events/no-such-task?token={TOKEN}").status_code == 404
        assert client.get("/api/v1/events/no-such-task?token=nope").status_code == 401
        # ... and only the SSE route.
        assert client.get(f"/api/v1/completed-models?token={TOKEN}").status_code == 401
        # Health and docs stay open.
        assert client.get("/healthz").status_code == 200
        assert client.get("/openapi.json").status_code == 200


def test_without_a_token_the_api_is_open(app_client):
    with app_client() as client:
        assert client.get("/api/v1/completed-models").status_code == 200


def test_a_500_never_shows_the_exception(app_client, monkeypatch, caplog):
    def broken() -> list:
        raise RuntimeError("cannot open /srv/secret/path: password=hunter2")

    monkeypatch.setattr(model_cache, "list_models", broken)
    with app_client() as client:
        resp = client.get("/api/v1/completed-models")
    assert resp.status_code == 500
    body = resp.json()
    assert body["detail"] == "internal error" and len(body["request_id"]) == 16
    assert "hunter2" not in resp.text and "secret" not in resp.text and "RuntimeError" not in resp.text
    # The log has it all, under the same request id.
    logged = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert logged and "hunter2" in str(logged[0].exc_info[1])


def test_redis_down_is_a_503_and_leaves_no_running_mlflow_run(app_client, service):
    from mlflow.tracking import MlflowClient
    from service_fixtures import tiny_request

    from slmb.api.serve import free_port

    with app_client(redis_url=f"redis://127.0.0.1:{free_port()}/0") as client:
        resp = client.post("/api/v1/train-complete-model", json=tiny_request("no-redis"))
        assert resp.status_code == 503 and "Redis" in resp.json()["detail"] and resp.json()["request_id"]
        assert client.get("/healthz").status_code == 503
    mlflow = MlflowClient(service.mlflow_uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("slmb").experiment_id], "tags.model_name = 'no-redis'")
    assert [(r.info.status, r.data.tags["training_status"]) for r in runs] == [("FAILED", "error")]


LOCAL = ("http://localhost:4173", "http://127.0.0.1:5173", "http://localhost:3000", "http://localhost",
         "http://[::1]:8080")
FOREIGN = ("https://evil.example", "http://localhost.evil.example:4173", "http://127.0.0.1.evil.example",
           "http://evil.example:4173", "null")


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options("/api/v1/train-complete-model", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})


def assert_cors(base_url: str, allowed: tuple[str, ...], refused: tuple[str, ...]) -> None:
    """A browser's preflight and simple request, over real HTTP, from each origin."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for origin in allowed:
            resp = preflight(client, origin)
            assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == origin, origin
            assert {"authorization", "content-type"} <= set(resp.headers["access-control-allow-headers"].lower()
                                                            .replace(" ", "").split(","))
            assert "POST" in resp.headers["access-control-allow-methods"]
            get = client.get("/api/v1/completed-models", headers={"Origin": origin})
            assert get.status_code == 200 and get.headers["access-control-allow-origin"] == origin, origin
        for origin in refused:
            resp = preflight(client, origin)
            assert resp.status_code == 400 and "access-control-allow-origin" not in resp.headers, origin
            get = client.get("/api/v1/completed-models", headers={"Origin": origin})
            assert "access-control-allow-origin" not in get.headers, origin  # the browser hides the answer


def test_cors_allows_any_local_port_and_nothing_else_by_default(service):
    """The real service, as the canvas's `vite preview` (port 4173) and dev server (5173) reach it."""
    assert_cors(service.api_url, LOCAL, FOREIGN)


def test_cors_origins_from_the_environment_add_to_the_local_ones(service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    monkeypatch.setenv("SLMB_CORS_ORIGINS", "https://canvas.example, https://b.example/")
    settings = Settings.from_env(redis_url=service.redis_url)
    assert settings.cors_origins == ["https://canvas.example", "https://b.example"]
    with serve_in_thread(create_app(settings)) as url:
        assert_cors(url, ("https://canvas.example", "https://b.example", "http://localhost:4173"),
                    ("https://evil.example", "http://canvas.example", "https://canvas.example:8443"))


def test_cors_star_needs_the_bearer_token(service, monkeypatch):
    """'*' would let any page the user opens drive the API; with the token it cannot: a page needs the token."""
    monkeypatch.setenv("SLMB_CORS_ORIGINS", "*")
    monkeypatch.delenv("SLMB_API_TOKEN", raising=False)
    with pytest.raises(RuntimeError, match="SLMB_API_TOKEN"):
        Settings.from_env()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    monkeypatch.setenv("SLMB_API_TOKEN", TOKEN)
    app = create_app(Settings.from_env(redis_url=service.redis_url))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        resp = preflight(client, "https://anywhere.example")
        assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == "*"
        get = client.get("/api/v1/completed-models", headers={"Origin": "https://anywhere.example"})
        assert get.status_code == 401 and get.headers["access-control-allow-origin"] == "*"
        get = client.get("/api/v1/completed-models", headers={"Origin": "https://anywhere.example",
                                                               "Authorization": f"Bearer {TOKEN}"})
        assert get.status_code == 200 and "models" in get.json()


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLMB_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("SLMB_API_TOKEN", "t")
    monkeypatch.setenv("SLMB_SSE_KEEPALIVE", "2.5")
    s = Settings.from_env()
    assert s.cors_origins == ["https://a.example", "https://b.example"] and s.api_token == "t"
    assert s.sse_keepalive_s == 2.5
    monkeypatch.delenv("SLMB_CORS_ORIGINS")
    assert Settings.from_env().cors_origins == []  # the local origins only
