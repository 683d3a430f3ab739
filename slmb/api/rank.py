"""One process of a service job trained on several devices (``slmb worker --nproc-per-node N``).

The worker's work-horse starts ``torchrun ... -m slmb.api.rank TASK_ID`` (``worker.train_job``); each rank reads the
task's request from the service's Redis ($SLMB_REDIS_URL, which the worker sets: a URL with a password stays out
of the command line) and runs the trainer in torchrun's process group. Rank 0 alone streams the events to the
task's Redis stream and reads its stop flag; the trainer carries a stop to every rank at the same step.

Exit status 0 when the run finished or stopped, 1 when it failed (rank 0 has then ended the stream with
``error``): torchrun reports a failed rank as a failed run and stops the others.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from slmb.core import distributed as D

    D.die_with_parent()  # torchrun's agent gone (a forced stop kills the work-horse, and the agent with it): go too
    if _launcher_gone():  # it went during this process's imports, before the line above took effect
        return 1
    parser = argparse.ArgumentParser(prog="python -m slmb.api.rank", description=__doc__.splitlines()[0])
    parser.add_argument("task_id")
    parser.add_argument("--redis-url", default=os.environ.get("SLMB_REDIS_URL"),
                        help="the service's Redis (default: $SLMB_REDIS_URL)")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("the service's Redis is needed: --redis-url or $SLMB_REDIS_URL")

    from slmb.api import redis_events as rev
    from slmb.api.worker import load_request
    from slmb.core.trainer import join_processes, train

    conn = rev.connect(args.redis_url)
    task_id = args.task_id
    sink: rev.RedisEventSink | None = None
    dist = None
    ended_well = False
    try:
        request = load_request(conn, task_id)  # every rank reads the same stored request
        confined = conn.hget(rev.task_key(task_id), "origin") != b"cli"
        dist = join_processes(request, None)
        if dist.is_main:
            sink = rev.RedisEventSink(conn, task_id)  # the trainer's emitter closes it (it drains to Redis)
        with D.catch_signals(dist):
            train(request, task_id=task_id, sinks=[sink] if sink else [],
                  control=rev.TrainerControl(sink) if sink else None, confined=confined, dist=dist)
        ended_well = True
    except Exception as exc:
        # The trainer ends the stream with its own errors; this covers what fails before it can (the request gone
        # from Redis, an invalid request, a process group that cannot form). A no-op once the stream has ended.
        if os.environ.get("RANK", "0") == "0":
            with contextlib.suppress(Exception):
                rev.RedisControl(conn).close_failed(task_id, f"{type(exc).__name__}: {exc}", type(exc).__name__)
        print(f"slmb rank {os.environ.get('RANK', '?')}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            dist.close(wait=ended_well)
        conn.close()
    return 0


def _launcher_gone() -> bool:
    """Whether the process that started torchrun (``SLMB_LAUNCHER_PID``: the work-horse) no longer exists."""
    from slmb.core.distributed import LAUNCHER_ENV

    pid = os.environ.get(LAUNCHER_ENV)
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except OSError:  # no such process (or the number now belongs to another user's)
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
