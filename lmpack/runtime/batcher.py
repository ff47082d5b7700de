"""Continuous batching: sequences that run at the same time share each decode step's session run.

Why: on a CPU one decode step of a small model is bound by per-operation overhead and compute, not by
reading the weights (docs/serving.md, "Against the peers", Scaling), so running 4-8 sequences in one call
costs little more than running one, while separate concurrent runs just split the cores. onnxruntime-genai
has no continuous batching on CPU, so lmpack does it here with the exported graph's own batch dimension.

One worker thread owns the decoder session. Each step it (1) drops cancelled sequences, (2) prefills
the newcomers whose prompt length suits the batch (each its own pass, as the unbatched engine does, so
their first token is the same) and adds them as rows, (3) runs one batched step for every row
(sessions.BatchKV: pasts padded to the longest, padding masked, each row at its own position) and
hands each row's logits to that sequence's generation.Decoding, which makes the same choices as the
solo loop. A finished or cancelled sequence leaves the batch at once. Text goes back to the
request's own thread through a queue, so the server's streaming and cancellation code is unchanged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from lmpack.runtime.generation import Generation
from lmpack.runtime.sessions import BatchKV, DecoderRunner, KVCache

log = logging.getLogger("lmpack.batcher")

_END = object()  # queued after a sequence's last text

# Rows stepped together have lengths equal modulo this, so every row's padding is a multiple of it.
# Why: measured on onnxruntime's CPU kernels (AVX2), a row padded by a multiple of 4 gives bit-for-bit
# its unbatched logits, other paddings differ in the last bits (the error repeats with period 4, as if
# keys were summed in groups of 4). On an fp32 variant that never changed a token, but an int8 variant
# quantizes each layer's activations again, which amplified it until greedy answers diverged
# (docs/serving.md, "Answers stay exactly the unbatched ones"). The price of exactness: a newcomer whose prompt
# length does not suit the batch waits (at most 3 steps) until the batch's growing lengths come round to
# it. The serve setting batch_align defaults to this; other CPUs' kernels may need another value.
# Only left-padded batches (optimum's graphs) need it: with onnxruntime-genai's graphs each row attends to its
# own length only, and batched rows gave their unbatched logits bit for bit at every padding (tests/runtime/
# test_batching.py), so those batches take every newcomer at once.
EXACT_ALIGN = 4


@dataclass(eq=False)
class _Sequence:
    generation: Generation  # its Decoding makes the token choices
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    decode_started: float = 0.0
    prefill: Iterator[tuple[KVCache, np.ndarray] | None] | None = None  # its prompt's chunks, once begun
    prefill_started: float = 0.0


class Batcher:
    """A GenerationLoop (generation.py): every generation given to it runs in shared batched steps of one
    decoder, at most `max_batch` sequences at a time.

    `on_step(size)` is called with the batch size of every batched decode step (the server's
    lmpack_batch_size histogram). Sequences beyond `max_batch` wait, in arrival order, for a row.
    With left-padded pasts a sequence joins only when its prompt length equals the batch's lengths modulo
    `align` (EXACT_ALIGN); right-padded batches ignore `align`.
    """

    def __init__(
        self,
        runner: DecoderRunner,
        *,
        max_batch: int,
        align: int = 1,
        on_step: Callable[[int], None] | None = None,
        prefill_chunk: int = 0,
    ):
        if max_batch < 1 or align < 1 or prefill_chunk < 0:
            raise ValueError("max_batch and align must be at least 1, prefill_chunk at least 0")
        self.runner = runner
        self.max_batch = max_batch
        self.align = align if runner.kv_padding == "left" else 1
        # Right-padded batches (the builder's graphs) take a long prompt in chunks between decode steps; left-padded
        # ones join on an aligned length, which a prompt's length alone decides, so they prefill whole.
        self.prefill_chunk = prefill_chunk if runner.kv_padding == "right" else 0
        self.on_step = on_step or (lambda size: None)
        self._pending: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lmpack-batcher", daemon=True)
        self._thread.start()

    def run(self, generation: Generation) -> Iterator[str]:
        """Text deltas of `generation` as the worker produces them; sets its finish_reason and timings."""
        seq = _Sequence(generation)
        with self._wake:
            if self._stopped:
                raise RuntimeError("the batcher has stopped")
            self._pending.append(seq)
            self._wake.notify()
        done = False
        try:
            while True:
                item = seq.out.get()
                if item is _END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:  # the reader went away (generator closed): free the row at the next step
                generation.cancel.set()

    def stop(self) -> None:
        """End the worker; sequences still running or waiting end as cancelled."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # The worker ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        active: list[_Sequence] = []  # rows of `batch`, in order
        waiting: list[_Sequence] = []  # taken from the queue, waiting for the batch's lengths to suit them
        batch = self.runner.new_batch(self.max_batch)
        while True:
            with self._wake:
                while not self._stopped and not self._pending and not active and not waiting:
                    self._wake.wait()
                if self._stopped:
                    for seq in active + waiting + self._pending:
                        self._end(seq, "cancelled")
                    self._pending.clear()
                    return
                room = self.max_batch - len(active) - len(waiting)
                waiting += self._pending[:room]
                del self._pending[:room]
            try:
                self._retain(active, batch, [not self._cancelled(seq) for seq in active])
                waiting = [seq for seq in waiting if not self._cancelled(seq)]
                waiting = self._admit_waiting(waiting, active, batch)
                if active:
                    self._decode(active, batch)
            except Exception as exc:  # a failed run fails every sequence that was in it, not the worker
                log.exception("batched step failed")
                for seq in active + waiting:
                    if seq.generation.finish_reason is None:
                        seq.out.put(exc)
                active, waiting, batch = [], [], self.runner.new_batch(self.max_batch)

    def _cancelled(self, seq: _Sequence) -> bool:
        if seq.generation.cancel.is_set():
            self._end(seq, "cancelled")
            return True
        return False

    def _end(self, seq: _Sequence, reason: str) -> None:
        seq.generation.finish_reason = reason
        seq.out.put(_END)

    def _emit(self, seq: _Sequence, text: str) -> bool:
        """Pass on `text`; True while the sequence goes on, False once it has finished (and was ended)."""
        if text:
            seq.out.put(text)
        reason = seq.generation.decoding.finish_reason
        if reason is not None:
            self._end(seq, reason)
            return False
        return True

    def _retain(self, active: list[_Sequence], batch: BatchKV, keep: list[bool]) -> None:
        if not all(keep):
            rows = [row for row, kept in enumerate(keep) if kept]
            active[:] = [active[row] for row in rows]
            batch.keep(rows, align=self.align)

    def _admit_waiting(self, waiting: list[_Sequence], active: list[_Sequence], batch: BatchKV) -> list[_Sequence]:
        """Prefill the waiting sequences that suit the batch and add them to it; those left waiting. With chunked
        prefill, one chunk (or one short prompt) runs before each decode step, so the running sequences' next tokens
        wait for at most one chunk, not for every newcomer's whole prompt."""
        if not self.prefill_chunk:
            return [seq for seq in waiting if not self._admit(seq, active, batch)]
        # chunked batches are right-padded, so align is 1: the first waiting sequence always suits the batch
        if waiting and self._admit(waiting[0], active, batch):
            return waiting[1:]
        return waiting

    def _admit(self, seq: _Sequence, active: list[_Sequence], batch: BatchKV) -> bool:
        """Prefill `seq` (or its next chunk) and add it to the batch once its prompt has run and its length suits the
        batch's (True: it is no longer waiting). The batch's lengths grow by one a step, so no sequence waits `align`
        steps."""
        generation = seq.generation
        if active and seq.prefill is None and (len(generation.prompt_ids) - batch.lengths[0]) % self.align:
            return False
        try:  # its prefill and its place in the batch are its own: a failure (no memory for its cache) ends it alone
            if seq.prefill is None:
                seq.prefill_started = time.perf_counter()
                seq.prefill = generation.prefill_steps(self.runner, self.prefill_chunk)
            step = next(seq.prefill)
            if step is None:  # more of the prompt to run, after the next decode step
                return False
            cache, logits = step
            seq.decode_started = time.perf_counter()
            generation.prefill_seconds = seq.decode_started - seq.prefill_started
            if self._emit(seq, generation.decoding.advance(logits, cache.length)):
                batch.join(cache)  # grows the batch's buffers, if at all, before it changes anything else
                active.append(seq)
        except Exception as exc:
            log.warning("a sequence could not join the batch: %s", exc)
            seq.out.put(exc)
        return True

    def _decode(self, active: list[_Sequence], batch: BatchKV) -> None:
        """One batched step for every row; the sequences that finished leave the batch."""
        self.on_step(len(active))
        logits = self.runner.step_batch([seq.generation.decoding.next_token for seq in active], batch)
        now = time.perf_counter()
        going = []
        for row, seq in enumerate(active):
            seq.generation.decode_seconds = now - seq.decode_started
            going.append(self._emit(seq, seq.generation.decoding.advance(logits[row], batch.lengths[row])))
        self._retain(active, batch, going)
