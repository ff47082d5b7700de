"""Continuous batching: sequences that run at the same time share each decode step's session run.

Why: on a CPU one decode step of a small model is bound by per-operation overhead and compute, not by
reading the weights (../shared measurements), so running 4-8 sequences in one call costs little more
than running one, while separate concurrent runs just split the cores. onnxruntime-genai has no
continuous batching on CPU, so lmpack does it here with the exported graph's own batch dimension.

One worker thread owns the decoder session. Each step it (1) drops cancelled sequences, (2) prefills
newcomers one by one (each its own pass, as the unbatched engine does, so their first token is the
same), (3) runs one batched step for everyone still going (sessions.BatchKV: pasts left-padded to the
longest, padding masked, each row at its own position; one run per group of rows whose lengths agree
modulo EXACT_ALIGN, see below), and hands each row's logits to that sequence's engine.Decoding, which
makes the same choices as the unbatched loop. A finished or
cancelled sequence leaves the batch at once; a new one joins at the next step. Text goes back to the
request's own thread through a queue, so the server's streaming and cancellation code is unchanged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from lmpack.runtime.sessions import BatchKV, KVCache

log = logging.getLogger("lmpack.batcher")

_END = object()  # queued after a sequence's last text

# Rows stepped together must have lengths equal modulo this, so every row's padding is a multiple of it.
# Why: onnxruntime's CPU attention kernels (AVX2 here) work on keys in groups of 4, so padding by any
# other amount shifts which keys share a group and changes the fp32 sums in the last bits. On an fp32
# variant that never changed a token, but an int8 variant quantizes each layer's activations again, which
# amplified it (logits off by up to 2 on SmolLM2 int8, a greedy answer in 8 diverging after ~10 tokens).
# With equal residues a batched row is bit-for-bit its unbatched self; the price is up to 4 runs a step.
EXACT_ALIGN = 4


@dataclass(eq=False)
class _Sequence:
    generation: object                     # engine.Generation; its Decoding makes the token choices
    out: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    decode_started: float = 0.0


@dataclass(eq=False)
class _Group:
    """Sequences stepped together in one session run; their lengths agree modulo the batcher's `align`."""
    seqs: list[_Sequence] = field(default_factory=list)
    batch: BatchKV = field(default_factory=BatchKV)

    def retain(self, keep: list[bool], align: int) -> None:
        if not all(keep):
            rows = [row for row, kept in enumerate(keep) if kept]
            self.seqs = [self.seqs[row] for row in rows]
            self.batch.keep(rows, align=align)


class Batcher:
    """Runs every generation of one engine in shared batched steps, at most `max_batch` sequences at a time.

    `on_step(size)` is called with the batch size of every batched decode step (the server's
    lmpack_batch_size histogram). Sequences beyond `max_batch` wait, in arrival order, for a row.
    Rows whose lengths differ modulo `align` run in separate groups, one session run each (EXACT_ALIGN).
    """

    def __init__(self, engine, *, max_batch: int, align: int = 1, on_step: Callable[[int], None] | None = None):
        if max_batch < 1 or align < 1:
            raise ValueError("max_batch and align must be at least 1")
        self.engine = engine
        self.max_batch = max_batch
        self.align = align
        self.on_step = on_step or (lambda size: None)
        self._pending: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="lmpack-batcher", daemon=True)
        self._thread.start()

    def run(self, generation) -> Iterator[str]:
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
        groups: list[_Group] = []
        while True:
            with self._wake:
                while not self._stopped and not self._pending and not groups:
                    self._wake.wait()
                if self._stopped:
                    for seq in [seq for group in groups for seq in group.seqs] + self._pending:
                        self._end(seq, "cancelled")
                    self._pending.clear()
                    return
                room = self.max_batch - sum(len(group.seqs) for group in groups)
                newcomers, self._pending = self._pending[:room], self._pending[room:]
            try:
                for group in groups:
                    group.retain([not self._cancelled(seq) for seq in group.seqs], self.align)
                groups = [group for group in groups if group.seqs]
                for seq in newcomers:
                    if not self._cancelled(seq):
                        self._prefill(seq, groups)
                for group in groups:
                    self._decode(group)
                groups = [group for group in groups if group.seqs]
            except Exception as exc:  # a failed run fails every sequence that was in it, not the worker
                log.exception("batched step failed")
                for seq in [seq for group in groups for seq in group.seqs] + newcomers:
                    if seq.generation.finish_reason is None:
                        seq.out.put(exc)
                groups = []

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

    def _prefill(self, seq: _Sequence, groups: list[_Group]) -> None:
        """The prompt's own pass and first token; then the sequence joins the group its length fits."""
        generation = seq.generation
        cache = KVCache()
        started = time.perf_counter()
        logits = self.engine.runner.step(generation.prompt_ids, cache)
        seq.decode_started = time.perf_counter()
        generation.prefill_seconds = seq.decode_started - started
        if not self._emit(seq, generation.decoding.advance(logits, cache.length)):
            return
        residue = cache.length % self.align
        group = next((g for g in groups if g.batch.lengths[0] % self.align == residue), None)
        if group is None:
            group = _Group()
            groups.append(group)
        group.seqs.append(seq)
        group.batch.join(cache)

    def _decode(self, group: _Group) -> None:
        """One batched step for a group; the sequences that finished leave it."""
        self.on_step(len(group.seqs))
        batch = group.batch
        logits = self.engine.runner.step_batch([seq.generation.decoding.token for seq in group.seqs], batch)
        now = time.perf_counter()
        going = []
        for row, seq in enumerate(group.seqs):
            seq.generation.decode_seconds = now - seq.decode_started
            going.append(self._emit(seq, seq.generation.decoding.advance(logits[row], batch.lengths[row])))
        group.retain(going, self.align)
