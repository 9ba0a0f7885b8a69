"""Completions without HTTP: many prompts through an engine from one thread, waiting for all
(what a benchmark harness's `generate_until` needs). The text is cut at stop strings exactly
as the server cuts it."""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence

from bigjax.data.tokenizer import Tokenizer
from bigjax.serving import text
from bigjax.serving.engine import Engine, Event, Finished, Params, Sequence_, Token

CHECK_EVERY_S = 0.25  # how often `between` is asked while no event arrives


def complete(
    engine: Engine, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
    params: Sequence[Params], stops: Sequence[Sequence[str]],
    between: Callable[[], None] | None = None,
) -> list[str]:  # fmt: skip
    """The generated text of each prompt; submitted in waves that fit the engine's queue.
    `between` is called between events (and every CHECK_EVERY_S while none comes); if it
    raises, every sequence is cancelled (the engine frees their slots at its next step) and
    the exception propagates: a preempted run must not spend its notice on generations."""
    events: queue.Queue[tuple[int, Event]] = queue.Queue()
    dets = [text.Detokenizer(tokenizer, tuple(s)) for s in stops]

    def reporter(i: int) -> Callable[[Event], None]:
        return lambda event: events.put((i, event))

    seqs = [
        Sequence_(p, q, reporter(i)) for i, (p, q) in enumerate(zip(prompts, params, strict=True))
    ]
    done = [False] * len(seqs)
    submitted = 0
    while not all(done):
        while submitted < len(seqs) and submitted - sum(done) < engine.max_waiting:
            engine.submit([seqs[submitted]])
            submitted += 1
        try:
            if between is not None:
                between()
            i, event = events.get(timeout=CHECK_EVERY_S if between is not None else None)
        except queue.Empty:
            continue
        except BaseException:
            for seq in seqs[:submitted]:
                seq.cancel()
            raise
        if done[i]:
            continue
        if isinstance(event, Token):
            dets[i].add(event.id)
            if dets[i].stopped:
                seqs[i].cancel()
                done[i] = True
        elif isinstance(event, Finished):
            if event.reason == "error":
                raise RuntimeError(f"generation failed: {event.message}")
            dets[i].flush()
            done[i] = True
    return [d.text() for d in dets]
