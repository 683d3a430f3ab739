"""`slmb validate` and `slmb schema` as a user runs them: exit codes 0/1/2, --json output, a torch-free --help."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmb.cli import app
from slmb.core.spec import NODE_TYPES

REPO = Path(__file__).resolve().parent.parent


def slmb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmb", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def invalid_file(shared, tmp_path):
    body = json.loads((shared / "requests" / "gpt2-reference.json").read_text())
    body["model"][3]["children"][1]["data"]["numHeads"] = 7
    body["model"][3]["children"][3]["data"]["source"] = "ghost"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    return path


def test_valid_request_exits_0_and_shows_the_model(shared):
    out = slmb("validate", str(shared / "requests" / "gpt2-reference.json"))
    assert out.returncode == 0, out.stderr
    assert "162,349,056" in out.stdout and "valid" in out.stdout
    assert "/model/3/children/1" in out.stdout and "[B, T, 50257]" in out.stdout


def test_invalid_request_exits_1_and_json_carries_every_error(invalid_file):
    out = slmb("validate", str(invalid_file), "--json")
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["valid"] is False and "summary" not in report
    assert [(e["path"], e["check"]) for e in report["errors"]] == [
        ("/model/3/children/1/data/numHeads", "attention_heads"),
        ("/model/3/children/3/data/source", "residual_sources")]
    assert all(e["hint"] and e["expected"] for e in report["errors"])


def test_invalid_request_text_output_names_paths_and_hints(invalid_file):
    result = CliRunner().invoke(app, ["validate", str(invalid_file)])
    assert result.exit_code == 1
    assert "/model/3/children/1/data/numHeads" in result.output and "hint:" in result.output
    assert "invalid: 2 error(s)" in result.output


def test_valid_request_json(shared):
    # Llama 3.2 1B trains in ~22 GiB (fp32 on a CPU): valid on a machine that has it, whatever this one has
    result = CliRunner().invoke(app, ["validate", str(shared / "requests" / "llama3-reference.json"), "--json"],
                                env={"SLMB_WORKER_MEMORY": "64GiB"})
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["valid"] is True and report["errors"] == [] and report["warnings"] == []
    assert report["summary"]["total_parameters"] == 1_235_818_496
    assert report["summary"]["rows"][0]["output_shape"] == "[B, T, 2048]"


@pytest.mark.parametrize("case", ["missing", "not json"])
def test_unreadable_file_exits_2(tmp_path, case):
    path = tmp_path / "x.json"
    if case == "not json":
        path.write_text('{"model": [')
    out = slmb("validate", str(path))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and str(path) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00garbage", "cannot read"),
    (b"[" * 100_000, "nests too deeply"),
    (b"", "not valid JSON"),
    (b"{'model': []}", "not valid JSON"),
])
def test_other_unreadable_files_exit_2(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and message in result.output
    directory = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert directory.exit_code == 2


def test_integer_too_long_to_parse_exits_2(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"model": [], "x": ' + "9" * 5000 + "}")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "is not valid JSON" in result.output


def test_a_json_body_that_is_not_an_object_is_invalid_not_unreadable(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    result = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["errors"][0]["path"] == ""


def test_schema_prints_a_json_schema_with_every_node_type():
    out = slmb("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema["title"] == "TrainRequest" and "model" in schema["required"]
    text = json.dumps(schema)
    for node_type in NODE_TYPES:
        assert f'"const": "{node_type}"' in text, node_type
    props = schema["properties"]
    assert {"config", "model", "dataset", "dataset_config", "modelName"} <= set(props)
    # The canvas's names are what the schema documents.
    assert "numHeads" in json.dumps(schema["$defs"]["MHAttentionData"])


def test_help_is_fast_and_does_not_import_torch():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "slmb", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and "validate" in out.stdout and "schema" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "numpy", "pydantic", "transformers", "datasets",
                                                         "mlflow")}
    assert not heavy, sorted(heavy)[:10]
    assert elapsed < 5, f"slmb --help took {elapsed:.1f} s"
    check = subprocess.run([sys.executable, "-c", "import slmb.cli, sys; assert 'torch' not in sys.modules"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
