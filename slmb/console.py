"""The terminal side of training: a rich event sink with a live progress line and a summary table.

It lives outside ``slmb.core`` because the trainer knows nothing of terminals; ``slmb train`` hands it to the
trainer as one more sink.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from slmb.core import events as ev


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_mfu(value: float | None) -> str:
    """Model FLOP utilisation as a percentage of the device's measured matmul peak."""
    return "-" if value is None else f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ConsoleSink:
    """Shows a training run: a header, a live bar (step/total, epoch, loss, val loss, lr, tokens/s, MFU, ETA), a line
    per evaluation, checkpoint and warning, and a summary table when the run ends."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task: Any = None
        self.started: ev.Started | None = None
        self.latest: ev.Progress | None = None
        self.best_val: float | None = None

    def emit(self, event: ev.Event) -> None:
        handler = getattr(self, f"_on_{event.name}", None)
        if handler is not None:
            handler(event)

    def close(self) -> None:
        self._stop_live()

    def _print(self, text: str) -> None:
        # Through the live display when there is one, so lines appear above the bar instead of tearing it.
        (self.progress.console if self.progress else self.console).print(text, highlight=False)

    def _on_started(self, e: ev.Started) -> None:
        self.started = e
        resumed = f", resumed from step {e.resumed_from_step:,}" if e.resumed_from_step else ""
        cache = {True: " (token cache)", False: " (tokenized now)"}.get(e.token_cache_hit, "")
        self._print(f"[bold]{escape(e.model_name)}[/]: {e.parameters:,} parameters on {e.device} ({e.dtype}); "
                    f"{escape(e.dataset)}{cache} with {escape(e.tokenizer)}; {e.total_steps:,} steps, "
                    f"{e.epochs} epoch(s) of {e.steps_per_epoch:,}, batch {e.batch_size} × {e.context_length}"
                    f"{resumed}")
        self._stop_live()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("MFU {task.fields[mfu]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console, transient=False,
        )
        self.task = self.progress.add_task("train", total=e.total_steps, completed=e.resumed_from_step,
                                           epoch=f"1/{e.epochs}", loss="-", val="-", lr="-", tps="-", mfu="-",
                                           eta="-")
        self.progress.start()

    def _on_progress(self, e: ev.Progress) -> None:
        self.latest = e
        if self.progress is not None:
            self.progress.update(self.task, completed=e.step, epoch=f"{e.epoch + 1}/{e.epochs}",
                                 loss=fmt_loss(e.loss_ema), val=fmt_loss(e.val_loss),
                                 lr=f"{e.lr:.2e}" if e.lr is not None else "-",
                                 tps=f"{e.tokens_per_sec:,.0f}" if e.tokens_per_sec else "-", mfu=fmt_mfu(e.mfu),
                                 eta=fmt_duration(e.eta_s))

    def _on_eval(self, e: ev.Eval) -> None:
        self.best_val = e.best_val_loss
        self._print(f"step {e.step:,}: train loss {fmt_loss(e.train_loss)}, val loss {fmt_loss(e.val_loss)}"
                    + (f" (best {fmt_loss(e.best_val_loss)})" if e.best_val_loss is not None else ""))

    def _on_epoch(self, e: ev.Epoch) -> None:
        self._print(f"epoch {e.epoch + 1} done at step {e.step:,}: mean loss {fmt_loss(e.epoch_loss)}")

    def _on_checkpoint(self, e: ev.Checkpoint) -> None:
        self._print(f"[dim]checkpoint at step {e.step:,}: {escape(e.path)}[/]")

    def _on_warning(self, e: ev.Warning) -> None:
        self._print(f"[yellow]warning[/] {escape(e.message)}")

    def _on_stop_requested(self, e: ev.StopRequested) -> None:
        self._print("[yellow]stop requested[/]: saving a checkpoint")

    def _on_finished(self, e: ev.Finished) -> None:
        self._summary("finished", e.step, e.train_loss, e.val_loss, e.elapsed_s, ("model", e.path))

    def _on_stopped(self, e: ev.Stopped) -> None:
        where = ("checkpoint", e.checkpoint or "none (nothing to resume)")
        elapsed = self.latest.elapsed_s if self.latest else None
        self._summary(f"stopped ({e.reason})", e.step, None, self.latest.val_loss if self.latest else None,
                      elapsed, where)

    def _on_error(self, e: ev.Error) -> None:
        self._stop_live()
        self._print(f"[red]error[/] {escape(e.type)}: {escape(e.message)}")

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
            ("train loss", fmt_loss(train_loss if train_loss is not None else p.loss_ema if p else None)),
            ("val loss", fmt_loss(val_loss)),
            ("best val loss", fmt_loss(self.best_val)),
            ("tokens/s", f"{p.tokens_per_sec:,.0f}" if p and p.tokens_per_sec else "-"),
            ("MFU", fmt_mfu(p.mfu if p else None)),
            ("time", fmt_duration(elapsed_s)),
            where,
        ]
        for key, value in rows:
            table.add_row(key, escape(value))
        self.console.print(table)
