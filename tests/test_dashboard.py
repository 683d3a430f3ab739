"""The dashboard at ``/`` of ``slmb serve``, in headless Chromium (Debian's, driven by Playwright; Playwright's own
browser is never downloaded), against the real service stack (Redis, an RQ worker, MLflow): submit a run from the
form and watch its loss curve grow, stop it, read a validation error's JSON pointer, look at a finished model and
generate from it, and enter the API token. Plus the JSON routes the page reads.

Screenshots go to ``$SLMB_TEST_ARTIFACTS/dashboard`` (or a pytest temporary folder); the path is printed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("service_fixtures")
from conftest import REPO  # noqa: E402
from service_fixtures import read_sse, serve_in_thread, submit_and_wait, tiny_request, wait_until  # noqa: E402

from slmb.api.app import Settings, create_app  # noqa: E402

pytest_plugins = ["service_fixtures"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "dash-secret-token"
STATE_TIMEOUT_MS = 180_000  # a busy 2-core machine: training start-up (imports, tokenization) takes a while
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install "
                                                             "chromium); Playwright's own browser is never used")


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    base = os.environ.get("SLMB_TEST_ARTIFACTS")
    path = Path(base) / "dashboard" if base else tmp_path_factory.mktemp("dashboard-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        sync_api.expect.set_options(timeout=STATE_TIMEOUT_MS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, artifacts, request):
    """A fresh browser context (its own session storage); a script error on the page fails the test. The page
    as it ended is saved beside the test's own screenshots."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(STATE_TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    yield pg
    pg.screenshot(path=str(artifacts / f"{request.node.name}-end.png"), full_page=True)
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def finished_model(service) -> str:
    """A tiny model trained through the service (by its worker), once for this module."""
    name = "dash-finished"
    with service.client() as client:
        task_id = submit_and_wait(client, tiny_request(name, max_steps=12), until="finished", timeout=300)
    return task_id


def count(page, selector: str) -> int:
    return int(page.get_attribute(selector, "data-count") or 0)


def wait_count(page, selector: str, above: int) -> int:
    """Wait until the chart path ``selector`` plots more than ``above`` points; returns how many it plots."""
    page.wait_for_function(f"() => document.querySelector('#run-state').dataset.state === 'error' || "
                           f"Number(document.querySelector({json.dumps(selector)})?.getAttribute('data-count') || 0)"
                           f" > {above}", timeout=STATE_TIMEOUT_MS)
    assert page.get_attribute("#run-state", "data-state") != "error", page.text_content("#run-message")
    return count(page, selector)


def shot(page, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


# ---------------------------------------------------------------------------------------------------- browser


@needs_chromium
def test_submit_a_run_watch_the_curve_grow_and_stop_it(service, page, artifacts):
    from playwright.sync_api import expect

    page.goto(f"{service.api_url}/#submit")
    body = tiny_request("dash-live", max_steps=100_000)  # far longer than the test: it is stopped
    body["config"]["emb_dim"] = 48  # the nodes are 32 wide: a warning, shown with the run
    page.fill("#request-json", json.dumps(body))
    page.click("#submit-button")
    # The page switches to the new run and follows its event stream.
    expect(page.locator("#panel-runs")).to_be_visible()
    task_id = page.text_content("#run-id")
    assert task_id and len(task_id) >= 8
    expect(page.locator("#run-title")).to_have_text("dash-live")
    expect(page.locator("#run-state")).to_have_text("running")
    # The config key that disagrees with the nodes: in the submit response, and in the started event.
    for origin in ("submitted", "started"):
        warning = page.locator(f'#run-warnings-list li[data-pointer="/config/emb_dim"][data-origin="{origin}"]')
        expect(warning).to_contain_text("config.emb_dim = 48 but /model/0 uses 32")
    train = "#chart-loss path.series-train"
    first = wait_count(page, train, 1)
    # More points arrive while the run trains: the curve grows from the live stream alone.
    assert wait_count(page, train, first) > first
    assert count(page, "#chart-lr path.series-lr") >= 2
    assert count(page, "#chart-tps path.series-tps") >= 2
    path_d = page.get_attribute(train, "d")
    assert path_d.startswith("M") and path_d.count("L") >= first  # a drawn line, one segment per point
    for key in ("loss", "lr", "tps"):
        value = page.text_content(f"[data-stat={key}] .stat-value")
        assert value and value != "–", (key, value)
    expect(page.locator("[data-stat=eta] .stat-value")).not_to_have_text("–")
    # The runs list shows it, running, and the server agrees.
    expect(page.locator(f'#runs-list li[data-task-id="{task_id}"]')).to_have_attribute("data-state", "running")
    shot(page, artifacts, "run-live")

    expect(page.locator("#stop-button")).to_be_enabled()
    page.click("#stop-button")
    expect(page.locator("#run-state")).to_have_text("stopped")
    expect(page.locator("#run-message")).to_contain_text("Stopped at step")
    expect(page.locator("#stop-button")).to_be_hidden()
    expect(page.locator(f'#runs-list li[data-task-id="{task_id}"]')).to_have_attribute("data-state", "stopped")
    shot(page, artifacts, "run-stopped")
    with service.client() as client:
        def server_state() -> str:
            return {r["task_id"]: r for r in client.get("/api/v1/runs").json()["runs"]}[task_id]["state"]

        wait_until(lambda: server_state() == "stopped", 60, "the server to list the run as stopped")


@needs_chromium
def test_a_bad_request_shows_each_error_with_its_json_pointer(service, page, artifacts, tmp_path):
    from playwright.sync_api import expect

    page.goto(f"{service.api_url}/#submit")
    page.fill("#request-json", "{not json")
    page.click("#submit-button")
    expect(page.locator("#submit-errors-title")).to_have_text("The text is not valid JSON")

    body = tiny_request("dash-bad")
    body["config"]["batch_size"] = 0
    body["config"]["learning_rate"] = -1
    page.fill("#request-json", json.dumps(body))
    page.click("#submit-button")
    expect(page.locator("#submit-errors-title")).to_contain_text("2 errors: the run was not queued")
    batch = page.locator('#submit-errors li[data-pointer="/config/batch_size"]')
    expect(batch.locator("code.pointer")).to_have_text("/config/batch_size")
    expect(batch).to_contain_text("greater than or equal to 1")
    expect(page.locator('#submit-errors li[data-pointer="/config/learning_rate"] code.pointer')).to_have_text(
        "/config/learning_rate")
    expect(page.locator("#submit-result")).to_be_hidden()
    shot(page, artifacts, "validation-errors")
    page.click("#format-button")
    assert page.input_value("#request-json") == json.dumps(body, indent=2)

    # So does a file.
    upload = tmp_path / "bad.json"
    upload.write_text(json.dumps(body))
    page.set_input_files("#request-file", str(upload))
    expect(page.locator("#submit-status")).to_have_text("loaded bad.json")
    assert json.loads(page.input_value("#request-json")) == body
    expect(page.locator("#submit-errors-box")).to_be_hidden()

    # An example fills the form.
    page.select_option("#example-select", "gpt2")
    expect(page.locator("#submit-status")).to_have_text("loaded examples/gpt2.json")
    loaded = json.loads(page.input_value("#request-json"))
    assert loaded == json.loads((REPO / "examples" / "gpt2.json").read_text())


@needs_chromium
def test_a_finished_model_shows_its_nodes_and_generates_streamed_text(service, page, artifacts, finished_model):
    from playwright.sync_api import expect

    # The finished run's curves, replayed from its stream.
    page.goto(f"{service.api_url}/#runs")
    page.click(f'#runs-list li[data-task-id="{finished_model}"]')
    wait_count(page, "#chart-loss path.series-train", 0)
    expect(page.locator("#run-state")).to_have_text("finished")
    expect(page.locator("#run-message")).to_contain_text("model dash-finished saved")

    page.click("#tab-models")
    page.click('#models-list li[data-model="dash-finished"]')
    expect(page.locator("#model-nodes tr").first).to_be_visible()
    rows = page.locator("#model-nodes tr")
    assert rows.count() >= 5
    types = " ".join(rows.locator("td:nth-child(2)").all_text_contents())
    assert "embedding" in types.lower() or "token" in types.lower(), types
    with service.client() as client:
        detail = client.get("/api/v1/completed-models/dash-finished").json()
    params = detail["parameters"]
    assert params > 0
    expect(page.locator("[data-stat=parameters] .stat-sub")).to_have_text(f"{params:,}")
    val = detail["final_losses"]["val_loss"]
    assert val is not None and val > 0
    assert page.text_content("[data-stat=val_loss] .stat-value") != "–"
    shot(page, artifacts, "model")

    page.click("#model-generate")
    expect(page.locator("#panel-generate")).to_be_visible()
    expect(page.locator("#gen-model")).to_have_value("dash-finished")
    page.fill("#gen-prompt", "To be")
    page.fill("#gen-max", "24")
    page.fill("#gen-temperature", "0.9")
    page.fill("#gen-seed", "7")
    page.click("#gen-button")
    expect(page.locator("#gen-output")).to_have_attribute("data-state", "done")
    text = page.text_content("#gen-out-text")
    assert text, "no generated text"
    assert page.text_content("#gen-out-prompt") == "To be"
    assert int(page.get_attribute("#gen-output", "data-deltas")) >= 2  # streamed in pieces, not in one answer
    expect(page.locator("#gen-status")).to_contain_text("tokens/s")
    shot(page, artifacts, "generate")

    # The same seed gives the same text: the controls reach the sampler.
    page.click("#gen-button")
    expect(page.locator("#gen-output")).to_have_attribute("data-state", "done")
    assert page.text_content("#gen-out-text") == text


@needs_chromium
def test_with_a_token_the_page_asks_for_it_and_works_once_entered(service, page, artifacts, monkeypatch,
                                                                   finished_model):
    from playwright.sync_api import expect

    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url, api_token=TOKEN, sse_keepalive_s=1))
    with serve_in_thread(app) as url:
        page.goto(f"{url}/")
        banner = page.locator("#auth-banner")
        expect(banner).to_contain_text("needs an API token")
        expect(banner).to_have_attribute("data-reason", "needed")
        shot(page, artifacts, "token-needed")

        page.fill("#token-input", "wrong-token")
        page.click("#token-save")
        expect(banner).to_have_attribute("data-reason", "wrong")
        expect(banner).to_contain_text("refused")

        page.fill("#token-input", TOKEN)
        page.click("#token-save")
        expect(banner).to_be_hidden()
        run = page.locator(f'#runs-list li[data-task-id="{finished_model}"]')
        expect(run).to_have_attribute("data-state", "finished")
        assert page.evaluate("sessionStorage.getItem('slmb.token')") == TOKEN
        # The event stream takes the token as ?token= (an EventSource cannot send headers).
        run.click()
        wait_count(page, "#chart-loss path.series-train", 0)
        expect(page.locator("#run-message")).to_contain_text("model dash-finished saved")
        shot(page, artifacts, "token-entered")

        # A reload keeps the token for the session.
        page.reload()
        expect(page.locator(f'#runs-list li[data-task-id="{finished_model}"]')).to_be_visible()
        expect(banner).to_be_hidden()


# ---------------------------------------------------------------------------------------------------- JSON routes


def test_the_page_and_its_files_need_no_token_and_forbid_foreign_scripts(service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url, api_token=TOKEN))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="dashboard/app.js">' in page.text
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            resp = client.get(f"/dashboard/{name}")
            assert resp.status_code == 200 and kind in resp.headers["content-type"], name
        assert client.get("/dashboard/nothing.js").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not an API operation
        # No CDN: every script and style the page loads is its own.
        assert "http://" not in page.text and "https://" not in page.text


def test_the_json_routes_need_the_token(service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url, api_token=TOKEN))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for path in ("/api/v1/runs", "/api/v1/examples", "/api/v1/completed-models/anything"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
            assert client.get(path, params={"token": TOKEN}).status_code == 401, path  # headers only
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/v1/runs", headers=auth).status_code == 200
        assert client.get("/api/v1/examples", headers=auth).status_code == 200


def test_runs_list_the_service_tasks_without_server_paths(service, finished_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        resp = client.get("/api/v1/runs")
        assert resp.status_code == 200
        runs = resp.json()["runs"]
        mine = next(r for r in runs if r["task_id"] == finished_model)
        assert mine["state"] == "finished" and mine["model_name"] == "dash-finished"
        assert mine["celery_state"] == "SUCCESS" and mine["step"] == 12 and mine["created"] > 0
        assert set(mine) == {"task_id", "model_name", "state", "celery_state", "step", "created", "message",
                             "mlflow_url"}
        created = [r["created"] for r in runs]
        assert created == sorted(created, reverse=True)  # newest first
        assert_no_server_paths(resp.text, service)


def test_a_run_lists_its_mlflow_link_for_the_run_view(service, monkeypatch):
    """The run view links to MLflow for any run the service lists, not only those submitted from the same tab."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    monkeypatch.setenv("SLMB_MLFLOW_UI", "http://127.0.0.1:5999")  # where `slmb serve` says its UI is
    app = create_app(Settings(redis_url=service.redis_url))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        job = client.post("/api/v1/train-complete-model", json=tiny_request("dash-mlflow-link", max_steps=2))
        assert job.status_code == 200, job.text
        link = job.json()["mlflow_url"]
        assert link.startswith("http://127.0.0.1:5999/#/experiments/") and job.json()["mlflow_run_id"] in link
        listed = {r["task_id"]: r for r in client.get("/api/v1/runs").json()["runs"]}[job.json()["task_id"]]
        assert listed["mlflow_url"] == link


def test_a_completed_model_with_nodes_parameters_and_losses(service, finished_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        resp = client.get("/api/v1/completed-models/dash-finished")
        assert resp.status_code == 200, resp.text
        d = resp.json()
        assert_no_server_paths(resp.text, service)
        # The node table of `slmb validate`: the same rows, and parameters that add up to the model's.
        from slmb.core.validate import validate

        report = validate(tiny_request("dash-finished", max_steps=12))
        assert [n["path"] for n in d["nodes"]] == [r.path for r in report.summary.rows]
        assert [n["output_shape"] for n in d["nodes"]] == [r.output_shape for r in report.summary.rows]
        assert d["parameters"] == report.summary.total_parameters == d["total_parameters"]
        assert d["steps"] == 12
        losses = d["final_losses"]
        assert 0 < losses["train_loss"] < 10 and 0 < losses["val_loss"] < 10
        assert d["model"]["model_name"] == "dash-finished"
        assert not Path(d["model"].get("path", "x")).is_absolute()

        missing = client.get("/api/v1/completed-models/no-such-model")
        assert missing.status_code == 404 and "no-such-model" in missing.json()["detail"]
        assert client.get("/api/v1/completed-models/bad%20name").status_code == 422
        assert client.get("/api/v1/completed-models/.hidden").status_code == 422


def test_the_examples_are_the_shipped_files(service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        examples = client.get("/api/v1/examples").json()["examples"]
    shipped = sorted((REPO / "slmb" / "examples").glob("*.json"))
    assert [e["name"] for e in examples] == [p.stem for p in shipped] and len(shipped) == 4
    for example, path in zip(examples, shipped, strict=True):
        assert example["request"] == json.loads(path.read_text())
        assert example["file"] == f"examples/{path.name}"
    # The repository's examples/ is the package's folder, so `slmb train examples/gpt2.json` still works.
    assert (REPO / "examples").resolve() == (REPO / "slmb" / "examples").resolve()


def assert_no_server_paths(text: str, service) -> None:
    for root in {str(service.tmp), str(Path.home()), os.getcwd(), str(REPO), os.environ["SLMB_HOME"]}:
        assert root not in text, root


def test_events_for_the_dashboard_take_the_token_as_a_query(service, finished_model, monkeypatch):
    """What the page's EventSource does: ?token= on the events route (only there)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url, api_token=TOKEN, sse_keepalive_s=1))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get(f"/api/v1/events/{finished_model}").status_code == 401
        seen = read_sse(client, f"/api/v1/events/{finished_model}?token={TOKEN}")
        assert [m["event"] for m in seen if "event" in m][-1] == "finished"
