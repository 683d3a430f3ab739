"""The terminal side of training: a rich event sink with a live progress line and a summary table.

It lives outside ``slmb.core`` because the trainer knows nothing of terminals; ``slmb train`` hands it to the
trainer as one more sink.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from slmb.core import events as ev
from slmb.plot import loss_plot, supports_unicode


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_mfu(value: float | None) -> str:
    """Model FLOP utilisation as a percentage of the device's measured matmul peak."""
    return "-" if value is None else f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"


def fmt_flops(value: float | None) -> str:
    """FLOP/s with an SI prefix: 3.4 GFLOP/s, 312 TFLOP/s."""
    if value is None:
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}FLOP/s"
    return f"{value:.3g} FLOP/s"


def fmt_utilisation(mfu: float | None, model_flops: float | None, peak: float | None = None) -> str:
    """MFU beside the model FLOP/s it comes from (and the peak, when known). MFU is None where it would pass
    100% (the peak was measured under load and no better one is recorded): the FLOP/s alone are then shown."""
    if model_flops is None:
        return fmt_mfu(mfu)
    of_peak = f" of {fmt_flops(peak)} peak" if peak else ""
    if mfu is None:
        return f"{fmt_flops(model_flops)} (peak not trusted yet)"
    return f"{fmt_mfu(mfu)} ({fmt_flops(model_flops)}{of_peak})"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# The live line's fields after the bar and step n/N, most important first: the first ones that fit the terminal are
# shown, in the order of DISPLAY_ORDER.
FIELD_PRIORITY = ("loss", "eta", "val", "tps", "epoch", "lr", "mfu")
DISPLAY_ORDER = ("epoch", "loss", "val", "lr", "tps", "mfu", "eta")


def bar_width(console_width: int) -> int:
    """The bar's width: 30 columns on a wide terminal, less on a narrow one, never under 10."""
    return max(10, min(30, console_width // 6))


class _FieldsColumn(ProgressColumn):
    """The fields after the bar, as many as the terminal's width leaves room for (FIELD_PRIORITY)."""

    def __init__(self, sink: ConsoleSink):
        super().__init__()
        self.sink = sink

    def render(self, task: Any) -> Text:
        fields = task.fields.get("shown") or {}
        room = self.sink.console.width - self.sink.fixed_width()
        chosen: list[str] = []
        used = 0
        for key in FIELD_PRIORITY:
            text = fields.get(key)
            if not text:
                continue
            need = len(text) + (1 if chosen else 0)
            if used + need <= room:
                chosen.append(key)
                used += need
        return Text(" ".join(fields[k] for k in DISPLAY_ORDER if k in chosen), no_wrap=True, overflow="crop")


class ConsoleSink:
    """Shows a training run: a header, a live bar (step n/N and, as the terminal's width allows, epoch, loss EMA, val
    loss, lr, tokens/s, MFU, ETA), a line per evaluation, checkpoint and warning, and when the run ends a summary
    table with the loss curve. Errors go to ``err_console`` (stderr), once."""

    def __init__(self, console: Console | None = None, err_console: Console | None = None):
        self.console = console or Console()
        self.err_console = err_console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.started: ev.Started | None = None
        self.latest: ev.Progress | None = None
        self.best_val: float | None = None
        self.last_eval: ev.Eval | None = None
        self.train_points: list[tuple[int, float]] = []
        self.val_points: list[tuple[int, float]] = []
        self.error: ev.Error | None = None  # the error this sink printed, so the CLI does not print it again

    def emit(self, event: ev.Event) -> None:
        handler = getattr(self, f"_on_{event.name}", None)
        if handler is not None:
            handler(event)

    def close(self) -> None:
        self._stop_live()

    def _print(self, text: str, soft_wrap: bool = False) -> None:
        # Through the live display when there is one, so lines appear above the bar instead of tearing it.
        # soft_wrap: a line holding a path, left for the terminal to wrap rather than cut into pieces.
        (self.progress.console if self.progress else self.console).print(text, highlight=False, soft_wrap=soft_wrap)

    def _on_started(self, e: ev.Started) -> None:
        self.started = e
        resumed = f", resumed from step {e.resumed_from_step:,}" if e.resumed_from_step else ""
        cache = {True: " (token cache)", False: " (tokenized now)"}.get(e.token_cache_hit, "")
        warmup = f" (warmup {e.warmup_steps:,})" if e.warmup_steps is not None else ""
        self._print(f"[bold]{escape(e.model_name)}[/]: {e.parameters:,} parameters on {e.device} ({e.dtype}); "
                    f"{escape(e.dataset)}{cache} with {escape(e.tokenizer)}; {e.total_steps:,} steps{warmup}, "
                    f"{e.epochs} epoch(s) of {e.steps_per_epoch:,}, batch {e.batch_size} × {e.context_length}"
                    f"{resumed}")
        if e.compile and e.compile.get("enabled"):  # compiling takes a while before the first step: say why
            graphs = ", CUDA graphs" if e.compile.get("cuda_graphs") else ""
            self._print(f"torch.compile{graphs} ({escape(str(e.compile.get('reason')))}); the first step compiles")
        for w in e.warnings:  # the request's validation warnings (config keys that disagree with the nodes, ...)
            self._print(f"[yellow]warning[/] {escape(str(w.get('path') or '/'))}: {escape(str(w.get('message')))}")
        self._stop_live()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=bar_width(self.console.width)), MofNCompleteColumn(),
            _FieldsColumn(self), console=self.console, transient=False,
            refresh_per_second=2,  # progress events come at most twice a second; 10 Hz redraws cost ~1% of a core
        )
        self.task = self.progress.add_task("train", total=e.total_steps, completed=e.resumed_from_step,
                                           shown={"epoch": f"epoch 1/{e.epochs}"})
        self.progress.start()

    def fixed_width(self) -> int:
        """Columns the live line spends before its fields: "train", the bar, step n/N and the gaps between."""
        total = self.started.total_steps if self.started else 0
        return len("train") + bar_width(self.console.width) + 2 * len(str(total)) + 1 + 3

    def _on_progress(self, e: ev.Progress) -> None:
        self.latest = e
        if self.progress is not None:
            shown = {"epoch": f"epoch {e.epoch + 1}/{e.epochs}", "loss": f"loss (EMA) {fmt_loss(e.loss_ema)}",
                     "val": f"val {fmt_loss(e.val_loss)}", "lr": f"lr {e.lr:.2e}" if e.lr is not None else "lr -",
                     "tps": f"{e.tokens_per_sec:,.0f} tok/s" if e.tokens_per_sec else "- tok/s",
                     "mfu": f"MFU {fmt_mfu(e.mfu)}" if e.mfu is not None or e.model_flops is None
                     else fmt_flops(e.model_flops), "eta": f"ETA {fmt_duration(e.eta_s)}"}
            self.progress.update(self.task, completed=e.step, shown=shown)
            if self.started is not None and e.step == self.started.resumed_from_step + 1:
                self.progress.refresh()  # the first step's line at once, not at the next 2 Hz redraw

    def _on_step(self, e: ev.Step) -> None:
        self.train_points.append((e.step, e.loss))

    def _on_eval(self, e: ev.Eval) -> None:
        self.best_val = e.best_val_loss
        self.last_eval = e
        if e.val_loss is not None:
            self.val_points.append((e.step, e.val_loss))
        self._print(f"step {e.step:,}: train loss {fmt_loss(e.train_loss)}, val loss {fmt_loss(e.val_loss)}"
                    + (f" (best {fmt_loss(e.best_val_loss)})" if e.best_val_loss is not None else ""))

    def _on_epoch(self, e: ev.Epoch) -> None:
        self._print(f"epoch {e.epoch + 1} done at step {e.step:,}: mean loss {fmt_loss(e.epoch_loss)}")

    def _on_checkpoint(self, e: ev.Checkpoint) -> None:
        self._print(f"[dim]checkpoint at step {e.step:,}: {escape(e.path)}[/]", soft_wrap=True)

    def _on_warning(self, e: ev.Warning) -> None:
        self._print(f"[yellow]warning[/] {escape(e.message)}", soft_wrap=True)

    def _on_stop_requested(self, e: ev.StopRequested) -> None:
        self._print("[yellow]stop requested[/]: saving a checkpoint")

    def _on_finished(self, e: ev.Finished) -> None:
        self._summary("finished", e.step, e.train_loss, e.val_loss, e.elapsed_s, ("model", e.path))

    def _on_stopped(self, e: ev.Stopped) -> None:
        where = ("checkpoint", e.checkpoint or "none (nothing to resume)")
        elapsed = self.latest.elapsed_s if self.latest else None
        self._summary(f"stopped ({e.reason})", e.step, self.last_eval.train_loss if self.last_eval else None,
                      self.latest.val_loss if self.latest else None, elapsed, where)

    def _on_error(self, e: ev.Error) -> None:
        self._stop_live()
        self.error = e
        self.err_console.print(f"[red]error[/] {escape(e.type)}: {escape(e.message)}", highlight=False,
                               soft_wrap=True)

    def _stop_live(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _summary(self, state: str, step: int | None, train_loss: float | None, val_loss: float | None,
                 elapsed_s: float | None, where: tuple[str, str]) -> None:
        self._stop_live()
        s, p = self.started, self.latest
        table = Table(title=f"{s.model_name if s else 'training'}: {state}", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        rows = [
            ("steps", f"{step:,} / {s.total_steps:,}" if s and step is not None else str(step)),
            # Two different numbers, each named: the live bar's smoothed loss of the training batches, and the
            # mean loss over eval_batches of the training split at the last evaluation.
            ("loss (EMA), last step", fmt_loss(p.loss_ema if p else None)),
            ("train loss, last eval", fmt_loss(train_loss)),
            ("val loss", fmt_loss(val_loss)),
            ("best val loss", fmt_loss(self.best_val)),
            ("tokens/s", f"{p.tokens_per_sec:,.0f}" if p and p.tokens_per_sec else "-"),
            ("MFU", fmt_utilisation(p.mfu, p.model_flops, s.peak_flops if s else None) if p else "-"),
            ("time", fmt_duration(elapsed_s)),
        ]
        for key, value in rows:
            table.add_row(key, escape(value))
        self.console.print(table)
        # A path is never cut to the terminal's width: on a line of its own, soft-wrapped (copied whole).
        self.console.print(f"[bold]{where[0]}[/]: {escape(where[1])}", highlight=False, soft_wrap=True)
        plot = loss_plot(self.train_points, self.val_points, width=min(self.console.width, 100),
                         unicode=supports_unicode(self.console.encoding))
        if plot:
            self.console.print(Text(plot, no_wrap=True), soft_wrap=True)
