"""onnxruntime sessions for exported models: one decoder step with a KV cache, full-window logits, pooled embeddings.

The build's validate step and the server feed the same ONNX graphs, so the feeding code lives here once
(the build half may import the runtime, never the reverse).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmpack.bundle.variant_dir import POOLINGS
from lmpack.runtime.device_kv import DeviceKV, dtype_of, shape_of
from lmpack.runtime.heap import mapped_zeros
from lmpack.runtime.trt_plan import CUDA_EP, TENSORRT_EP

NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."
# The input lmpack's export adds to compute the LM head for only the last positions (steps.onnx_graph.keep_last_logits).
LOGITS_TO_KEEP = "num_logits_to_keep"
KV_PADDINGS = ("left", "right")


def create_session(
    model_path: Path | bytes,
    *,
    threads: int | None = None,
    providers: Sequence[Any] | None = None,
    weights_dir: Path | None = None,
):
    """An InferenceSession on the first available of `providers` (CPU when none is available or given).

    `model_path` may be a serialized graph instead, whose external weights are then read from `weights_dir`
    (the build's fp16 range check runs an edited copy of a graph on the original's weights this way).

    A variant lists its target's providers in preference order, each a name or a (name, options) pair
    (a hardware-compatible TensorRT engine must be loaded with `trt_engine_hw_compatible` too); a server
    without the GPU package still answers on the CPU rather than failing to start.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # The thread pool hands out a parallel loop's work in shrinking blocks instead of equal shares, which
    # balances the small matrices of one-token steps better: faster decode and batched steps, prefill the
    # same (docs/serving.md, "How the engine runs the model").
    options.add_session_config_entry("session.dynamic_block_base", "4")
    if weights_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    available = set(ort.get_available_providers())
    chosen = [p for p in (providers or []) if (p if isinstance(p, str) else p[0]) in available] or [
        "CPUExecutionProvider"
    ]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    model = model_path if isinstance(model_path, bytes) else str(model_path)
    return ort.InferenceSession(model, options, providers=chosen)


@dataclass
class KVCache:
    """The past keys and values of one sequence.

    For left-padded graphs (optimum's) they are the last step's presents, kept as OrtValues so they go to
    the next step without a round trip through numpy (which copied the whole cache twice per token). For
    right-padded graphs (GroupQueryAttention) they are numpy buffers with room for more positions than
    `length`, bound as both past and present, so the graph writes each new key in place (see DecoderRunner).
    """

    length: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    binding: InPlaceBinding | DeviceBinding | None = None  # right-padded graphs: the I/O binding of `values`, reused
    # Right-padded graphs: the positions this sequence may reach (its prompt and max_tokens). Its buffers (and
    # a batch's it joins) are made that long at once, so they need not grow, which copies the whole cache
    # while the old and new buffers are both resident; positions not yet written take no memory (mapped_zeros).
    room: int = 0

    def past(self, length: int | None = None) -> dict[str, np.ndarray]:
        """The first `length` positions (all it holds when None) of each past, as arrays: views, not copies."""
        end = self.length if length is None else length
        return {name: _as_array(value)[:, :, :end] for name, value in self.values.items()}

    def copy(self) -> KVCache:
        """An independent cache holding the same past (n choices of one prompt each go on from its prefill); a
        device cache's copy is made on the host and goes back to the device at its next step."""
        values = {name: array.copy() for name, array in self.past().items()}
        return KVCache(length=self.length, values=values, room=self.room)


@dataclass
class BatchKV:
    """The past of several sequences stacked for one batched step: [batch, kv_heads, width, head_dim].

    `mask` has 1 on each row's real positions and 0 on the padding, and becomes the attention mask, so
    padding is never attended to. Where a row's real positions sit depends on the graph (`padding`):

    - "left" (optimum's graphs, which attend over the whole window): row i's real past is its last
      `lengths[i]` columns, so the next token of every row lands in the same new column.
    - "right" (GroupQueryAttention, which reads each row's length from the mask and writes its new keys
      right after them): row i's real past is its first `lengths[i]` columns.

    Either way each row's past is one contiguous slice. With left padding each step's presents are the
    next step's pasts as they are (OrtValues, no copy), and a row joining or leaving re-packs the arrays.
    Right-padded batches are written in place (DecoderRunner): the batch owns buffers with spare rows and
    positions (`_store`), `values` are views of their first `size` rows, a newcomer is written into the
    next free row and a leaving row's place is filled by moving the later rows up. The buffers are made
    with `max_rows` rows and each newcomer's `room` positions, so the running rows' caches are copied only
    when a newcomer needs more positions than the buffers have (or rows beyond `max_rows` are asked for).
    The width is always the longest row's length.
    """

    padding: str = "left"
    lengths: list[int] = field(default_factory=list)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    values: dict[str, Any] = field(default_factory=dict)
    binding: InPlaceBinding | DeviceBinding | None = None  # as KVCache.binding
    max_rows: int = 1  # right padding: the rows the buffers are first made with
    _store: dict[str, Any] = field(default_factory=dict, repr=False)  # right padding: see above
    # Right padding on a GPU: `_store` holds device buffers, reshaped on the device (device_kv.py), and `values`
    # is the store itself, bound with the batch's current rows.
    device: DeviceKV | None = None

    def __post_init__(self) -> None:
        if self.padding not in KV_PADDINGS:
            raise ValueError(f"padding must be one of {KV_PADDINGS}, not {self.padding!r}")

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def _arrays(self) -> dict[str, np.ndarray]:
        """Left padding: the pasts as arrays of exactly `width` positions."""
        return {name: _as_array(value)[:, :, : self.width] for name, value in self.values.items()}

    @staticmethod
    def _pad(array: np.ndarray, width: int, axis: int = 2) -> np.ndarray:
        """Left padding: masked zeros before a narrower row's past."""
        missing = width - array.shape[axis]
        if missing == 0:
            return array
        pad = [(0, 0)] * array.ndim
        pad[axis] = (missing, 0)
        return np.pad(array, pad)

    def step_mask(self) -> np.ndarray:
        """The attention mask of the next step: every row's past plus one new token."""
        if self.padding == "left":
            return np.concatenate([self.mask, np.ones((self.size, 1), dtype=np.int64)], axis=1)
        lengths = np.asarray(self.lengths, dtype=np.int64)[:, None] + 1
        return (np.arange(self.width + 1)[None, :] < lengths).astype(np.int64)

    def join(self, cache: KVCache) -> None:
        """Add one prefilled sequence as the last row; the narrower side is padded with masked zeros."""
        if self.padding == "right" and self.device is not None:
            self._join_on_device(cache)
            return
        new = cache.past()
        if self.padding == "right":
            width = max(self.width if self.lengths else 0, cache.length)
            self._reserve(self.size + 1, max(width + 1, cache.room), new)
            for name, value in new.items():
                row = self._store[name][self.size]
                row[:, : cache.length] = value[0]
                row[:, cache.length : width] = 0  # a previous row's leftovers: masked anyway, but kept clean
            self.lengths.append(cache.length)
            self._settle(width)
            return
        if not self.lengths:
            self.values = {name: np.ascontiguousarray(value) for name, value in new.items()}
            self.mask = np.ones((1, cache.length), dtype=np.int64)
            self.lengths = [cache.length]
            return
        width = max(self.width, cache.length)
        old = self._arrays()
        self.values = {name: np.concatenate([self._pad(old[name], width), self._pad(new[name], width)]) for name in new}
        self.mask = np.concatenate(
            [self._pad(self.mask, width, axis=1), self._pad(np.ones((1, cache.length), dtype=np.int64), width, axis=1)]
        )
        self.lengths.append(cache.length)

    def keep(self, rows: list[int], *, align: int = 1) -> None:
        """Keep only `rows` (in that order), and drop the padding columns no remaining row needs (with left
        padding a multiple of `align` of them, so each row's padding stays what the batcher made it modulo `align`)."""
        if not rows:
            self.lengths, self.values, self.mask = [], {}, np.zeros((0, 0), dtype=np.int64)
            self._store, self.binding = {}, None  # the binding would keep the buffers alive until the next batch
            return
        old_width = self.width
        self.lengths = [self.lengths[i] for i in rows]
        if self.padding == "right" and self.device is not None:
            if rows != list(range(len(rows))):
                self._resize_on_device(rows, old_width, *self._device_capacity())
            self._settle(max(self.lengths))
            return
        if self.padding == "right":
            width = max(self.lengths)
            if rows != list(range(len(rows))):
                for store in self._store.values():  # the fancy-indexed read copies first, so overlap is safe
                    store[: len(rows), :, :width] = store[rows, :, :width]
            self._settle(width)
            return
        start = self.width - max(self.lengths)
        window = slice(start - start % align, None)
        self.values = {name: np.ascontiguousarray(value[rows, :, window]) for name, value in self._arrays().items()}
        self.mask = self.mask[rows, window]

    def reserve(self, positions: int) -> None:
        """Right padding: room for `positions` positions in every row (the step about to run needs width + 1).
        `values` stay the same arrays (and their I/O binding stays valid) unless the store had to grow."""
        if self.device is not None:
            have_rows, have_positions = self._device_capacity()
            if have_positions < positions:
                self._resize_on_device(range(self.size), self.width, have_rows, _capacity(positions))
                self.values = dict(self._store)
            return
        if self._reserve(self.size, positions, self._store):
            self.values = {name: store[: self.size] for name, store in self._store.items()}

    def _reserve(self, rows: int, positions: int, like: dict[str, np.ndarray]) -> bool:
        """Make the store hold at least `rows` rows of `positions` positions, keeping what the current rows hold;
        True when it was reallocated."""
        have_rows = next((store.shape[0] for store in self._store.values()), 0)
        if rows > have_rows:  # the batcher's max_rows at once, then doubling
            rows = max(rows, 2 * have_rows, self.max_rows)
        layout = {name: (row.shape[1], row.shape[3], row.dtype) for name, row in like.items()}
        store = _fit(self._store, layout, rows, positions, (self.size, self.width))
        grew, self._store = store is not self._store, store
        return grew

    def _device_capacity(self) -> tuple[int, int]:
        """The device buffers' (rows, positions); (0, 0) before any row joined."""
        sample = next(iter(self._store.values()), None)
        if sample is None:
            return 0, 0
        rows, _, positions, _ = shape_of(sample)
        return rows, positions

    def _resize_on_device(self, rows: Sequence[int], keep: int, out_rows: int, out_positions: int) -> None:
        """Every device buffer remade with `rows` first (their first `keep` positions), `out_rows` x `out_positions`."""
        assert self.device is not None
        self._store = {
            name: self.device.resize(store, rows, keep, out_rows, out_positions) for name, store in self._store.items()
        }

    def _join_on_device(self, cache: KVCache) -> None:
        """join() for device buffers: the batch's rows, then the newcomer's with the spare rows (the batcher's
        max_rows, then doubling) after it, stacked into new buffers on the device with the newcomer's room."""
        assert self.device is not None
        width = max(self.width if self.lengths else 0, cache.length)
        have_rows, have_positions = self._device_capacity()
        rows = self.size + 1 if self.size + 1 <= have_rows else max(self.size + 1, 2 * have_rows, self.max_rows)
        needed = max(width + 1, cache.room)
        positions = have_positions if have_positions >= needed else _capacity(needed)
        store = {}
        for name, value in cache.values.items():
            spare = rows - self.size  # the newcomer's row and the free ones below it
            if isinstance(value, np.ndarray):  # a prefix-cache hit's rows, or a copy: to the device
                row = self.device.upload(value[:, :, : cache.length], spare, positions)
            else:
                row = self.device.resize(value, [0], cache.length, spare, positions)
            if self.size:
                kept = self.device.resize(self._store[name], range(self.size), self.width, self.size, positions)
                row = self.device.stack(kept, row)
            store[name] = row
        self._store = store
        self.lengths.append(cache.length)
        self._settle(width)

    def _settle(self, width: int) -> None:
        """Point `values` at the store's first rows and rebuild the mask for `width` columns."""
        if self.device is not None:
            self.values = dict(self._store)  # bound with `size` rows by address (DeviceBinding)
        else:
            self.values = {name: store[: self.size] for name, store in self._store.items()}
        lengths = np.asarray(self.lengths, dtype=np.int64)[:, None]
        self.mask = (np.arange(width)[None, :] < lengths).astype(np.int64)


def _as_array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


# A run over more tokens than this (a prompt) hands the arena's unused memory back afterwards: its activations
# are sized by the prompt, and the arena would otherwise keep the largest prompt's for the life of the server.
# Far less stays resident after a long prompt, at the same decode and prefill speed (docs/serving.md, "Memory").
_SHRINK_AFTER_TOKENS = 64


def run_options(tokens: int):
    """RunOptions for a run over `tokens` input tokens: None, or the arena shrink for a prompt-sized run."""
    if tokens <= _SHRINK_AFTER_TOKENS:
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


# Right-padded buffers are made a multiple of this many positions long: a cache made for its room
# (KVCache.room) never grows; one made without (room 0) re-allocates once every 128 tokens, not every token.
_GROWTH = 128


def _capacity(positions: int) -> int:
    """Buffer positions for `positions` and room to grow: the next multiple of _GROWTH above it."""
    return (positions // _GROWTH + 1) * _GROWTH


def _kv_buffers(
    layout: dict[str, tuple], rows: int, positions: int, old: dict[str, np.ndarray], filled: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Zeroed buffers [rows, heads, positions, head_dim] for each past in `layout` ({name: (heads, head_dim,
    dtype)}), holding what `old` held in its first `filled` (rows, positions)."""
    buffers = {}
    for name, (heads, head_dim, dtype) in layout.items():
        buffers[name] = mapped_zeros((rows, heads, positions, head_dim), dtype)
        if name in old:
            buffers[name][: filled[0], :, : filled[1]] = old[name][: filled[0], :, : filled[1]]
    return buffers


def _fit(
    buffers: dict[str, np.ndarray], layout: dict[str, tuple], rows: int, positions: int, filled: tuple[int, int]
) -> dict[str, np.ndarray]:
    """`buffers` when they hold `rows` rows of `positions` positions; otherwise new ones that do (positions
    rounded up by _capacity), holding what the first `filled` (rows, positions) of `buffers` held."""
    sample = next(iter(buffers.values()), None)  # every buffer has the same rows and positions
    have_rows, have_positions = (0, 0) if sample is None else (sample.shape[0], sample.shape[2])
    if sample is not None and have_rows >= rows and have_positions >= positions:
        return buffers
    positions = have_positions if have_positions >= positions else _capacity(positions)
    return _kv_buffers(layout, max(rows, have_rows), positions, buffers, filled)


class DecoderRunner:
    """A decoder exported with past/present KV-cache inputs and outputs.

    Inputs: input_ids, attention_mask, position_ids (optimum's graphs) and past_key_values.N.key/value shaped
    [batch, kv_heads, past_len, head_dim]; outputs: logits and present.N.key/value.

    Right-padded graphs (onnxruntime-genai's, with GroupQueryAttention) run with I/O binding and one buffer
    per past that is bound as the past input and the present output at once: GroupQueryAttention then
    writes each step's new keys and values in place, at each row's own length, instead of copying the
    whole cache into a new present every token, which decodes faster; keeping the binding from step to step
    (InPlaceBinding) is faster again, with the same tokens out (docs/serving.md, "Against the peers", the
    list of what got lmpack there).
    """

    def __init__(
        self,
        model_path: Path | bytes,
        *,
        threads: int | None = None,
        providers: Sequence[Any] | None = None,
        kv_padding: str = "left",
        bind_kv: bool | None = None,
        weights_dir: Path | None = None,
        device_kv: bool | None = None,
    ):
        if kv_padding not in KV_PADDINGS:
            raise ValueError(f"kv_padding must be one of {KV_PADDINGS}, not {kv_padding!r}")
        self.kv_padding = kv_padding  # how batched pasts are laid out: lmpack-model.json's kv_padding
        self.session = create_session(model_path, threads=threads, providers=providers, weights_dir=weights_dir)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [name for name in self.inputs if name.startswith(_PAST_PREFIX)]
        self.present_of = {name: _PRESENT_PREFIX + name[len(_PAST_PREFIX) :] for name in self.past_names}
        unexpected = set(self.inputs) - {
            "input_ids",
            "attention_mask",
            "position_ids",
            LOGITS_TO_KEEP,
            *self.past_names,
        }
        if unexpected:
            raise ValueError(f"unexpected decoder inputs {sorted(unexpected)}")
        # Where the KV cache lives between steps: the GPU's memory when a GPU provider runs the graph.
        self.kv_device = "cuda" if self.session.get_providers()[0] in (TENSORRT_EP, CUDA_EP) else "cpu"
        self.bind_kv = self.kv_device != "cpu" if bind_kv is None else bind_kv
        # Right-padded graphs (GroupQueryAttention: the CPU graphs, and the int8/int4 CUDA graphs of NVIDIA targets)
        # write their cache in place: in host buffers on the CPU, in the GPU's memory on a GPU provider
        # (device_kv.py); `device_kv` forces the device buffers on (with the CPU as the device, for tests) or off.
        self.in_place = kv_padding == "right"
        on_device = self.in_place and (self.kv_device != "cpu" if device_kv is None else device_kv)
        self.device_kv = DeviceKV(self.kv_device, self.session.get_providers()) if on_device else None
        self._past_layout = {
            name: (self.inputs[name].shape[1], self.inputs[name].shape[3], self._type(name)) for name in self.past_names
        }

    def _type(self, name: str):
        return NP_TYPES[self.inputs[name].type]

    def _empty_past(self, name: str) -> np.ndarray:
        # [batch, kv_heads, past_len=0, head_dim]: the cache starts empty.
        shape = [1 if i == 0 else (0 if i == 2 else dim) for i, dim in enumerate(self.inputs[name].shape)]
        return np.zeros(shape, dtype=self._type(name))

    def _feed(self, ids: np.ndarray, past_length: int, *, keep: int = 1) -> dict[str, np.ndarray]:
        """The inputs of one run; graphs with LOGITS_TO_KEEP compute the logits of the last `keep` positions only."""
        length = ids.shape[1]
        feed = {"input_ids": ids.astype(np.int64)}
        if LOGITS_TO_KEEP in self.inputs:
            feed[LOGITS_TO_KEEP] = np.array([keep], dtype=np.int64)
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, past_length + length), dtype=self._type("attention_mask"))
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(
                past_length, past_length + length, dtype=self._type("position_ids")
            ).reshape(1, -1)
        return feed

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        """Logits for every position of one window, from an empty cache: [length, vocab]."""
        return self.window_outputs(token_ids, ["logits"])[0][0].astype(np.float32)

    def window_outputs(self, token_ids: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The graph's outputs `names` for one window from an empty cache (the build's fp16 range check reads
        intermediate tensors this way, from a graph that outputs them)."""
        feed = self._feed(token_ids.reshape(1, -1), 0, keep=token_ids.size)
        feed.update({name: self._empty_past(name) for name in self.past_names})
        return self.session.run(names, feed, run_options(token_ids.size))

    def step(self, token_ids: Sequence[int], cache: KVCache) -> np.ndarray:
        """Run `token_ids` after what `cache` holds; return the last position's logits and advance the cache."""
        return self.step_window(token_ids, cache, keep=1)[-1]

    def step_window(self, token_ids: Sequence[int], cache: KVCache, *, keep: int | None = None) -> np.ndarray:
        """`step`, returning the logits of the last `keep` positions (all of `token_ids` when None): [keep, vocab]."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        keep = ids.shape[1] if keep is None else keep
        feed = self._feed(ids, cache.length, keep=keep)
        if self.in_place:
            fit = self._fit_on_device if self.device_kv is not None else _fit
            cache.values = fit(
                cache.values, self._past_layout, 1, max(cache.length + ids.shape[1], cache.room), (1, cache.length)
            )
            logits = self._run_in_place(feed, cache)
        else:
            pasts = {
                name: cache.values[name] if name in cache.values else self._empty_past(name) for name in self.past_names
            }
            logits, cache.values = self._run(feed, pasts)
        cache.length += ids.shape[1]
        return logits[0, -keep:].astype(np.float32)

    def new_batch(self, max_rows: int = 1) -> BatchKV:
        """An empty batch laid out the way this graph wants its pasts (right padding: buffers for `max_rows`)."""
        return BatchKV(padding=self.kv_padding, max_rows=max_rows, device=self.device_kv)

    def step_batch(self, tokens: Sequence[int], batch: BatchKV) -> np.ndarray:
        """One new token for each row of `batch` in one session run; return logits [rows, vocab], advance the batch.

        Each row gets its own position (its true length, not the padded width), so the rotary
        positions are those the row would have alone.
        """
        rows = batch.size
        mask = batch.step_mask()
        feed = {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(rows, 1)}
        if LOGITS_TO_KEEP in self.inputs:
            feed[LOGITS_TO_KEEP] = np.array([1], dtype=np.int64)
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = mask.astype(self._type("attention_mask"))
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.asarray(batch.lengths, dtype=self._type("position_ids")).reshape(rows, 1)
        if self.in_place:
            batch.reserve(mask.shape[1])
            logits = self._run_in_place(feed, batch)
        else:
            logits, batch.values = self._run(feed, batch.values)
        batch.mask = mask
        batch.lengths = [length + 1 for length in batch.lengths]
        return logits[:, -1].astype(np.float32)

    def _run(self, feed: dict[str, np.ndarray], pasts: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One session run; (logits on the host, the presents as the next step's pasts, as OrtValues).

        With `bind_kv` (GPU providers) the presents are bound to `kv_device` and stay in the GPU's memory
        between steps, so a step moves only the new token in and the logits out, never the cache. On the
        CPU, run_with_ort_values does the same job with less per-call work, so decode is faster
        (docs/serving.md, "How the engine runs the model").
        """
        import onnxruntime as ort

        pasts = {
            name: ort.OrtValue.ortvalue_from_numpy(pasts[name]) if isinstance(pasts[name], np.ndarray) else pasts[name]
            for name in self.past_names
        }
        present_names = [self.present_of[name] for name in self.past_names]
        if self.bind_kv:
            binding = self.session.io_binding()
            binding.bind_output("logits")  # bound first: get_outputs() lists outputs in the order they were bound
            for name in present_names:
                binding.bind_output(name, self.kv_device)
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            for name, value in pasts.items():
                binding.bind_ortvalue_input(name, value)
            self.session.run_with_iobinding(binding, run_options(feed["input_ids"].size))
            logits, *presents = binding.get_outputs()
        else:
            values = {**{name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in feed.items()}, **pasts}
            logits, *presents = self.session.run_with_ort_values(
                ["logits", *present_names], values, run_options(feed["input_ids"].size)
            )
        return logits.numpy(), dict(zip(self.past_names, presents, strict=True))

    def _run_in_place(self, feed: dict[str, np.ndarray], holder: KVCache | BatchKV) -> np.ndarray:
        """One session run with each past's buffer bound as its present too; returns the logits.

        The binding lives on the cache (or batch) and is reused while its buffers are the same ones, so a
        step binds only its own inputs: binding every past and present anew each token, and fetching the
        logits through get_outputs(), took a noticeable share of a step (docs/serving.md, "How the engine
        runs the model").
        """
        bound = holder.binding
        rows = feed["input_ids"].shape[0]
        if bound is None or bound.values is not holder.values or bound.rows != rows:
            binding = DeviceBinding if self.device_kv is not None else InPlaceBinding
            bound = holder.binding = binding(self.session, holder.values, self.present_of, rows)
        return bound.run(feed)

    def _fit_on_device(
        self, values: dict[str, Any], layout: dict[str, tuple], rows: int, positions: int, filled: tuple[int, int]
    ) -> dict[str, Any]:
        """_fit for device buffers: `values` when they are device buffers with room enough, else new ones on the
        device holding their first `filled` (rows, positions); host arrays (a prefix-cache hit, a copy) go up."""
        assert self.device_kv is not None
        sample = next(iter(values.values()), None)
        on_device = sample is not None and not isinstance(sample, np.ndarray)
        have_rows, _, have_positions, _ = shape_of(sample) if sample is not None else (0, 0, 0, 0)
        if on_device and have_rows >= rows and have_positions >= positions:
            return values
        size = have_positions if on_device and have_positions >= positions else _capacity(positions)
        rows = max(rows, have_rows)
        if sample is None:
            return {
                name: self.device_kv.zeros((rows, heads, size, dim), dtype)
                for name, (heads, dim, dtype) in layout.items()
            }
        if isinstance(sample, np.ndarray):
            return {
                name: self.device_kv.upload(v[: filled[0], :, : filled[1]], rows, size) for name, v in values.items()
            }
        return {name: self.device_kv.resize(v, range(filled[0]), filled[1], rows, size) for name, v in values.items()}


class DeviceBinding:
    """An I/O binding of device KV buffers (device_kv.py) by address, each past bound as its present too, with
    the batch's `rows` of them; the logits come back to the host."""

    def __init__(self, session: Any, values: dict[str, Any], present_of: dict[str, str], rows: int):
        self.session, self.values, self.rows = session, values, rows
        self.binding = session.io_binding()
        for name, value in values.items():
            device, shape, dtype = value.device_name(), [rows, *shape_of(value)[1:]], dtype_of(value)
            self.binding.bind_input(name, device, 0, dtype, shape, value.data_ptr())
            self.binding.bind_output(present_of[name], device, 0, dtype, shape, value.data_ptr())
        self.binding.bind_output("logits")  # to the host; bound last, so last in get_outputs()

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in feed.items():
            self.binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(self.binding, run_options(feed["input_ids"].size))
        return self.binding.get_outputs()[-1].numpy()


class InPlaceBinding:
    """An I/O binding of one set of KV buffers (each past bound as its present too) and a logits buffer."""

    def __init__(self, session: Any, values: dict[str, np.ndarray], present_of: dict[str, str], rows: int = 1):
        import onnxruntime as ort

        self.session, self.rows = session, rows
        self.values = values  # the buffers bound: a cache that grows or re-packs gets a new dict, and a new binding
        self.binding = session.io_binding()
        for name, buffer in values.items():
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # no copy: the graph writes into the array
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(present_of[name], value)
        output = next(o for o in session.get_outputs() if o.name == "logits")
        self.vocab, self.logits_type = output.shape[-1], NP_TYPES[output.type]
        self.logits: np.ndarray | None = None
        if not isinstance(self.vocab, int):  # no fixed vocabulary size to allocate for: onnxruntime allocates
            self.binding.bind_output("logits")

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The logits [rows, positions, vocab], in a buffer the next run overwrites."""
        for name, value in feed.items():
            self.binding.bind_cpu_input(name, value)
        options = run_options(feed["input_ids"].size)
        if not isinstance(self.vocab, int):
            self.session.run_with_iobinding(self.binding, options)
            return self.binding.get_outputs()[-1].numpy()  # bound last
        rows, positions = feed["input_ids"].shape
        if LOGITS_TO_KEEP in feed:
            positions = min(positions, int(feed[LOGITS_TO_KEEP][0]))
        if self.logits is None or self.logits.shape[:2] != (rows, positions):
            import onnxruntime as ort

            self.logits = np.empty((rows, positions, self.vocab), dtype=self.logits_type)
            self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        self.session.run_with_iobinding(self.binding, options)
        return self.logits


class EncoderRunner:
    """Sentence embeddings pooled as the model's sentence-transformers pipeline pools them (lmpack-model.json's
    `pooling`: "mean" over the tokens, the first ("cls") or the last real token ("last"); batches are right-padded),
    L2-normalised when it normalises."""

    def __init__(
        self,
        model_path: Path | bytes,
        *,
        threads: int | None = None,
        providers: Sequence[Any] | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        weights_dir: Path | None = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.pooling, self.normalize = pooling, normalize
        self.session = create_session(model_path, threads=threads, providers=providers, weights_dir=weights_dir)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def outputs(self, ids: np.ndarray, mask: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
        """The graph's outputs `names` (all when None) for a right-padded batch."""
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return self.session.run(names, feed, run_options(ids.size))

    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hidden = self.outputs(ids, mask)[0].astype(np.float32)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[np.arange(len(hidden)), np.maximum(mask.sum(axis=1) - 1, 0)]
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if not self.normalize:
            return pooled
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
