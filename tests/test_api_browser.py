"""The SSE wire format in a real browser: headless Chromium loads a page (same origin as the API) that posts
a training request and follows its events with ``EventSource``, then posts what it saw back to the test."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess

import pytest

pytest.register_assert_rewrite("service_fixtures")
from fastapi import Request  # noqa: E402
from fastapi.responses import HTMLResponse  # noqa: E402
from service_fixtures import serve_in_thread, tiny_request  # noqa: E402

from slmb.api.app import Settings, create_app  # noqa: E402

pytest_plugins = ["service_fixtures"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = """<!doctype html><html><head><title>waiting</title></head><body><script>
const request = %s;
(async () => {
  const job = await (await fetch("/api/v1/train-complete-model", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(request)})).json();
  const seen = [];
  const source = new EventSource(job.sse_url);
  source.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    seen.push({id: e.lastEventId, event: msg.event, task_id: msg.data.task_id});
    if (["finished", "stopped", "error"].includes(msg.event)) {
      source.close();
      fetch("/record", {method: "POST", headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({task_id: job.task_id, events: seen})});
    }
  };
  source.onerror = () => seen.push({event: "transport-error"});
})();
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/system-deps.sh installs it)")
def test_eventsource_in_headless_chromium_follows_a_training_run(service, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url, sse_keepalive_s=1))
    records: queue.Queue = queue.Queue()
    page = PAGE % json.dumps(tiny_request("browser-run"))

    async def record(request: Request) -> dict:
        records.put(await request.json())
        return {}

    app.add_api_route("/page", lambda: HTMLResponse(page), methods=["GET"])
    app.add_api_route("/record", record, methods=["POST"])
    with serve_in_thread(app) as url:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", f"{url}/page"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            seen = records.get(timeout=150)
        finally:
            browser.kill()
            browser.wait(10)
    names = [e["event"] for e in seen["events"]]
    assert "transport-error" not in names
    assert names[0] == "connected" and names[1] == "queued" and names[-1] == "finished"
    assert "started" in names and "step" in names and "progress" in names
    assert {e["task_id"] for e in seen["events"]} == {seen["task_id"]}
    # The browser saw the stream ids as lastEventId, in order.
    ids = [tuple(map(int, e["id"].split("-"))) for e in seen["events"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
