"""The ``slmb`` command line: thin commands that parse, call one library function, and render.

Imports of torch, pydantic models and rich tables happen inside the commands so ``slmb --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="slmb: design a small language model as JSON, validate it, train it, generate with it.")

EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def main() -> None:
    command = typer.main.get_command(app)
    _name_metavars(command)
    command()


def _name_metavars(command: Any) -> None:
    """Give every option a metavar that reads as a placeholder (``--device DEVICE``, ``--epochs N``) where typer
    would print its type (``<str>``, ``<int range>``)."""
    for sub in getattr(command, "commands", {}).values():
        _name_metavars(sub)
    for param in command.params:
        if param.metavar is not None or getattr(param, "is_flag", True):  # arguments have no is_flag: kept
            continue
        kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if kind is bool:
            continue
        param.metavar = {int: "N", float: "X", Path: "PATH"}.get(kind) or param.name.rsplit("_", 1)[-1].upper()


def read_request(path: Path) -> Any:
    """The parsed JSON body of a request file; exits 2 with a clear message when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}", EXIT_UNREADABLE)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", EXIT_UNREADABLE)
    except RecursionError:
        _fail(f"{path} nests too deeply to parse", EXIT_UNREADABLE)
    except ValueError as exc:  # e.g. an integer literal longer than Python will convert
        _fail(f"{path} is not valid JSON: {exc}", EXIT_UNREADABLE)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return f"{n:,.1f} TiB"


MAX_MEMORY = typer.Option(None, "--max-memory", envvar="SLMB_WORKER_MEMORY", metavar="SIZE",
                          help="memory a training run may use, e.g. 16GiB or 500MB (default: this machine's RAM "
                               "less a reserve, or the GPU's memory)")


def _memory_limit(value: str | None, flag: str = "--max-memory") -> int | None:
    """--max-memory in bytes; also put in the environment, where the trainer's own check reads it."""
    if value is None:
        return None
    import os

    from slmb.core.memory import parse_bytes

    try:
        limit = parse_bytes(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None
    os.environ["SLMB_WORKER_MEMORY"] = str(limit)
    return limit


def _refuse_if_too_big(body: Any, overrides: dict[str, Any], limit: int | None, world_size: int = 1) -> None:
    """`slmb train` refuses a run that cannot fit in memory (on each of ``world_size`` devices) before it creates
    or loads anything, with the error `slmb validate` prints; other problems are left to the trainer's own
    validation."""
    from slmb.core.trainer import apply_overrides
    from slmb.core.validate import validate as run_validation

    if not isinstance(body, dict):
        return
    report = run_validation(apply_overrides(body, overrides), admit=True, memory_limit=limit, world_size=world_size)
    for e in report.errors:
        if e.check == "memory" or (world_size > 1 and e.path == "/config/batch_size"):
            _fail(f"{e.path}: {e.message}\n  hint: {e.hint}", EXIT_INVALID)


@app.command()
def validate(file: Path = typer.Argument(..., help="request JSON (the body the canvas posts)"),
             as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
             max_memory: str | None = MAX_MEMORY,
             nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1,
                                                help="judge memory per device for a run on this many processes "
                                                     "(config.distributed picks DDP or FSDP)"),
             nnodes: int = typer.Option(1, "--nnodes", min=1, help="machines the run will use")) -> None:
    """Check a request and show the model it describes: nodes, output shapes, parameters, memory.

    Exit code 0 when valid, 1 when invalid (every error is printed; a run whose estimated peak memory is over
    the limit is one), 2 when the file cannot be read.
    """
    body = read_request(file)  # before the heavy imports: an unreadable file fails at once
    from slmb.core.validate import validate as run_validation

    report = run_validation(body, admit=True, memory_limit=_memory_limit(max_memory),
                            world_size=nproc_per_node * nnodes)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        _render_report(report, file)
    raise typer.Exit(0 if report.ok else EXIT_INVALID)


def _render_report(report, file: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    if report.summary:
        s = report.summary
        table = Table(title=f"{file.name}: {report.request.model_name or '(no modelName)'}", title_justify="left")
        for col, kw in (("node", {"no_wrap": True}), ("type", {"no_wrap": True}), ("output", {"no_wrap": True}),
                        ("parameters", {"justify": "right", "no_wrap": True}), ("", {"style": "dim"})):
            table.add_column(col, **kw)
        for row in s.rows:
            params = f"{row.parameters:,}" if row.parameters else "-"
            table.add_row(row.path, "  " * row.depth + row.type, row.output_shape, params, escape(row.note))
        console.print(table)
        m = s.memory
        console.print(f"parameters: [bold]{s.total_parameters:,}[/] (trainable {s.trainable_parameters:,})   "
                      f"vocabulary: {s.vocab_size:,}   context: {s.context_length:,}")
        where = m['device'] if (m.get("world_size") or 1) == 1 else (
            f"each of {m['world_size']} {m['device']} devices ({m['strategy']}, {m['device_batch_size']} rows each)")
        console.print(f"memory: weights {_human_bytes(m['weights_fp32'])} fp32 / {_human_bytes(m['weights_bf16'])} "
                      f"bf16; training peak ≈ [bold]{_human_bytes(m['training_total'])}[/] on {where} in "
                      f"{m['dtype']} at batch {m['batch_size']} × {m['context_length']} "
                      f"({s.estimate.breakdown()})", highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning[/] {escape(w.path or '/')}: {escape(w.message)}"
                      + (f" ({escape(w.hint)})" if w.hint else ""), highlight=False)
    for e in report.errors:
        detail = "; ".join(x for x in (f"expected {e.expected}" if e.expected else "",
                                       f"found {e.found!r}" if e.found is not None else "") if x)
        console.print(f"[red]error[/] {escape(e.path or '/')}: {escape(e.message)}"
                      + (escape(f" [{detail}]") if detail else "")
                      + (f"\n      hint: {escape(e.hint)}" if e.hint else ""), highlight=False)
    if report.ok:
        console.print("[green]valid[/]")
    else:
        console.print(f"[red]invalid[/]: {len(report.errors)} error(s)")


@app.command("export")
def export_model(model: str = typer.Argument(..., help="name of a completed model (see `slmb list`)"),
                 out_dir: Path = typer.Argument(..., help="directory to write (new, or empty)"),
                 fmt: str = typer.Option("hf", "--format",
                                         help="hf: a transformers checkpoint; gguf: model.gguf for llama.cpp")
                 ) -> None:
    """Write a completed model as a transformers checkpoint (GPT-2, Llama or Qwen3 canvases) that
    AutoModelForCausalLM.from_pretrained(OUT_DIR) and AutoTokenizer load offline, with the same logits.

    A canvas that does not map (sinusoidal or relative positions, post-norm, ...) exits 1 naming the node."""
    from slmb.core.export import ExportError, export_hf
    from slmb.core.store import StoreError

    try:
        result = export_hf(model, out_dir, fmt)
    except (ExportError, StoreError) as exc:
        _fail(str(exc), EXIT_INVALID)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"{result.architecture} checkpoint written to {result.out_dir}: {', '.join(result.files)}")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the request body."""
    from slmb.core.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def generate(model: str = typer.Argument(..., help="name of a completed model (see `slmb list`)"),
             prompt: str = typer.Argument("", help="text to continue"),
             max_length: int = typer.Option(200, "--max-length", "-n", help="new tokens at most"),
             temperature: float = typer.Option(0.8, help="0 = greedy"),
             top_k: int = typer.Option(40, "--top-k", help="0 = off"),
             top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling; 1 = off"),
             repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
             seed: int | None = typer.Option(None, help="same seed, same text"),
             stop: list[str] = typer.Option([], "--stop", metavar="TEXT",
                                            help="end the text before TEXT; repeat for several"),
             stream: bool = typer.Option(True, "--stream/--no-stream", help="print text as it comes"),
             device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps"),
             bf16: bool = typer.Option(False, "--bf16",
                                       help="bf16 weights: half the memory, not bit-identical, mostly slower"),
             as_json: bool = typer.Option(False, "--json", help="print one JSON object with the result")) -> None:
    """Generate text with a completed model; prints the prompt and its continuation."""
    from slmb.core.generate import Generation, SamplingParams, load_generator
    from slmb.core.store import StoreError

    try:
        params = SamplingParams(max_new_tokens=max_length, temperature=temperature, top_k=top_k,
                                top_p=top_p if top_p < 1.0 else None, repetition_penalty=repetition_penalty,
                                seed=seed, stop=stop)
    except ValueError as exc:
        _fail(str(exc), EXIT_INVALID)
    try:
        gen, _ = load_generator(model, device, dtype="bf16" if bf16 else None)
    except (StoreError, FileNotFoundError) as exc:
        _fail(str(exc), EXIT_INVALID)
    result = Generation(prompt, "")
    if as_json or not stream:
        for _ in gen.stream(prompt, params, result):
            pass
    else:
        sys.stdout.write(prompt)
        for delta in gen.stream(prompt, params, result):
            sys.stdout.write(delta)
            sys.stdout.flush()
    if as_json:
        typer.echo(json.dumps({"model_name": model, "input_text": prompt, "output_text": result.output_text,
                               "generated_text": result.text, "new_tokens": len(result.token_ids),
                               "prompt_tokens": result.prompt_tokens, "finish_reason": result.finish_reason,
                               "tokens_per_sec": round(result.tokens_per_sec, 2)}, ensure_ascii=False))
    elif not stream:
        typer.echo(result.output_text)
    else:
        typer.echo()
        typer.echo(f"[{len(result.token_ids)} tokens, {result.tokens_per_sec:.1f} tokens/s, "
                   f"{result.finish_reason}]", err=True)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
          port: int = typer.Option(8000, help="HTTP port"),
          redis_url: str | None = typer.Option(None, "--redis-url", envvar="SLMB_REDIS_URL",
                                               help="a running Redis; without one a private redis-server starts, "
                                                    "its data in $SLMB_HOME/redis"),
          workers: int = typer.Option(1, "--workers", min=0, help="worker processes to start (0: API only)"),
          data_dir: Path | None = typer.Option(
              None, "--data-dir", envvar="SLMB_DATA_DIR", file_okay=False, exists=True,
              help="the data root: HTTP callers may name files and folders under it as datasets (else named "
                   "datasets only)"),
          worker_memory: str | None = typer.Option(
              None, "--worker-memory", envvar="SLMB_WORKER_MEMORY", metavar="SIZE",
              help="memory a training may use, e.g. 16GiB: larger requests get a 422 (default: this machine's RAM "
                   "less a reserve, or the GPU's memory)"),
          nproc_per_node: int | None = typer.Option(
              None, "--nproc-per-node", min=1, envvar="SLMB_NPROC_PER_NODE",
              help="each worker trains every run on N processes through torchrun: one per GPU (NCCL), or CPU "
                   "processes (gloo); the API then admits a run by one device's share and a batch_size that splits "
                   "over N (default: one process per run)"),
          mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", envvar="SLMB_SERVE_MLFLOW",
                                      help="start the MLflow UI on the tracking store (not when MLFLOW_TRACKING_URI "
                                           "names a server: the links point there)"),
          mlflow_port: int = typer.Option(5000, "--mlflow-port", min=1, max=65535, envvar="SLMB_MLFLOW_PORT",
                                          help="the MLflow UI's port"),
          mlflow_host: str = typer.Option("127.0.0.1", "--mlflow-host",
                                          help="address the MLflow UI listens on (it has no login: mind who can "
                                               "reach it)"),
          log_level: str = typer.Option("info", "--log-level")) -> None:
    """Run the HTTP service (API, workers, the MLflow UI and, unless --redis-url is given, Redis) until Ctrl-C or
    SIGTERM. The workers, the UI and Redis it starts are restarted when they exit."""
    import logging
    import os

    if data_dir is not None:  # the API and the workers it starts read it from the environment
        os.environ["SLMB_DATA_DIR"] = str(data_dir.resolve())
    _memory_limit(worker_memory, "--worker-memory")  # so does this

    from slmb.api.serve import serve as run_service

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_service(host=host, port=port, redis_url=redis_url, workers=workers, log_level=log_level,
                    nproc_per_node=nproc_per_node, mlflow=mlflow, mlflow_port=mlflow_port, mlflow_host=mlflow_host)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        _fail(str(exc), EXIT_INVALID)


@app.command()
def worker(redis_url: str = typer.Option(..., "--redis-url", envvar="SLMB_REDIS_URL", help="the service's Redis"),
           queue: list[str] = typer.Option([], "--queue", help="queue to take jobs from (repeatable; default "
                                                               "$SLMB_QUEUE or 'slmb')"),
           name: str | None = typer.Option(None, help="worker name (default: RQ's)"),
           burst: bool = typer.Option(False, help="exit once the queues are empty"),
           nproc_per_node: int | None = typer.Option(
               None, "--nproc-per-node", min=1, envvar="SLMB_NPROC_PER_NODE",
               help="train every run on N processes through torchrun: one per GPU of this machine (NCCL), or CPU "
                    "processes (gloo); config.distributed picks DDP or FSDP (default: one process per run)")) -> None:
    """Run a training worker: takes queued runs from Redis, trains them, streams their events back."""
    from slmb.api.worker import run_worker

    run_worker(redis_url, queue or None, burst=burst, name=name, nproc_per_node=nproc_per_node)


EXIT_STOPPED = 3  # `slmb train` ended by a stop (Ctrl-C or `slmb stop`): resumable, but not a finished model

# What to change on the command line when a run fails for want of its data or tokenizer (the error names where
# slmb looked; these say how to point it elsewhere without editing the request).
FAILURE_HINTS = {
    "DatasetNotFoundError": "hint: give another dataset with `slmb train FILE --dataset NAME|PATH` (a local "
                            ".txt/.jsonl/.json/.parquet file or a folder of them)",
    "DatasetRefusedError": "hint: give another dataset with `slmb train FILE --dataset NAME|PATH`",
    "TokenizerNotFoundError": "hint: give another tokenizer with `slmb train FILE --tokenizer NAME|PATH` (gpt2 and "
                              "byte need no files), or set SLMB_TOKENIZER_DIR",
}


def _fail_run(exc: BaseException, shown: bool) -> None:
    """A run that failed: its error once, on stderr (the display already printed it, formatted, when ``shown``),
    with a hint when a command-line option fixes it; exit 1."""
    if not shown:
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
    hint = FAILURE_HINTS.get(type(exc).__name__)
    if hint:
        typer.echo(hint, err=True)
    raise typer.Exit(EXIT_INVALID)


def _local_path_or_name(value: str | None) -> str | None:
    """A --dataset/--tokenizer value: an existing local path made absolute (a resumed run finds it from anywhere),
    anything else (a name) as given."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _refuse_resume(task_id: str) -> None:
    """Exit 1 with the reason when the run cannot be resumed (see :func:`slmb.core.control.resume_problem`)."""
    from slmb.core.control import resume_problem
    from slmb.core.store import StoreError, run_dir

    try:
        problem = resume_problem(task_id)
    except StoreError as exc:
        problem = str(exc)
    if problem is None:
        return
    try:
        request = run_dir(task_id).request
        again = f"\n  to train it again from the start: slmb train {request}" if request.is_file() else ""
    except StoreError:
        again = ""
    _fail(problem + (again if "no checkpoint" in problem else ""), EXIT_INVALID)


def _device_of(body: Any) -> str:
    config = body.get("config") if isinstance(body, dict) else None
    device = config.get("device") if isinstance(config, dict) else None
    return device if isinstance(device, str) else "auto"


def _launch(cmd: list[str], task_id: str, env: dict[str, str], holds_rank0: bool, track: bool) -> None:
    """`slmb train --nproc-per-node N`: run torchrun and own the run's signals and the end of its log.

    The ranks run in their own session, so a Ctrl-C here reaches only this process: the first asks for a stop
    (rank 0 reads the flag, every rank stops after the same step and they checkpoint together), the second ends
    every rank at once. SIGTERM (`slmb stop --force` kills this process) ends them at once too. When the ranks
    are gone and rank 0 could not end the log (it was killed, or lost a peer), this process does."""
    import contextlib
    import os
    import signal
    import subprocess

    from slmb.core import distributed as D
    from slmb.core.control import get_control
    from slmb.core.store import StoreError

    proc = D.start(cmd, env)
    how = {"interrupted": False, "killed": False}

    def kill_all() -> None:  # torchrun at once; its ranks die with it (PR_SET_PDEATHSIG)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def on_sigint(signum: int, frame: Any) -> None:
        try:
            if not (get_control().read_status(task_id) or {}).get("state"):
                raise StoreError("no run yet")
            get_control().request_stop(task_id)
            typer.echo("stopping every process after this step (Ctrl-C again to quit now)", err=True)
            signal.signal(signal.SIGINT, on_second)
        except StoreError:  # the ranks have not started the run yet: nothing to checkpoint
            on_second(signum, frame)

    def on_second(signum: int, frame: Any) -> None:
        how["interrupted"] = True
        kill_all()

    def on_sigterm(signum: int, frame: Any) -> None:
        how["killed"] = True
        kill_all()

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    while True:  # handlers only signal: a handler that waited on proc would deadlock with wait()'s lock
        try:
            returncode = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            continue
    if how["killed"]:  # a forced stop: `slmb stop --force` ends the log once this process has exited
        raise typer.Exit(EXIT_STOPPED)
    state = D.close_log(task_id, D.describe_exit(returncode), interrupted=how["interrupted"],
                        track=track) if holds_rank0 else None
    if state == "stopped":
        raise typer.Exit(130 if how["interrupted"] else EXIT_STOPPED)
    if state == "error" or (state is None and returncode != 0):
        if state == "error" and returncode != 0:
            typer.echo(f"error: the run failed ({D.describe_exit(returncode)}); see slmb events {task_id}", err=True)
        raise typer.Exit(EXIT_INVALID)


def _mlflow_line(info: dict[str, Any]) -> str:
    """Where to see the run: its page on a tracking server or on a UI that answers at $SLMB_MLFLOW_UI (`slmb serve`
    sets it); else the command that opens a UI on the local store, and the run's place in it."""
    from slmb.core import tracking

    run_id, experiment_id = info.get("mlflow_run_id"), info.get("mlflow_experiment_id")
    url, base = info.get("mlflow_url"), tracking.mlflow_ui_base()
    if url and base and (tracking.tracking_uri().startswith(("http://", "https://")) or tracking.ui_answers(base)):
        return f"MLflow run: {url}"
    command = tracking.mlflow_ui_command()
    if not (command and run_id and experiment_id):
        return f"MLflow run: {run_id}"
    return f"MLflow run {run_id}: open a UI with `{command}`, then {tracking.mlflow_run_path(run_id, experiment_id)}"


def _train_rank(body: Any, task_id: str, overrides: dict[str, Any], resume: bool, track: bool,
                as_json: bool) -> None:
    """`slmb train` in a process torchrun started: join the group and train; rank 0 alone prints. A stopped
    run exits 0: torchrun would report any other status as a failed run (`_launch` reads the log for its own
    exit code)."""
    import os

    from slmb.core import distributed as D
    from slmb.core import events as ev
    from slmb.core.trainer import join_processes
    from slmb.core.trainer import train as run_training
    from slmb.core.validate import RequestInvalidError

    D.die_with_parent()  # torchrun's agent gone: this rank goes too
    try:
        dist = join_processes(body, overrides)
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_INVALID)
    sink: Any = None
    if dist.is_main:
        if as_json:
            sink = ev.CallbackSink(lambda e: typer.echo(e.to_json()))
            typer.echo(f"task {task_id} ({dist.world_size} processes)", err=True)
        else:
            from slmb.console import ConsoleSink

            sink = ConsoleSink()
            sink.console.print(f"task [bold]{task_id}[/] on {dist.world_size} processes (from another terminal: "
                               f"slmb stop {task_id})", highlight=False, soft_wrap=True)
    launched_by_slmb = D.LAUNCHER_ENV in os.environ
    ended_well = False
    try:
        with D.catch_signals(dist):
            result = run_training(body, task_id=task_id, sinks=[sink] if sink else [], overrides=overrides,
                                  resume=resume, track=track, dist=dist)
        ended_well = True
    except RequestInvalidError as exc:
        _fail(str(exc) if dist.is_main else "invalid request (rank 0 prints why)", EXIT_INVALID)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        _fail_run(exc, getattr(sink, "error", None) is not None)
    finally:
        if sink is not None:
            sink.close()
        dist.close(wait=ended_well)
    if dist.is_main and result.mlflow and not as_json:
        typer.echo(_mlflow_line(result.mlflow))
    if result.state == "stopped":
        if dist.is_main and result.path:
            typer.echo(f"resume with: slmb train --resume {task_id}"
                       + ("" if launched_by_slmb else " (under torchrun, as before)"), err=True)
        raise typer.Exit(0)  # torchrun would report any other status as a failed run


@app.command()
def train(file: Path | None = typer.Argument(None, help="request JSON; optional with --resume"),
          epochs: int | None = typer.Option(None, "--epochs", min=1, help="override config.epochs"),
          max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="override config.max_steps"),
          batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="override config.batch_size"),
          device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps"),
          dtype: str | None = typer.Option(None, "--dtype", help="auto, fp32, bf16 or fp16 (compute precision)"),
          name: str | None = typer.Option(None, "--name", help="override modelName (names the completed model)"),
          compile_: str | None = typer.Option(None, "--compile", metavar="auto|on|off",
                                              help="override config.compile: torch.compile the loss (auto: on "
                                                   "CUDA when the run is long enough to repay it)"),
          dataset: str | None = typer.Option(None, "--dataset", metavar="NAME|PATH",
                                             help="override the request's dataset: a name (tiny_shakespeare, "
                                                  "roneneldan/TinyStories, ...) or a local .txt/.jsonl/.json/"
                                                  ".parquet file or folder of them"),
          tokenizer: str | None = typer.Option(None, "--tokenizer", metavar="NAME|PATH",
                                               help="override config.tokenizer: gpt2, byte, llama2, llama3, qwen3 "
                                                    "or a tokenizer file"),
          resume: str | None = typer.Option(None, "--resume", metavar="TASK_ID",
                                            help="continue a stopped run from its latest checkpoint"),
          track: bool = typer.Option(True, "--track/--no-track", help="log the run to MLflow"),
          as_json: bool = typer.Option(False, "--json", help="print one event per line (JSON) instead of the "
                                                             "live display"),
          queue: bool = typer.Option(False, "--queue", help="train on the service's workers (Redis at "
                                                            "$SLMB_REDIS_URL) and follow the run here"),
          max_memory: str | None = MAX_MEMORY,
          nproc_per_node: int | None = typer.Option(
              None, "--nproc-per-node", min=1,
              help="train on N processes on this machine through torchrun: one per GPU (NCCL), or CPU processes "
                   "(gloo); config.distributed picks DDP or FSDP, batch_size is the global batch"),
          nnodes: int = typer.Option(1, "--nnodes", min=1, help="machines taking part; run this same command on "
                                                                  "each, with its --node-rank"),
          node_rank: int = typer.Option(0, "--node-rank", min=0, help="this machine's place (0 holds rank 0, "
                                                                      "which writes events and the model)"),
          master_addr: str | None = typer.Option(None, "--master-addr", help="address of the machine with node "
                                                                            "rank 0 (several machines)"),
          master_port: int | None = typer.Option(None, "--master-port", help="its port (default 29500)"),
          rdzv_endpoint: str | None = typer.Option(None, "--rdzv-endpoint", metavar="HOST:PORT",
                                                   help="a c10d rendezvous instead of --master-addr/--node-rank"),
          task_id_given: str | None = typer.Option(None, "--task-id", hidden=True)) -> None:
    """Train a model; the finished model goes to the store (see `slmb list`).

    Prints the task id first, so another terminal can `slmb stop TASK_ID` or `slmb events TASK_ID --follow`.
    Ctrl-C stops after the current step with a checkpoint (resume with --resume TASK_ID); a second Ctrl-C
    quits at once. Exit code 0 finished, 1 invalid request (or one estimated not to fit in memory: see
    --max-memory) or failed, 2 unreadable file, 3 stopped.

    With --nproc-per-node N (and --nnodes for several machines) the run trains on N processes started by
    torchrun, and behaves the same: one display, one event log, one model (docs/distributed.md). Starting
    this command under torchrun yourself (`torchrun --nproc-per-node 2 -m slmb train req.json`) works too.
    """
    import os
    import signal

    # MLflow prints "View run ... at: URL" to stdout when a run on a tracking server ends: that would break
    # --json (nothing but events on stdout) and tear the live display. `slmb train` prints the link itself.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    from slmb.core import distributed as D
    from slmb.core import events as ev
    from slmb.core.control import get_control
    from slmb.core.store import StoreError, new_task_id
    from slmb.core.trainer import train as run_training
    from slmb.core.validate import RequestInvalidError

    if file is None and resume is None:
        _fail("give a request FILE, or --resume TASK_ID to continue a stopped run", EXIT_UNREADABLE)
    body = read_request(file) if file is not None else None
    task_id = resume or task_id_given or new_task_id()
    if resume is not None and not D.launched():  # before any banner: a run that cannot resume says why, alone
        _refuse_resume(resume)
    overrides = {"epochs": epochs, "max_steps": max_steps, "batch_size": batch_size, "device": device,
                 "dtype": dtype, "model_name": name, "dataset": _local_path_or_name(dataset),
                 "tokenizer": _local_path_or_name(tokenizer),
                 "compile": {"on": True, "off": False}.get(compile_, compile_)}
    launch = nproc_per_node is not None or nnodes > 1
    if launch and queue:
        _fail("--queue trains on the service's workers: give their --nproc-per-node to `slmb worker` or `slmb "
              "serve`, not here", EXIT_UNREADABLE)
    if D.launched():  # a rank torchrun started: the run's display, log and exit code belong to rank 0
        _train_rank(body, task_id, overrides, resume is not None, track, as_json)
        return
    world_size = (nproc_per_node or 1) * nnodes
    _refuse_if_too_big(body, overrides, _memory_limit(max_memory), world_size)
    if launch:
        flags = [a for flag, value in (("--epochs", epochs), ("--max-steps", max_steps), ("--batch-size", batch_size),
                                       ("--device", device), ("--dtype", dtype), ("--name", name),
                                       ("--dataset", overrides["dataset"]), ("--tokenizer", overrides["tokenizer"]),
                                       ("--resume", resume), ("--max-memory", max_memory), ("--compile", compile_))
                 if value is not None for a in (flag, str(value))]
        args = ["train", *([str(file)] if file is not None else []), *flags, "--task-id", task_id,
                *([] if track else ["--no-track"]), *(["--json"] if as_json else [])]
        cmd = D.torchrun_command(args, nproc_per_node=nproc_per_node or 1, nnodes=nnodes, node_rank=node_rank,
                                 master_addr=master_addr, master_port=master_port, rdzv_endpoint=rdzv_endpoint)
        _launch(cmd, task_id, D.rank_env(nproc_per_node or 1, device or _device_of(body)), node_rank == 0, track)
        return
    if as_json:
        sink: Any = ev.CallbackSink(lambda e: typer.echo(e.to_json()))
    else:
        from slmb.console import ConsoleSink

        sink = ConsoleSink()
    if queue:
        if resume or not track:
            _fail("--queue cannot be combined with --resume or --no-track", EXIT_UNREADABLE)
        _train_queued(body, overrides, sink)
        return
    if as_json:
        typer.echo(f"task {task_id}", err=True)
    else:
        sink.console.print(f"task [bold]{task_id}[/] (from another terminal: slmb stop {task_id})", highlight=False,
                           soft_wrap=True)

    def on_sigint(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C quits at once
        try:
            get_control().request_stop(task_id)
        except StoreError:  # no run yet (still validating): nothing to checkpoint
            raise KeyboardInterrupt from None
        typer.echo("stopping after this step (Ctrl-C again to quit now)", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = run_training(body, task_id=task_id, sinks=[sink], overrides=overrides, resume=resume is not None,
                              track=track)
    except RequestInvalidError as exc:
        _fail(str(exc), EXIT_INVALID)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        _fail_run(exc, getattr(sink, "error", None) is not None)
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.mlflow and not as_json:
        typer.echo(_mlflow_line(result.mlflow))
    if result.state == "stopped":
        if result.path:
            typer.echo(f"resume with: slmb train --resume {task_id}", err=True)
        raise typer.Exit(EXIT_STOPPED)


@app.command()
def stop(task_id: str = typer.Argument(..., help="the run's task id (printed by `slmb train`)"),
         force: bool = typer.Option(False, "--force", help="kill the training process (SIGTERM, then SIGKILL) "
                                                           "instead of asking it to checkpoint and stop")) -> None:
    """Stop a training run: cooperatively (checkpoint, then `stopped`), or at once with --force."""
    from slmb.core.control import get_control
    from slmb.core.store import StoreError

    if (conn := _service_redis()) is not None:
        from slmb.api.redis_events import RedisControl

        try:
            result = RedisControl(conn).request_stop(task_id, force=force)
            typer.echo(f"{task_id}: {result['message']} [{result['celery_state']}]")
            return
        except StoreError:  # not one of the service's tasks: a local run
            pass
    try:
        result = get_control().request_stop(task_id, force=force)
    except StoreError as exc:
        _fail(str(exc), EXIT_INVALID)
    typer.echo(f"{task_id}: {result['message']}")


@app.command("import")
def import_model(source: str = typer.Argument(..., help="a transformers checkpoint directory (config.json + "
                                              "safetensors) or a model id already in the local Hugging Face cache"),
                 name: str = typer.Option(..., "--name", help="name of the completed model to write")) -> None:
    """Import a Hugging Face checkpoint (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM,
    MistralForCausalLM) as a completed model: a canvas stating every value, the weights, and the checkpoint's own
    tokenizer. Never downloads. A checkpoint that does not map exits 1 naming the config field or weight."""
    from slmb.core.interop import InteropError, import_checkpoint
    from slmb.core.store import StoreError

    try:
        path, conv = import_checkpoint(source, name)
    except (InteropError, StoreError) as exc:
        _fail(str(exc), EXIT_INVALID)
    tok = conv.tokenizer_file or "none found (set config.tokenizer to train or generate)"
    typer.echo(f"imported {conv.architecture} from {conv.source} as {name!r}: {conv.parameters:,} parameters, "
               f"tokenizer {tok}\nwritten to {path}")


@app.command(name="list")
def list_models(as_json: bool = typer.Option(False, "--json", help="print models and tasks as JSON")) -> None:
    """List the completed models in the store (a broken one with the reason), and the training runs: the service's
    tasks with $SLMB_REDIS_URL set, else this machine's runs (the table shows those not finished; a task the HTTP
    service recorded here shows the state held by the Redis it names, or "unknown" and why). --json prints
    {"models": [...], "tasks": [...]} either way."""
    from slmb.core.store import list_models as completed_models

    models = completed_models()
    conn = _service_redis()
    if conn is not None:
        from slmb.api.redis_events import list_tasks

        tasks, service = list_tasks(conn), True
    else:
        from slmb.core.control import list_runs

        tasks, service = _service_states(list_runs()), False
    if as_json:
        typer.echo(json.dumps({"models": [m.to_dict() for m in models], "tasks": tasks}, indent=2, default=str))
        return
    shown = tasks if service else [t for t in tasks if t["state"] != "finished"]
    if shown:
        _render_tasks(shown, service)
        for message in dict.fromkeys(t["message"] for t in shown if t["state"] == "unknown"):
            typer.echo(f"unknown: {message}")
        dead = [t for t in shown if not service and not t.get("service") and not t.get("resumable")
                and t["state"] in ("stopped", "error", "lost")]
        if dead:
            typer.echo(f"{len(dead)} of these can never become a model (failed, lost, or stopped without a "
                       "checkpoint): `slmb prune` removes them, `slmb rm TASK_ID` one of them")
    if not models:
        typer.echo("no completed models yet (train one with `slmb train FILE`)")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from slmb.console import fmt_loss

    table = Table()
    for col, kw in (("model", {"no_wrap": True}), ("parameters", {"justify": "right"}), ("tokenizer", {}),
                    ("steps", {"justify": "right"}), ("val loss", {"justify": "right"}), ("created", {})):
        table.add_column(col, **kw)
    for m in models:
        meta = m.metadata
        params, steps = meta.get("parameters"), meta.get("steps")
        loss = meta["metrics"].get("val_loss") if isinstance(meta.get("metrics"), dict) else None
        loss = loss if isinstance(loss, float) else None
        table.add_row(m.name + (" [red](broken)[/]" if m.error else ""),
                      f"{params:,}" if isinstance(params, int) else "-", str(meta.get("tokenizer", "-")),
                      f"{steps:,}" if isinstance(steps, int) else "-", fmt_loss(loss),
                      str(meta.get("created", "-"))[:19].replace("T", " "))
    console = Console()
    console.print(table)
    for m in models:
        if m.error:
            console.print(f"[red]broken[/] {escape(m.name)}: {escape(m.error)}", highlight=False, soft_wrap=True)


@app.command()
def events(task_id: str = typer.Argument(..., help="the run's task id"),
           follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new events until the run ends"),
           plot: bool = typer.Option(False, "--plot", help="draw the run's loss curve (train and validation) "
                                                           "instead of printing the events")) -> None:
    """Print a run's events, one JSON object per line ({"event": ..., "data": {...}}), or with --plot its loss
    curve."""
    from slmb.core.events import follow_events, read_events

    if plot:
        if follow:
            _fail("--plot draws the events so far; it cannot be combined with --follow", EXIT_UNREADABLE)
        _print_plot(_run_events(task_id))
        return
    conn = _service_redis() or _recorded_redis(task_id)
    if conn is not None:
        from slmb.api import redis_events as rev

        if rev.task_exists(conn, task_id):
            try:
                wires = (w for _, w in rev.follow_events(conn, task_id)) if follow else (
                    w for _, w in rev.read_events(conn, task_id))
                for wire in wires:
                    typer.echo(json.dumps(wire, separators=(",", ":")))
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
            except rev.EventsUnavailable as exc:
                _fail(str(exc), EXIT_UNREADABLE)
            return
    run = _local_run(task_id)
    try:
        for event in follow_events(run.events) if follow else read_events(run.events):
            typer.echo(event.to_json())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _run_events(task_id: str) -> list[dict[str, Any]]:
    """A run's events in wire form ({"event", "data"}), from the service's Redis when it holds the task (as
    `slmb events` reads them), else from $SLMB_HOME/runs/<task_id>/events.jsonl; exits 1 when there are none."""
    from slmb.core.events import read_events

    conn = _service_redis() or _recorded_redis(task_id)
    if conn is not None:
        from slmb.api import redis_events as rev

        if rev.task_exists(conn, task_id):
            try:
                return [w for _, w in rev.read_events(conn, task_id)]
            except rev.EventsUnavailable as exc:
                _fail(str(exc), EXIT_UNREADABLE)
    return [e.to_wire() for e in read_events(_local_run(task_id).events)]


def _local_run(task_id: str) -> Any:
    """The run's directory in $SLMB_HOME, holding its events; exits 1 when there is none, or when a worker
    elsewhere wrote the events (they are in the service's Redis only, which did not answer for them)."""
    from slmb.core.control import service_of
    from slmb.core.store import StoreError, run_dir

    try:
        run = run_dir(task_id)
    except StoreError as exc:
        _fail(str(exc), EXIT_INVALID)
    if not run.exists():
        _fail(f"no run {task_id!r} in {run.path.parent}", EXIT_INVALID)
    service = service_of(run)
    if service is not None and not run.events.exists():
        _fail(f"task {task_id} ran on the HTTP service; its events are in its Redis ({service.get('redis_url')}), "
              "which does not answer or no longer holds it: set SLMB_REDIS_URL to the service's Redis", EXIT_INVALID)
    return run


def _stdout_console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 100)


def _print_plot(wires: list[dict[str, Any]], console: Any = None) -> None:
    from rich.text import Text

    from slmb.plot import curves_of, loss_plot, supports_unicode

    console = console or _stdout_console()
    train, val = curves_of(wires)
    text = loss_plot(train, val, width=min(console.width, 100), unicode=supports_unicode(console.encoding))
    if text:
        console.print(Text(text, no_wrap=True), soft_wrap=True)
    else:
        console.print("no losses logged yet: the run has no step or eval events", highlight=False)


runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Look at past and current training runs.")
app.add_typer(runs_app, name="runs")


@runs_app.command("show")
def runs_show(task_id: str = typer.Argument(..., help="the run's task id (see `slmb list`)"),
              as_json: bool = typer.Option(False, "--json", help="print the summary as JSON (no plot)")) -> None:
    """A run's summary (state, model, steps, final losses, paths) and its loss curve, from its events (this machine's
    $SLMB_HOME/runs/<task_id>/events.jsonl, or the service's Redis like `slmb events`)."""
    from slmb.core.store import StoreError, run_dir

    wires = _run_events(task_id)
    info = _summarise(task_id, wires)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.markup import escape
    from rich.table import Table

    from slmb.console import fmt_duration, fmt_loss

    console = _stdout_console()
    table = Table(title=f"run {task_id}", title_justify="left", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    steps = info["step"]
    rows = [("state", info["state"] + ("" if info["resumable"] or info["state"] not in ("stopped", "error", "lost")
                                       else ", no checkpoint (cannot resume)")),
            ("model", info["model_name"] or "-"),
            ("parameters", f"{info['parameters']:,}" if info["parameters"] else "-"),
            ("dataset", info["dataset"] or "-"), ("tokenizer", info["tokenizer"] or "-"),
            ("steps", "-" if steps is None else f"{steps:,}" + (f" / {info['total_steps']:,}"
                                                                  if info["total_steps"] else "")),
            ("loss (EMA), last step", fmt_loss(info["loss_ema"])),
            ("train loss, last eval", fmt_loss(info["train_loss"])),
            ("val loss, last eval", fmt_loss(info["val_loss"])),
            ("best val loss", fmt_loss(info["best_val_loss"])),
            ("time", fmt_duration(info["elapsed_s"]))]
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    console.print(table)
    if info["message"]:
        console.print(f"[bold]message[/]: {escape(info['message'])}", highlight=False, soft_wrap=True)
    try:
        run_path = run_dir(task_id).path
    except StoreError:
        run_path = None
    for key in ("model_path", "checkpoint"):
        if info[key]:
            console.print(f"[bold]{key.replace('_', ' ')}[/]: {escape(info[key])}", highlight=False, soft_wrap=True)
    if run_path is not None and run_path.exists():
        console.print(f"[bold]run directory[/]: {escape(str(run_path))}", highlight=False, soft_wrap=True)
    if info["state"] in ("stopped", "error", "lost") and info["resumable"]:
        console.print(f"resume with: slmb train --resume {task_id}", highlight=False, soft_wrap=True)
    _print_plot(wires, console)


def _summarise(task_id: str, wires: list[dict[str, Any]]) -> dict[str, Any]:
    """What `slmb runs show` prints, from the run's events and (on this machine) its status and checkpoints."""
    from slmb.core.control import find_run
    from slmb.core.store import StoreError

    info: dict[str, Any] = {"task_id": task_id, "state": None, "model_name": None, "parameters": None,
                            "dataset": None, "tokenizer": None, "step": None, "total_steps": None, "loss_ema": None,
                            "train_loss": None, "val_loss": None, "best_val_loss": None, "elapsed_s": None,
                            "model_path": None, "checkpoint": None, "message": None, "resumable": False}
    for wire in wires:
        name, data = wire.get("event"), wire.get("data") or {}
        if name == "started":
            info.update({k: data.get(k) for k in ("model_name", "parameters", "dataset", "tokenizer",
                                                 "total_steps")})
        elif name in ("step", "progress"):
            info["step"] = data.get("step", info["step"])
            info["total_steps"] = data.get("total_steps") or info["total_steps"]
            if name == "progress":
                info["loss_ema"] = data.get("loss_ema", info["loss_ema"])
                info["elapsed_s"] = data.get("elapsed_s", info["elapsed_s"])
        elif name == "eval":
            info.update(train_loss=data.get("train_loss"), val_loss=data.get("val_loss"),
                        best_val_loss=data.get("best_val_loss"))
        elif name == "checkpoint":
            info["checkpoint"] = data.get("path")
        elif name == "status":
            info["state"] = data.get("state") or info["state"]
            info["message"] = data.get("message") or info["message"]
        elif name == "finished":
            info.update(state="finished", model_name=data.get("model_name"), step=data.get("step"),
                        train_loss=data.get("train_loss"), val_loss=data.get("val_loss"),
                        model_path=data.get("path"), elapsed_s=data.get("elapsed_s"))
        elif name == "stopped":
            info.update(state="stopped", checkpoint=data.get("checkpoint"),
                        step=data.get("step") if data.get("step") is not None else info["step"])
            if not data.get("checkpoint"):
                info["checkpoint"] = None
        elif name == "error":
            info.update(state="error", message=f"{data.get('type', 'Error')}: {data.get('message')}")
    try:
        local = find_run(task_id)
    except StoreError:
        local = None
    if local is not None and local["service"] is None:  # this machine's status is the truth (lost, checkpoints)
        info["state"] = local["state"]
        info["resumable"] = local["resumable"]
        info["checkpoint"] = local["checkpoint"]
        info["model_name"] = info["model_name"] or local["model_name"]
    info["state"] = info["state"] or "queued"
    return info


def _describe_targets(targets: list[str], model_only: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, id, info) of each `slmb rm` argument: a run by task id or a completed model by name."""
    from slmb.core.control import find_run
    from slmb.core.store import StoreError, get_model, run_dir

    found = []
    for target in targets:
        run = model = None
        if not model_only:
            try:
                run = find_run(target) if run_dir(target).exists() else None
            except StoreError:
                run = None
        try:
            model = get_model(target)
        except StoreError:
            model = None
        if run is not None and model is not None:
            _fail(f"{target!r} is both a run and a model: add --model to remove the model", EXIT_INVALID)
        if run is not None:
            found.append(("run", target, run))
        elif model is not None:
            found.append(("model", target, {"path": model.path}))
        else:
            what = "completed model" if model_only else "run or completed model"
            _fail(f"no {what} {target!r} (see `slmb list`)", EXIT_INVALID)
    return found


@app.command()
def rm(targets: list[str] = typer.Argument(..., metavar="TASK_ID|MODEL...",
                                           help="runs (by task id) and completed models (by name) to remove"),
       model_only: bool = typer.Option(False, "--model", help="the names are models (when a run has that id too)"),
       yes: bool = typer.Option(False, "--yes", "-y", help="remove without asking")) -> None:
    """Remove runs (their events and checkpoints) and completed models from $SLMB_HOME. A running or queued run is
    refused (stop it first). Asks first unless --yes; a model's copy in MLflow stays."""
    from slmb.core.control import remove_run
    from slmb.core.store import StoreError, remove_model, run_dir, tree_size

    found = _describe_targets(targets, model_only)
    total = 0
    for kind, ident, info in found:
        if kind == "run" and info["state"] in ("running", "queued", "unknown"):
            _fail(f"run {ident} is {info['state']}: stop it first (slmb stop {ident})"
                  if info["state"] != "unknown" else f"run {ident} is a task of the HTTP service whose state this "
                  "machine cannot tell", EXIT_INVALID)
        path = run_dir(ident).path if kind == "run" else info["path"]
        size = tree_size(path.resolve() if kind == "model" else path)
        total += size
        desc = f"{info['state']}, {info['model_name'] or '-'}" if kind == "run" else "completed model"
        typer.echo(f"{kind} {ident} ({desc}; {_human_bytes(size)}): {path}")
    if not yes and not typer.confirm(f"remove {len(found)} item(s), {_human_bytes(total)}?", default=False):
        _fail("nothing removed", EXIT_INVALID)
    for kind, ident, _ in found:
        try:
            remove_run(ident) if kind == "run" else remove_model(ident)
        except StoreError as exc:
            _fail(str(exc), EXIT_INVALID)
        typer.echo(f"removed {kind} {ident}")


def parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d``, ``2w`` or seconds (``90``, ``90s``) in seconds; ValueError otherwise."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 30m, 12h, 7d or 2w")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


@app.command()
def prune(older_than: str | None = typer.Option(None, "--older-than", metavar="AGE",
                                                help="only runs last updated longer ago than AGE (30m, 12h, 7d, 2w)"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, remove nothing"),
          yes: bool = typer.Option(False, "--yes", "-y", help="remove without asking")) -> None:
    """Remove the runs that can never become a model: failed (error), lost (their process died while running) and
    stopped without a checkpoint. Finished and resumable runs, running ones and the HTTP service's tasks stay;
    models are never pruned (`slmb rm MODEL`). Asks first unless --yes."""
    from slmb.core.control import prune_candidates, remove_run
    from slmb.core.store import StoreError, run_dir, tree_size

    try:
        age = parse_duration(older_than) if older_than is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    chosen = prune_candidates(age)
    if not chosen:
        typer.echo("nothing to prune")
        return
    total = 0
    for info in chosen:
        size = tree_size(run_dir(info["task_id"]).path)
        total += size
        why = "no checkpoint" if info["state"] == "stopped" else info["state"]
        typer.echo(f"run {info['task_id']} ({why}, {info['model_name'] or '-'}, step {info['step'] or 0}; "
                   f"{_human_bytes(size)})")
    if dry_run:
        typer.echo(f"would remove {len(chosen)} run(s), {_human_bytes(total)} (--dry-run: nothing removed)")
        return
    if not yes and not typer.confirm(f"remove {len(chosen)} run(s), {_human_bytes(total)}?", default=False):
        _fail("nothing removed", EXIT_INVALID)
    removed = 0
    for info in chosen:
        try:
            remove_run(info["task_id"])
            removed += 1
        except StoreError as exc:  # it changed meanwhile (resumed, say): leave it
            typer.echo(f"kept {info['task_id']}: {exc}", err=True)
    typer.echo(f"removed {removed} run(s)")


# ---------------------------------------------------------------------------------------------------- service


def _service_redis() -> Any:
    """A Redis client for $SLMB_REDIS_URL (the HTTP service's), or None when it is not set."""
    import os

    url = os.environ.get("SLMB_REDIS_URL")
    if not url:
        return None
    import redis

    from slmb.api.redis_events import connect

    conn = connect(url)
    try:
        conn.ping()
    except redis.RedisError as exc:
        _fail(f"cannot reach the service's Redis at $SLMB_REDIS_URL={url}: {exc}", EXIT_INVALID)
    return conn


def _recorded_redis(task_id: str) -> Any:
    """The Redis a task of the HTTP service recorded in its run dir (``service.json``), if it answers."""
    from slmb.core.control import service_of
    from slmb.core.store import StoreError, run_dir

    try:
        url = (service_of(run_dir(task_id)) or {}).get("redis_url")
    except StoreError:
        return None
    if not url:
        return None
    import redis

    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=1, health_check_interval=30)
        conn.ping()
    except (redis.RedisError, ValueError):
        return None
    return conn


def _service_states(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill in the state of the HTTP service's tasks that this machine's files cannot tell ("unknown") from the Redis
    each one names, where that Redis answers."""
    asked = [t for t in tasks if t["state"] == "unknown" and (t.get("service") or {}).get("redis_url")]
    if not asked:
        return tasks  # no Redis client to import
    import redis

    from slmb.api.redis_events import RedisControl

    conns: dict[str, Any] = {}
    for task in asked:
        url = task["service"]["redis_url"]
        if url not in conns:
            try:
                conns[url] = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
                conns[url].ping()
            except (redis.RedisError, ValueError):
                conns[url] = None
        if conns[url] is None:
            task["message"] = (f"a task of the HTTP service, whose Redis ({url}) does not answer: set SLMB_REDIS_URL "
                               "to the service's Redis to see its state")
            continue
        status = RedisControl(conns[url]).read_status(task["task_id"])
        if status is None:
            task["message"] = (f"the service's Redis ({url}) no longer holds this task (an ended task expires after "
                               "SLMB_TASK_TTL_S)")
            continue
        task.update(state=status.get("state", "queued"), step=status.get("step", task["step"]),
                    updated=status.get("updated"), message=status.get("message"))
    return tasks


def _train_queued(body: Any, overrides: dict[str, Any], sink: Any) -> None:
    """`slmb train --queue`: enqueue on the service's workers and follow the run's events from Redis."""
    import signal

    from slmb.api import redis_events as rev
    from slmb.api.worker import enqueue_request, reap_dead_tasks
    from slmb.core.validate import RequestInvalidError

    conn = _service_redis()
    if conn is None:
        _fail("--queue needs the service's Redis: set SLMB_REDIS_URL (slmb serve prints it)", EXIT_UNREADABLE)
    try:
        task_id = enqueue_request(conn, body, overrides)
    except RequestInvalidError as exc:
        _fail(str(exc), EXIT_INVALID)
    typer.echo(f"task {task_id} queued (from another terminal: slmb stop {task_id})", err=True)

    def on_sigint(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C stops following at once
        rev.RedisControl(conn).request_stop(task_id)
        typer.echo("stopping after this step (Ctrl-C again to stop following; the run stops anyway)", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        # While waiting, look for dead workers too: with no API running, nobody else would.
        terminal = rev.follow_into(conn, task_id, sink, idle=lambda: reap_dead_tasks(conn))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except rev.EventsUnavailable as exc:  # the run goes on in its worker; only following it failed
        _fail(f"{exc}\nthe task goes on: follow it later with `slmb events {task_id} --follow`", EXIT_UNREADABLE)
    finally:
        signal.signal(signal.SIGINT, previous)
        sink.close()
    if terminal == "stopped":
        raise typer.Exit(EXIT_STOPPED)
    if terminal != "finished":
        raise typer.Exit(EXIT_INVALID)


def _render_tasks(tasks: list[dict[str, Any]], service: bool = True) -> None:
    from datetime import datetime

    from rich.console import Console
    from rich.table import Table

    table = Table(title="service tasks" if service else "runs not finished", title_justify="left")
    for col in ("task", "model", "state", *(["celery"] if service else []), "step",
                "queued at" if service else "started at"):
        table.add_column(col, no_wrap=True)
    for t in tasks:
        created = datetime.fromtimestamp(t["created"]).strftime("%Y-%m-%d %H:%M:%S") if t["created"] else "-"
        state = t["state"] + (", no checkpoint" if not service and not t.get("service")
                              and t["state"] in ("stopped", "error", "lost") and not t.get("resumable") else "")
        table.add_row(t["task_id"], t["model_name"] or "-", state, *([t["celery_state"]] if service else []),
                      "-" if t["step"] is None else f"{t['step']:,}", created)
    Console(width=None if sys.stdout.isatty() else 120).print(table)  # whole task ids, even when piped


if __name__ == "__main__":
    sys.exit(main())
