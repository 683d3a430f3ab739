"""The service's trust boundary and its answers to bad input (issue 11, points 1-5), each attack reproduced.

Whoever reaches the HTTP API does not own the machine (DESIGN.md §5): server files named as datasets or
tokenizers, cross-site form posts, oversize bodies, values JSON cannot carry and absolute server paths in what
the service says are all refused or kept out. Most tests use the app in-process (TestClient) with the test
stack's Redis, on a queue no worker listens on; the end-to-end ones use the stack's real API and worker.
"""

from __future__ import annotations

import json
import os
import select
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import shared_dir
from fastapi.testclient import TestClient

pytest.register_assert_rewrite("service_fixtures")
from service_fixtures import events_of, read_sse, serve_in_thread, tiny_request  # noqa: E402

from slmb.api import redis_events as rev  # noqa: E402
from slmb.api.app import Settings, create_app  # noqa: E402

pytest_plugins = ["service_fixtures"]
TRAIN, GENERATE, STREAM, STOP = ("/api/v1/train-complete-model", "/api/v1/generate-text",
                                 "/api/v1/generate-text/stream", "/api/v1/stop-training")
IDLE_QUEUE = f"trust-idle-{os.getpid()}"  # no worker listens: an accepted request is queued, never trained


@pytest.fixture
def app_client(service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)

    def make(**settings) -> TestClient:
        app = create_app(Settings(**{"redis_url": service.redis_url, "queue": IDLE_QUEUE, **settings}))
        return TestClient(app, raise_server_exceptions=False)

    return make


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A data root with a text file, a folder, a link out of the root and a folder hiding such a link."""
    root = tmp_path / "data"
    (root / "books").mkdir(parents=True)
    (root / "books" / "one.txt").write_text("To be, or not to be, that is the question. " * 40)
    (root / "notes.txt").write_text("a note " * 200)
    secret = tmp_path / "secret.txt"
    secret.write_text("the server's secret " * 100)
    (root / "escape").symlink_to(tmp_path)
    (root / "leak.txt").symlink_to(secret)
    (root / "mixed").mkdir()
    (root / "mixed" / "fine.txt").write_text("fine " * 100)
    (root / "mixed" / "hidden.txt").symlink_to(secret)
    (root / "loop").symlink_to(root / "loop")
    return root


def errors_at(resp: httpx.Response, pointer: str) -> list[dict]:
    assert resp.status_code == 422, resp.text
    return [e for e in strict_json(resp)["errors"] if e["path"] == pointer]


def strict_json(resp: httpx.Response):
    """The body as JSON proper: NaN, Infinity and invalid UTF-8 fail here."""
    return json.loads(resp.content.decode("utf-8"), parse_constant=lambda c: pytest.fail(f"{c} in {resp.text}"))


def cancel_idle_tasks(service) -> None:
    """Stop what a test queued on the idle queue: its MLflow run is closed and its stream ended."""
    conn = service.redis()
    control = rev.RedisControl(conn)
    for task in rev.list_tasks(conn):
        if task["queue"] == IDLE_QUEUE and not rev.terminal_event(conn, task["task_id"]):
            control.request_stop(task["task_id"])


# ---------------------------------------------------------------------------------------------------- datasets


OUTSIDE = ["../../../../etc", "/etc", "/etc/hostname", "/no/such/dir", "~", "~/.bashrc", "../secret.txt",
           "books/../../secret.txt", "escape", "escape/secret.txt", "leak.txt", "mixed", "./../data/notes.txt",
           "/" + "a" * 300, "a" * 300, "books/\0one.txt", "loop", "loop/x.txt"]


def test_a_dataset_outside_the_data_root_is_a_422_that_reveals_nothing(app_client, data_root, service):
    with app_client(data_dir=data_root) as client:
        errors = {}
        for dataset in OUTSIDE:
            resp = client.post(TRAIN, json={**tiny_request("trust-ds"), "dataset": dataset})
            [error] = errors_at(resp, "/dataset")
            assert error["found"] == dataset[:80]
            errors[dataset] = {k: v for k, v in error.items() if k != "found"}
    # One answer for every refusal: "/etc/hostname" (there) reads like "/no/such/dir" (not there), a link out
    # of the root like "..".
    assert len({json.dumps(e, sort_keys=True) for e in errors.values()}) == 1, errors
    message = errors["/etc"]["message"]
    assert "named dataset" in message and "data root" in message and str(data_root) not in message
    assert all(t["model_name"] != "trust-ds" for t in rev.list_tasks(service.redis()))  # nothing was queued
    # Every error at once: a refused dataset beside a semantic error of the canvas.
    body = {**tiny_request("trust-ds"), "dataset": "/etc"}
    body["model"][-1]["data"]["outDim"] = 100  # fewer logits than the byte tokenizer's 257 tokens
    with app_client(data_dir=data_root) as client:
        paths = {e["path"] for e in client.post(TRAIN, json=body).json()["errors"]}
    assert "/dataset" in paths and len(paths) >= 2, paths


def test_without_a_data_root_only_named_datasets(app_client, data_root, service):
    with app_client(data_dir=None) as client:
        for dataset in ("notes.txt", "books", str(data_root / "notes.txt"), "/etc"):
            [error] = errors_at(client.post(TRAIN, json={**tiny_request("trust-noroot"), "dataset": dataset}),
                                "/dataset")
            assert "there is no data root" in error["message"]
        for dataset in ("tiny_shakespeare", "roneneldan/TinyStories"):
            resp = client.post(TRAIN, json={**tiny_request("trust-named"), "dataset": dataset})
            assert resp.status_code == 200, resp.text
    cancel_idle_tasks(service)


def test_files_under_the_data_root_are_accepted(app_client, data_root, service):
    with app_client(data_dir=data_root) as client:
        for dataset in ("notes.txt", "books", "books/one.txt", "mixed/fine.txt", "tiny_shakespeare"):
            resp = client.post(TRAIN, json={**tiny_request("trust-root"), "dataset": dataset})
            assert resp.status_code == 200, (dataset, resp.text)
            assert resp.json()["training_config"]["dataset"] == dataset
        # Inside the root, a missing file may be named as missing: the root is there to be offered.
        [error] = errors_at(client.post(TRAIN, json={**tiny_request("trust-root"), "dataset": "nope.txt"}),
                            "/dataset")
        assert error["message"] == "no such file or folder under the data root"
    cancel_idle_tasks(service)


def test_the_worker_resolves_an_http_task_under_the_data_root_not_its_working_directory(service):
    """The stored request of an HTTP task is trained confined: a file in the worker's working directory (the
    stack's tmp) is not a dataset, though `Path(dataset)` would find it there."""
    from slmb.api.worker import submit

    (service.tmp / "cwd-secret.txt").write_text("secret in the worker's working directory " * 200)
    conn = service.redis()
    body = {**tiny_request("trust-cwd", max_steps=2), "dataset": "cwd-secret.txt"}
    task_id = submit(conn, body)
    with service.client() as client:
        events = events_of(read_sse(client, f"/api/v1/events/{task_id}", timeout=120))
    assert events[-1]["event"] == "error", events
    assert "is not under the data root" in events[-1]["data"]["message"]
    assert "started" not in [e["event"] for e in events]


def test_core_confines_datasets_and_tokenizers(data_root, monkeypatch, tmp_path):
    from slmb.core.data import DatasetNotFoundError, DatasetRefusedError, prepare_tokens
    from slmb.core.tokenizers import TokenizerNotFoundError, load_tokenizer

    tok = load_tokenizer("byte")
    monkeypatch.setenv("SLMB_DATA_DIR", str(data_root))
    monkeypatch.chdir(tmp_path)
    assert prepare_tokens("secret.txt", None, tok).meta["total_tokens"] > 0  # the CLI: the user's own files
    for dataset in ("../secret.txt", str(tmp_path / "secret.txt"), "leak.txt", "mixed", "escape"):
        with pytest.raises(DatasetRefusedError, match="the dataset is not available"):
            prepare_tokens(dataset, None, tok, confined=True)
    with pytest.raises(DatasetNotFoundError, match="not under the data root"):  # not from the working directory
        prepare_tokens("secret.txt", None, tok, confined=True)
    assert prepare_tokens("books", None, tok, confined=True).meta["documents"] == 1
    monkeypatch.delenv("SLMB_DATA_DIR")
    with pytest.raises(DatasetRefusedError, match="there is no data root"):
        prepare_tokens("books", None, tok, confined=True)

    llama3 = shared_dir() / "tokenizers" / "llama3" / "tokenizer.model"
    assert load_tokenizer(str(llama3)).vocab_size == 128256
    with pytest.raises(TokenizerNotFoundError, match="files are not accepted"):
        load_tokenizer(str(llama3), paths=False)
    assert load_tokenizer("llama3", paths=False).vocab_size == 128256  # from the search path


def test_a_tokenizer_file_is_a_422_named_or_not(app_client, data_root):
    llama3 = shared_dir() / "tokenizers" / "llama3" / "tokenizer.model"
    with app_client(data_dir=data_root) as client:
        answers = []
        for tokenizer in (str(llama3), "/no/such/tokenizer.model", "../../tokenizer.model", "~/tok.tiktoken"):
            body = tiny_request("trust-tok")
            body["config"]["tokenizer"] = tokenizer
            [error] = errors_at(client.post(TRAIN, json=body), "/config/tokenizer")
            answers.append(error)
    assert all(a == answers[0] for a in answers) and "by name" in answers[0]["message"]
    assert str(llama3) not in json.dumps(answers)


# ---------------------------------------------------------------------------------------------------- 415


def test_json_routes_need_application_json(app_client, service):
    body = json.dumps(tiny_request("trust-ct"))
    with app_client() as client:
        for path in (TRAIN, STOP, GENERATE, STREAM):
            for headers, content in (({"Content-Type": "text/plain"}, body),
                                     ({"Content-Type": "application/x-www-form-urlencoded"}, "a=b&c=d"),
                                     ({"Content-Type": "multipart/form-data; boundary=x"}, "--x--"),
                                     ({"Content-Type": "application/json; charset=latin-1"}, body),
                                     ({"Content-Type": "application/jsonp"}, body),
                                     ({}, body)):
                resp = client.post(path, content=content, headers=headers)
                assert resp.status_code == 415, (path, headers, resp.text)
                assert "application/json" in resp.json()["detail"]
        resp = client.post(TRAIN, data={"modelName": "trust-form"})  # what an HTML form sends
        assert resp.status_code == 415
        # A browser can read the refusal: it carries the CORS headers.
        resp = client.post(TRAIN, content=body, headers={"Content-Type": "text/plain",
                                                         "Origin": "http://localhost:5173"})
        assert resp.status_code == 415 and resp.headers["access-control-allow-origin"] == "http://localhost:5173"
        for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
            resp = client.post(STOP, content='{"task_id": "no-such-task"}', headers={"Content-Type": content_type})
            assert resp.status_code == 404, (content_type, resp.text)
    assert all(t["model_name"] != "trust-ct" for t in rev.list_tasks(service.redis()))


# ---------------------------------------------------------------------------------------------------- 413


def test_every_route_limits_its_body_with_or_without_content_length(app_client):
    limit = 10_000
    big = json.dumps({"model_name": "m", "input_text": "x" * (3 * limit)}).encode()

    def chunked():
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    json_headers = {"Content-Type": "application/json"}
    with app_client(max_body_bytes=limit) as client:
        for method, path in (("POST", GENERATE), ("POST", STREAM), ("POST", TRAIN), ("POST", STOP),
                             ("GET", "/api/v1/completed-models"), ("GET", "/healthz")):
            sized = client.request(method, path, content=big, headers=json_headers)
            assert sized.status_code == 413, (path, sized.text)
            streamed = client.request(method, path, content=chunked(), headers=json_headers)
            assert "content-length" not in streamed.request.headers
            if method == "GET":  # a route that reads no body never holds one: it answers as usual
                assert streamed.status_code == 200, (path, streamed.text)
                continue
            assert streamed.status_code == 413, (path, streamed.text)
            assert str(limit) in streamed.json()["detail"]
        # Under the limit, the same routes answer as usual.
        assert client.post(STOP, json={"task_id": "no-such-task"}).status_code == 404


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_50_mb_chunked_body_is_refused_early_and_not_held(service):
    """The stack's API (limit 200 000 bytes) gets a 50 MB chunked body on the streamed route, with no
    Content-Length: it answers 413 once the limit is passed and its memory does not grow by the body."""
    api = next(p for p in service.procs if "serve" in p.args)
    host, port = service.api_url.removeprefix("http://").split(":")
    before = _rss_kib(api.pid)
    total, sent, answer = 50 << 20, 0, b""
    chunk = b"[" + b"1," * 32767 + b"1]"  # 64 KiB of JSON-looking bytes
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {STREAM} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        try:
            while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
                answer += data
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert sent < total // 4, f"{sent} bytes went in before the refusal"
    assert _rss_kib(api.pid) - before < 25_000, "the API process grew by the body"


# ---------------------------------------------------------------------------------------------------- bad values


def raw_post(client: TestClient, path: str, text: str) -> httpx.Response:
    return client.post(path, content=text.encode("utf-8", "surrogatepass"),
                       headers={"Content-Type": "application/json"})


def test_values_json_cannot_carry_are_422s_with_their_pointer(app_client):
    body = tiny_request("trust-nan")
    with app_client() as client:
        for pointer, mutate in (
                ("/config/learning_rate", lambda b: b["config"].update(learning_rate=float("nan"))),
                ("/config/grad_clip", lambda b: b["config"].update(grad_clip=float("inf"))),
                ("/model/0/data/embDim", lambda b: b["model"][0]["data"].update(embDim=float("-inf"))),
                ("/config/unknown", lambda b: b["config"].update(unknown=[float("nan")]) or
                 b["config"].update(unknown=float("nan")))):
            case = json.loads(json.dumps(body))
            mutate(case)
            text = json.dumps(case)  # Python writes NaN, Infinity and -Infinity, as a careless client would
            assert "NaN" in text or "Infinity" in text
            errors = errors_at(raw_post(client, TRAIN, text), pointer)
            assert errors and errors[0]["expected"] == "a finite number", errors
            assert errors[0]["found"] in ("NaN", "Infinity", "-Infinity")
        # A lone surrogate, in a value and in a key.
        text = json.dumps(body).replace('"trust-nan"', '"trust-\\ud800"', 1)
        [error] = errors_at(raw_post(client, TRAIN, text), "/modelName")
        assert "surrogate" in error["message"] and error["found"] == "trust-\\ud800"
        text = json.dumps(body).replace('"config": {', '"config": {"\\udfff": 1, ', 1)
        assert "surrogate" in errors_at(raw_post(client, TRAIN, text), "/config")[0]["message"]
        # Integers past what torch and numpy take.
        for key, value in (("seed", 2**70), ("seed", 2**64), ("seed", -1), ("max_steps", 2**70),
                           ("epochs", 2**70), ("batch_size", 2**70), ("eval_batches", 2**70),
                           ("warmup_steps", 2**70), ("checkpoint_every", 10**30)):
            case = json.loads(json.dumps(body))
            case["config"][key] = value
            assert errors_at(client.post(TRAIN, json=case), f"/config/{key}"), key
        seed_ok = json.loads(json.dumps(body))
        seed_ok["config"]["seed"] = 2**64 - 1
        assert client.post(TRAIN, json=seed_ok).status_code == 200


def test_bad_sampling_values_are_422s_that_serialise(app_client, service):
    with app_client() as client:
        for route in (GENERATE, STREAM):
            for field, value in (("top_p", "NaN"), ("top_p", "Infinity"), ("top_p", "1.5"), ("top_p", "0"),
                                 ("temperature", "NaN"), ("temperature", "-Infinity"), ("temperature", "-1"),
                                 ("repetition_penalty", "NaN"), ("repetition_penalty", "0"),
                                 ("seed", str(2**70)), ("seed", "-1"), ("top_k", str(2**70)),
                                 ("input_text", '"\\ud800 lone"'), ("stop", '["ok", "\\udc00"]'),
                                 ("model_name", '"m\\ud800"')):
                fields = {"model_name": '"no-such-model"', "input_text": '"hi"', field: value}
                text = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
                resp = raw_post(client, route, text)
                assert resp.status_code == 422, (route, field, value, resp.text)
                body = strict_json(resp)
                errors = [e for e in body["errors"] if e["path"].split("/")[1] == field]
                assert errors and body["detail"].startswith(f"/{field}"), body  # the one error here, first
        # Valid values reach the model lookup (404: no such model), so the 422s above are about the values.
        ok = raw_post(client, GENERATE, '{"model_name": "no-such-model", "top_p": 0.9, "seed": 18446744073709551615}')
        assert ok.status_code == 404, ok.text
    cancel_idle_tasks(service)


# ---------------------------------------------------------------------------------------------------- paths


def test_no_response_or_event_of_a_real_run_carries_a_server_path(service, tmp_path_factory):
    """A tiny run trained by the stack's worker from a file under the data root, with checkpoints, then its
    model fetched and used by the API; and a run that fails while looking for a named dataset. Every response
    and SSE message is scanned for the absolute paths of this machine."""
    forbidden = {str(tmp_path_factory.getbasetemp()), str(service.tmp), str(shared_dir()),
                 str(Path.home()) + "/", tempfile.gettempdir() + "/", str(Path.cwd())}
    texts: list[str] = []
    with service.client() as client:
        body = {**tiny_request("trust-paths", max_steps=6), "dataset": "tiny_shakespeare/input.txt"}
        body["config"]["checkpoint_every"] = 2
        resp = client.post(TRAIN, json=body)
        assert resp.status_code == 200, resp.text
        texts.append(resp.text)
        task_id = resp.json()["task_id"]
        with client.stream("GET", f"/api/v1/events/{task_id}", timeout=httpx.Timeout(10, read=180)) as stream:
            lines = []
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith("data:") and json.loads(line[5:])["event"] in ("finished", "stopped", "error"):
                    break
        texts.append("\n".join(lines))
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        names = [e["event"] for e in events]
        assert names[-1] == "finished", events[-3:]
        # The paths are there, under placeholders.
        checkpoints = [e["data"]["path"] for e in events if e["event"] == "checkpoint"]
        assert checkpoints and all(p.startswith(f"$SLMB_HOME/runs/{task_id}/") for p in checkpoints)
        assert events[-1]["data"]["path"].startswith("$SLMB_HOME/")

        generated = client.post(GENERATE, json={"model_name": "trust-paths", "input_text": "ROMEO:",
                                                "max_length": 4})
        assert generated.status_code == 200, generated.text
        texts.append(generated.text)
        models = client.get("/api/v1/completed-models")
        texts.append(models.text)
        [model] = [m for m in models.json()["models"] if m["model_name"] == "trust-paths"]
        assert model["source"] == "local" and model["path"] == "completed/trust-paths"
        assert model["structure_file"] == "completed/trust-paths/structure.json"
        health = client.get("/healthz")
        texts.append(health.text)
        assert health.json()["mlflow"]["tracking"] == "sqlite"

        # A named dataset that is not on this offline machine: the error lists where it was looked for.
        missing = client.post(TRAIN, json={**tiny_request("trust-missing", max_steps=2),
                                           "dataset": "roneneldan/TinyStories"})
        assert missing.status_code == 200, missing.text
        texts.append(missing.text)
        events = events_of(read_sse(client, f"/api/v1/events/{missing.json()['task_id']}", timeout=180))
        texts.append(json.dumps(events))
        assert events[-1]["event"] == "error" and "$SLMB_DATA_DIR/roneneldan/TinyStories" in \
            events[-1]["data"]["message"], events[-1]
    leaks = {(path, text[max(0, text.find(path) - 80):text.find(path) + 80]) for text in texts for path in forbidden
             if path in text}
    assert not leaks, leaks


def test_redact_names_roots_and_only_whole_path_parts(monkeypatch, tmp_path):
    from slmb.api.trust import redact

    monkeypatch.setenv("SLMB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLMB_DATA_DIR", str(tmp_path / "data"))
    out = redact({"a": f"saved to {tmp_path}/home/runs/x and {tmp_path}/data/books",
                  "b": [f"{tmp_path}/homework", f"{Path.home()}/.cache/slmb"], "c": 1.5})
    assert out == {"a": "saved to $SLMB_HOME/runs/x and $SLMB_DATA_DIR/books",
                   "b": ["$TMPDIR/" + str(tmp_path / "homework").removeprefix(tempfile.gettempdir() + "/"),
                         "~/.cache/slmb"], "c": 1.5}


def test_model_metadata_names_no_local_place(monkeypatch, tmp_path):
    """A model a CLI user trained with a local dataset file, a tokenizer file and an MLflow store of their own."""
    from slmb.api.trust import redact, store_kind, store_relative

    monkeypatch.setenv("SLMB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////srv/tracking/mlflow.db")
    item = {"model_name": "m", "path": str(tmp_path / "home" / "completed" / "m"), "dataset": "/srv/corpus/books.txt",
            "tokenizer": "/opt/tok/llama.model", "mlflow_tracking_uri": "sqlite:////srv/tracking/mlflow.db",
            "parameters": 1234, "tags": ["x"]}
    [out] = store_relative([item], ("path", "structure_file"))
    assert out == {"model_name": "m", "path": "completed/m", "dataset": "books.txt", "tokenizer": "llama.model",
                   "mlflow_tracking_uri": "sqlite", "parameters": 1234, "tags": ["x"]}
    assert redact("MLflow tracking at /srv/tracking/mlflow.db is down") == (
        "MLflow tracking at $MLFLOW_STORE/mlflow.db is down")
    assert [store_kind(u) for u in ("/srv/mlruns", "file:///srv/mlruns", "sqlite:///x.db", "http://h:5000")] == [
        "file", "file", "sqlite", "http"]


# ---------------------------------------------------------------------------------------------------- fuzzing


def test_schemathesis_finds_no_server_error(service, monkeypatch):
    """Every operation of the OpenAPI schema, with bodies that fit it and bodies that do not: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    monkeypatch.setenv("MLFLOW_TRACKING_URI", service.mlflow_uri)
    app = create_app(Settings(redis_url=service.redis_url, queue=IDLE_QUEUE, max_body_bytes=200_000,
                              data_dir=shared_dir() / "datasets"))
    schema = schemathesis.openapi.from_dict(app.openapi())
    failures, calls = [], []
    started = time.monotonic()

    def fuzz(url: str, operation, mode: GenerationMode) -> None:
        @settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            resp = case.call(base_url=url, timeout=60)
            calls.append((operation.label, resp.status_code))
            if resp.status_code >= 500:
                failures.append((operation.label, mode.value, resp.status_code, resp.text[:300],
                                 case.as_curl_command()))

        try:
            call()
        except Unsatisfiable:  # nothing in the operation can be wrong (no parameters, no body)
            assert mode == GenerationMode.NEGATIVE, operation.label

    with serve_in_thread(app) as url:
        for result in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(url, result.ok(), mode)
    cancel_idle_tasks(service)
    assert len(calls) >= 100 and len({label for label, _ in calls}) >= 7, calls
    assert not failures, failures
    assert time.monotonic() - started < 300


def test_the_data_root_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMB_DATA_DIR", str(tmp_path))
    assert Settings.from_env().data_dir == tmp_path
    monkeypatch.delenv("SLMB_DATA_DIR")
    assert Settings.from_env().data_dir is None
