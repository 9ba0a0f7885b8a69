"""Stop signals for a training run: SIGTERM, SIGINT and SIGHUP ask the loop to save and stop
after the step in flight (an eval in progress is left unfinished); a second Ctrl-C interrupts
at once. With several processes, they all stop after the same step (`StopVote`). Grain's
worker processes leave the stop to the trainer and exit with it (`exit_with_parent`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, str]]:
    """SIGTERM (preemption), SIGINT (Ctrl-C) and SIGHUP (the terminal hung up: a closed
    laptop lid, a dropped SSH session) ask the loop to save and stop after the step in flight,
    instead of killing it. A second Ctrl-C interrupts at once. Repeated SIGTERMs do not:
    schedulers resend preemption notices, and PR_SET_PDEATHSIG fires once per reparenting as a
    dying parent's threads exit, and aborting the checkpoint save they asked for would lose the
    work they meant to keep. Once a stop was asked the process is on its way out, so SIGTERM
    and SIGHUP stay ignored after the loop: a resent notice can no longer kill it between the
    final save and exit.

    SIGHUP: libtpu sets it to be ignored when it starts (in C, which Python's own record of
    the handler does not see), so a hangup went unnoticed until the next write to the dead
    terminal killed the run. Taking it over restores what a terminal user expects, unless the
    process started with it ignored (`nohup`): then the user asked for that, and it stays."""
    asked: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    signals = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.append(signal.SIGHUP)

    def handle(signum: int, frame: Any) -> None:
        if asked and signum == signal.SIGINT:
            asked["now"] = "yes"  # for `interrupt_if_asked`, should this raise be swallowed
            raise KeyboardInterrupt
        if signum == signal.SIGHUP:
            detach_terminal()
        asked.setdefault("signal", signal.Signals(signum).name)

    def unraisable(report: Any) -> None:
        # the second Ctrl-C swallowed by a callback: `interrupt_if_asked` raises it again, so
        # the traceback Python would print is noise before the one-line "interrupted"
        if not (isinstance(report.exc_value, KeyboardInterrupt) and "now" in asked):
            previous_hook(report)

    previous = {s: signal.signal(s, handle) for s in signals}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield asked
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if asked and s != signal.SIGINT else handler)


def interrupt_if_asked(asked: dict[str, str]) -> None:
    """Raises the second Ctrl-C's KeyboardInterrupt again if it was lost. A signal handler's
    exception is raised wherever the main thread is, and where that is a callback run by the
    interpreter (jax's garbage-collection hook, a weakref finaliser), Python prints "Exception
    ignored" and goes on: the run then saved and exited 0 as if asked once (seen in the
    second-Ctrl-C test, about 1 run in 20). The loop calls this before each step and save;
    `stop_on_signals` keeps the swallowed one's traceback off the terminal."""
    if "now" in asked:
        raise KeyboardInterrupt


def detach_terminal() -> None:
    """Points the standard streams that are a terminal at /dev/null: after a hangup, every
    write to the terminal fails (EIO), from Python and from native code alike. Redirected
    streams (a log file, a pipe) are left as they are."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            with contextlib.suppress(OSError):
                if os.isatty(fd):
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class StopVote:
    """Whether to save and stop after this step: the same answer on every process. A signal
    reaches each host of a pod by itself (one VM's maintenance notice, or a preemption that
    lands a step apart). A process that saved and left on its own left the others waiting
    for it in the next step's collectives, and itself in the save's barrier, until the kill
    took the steps since the last checkpoint. So every process votes each step with what it
    was asked: a one-number all-reduce dispatched after the step and read with the next one,
    when the loop waits for the device anyway (the host never blocks on it alone); all stop
    after the step in which they read a vote to stop. One process alone needs no vote and
    stops after the step in flight, as before. What it costs: docs/reliability.md."""

    def __init__(self, asked: dict[str, str], mesh: Mesh, *, together: bool | None = None):
        self.asked = asked
        self.together = jax.process_count() > 1 if together is None else together
        self.ballot = NamedSharding(mesh, P(mesh.axis_names))  # one entry per device
        self.count = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
        self.pending: jax.Array | None = None  # the vote dispatched after the last step
        self.verdict = False  # what the last vote read decided

    def __call__(self) -> bool:
        """Called once per step, after it is dispatched: True if every process saves and
        stops after it. A stop learned from another process's vote is recorded in `asked`
        (as "SIGTERM on process 3"), so the run's closing lines say why it stopped."""
        if not self.together:
            return bool(self.asked)
        verdict = 0 if self.pending is None else int(jax.device_get(self.pending))
        self.pending = self._cast()
        self.hear(verdict)
        return self.verdict

    def poll(self) -> bool:
        """Whether to stop now, in a pass with no steps (an eval, between its batches): the
        same answer on every process, which all call it at the same point of the same pass.
        One process alone: whether it was asked; several: a vote read at once (a one-number
        all-reduce; the eval waits for each batch's result anyway)."""
        if not self.together:
            return bool(self.asked)
        self.hear(int(jax.device_get(self._cast())))
        return self.verdict

    def mine(self) -> int:
        """This process's vote, with no collective: 0 to go on, else the signal it was asked
        by and its index (for a pass led by one process, which shares its verdict itself)."""
        return _vote(self.asked)

    def _cast(self) -> jax.Array:
        """Dispatches this process's vote; the result is the largest of all processes'."""
        mine = _vote(self.asked)
        ballot = jax.make_array_from_callback(
            (self.ballot.mesh.size,), self.ballot, lambda _: np.full(1, mine, np.int32)
        )
        return self.count(ballot)

    def hear(self, verdict: int) -> None:
        """Takes a verdict (a vote, or the largest of all processes'): a stop learned from
        another process is recorded in `asked` too."""
        if verdict and "signal" not in self.asked:
            name = signal.Signals(verdict >> _PROCESS_BITS).name
            self.asked["signal"] = f"{name} on process {verdict & (1 << _PROCESS_BITS) - 1}"
        self.verdict = self.verdict or bool(verdict)

    def now(self) -> bool:
        """Whether to stop before the next step. One process alone: whether it was asked by
        now (during the step's eval or save, say: the run then saves where it is instead of
        training a step more); several: what this step's vote decided, as all of them do."""
        return self.verdict if self.together else bool(self.asked)


_PROCESS_BITS = 20  # a vote is (signal number << 20) | process index: 2**20 hosts is plenty


def _vote(asked: dict[str, str]) -> int:
    """This process's vote: 0 to go on, else the signal it was asked by and its index."""
    if "signal" not in asked:
        return 0
    signum = signal.Signals[asked["signal"].split()[0]]
    return int(signum) << _PROCESS_BITS | jax.process_index()


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each Grain worker: exits when the training process is gone. A trainer killed
    with SIGKILL (OOM killer, a hard preemption) cannot stop its workers, and Grain's would
    otherwise live on as orphans holding memory. A terminal's Ctrl-C and hangup reach the
    whole foreground process group, workers included: they ignore both and leave the stop to
    the trainer, which saves with their data state and then closes them."""
    del worker_index, worker_count
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
