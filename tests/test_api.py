"""The HTTP service end to end: real Redis, a real ``slmb worker``, the API under uvicorn (see service_fixtures).

Training runs are tiny (the GPT-2 canvas at width 32, byte tokenizer, 20 steps), so the module takes well
under a minute of CPU beyond the stack's start.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import (  # noqa: E402
    events_of,
    follow_many,
    log_tail,
    parse_sse,
    read_sse,
    submit_and_wait,
    tiny_request,
    wait_until,
)

pytest_plugins = ["service_fixtures"]

CLIENTS = 50
PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def trained(service):
    """One tiny training run followed live by 50 SSE clients at once."""
    with service.client() as client:
        resp = client.post("/api/v1/train-complete-model", json=tiny_request("tiny-api"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    streams = follow_many(body["sse_url_abs"], CLIENTS)
    return {"response": body, "task_id": body["task_id"], "streams": streams}


def test_train_response_has_the_old_backends_keys(trained, service):
    body = trained["response"]
    task_id = body["task_id"]
    assert body["status"] == "success" and body["model_name"] == "tiny-api"
    assert body["sse_url"] == f"/api/v1/events/{task_id}"
    assert body["sse_url_abs"] == f"{service.api_url}/api/v1/events/{task_id}"
    assert body["stop_url_abs"] == f"{service.api_url}/api/v1/stop-training"
    # No MLflow UI is named for the stack's sqlite store: no dead link, but the command that opens one (no path).
    assert body["mlflow_url"] is None and body["mlflow_run_path"] == f"#/experiments/1/runs/{body['mlflow_run_id']}"
    assert re.fullmatch(r"mlflow ui --backend-store-uri sqlite:///\$[A-Z_]+/mlflow\.db", body["mlflow_ui_command"])
    assert body["experiment_name"] == "slmb" and len(body["structure_id"]) == 16 and body["message"]
    info = body["model_info"]
    assert info["total_parameters"] == info["trainable_parameters"] > 0
    assert info["config"]["emb_dim"] == 32 and info["dataset"] == "tiny_shakespeare"
    assert body["training_config"] == {"dataset": "tiny_shakespeare", "dataset_config": "default", "epochs": 1}


def test_every_client_receives_every_event_in_order(trained, service):
    streams = [events_of(s) for s in trained["streams"]]
    assert len(streams) == CLIENTS
    first = streams[0]
    names = [m["event"] for m in first]
    assert names[0] == "connected" and names[1] == "queued" and names[-1] == "finished"
    for name in ("started", "step", "progress", "eval", "status"):
        assert name in names
    assert names.index("queued") < names.index("started") < names.index("step") < names.index("finished")
    ids = [tuple(map(int, m["id"].split("-"))) for m in first]
    assert ids[0] == (0, 0) and ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {m["data"]["task_id"] for m in first} == {trained["task_id"]}
    finished = first[-1]["data"]
    assert finished["step"] == 20 and finished["model_name"] == "tiny-api"
    assert mlflow_state(service, trained["task_id"]) == ("FINISHED", "finished")
    # Everyone got the same events (the per-client `connected` aside).
    for stream in streams[1:]:
        assert [(m["id"], m["event"]) for m in stream[1:]] == [(m["id"], m["event"]) for m in first[1:]]


def test_late_client_gets_the_full_replay_and_last_event_id_resumes(trained, service):
    live = events_of(trained["streams"][0])
    with service.client() as client:
        late = events_of(read_sse(client, f"/api/v1/events/{trained['task_id']}"))
        assert [m["id"] for m in late[1:]] == [m["id"] for m in live[1:]]
        cut = len(live) // 2
        resumed = events_of(read_sse(client, f"/api/v1/events/{trained['task_id']}",
                                     headers={"Last-Event-ID": live[cut]["id"]}))
        assert resumed[0]["event"] == "connected" and resumed[0]["id"] == live[cut]["id"]
        assert [m["id"] for m in resumed[1:]] == [m["id"] for m in live[cut + 1:]]
        # Resuming after the terminal event: nothing more, and the stream still closes.
        after_end = events_of(read_sse(client, f"/api/v1/events/{trained['task_id']}",
                                       headers={"Last-Event-ID": live[-1]["id"]}, timeout=10))
        assert [m["event"] for m in after_end] == ["connected"]


def test_the_finished_model_is_listed_and_generates(trained, service):
    with service.client() as client:
        models = {m["model_name"]: m for m in client.get("/api/v1/completed-models").json()["models"]}
        # The worker has another SLMB_HOME: the API knows the model from MLflow only.
        assert models["tiny-api"]["source"] == "mlflow" and models["tiny-api"]["has_structure"]
        assert "structure_file" in models["tiny-api"]

        params = {"model_name": "tiny-api", "input_text": PROMPT, "max_length": 24, "temperature": 0.8,
                  "top_k": 40, "seed": 7}
        resp = client.post("/api/v1/generate-text", json=params)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["status"] == "success" and out["input_text"] == PROMPT
        assert out["output_text"].startswith(PROMPT) and len(out["output_text"]) > len(PROMPT)
        # Fetched into the API's own store, and from now on served from memory.
        models = {m["model_name"]: m for m in client.get("/api/v1/completed-models").json()["models"]}
        assert models["tiny-api"]["source"] == "local" and models["tiny-api"]["task_id"] == trained["task_id"]

        with client.stream("POST", "/api/v1/generate-text/stream", json=params) as stream:
            assert stream.status_code == 200
            messages = parse_sse(stream.iter_lines())
    names = [m["event"] for m in messages]
    assert names[0] == "start" and names[-1] == "done" and "delta" in names
    streamed = "".join(m["data"]["text"] for m in messages if m["event"] == "delta")
    # Same seed, same text, streamed or not.
    assert PROMPT + streamed == messages[-1]["data"]["output_text"] == out["output_text"]


def test_generation_bounds_and_unknown_models(trained, service):
    with service.client() as client:
        too_long = client.post("/api/v1/generate-text", json={"model_name": "tiny-api", "max_length": 257})
        assert too_long.status_code == 422
        assert too_long.json()["detail"] == "/max_length: max_length is 257; the service allows at most 256"
        big_prompt = client.post("/api/v1/generate-text", json={"model_name": "tiny-api", "input_text": "x" * 30_000})
        assert big_prompt.status_code == 413
        assert client.post("/api/v1/generate-text", json={"model_name": "nope"}).status_code == 404
        bad = client.post("/api/v1/generate-text", json={"model_name": "tiny-api", "temperature": -1})
        assert bad.status_code == 422
        assert bad.json()["detail"] == "/temperature: Input should be greater than or equal to 0"
        assert [e["path"] for e in bad.json()["errors"]] == ["/temperature"]
        long_stop = client.post("/api/v1/generate-text", json={"model_name": "tiny-api", "stop": ["ok", "x" * 201]})
        assert long_stop.json()["detail"] == "/stop/1: stop strings are 200 characters at most, this one has 201"


@pytest.mark.parametrize("name", ["../etc/passwd", "..", ".hidden", "a/b", "a\\b", "x" * 65, ""])
def test_model_names_that_could_escape_the_store_are_refused(service, name):
    with service.client() as client:
        resp = client.post("/api/v1/generate-text", json={"model_name": name, "input_text": "hi"})
        assert resp.status_code == 422, resp.text
        body = tiny_request("ok")
        body["modelName"] = name
        resp = client.post("/api/v1/train-complete-model", json=body)
        assert resp.status_code == 422
        assert [e["path"] for e in resp.json()["errors"]] == ["/modelName"]
        assert client.post("/api/v1/stop-training", json={"task_id": name}).status_code == 422


@pytest.mark.parametrize("path", ["..%2F..%2Fetc%2Fpasswd", "..", "%2e%2e", "no-such-task"])
def test_unknown_or_malicious_task_ids_get_404(service, path):
    with service.client() as client:
        assert client.get(f"/api/v1/events/{path}").status_code == 404
    with service.client() as client:
        assert client.post("/api/v1/stop-training", json={"task_id": "no-such-task"}).status_code == 404


def test_bad_bodies_get_4xx_with_json_pointer_paths(service):
    with service.client() as client:
        not_json = client.post("/api/v1/train-complete-model", content=b"{nope",
                               headers={"content-type": "application/json"})
        assert not_json.status_code == 400
        body = tiny_request("bad")
        block = body["model"][3]
        block["children"][1]["data"]["numHeads"] = 3  # 32 is not divisible by 3
        block["children"][3]["data"]["source"] = "does-not-exist"
        body["config"]["epochs"] = 0
        resp = client.post("/api/v1/train-complete-model", json=body)
        assert resp.status_code == 422
        errors = resp.json()["errors"]
        assert "/config/epochs" in {e["path"] for e in errors}
        # The canvas shows only `detail`: the first error with its pointer, and how many more `errors` has.
        assert resp.json()["detail"] == "/config/epochs: Input should be greater than or equal to 1"
        body["config"]["epochs"] = 1
        resp = client.post("/api/v1/train-complete-model", json=body)
        errors = resp.json()["errors"]
        paths = {e["path"] for e in errors}
        assert "/model/3/children/1/data/numHeads" in paths and "/model/3/children/3/data/source" in paths
        assert all(e["message"] for e in errors)
        first = errors[0]
        assert resp.json()["detail"] == (f"{first['path']}: {first['message']} (and {len(errors) - 1} more error"
                                         + ("s)" if len(errors) > 2 else ")"))
        assert client.post("/api/v1/train-complete-model", json=[1, 2]).status_code == 422
        huge = client.post("/api/v1/train-complete-model", content=b" " * 300_000,
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413


def test_health_and_openapi(service):
    with service.client() as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["redis"]["ok"] and health["mlflow"]["ok"]
        assert health["workers"]["count"] >= 1
        schema = client.get("/openapi.json").json()
        for path in ("/api/v1/train-complete-model", "/api/v1/events/{task_id}", "/api/v1/stop-training",
                     "/api/v1/completed-models", "/api/v1/generate-text", "/api/v1/generate-text/stream"):
            assert path in schema["paths"]
        assert "TrainRequest" in schema["components"]["schemas"]
        assert client.get("/docs").status_code == 200


def mlflow_state(service, task_id: str) -> tuple[str, str]:
    """(run status, training_status tag) of a task's MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(service.mlflow_uri)
    experiment = client.get_experiment_by_name("slmb")
    run = client.search_runs([experiment.experiment_id], f"tags.task_id = '{task_id}'")[0]
    return run.info.status, run.data.tags["training_status"]


def _blocked_clients(conn) -> int:
    """Redis connections blocked in XREAD (the SSE route's XREAD BLOCK; idle workers block in other commands)."""
    return sum(1 for c in conn.client_list() if "b" in c.get("flags", "") and c.get("cmd") == "xread")


def test_stop_while_queued_then_cooperative_stop(service):
    with service.client() as client:
        running = submit_and_wait(client, tiny_request("long-coop", max_steps=100_000))
        queued = client.post("/api/v1/train-complete-model", json=tiny_request("queued-one")).json()["task_id"]

        # Idle SSE clients of the queued task get keep-alive comments; when they leave, nothing lingers.
        conn = service.redis()
        # The follower of the running task above is let go within a keep-alive interval: count from none.
        wait_until(lambda: _blocked_clients(conn) == 0, 60, "earlier SSE connections to Redis to close")
        with httpx.Client(base_url=service.api_url, timeout=30) as other:
            streams = [other.stream("GET", f"/api/v1/events/{queued}") for _ in range(5)]
            readers = [s.__enter__().iter_lines() for s in streams]  # (a dropped iterator closes its response)
            for lines in readers:
                assert next(lines).startswith("id: 0-0")
                wait_until(lambda lines=lines: next(lines).startswith(": keep-alive"), 60, "a keep-alive")
            # (each client leaves XREAD for a moment every second to send its keep-alive)
            wait_until(lambda: _blocked_clients(conn) >= 5, 60, "5 clients blocked in XREAD")
            for s in streams:
                s.__exit__(None, None, None)
        wait_until(lambda: _blocked_clients(conn) == 0, 60, "the SSE connections to Redis to close")

        stop = client.post("/api/v1/stop-training", json={"task_id": queued, "force_kill": False})
        assert stop.status_code == 200
        assert stop.json() | {"message": None} == {"status": "ok", "task_id": queued, "celery_state": "REVOKED",
                                                   "mode": "cooperative_stop", "message": None}
        names = [m["event"] for m in events_of(read_sse(client, f"/api/v1/events/{queued}"))]
        assert names[:2] == ["connected", "queued"] and names[-1] == "stopped" and "started" not in names

        stop = client.post("/api/v1/stop-training", json={"task_id": running, "force_kill": False}).json()
        assert stop["mode"] == "cooperative_stop" and stop["celery_state"] == "STARTED"
        events = events_of(read_sse(client, f"/api/v1/events/{running}"))
        names = [m["event"] for m in events]
        # The API acknowledges at once; the trainer says so again when it stops, after its checkpoint.
        assert names.count("stop_requested") == 2
        assert names[-4:] == ["stop_requested", "checkpoint", "status", "stopped"]
        stopped = events[-1]["data"]
        assert stopped["reason"] == "requested" and stopped["checkpoint"] and stopped["step"] >= 1
        again = client.post("/api/v1/stop-training", json={"task_id": running, "force_kill": True}).json()
        assert again["celery_state"] == "REVOKED" and "already" in again["message"]
        models = {m["model_name"] for m in client.get("/api/v1/completed-models").json()["models"]}
        assert "long-coop" not in models and "queued-one" not in models
        assert Job.fetch(queued, connection=conn, serializer=JSONSerializer).get_status() == JobStatus.CANCELED
        # Both MLflow runs are closed: one by its trainer, the cancelled one by the API.
        assert mlflow_state(service, queued) == ("KILLED", "stopped")
        assert mlflow_state(service, running) == ("KILLED", "stopped")


def test_force_stop_kills_the_job_and_the_stream_still_ends_with_stopped(service):
    with service.client() as client:
        task_id = submit_and_wait(client, tiny_request("long-force", max_steps=100_000))
        stop = client.post("/api/v1/stop-training", json={"task_id": task_id, "force_kill": True})
        assert stop.status_code == 200
        assert stop.json()["mode"] == "force_kill" and stop.json()["celery_state"] == "REVOKED"
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}"))
        assert [m["event"] for m in events[-3:]] == ["stop_forced", "status", "stopped"]
        assert events[-1]["data"]["reason"] == "force" and events[-1]["data"]["step"] >= 1
        assert "stop_requested" in [m["event"] for m in events]
        conn = service.redis()
        # RQ files the job as stopped just after the worker's stop callback has ended the stream.
        job = Job.fetch(task_id, connection=conn, serializer=JSONSerializer)
        wait_until(lambda: job.get_status() == JobStatus.STOPPED, 10, "RQ to file the job as stopped")
        assert mlflow_state(service, task_id) == ("KILLED", "stopped")
        # The worker survives a forced stop and takes the next job.
        health = wait_until(lambda: (h := client.get("/healthz").json())["workers"]["workers"][0]["state"] == "idle"
                            and h, 15, "the worker to be idle again")
        assert health["workers"]["count"] == 1


def test_compat_seed_reports_a_stop_made_elsewhere_as_finished_with_status_stopped(service):
    """The old canvas front end knows only `finished` and `error`: with ?compat=seed its stream of a run stopped by
    someone else ends in `finished` with `"status": "stopped"` (a forced stop, and a cancel while queued), while
    the plain stream keeps the honest `stopped`."""
    with service.client() as client:
        assert client.get("/api/v1/events/whatever?compat=nope").json()["detail"] == (
            "query parameter 'compat': Input should be 'seed'")
        running = submit_and_wait(client, tiny_request("compat-running", max_steps=100_000), until="progress")
        queued = client.post("/api/v1/train-complete-model", json=tiny_request("compat-queued")).json()["task_id"]
        with ThreadPoolExecutor(2) as pool:  # the front end's streams are open when the stops come
            live = pool.submit(read_sse, client, f"/api/v1/events/{running}?compat=seed")
            live_queued = pool.submit(read_sse, client, f"/api/v1/events/{queued}?compat=seed")
            wait_until(lambda: _blocked_clients(service.redis()) >= 2, 60, "both streams to be following")
            for task_id, force in ((queued, False), (running, True)):
                stop = client.post("/api/v1/stop-training", json={"task_id": task_id, "force_kill": force})
                assert stop.status_code == 200
            compat, compat_queued = events_of(live.result(120)), events_of(live_queued.result(120))

        names = [m["event"] for m in compat]
        assert "stopped" not in names and names[-3:] == ["stop_forced", "status", "finished"]
        end = compat[-1]["data"]
        assert end["status"] == "stopped" and end["reason"] == "force" and end["step"] >= 1
        assert end["model_name"] == "compat-running" and end["task_id"] == running and "path" not in end
        assert end["train_loss"] > 0 and end["elapsed_s"] > 0  # the last progress this client saw
        assert [m["event"] for m in compat_queued][-1] == "finished" and "started" not in compat_queued
        end = compat_queued[-1]["data"]
        assert end["status"] == "stopped" and end["model_name"] == "compat-queued" and end["train_loss"] is None

        # The plain stream of the same run is unchanged and ends with `stopped`, at the same stream id.
        plain = events_of(read_sse(client, f"/api/v1/events/{running}"))
        assert plain[-1]["event"] == "stopped" and plain[-1]["id"] == compat[-1]["id"]
        assert {k: v for k, v in compat[-1]["data"].items() if k in plain[-1]["data"]} == plain[-1]["data"]
        # A client that resumes past `started` still gets the model's name (from the task's record).
        again = events_of(read_sse(client, f"/api/v1/events/{running}?compat=seed",
                                   headers={"Last-Event-ID": compat[-2]["id"]}))
        assert [m["event"] for m in again] == ["connected", "finished"]
        assert again[-1]["data"]["model_name"] == "compat-running" and again[-1]["data"]["train_loss"] is None


def test_a_worker_killed_mid_training_fails_the_job_with_an_error_event(service, monkeypatch):
    """A worker of its own on another queue, killed with SIGKILL: its work-horse dies with it, the heartbeat
    stops, and the API's reaper ends the stream with `error` within seconds; /healthz stops counting it."""
    from slmb.api import redis_events as rev
    from slmb.api.routes.health import _workers
    from slmb.api.worker import HEARTBEAT_MISSES, heartbeat_s, submit

    monkeypatch.setenv("SLMB_HEARTBEAT_S", service.env["SLMB_HEARTBEAT_S"])  # judge as the service does

    worker = service.start_worker("doomed-worker", queue="doomed")
    service.wait_for_workers("doomed", 1)
    conn = service.redis()
    task_id = submit(conn, tiny_request("doomed", max_steps=100_000), queue="doomed")
    with service.client() as client:
        read_sse(client, f"/api/v1/events/{task_id}", on_message=lambda m: m["event"] == "step", timeout=90)
        horse = rev.RedisControl(conn).read_status(task_id)["pid"]
        [listed] = _workers(conn, "doomed")
        assert listed["alive"] and listed["state"] == "busy" and listed["current_job"] == task_id
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        t0 = time.monotonic()
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=30))
        took = time.monotonic() - t0
        assert events[-1]["event"] == "error", log_tail(service.tmp / "doomed-worker.log")
        assert "heartbeat" in events[-1]["data"]["message"] and events[-1]["data"]["type"] == "WorkerLost"
        assert took < 10
        wait_until(lambda: not os.path.exists(f"/proc/{horse}"), 10, "the work-horse to die with its worker")
        job = Job.fetch(task_id, connection=conn, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FAILED
        assert rev.celery_state(conn, task_id) == "FAILURE"
        assert mlflow_state(service, task_id) == ("FAILED", "error")
        assert "doomed" not in {m["model_name"] for m in client.get("/api/v1/completed-models").json()["models"]}
        # RQ still lists the dead worker for a minute; the health check goes by its silent heartbeat instead.
        [listed] = wait_until(lambda: [w for w in _workers(conn, "doomed") if not w["alive"]], 10,
                              "the killed worker to count as dead")
        assert listed["last_heartbeat_s"] > heartbeat_s() * HEARTBEAT_MISSES


def test_a_training_process_that_dies_fails_the_job_and_its_worker_carries_on(service):
    """The work-horse dies (as under the OOM killer); its worker notices at once and ends the stream with
    `error`."""
    from slmb.api import redis_events as rev

    conn = service.redis()
    with service.client() as client:
        task_id = submit_and_wait(client, tiny_request("oom", max_steps=100_000))
        os.kill(rev.RedisControl(conn).read_status(task_id)["pid"], signal.SIGKILL)
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=30))
        assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "ProcessDied"
        assert events[-1]["data"]["message"].startswith("the training process was killed by SIGKILL")
        assert rev.celery_state(conn, task_id) == "FAILURE"
        wait_until(lambda: client.get("/healthz").json()["workers"]["workers"][0]["state"] == "idle", 15,
                   "the worker to be idle again")
