"""Continuous batching: padded batched steps give the unbatched logits, and a real server batches concurrent
clients (metrics show it) while every greedy answer stays the one `lmpack generate` gives.

The tiny Llama is an int8 variant, like the served ones: its activations are quantized again in every
layer, so these tests would catch a batch that is merely close to the unbatched result.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from runtime_servers import REPO, run_server

from lmpack.runtime.batcher import EXACT_ALIGN, Batcher
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.sessions import BatchKV, KVCache
from lmpack.runtime.variant import load_variant

PROMPTS = ["The railway", "Once upon a time there was", "Hello", "In the year 1900 the city of London had"]


@pytest.fixture(scope="module")
def engine(llama_variant) -> DecoderEngine:
    return DecoderEngine(load_variant(llama_variant), threads=1)


@pytest.fixture(scope="module")
def batch_server(llama_variant, tmp_path_factory):
    with run_server(
        llama_variant,
        "--max-concurrency",
        "4",
        "--max-batch",
        "4",
        "--queue",
        "4",
        tmp=tmp_path_factory.mktemp("batch-serve"),
    ) as server:
        yield server


def _unbatched(engine: DecoderEngine, prompt: str, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each came from, one sequence alone."""
    cache, tokens, logits = KVCache(), [], []
    step_logits = engine.runner.step(engine.encode_prompt(prompt), cache)
    for _ in range(steps):
        logits.append(step_logits)
        tokens.append(int(np.argmax(step_logits)))
        step_logits = engine.runner.step([tokens[-1]], cache)
    return tokens, logits


@pytest.mark.parametrize(
    "variant_fixture", ["llama_variant", "llama_variant_optimum", "llama_variant_fp16_kv", "llama_variant_gpu_graph"]
)
def test_padded_batch_steps_give_the_unbatched_logits(variant_fixture, request):
    """Rows of different lengths, padded and masked, fed the unbatched tokens: same logits, same argmax;
    rows leaving mid-way do not disturb the rest. onnxruntime-genai's graph (right-padded rows, each
    attending to its own length only) is bit for bit, with its KV cache in fp16 too; optimum's (left-padded,
    attending over the padded window) is bit for bit where the padding is a multiple of EXACT_ALIGN."""
    engine = DecoderEngine(load_variant(request.getfixturevalue(variant_fixture)), threads=1)
    expected_padding = "left" if variant_fixture == "llama_variant_optimum" else "right"
    assert engine.runner.kv_padding == expected_padding
    lengths = [len(engine.encode_prompt(p)) for p in PROMPTS]
    assert len(set(lengths)) > 1 and len({n % EXACT_ALIGN for n in lengths}) > 1, lengths
    reference = [_unbatched(engine, prompt, 12) for prompt in PROMPTS]
    batch, rows = engine.runner.new_batch(), list(range(len(PROMPTS)))
    for prompt in PROMPTS:
        cache = KVCache()
        engine.runner.step(engine.encode_prompt(prompt), cache)
        batch.join(cache)
    assert batch.width == max(lengths) and batch.mask.sum() == sum(lengths)
    expected_kv = np.float16 if variant_fixture in ("llama_variant_fp16_kv", "llama_variant_gpu_graph") else np.float32
    assert {past.dtype for past in batch.values.values()} == {np.dtype(expected_kv)}
    for step in range(11):
        if step == 5:  # the longest prompt's row leaves: the batch narrows (left: by a multiple of EXACT_ALIGN)
            rows = [0, 1, 2]
            batch.keep(rows, align=EXACT_ALIGN)
            assert batch.width - max(batch.lengths) < (EXACT_ALIGN if expected_padding == "left" else 1)
        logits = engine.runner.step_batch([reference[r][0][step] for r in rows], batch)
        for row, r in enumerate(rows):
            expected = reference[r][1][step + 1]
            assert int(np.argmax(logits[row])) == int(np.argmax(expected))
            if expected_padding == "right" or (batch.width - batch.lengths[row]) % EXACT_ALIGN == 0:
                assert np.array_equal(logits[row], expected), (r, step)
            else:
                assert np.allclose(logits[row], expected, atol=1e-2), (r, step)


def test_batch_layouts_put_each_rows_past_where_its_graph_reads_it():
    """Two rows of lengths 2 and 3: left padding puts the short row's past at the end, right at the start."""

    def cache(length: int, value: float) -> KVCache:
        return KVCache(length=length, values={"k": _Value(np.full((1, 1, length, 2), value, dtype=np.float32))})

    for padding, short_row, step_mask in (
        ("left", [0, 1, 1], [[0, 1, 1, 1], [1, 1, 1, 1]]),
        ("right", [1, 1, 0], [[1, 1, 1, 0], [1, 1, 1, 1]]),
    ):
        batch = BatchKV(padding=padding)
        batch.join(cache(2, 5.0))
        batch.join(cache(3, 7.0))
        assert batch.mask.tolist() == [short_row, [1, 1, 1]]
        # (right-padded rows have spare positions beyond the width: the graph writes the next keys there)
        assert batch.values["k"][0, 0, : batch.width, 0].tolist() == [5.0 * m for m in short_row]
        assert batch.step_mask().tolist() == step_mask
        batch.keep([0])
        assert batch.width == 2 and batch.values["k"][0, 0, : batch.width, 0].tolist() == [5.0, 5.0]
    with pytest.raises(ValueError, match="padding"):
        BatchKV(padding="middle")


def test_a_right_padded_batch_keeps_its_buffers_as_rows_join_and_leave():
    """Rows join into spare rows and leave by moving the later rows up, in the same buffers; only growth
    (rows doubling, positions by 128) allocates, and keeps every row's past."""

    def cache(length: int, value: float) -> KVCache:
        return KVCache(length=length, values={"k": _Value(np.full((1, 1, length, 2), value, dtype=np.float32))})

    def rows(batch: BatchKV) -> list[list[float]]:
        return batch.values["k"][:, 0, : batch.width, 0].tolist()

    batch = BatchKV(padding="right")
    for value, length in ((1.0, 3), (2.0, 5), (3.0, 4)):
        batch.join(cache(length, value))
    store = batch._store["k"]
    assert store.shape[0] == 4 and store.shape[2] == 128  # rows doubled 1 -> 2 -> 4
    batch.keep([0, 2])  # the middle row leaves, the last moves up
    assert batch._store["k"] is store and np.shares_memory(batch.values["k"], store)
    assert rows(batch) == [[1, 1, 1, 0], [3, 3, 3, 3]]
    batch.join(cache(2, 9.0))  # into the free row, over the old row's keys
    assert batch._store["k"] is store and rows(batch) == [[1, 1, 1, 0], [3, 3, 3, 3], [9, 9, 0, 0]]
    values = batch.values
    batch.reserve(100)  # fits: the same arrays (and I/O binding)
    assert batch.values is values
    batch.reserve(200)  # grows, keeping every row
    assert batch._store["k"].shape[2] == 256 and rows(batch) == [[1, 1, 1, 0], [3, 3, 3, 3], [9, 9, 0, 0]]
    batch.keep([])
    assert batch._store == {} and batch.size == 0


def test_buffers_are_made_for_the_room_asked_and_never_grow_within_it(engine):
    """A cache made for its prompt and max_tokens, and a batch made for max_rows rows and its rows' room,
    take every step in the same buffers (no copy of the cache as it grows), with the same logits as
    growing buffers; an emptied batch lets its buffers go, binding included."""
    ids = engine.encode_prompt(PROMPTS[1])
    roomy, growing = KVCache(room=300), KVCache()
    logits = [engine.runner.step(ids, roomy), engine.runner.step(ids, growing)]
    buffers = roomy.values
    assert next(iter(buffers.values())).shape[2] == 384  # 300 rounded up to the next 128
    for _ in range(140):  # past 128 positions: `growing` grows
        assert np.array_equal(*logits)
        token = int(np.argmax(logits[0]))
        logits = [engine.runner.step([token], roomy), engine.runner.step([token], growing)]
    assert roomy.values is buffers and roomy.length > 128

    batch = engine.runner.new_batch(max_rows=4)
    for prompt, room in zip(PROMPTS, (200, 40, 100, 50), strict=False):  # the first asks the most
        cache = KVCache(room=room)
        engine.runner.step(engine.encode_prompt(prompt), cache)
        batch.join(cache)
        if batch.size == 1:
            store = batch._store
    sample = next(iter(store.values()))
    assert (sample.shape[0], sample.shape[2]) == (4, 256)  # made once: 4 rows, room 200 -> 256 positions
    for _ in range(100):
        engine.runner.step_batch([5] * batch.size, batch)
    assert batch._store is store and batch.binding is not None
    batch.keep([])
    assert batch._store == {} and batch.binding is None


def test_a_sequence_whose_cache_cannot_be_made_fails_alone(llama_variant, monkeypatch):
    """No memory for a newcomer's cache (here the mapping is refused above 256 positions, as a host with strict
    overcommit would refuse a large one) fails that request only: the running sequence goes on in the batch
    and still gives its unbatched answer."""
    from lmpack.runtime import sessions

    engine = DecoderEngine(load_variant(llama_variant), threads=1)
    ids, params = engine.encode_prompt(PROMPTS[1]), SamplingParams(max_tokens=60, temperature=0.0)
    alone = engine.generate(ids, params).result()
    assert alone.finish_reason == "length"  # long enough to be in the batch when the other one arrives
    mapped = sessions.mapped_zeros

    def refusing(shape, dtype):
        if shape[2] > 256:
            raise MemoryError(f"could not map a cache of {shape[2]} positions (refused by this test)")
        return mapped(shape, dtype)

    monkeypatch.setattr(sessions, "mapped_zeros", refusing)
    batcher = Batcher(engine.runner, max_batch=4)
    try:
        running = engine.generate(ids, params, loop=batcher)
        deltas = iter(running)
        text = next(deltas)  # it is in the batch now
        big = engine.generate(
            engine.encode_prompt(PROMPTS[0]), SamplingParams(max_tokens=400, temperature=0.0), loop=batcher
        )
        with pytest.raises(MemoryError, match="refused by this test"):
            big.result()
        text += "".join(deltas)
    finally:
        batcher.stop()
    assert text == alone.text and running.finish_reason == "length"


class _Value:
    """Stands in for an OrtValue in the layout test: what BatchKV calls on one."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _together(jobs):
    """Run the callables at the same moment in threads; their results in order."""
    barrier, results = threading.Barrier(len(jobs)), [None] * len(jobs)

    def run(i):
        barrier.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_clients_share_batches_and_get_the_unbatched_answers(batch_server, engine, llama_variant):
    # different max_tokens and stop sequences per request, all in one batch; prompt lengths 6, 10, 4 and
    # 19 tokens, so all but one wait a step or more for the batch's lengths to suit them (EXACT_ALIGN)
    # (and one sampled with a seed: its own generator, whatever else shares the step)
    requests = [
        {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0},
        {"prompt": PROMPTS[1], "max_tokens": 120, "temperature": 0},
        {"prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0.8, "seed": 7},
        {"prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0},
    ]
    free = engine.generate(engine.encode_prompt(PROMPTS[3]), SamplingParams(max_tokens=200, temperature=0))
    free_text = free.result().text
    requests[3]["stop"] = [free_text[60:64]]  # a stop sequence the answer is sure to meet
    expected = [
        engine.generate(
            engine.encode_prompt(r["prompt"]),
            SamplingParams(  # what the server fills in for the fields a request leaves out: the model's defaults
                **{**engine.defaults(), "temperature": r["temperature"]},
                max_tokens=r["max_tokens"],
                seed=r.get("seed"),
                stop=tuple(r.get("stop", ())),
            ),
        ).result()
        for r in requests
    ]
    assert expected[3].finish_reason == "stop" and len(expected[3].text) < len(free_text)

    batched_steps = 0
    with batch_server.client() as client:
        for _ in range(3):  # a request joins at the step it arrives in: rounds until some step held several
            before = client.get("/metrics").text
            answers = _together([lambda r=r: client.post("/v1/completions", json=r).json() for r in requests])
            metrics = client.get("/metrics").text
            for answer, want in zip(answers, expected, strict=True):
                choice = answer["choices"][0]
                assert (choice["text"], choice["finish_reason"]) == (want.text, want.finish_reason)
                assert answer["usage"]["completion_tokens"] == want.completion_tokens
            steps = _metric(metrics, "lmpack_batch_size_count") - _metric(before, "lmpack_batch_size_count")
            batched_steps = steps - (
                _metric(metrics, 'lmpack_batch_size_bucket{le="1.0"}')
                - _metric(before, 'lmpack_batch_size_bucket{le="1.0"}')
            )
            if batched_steps > 0:
                break
    assert batched_steps > 0, "no decode step ran more than one sequence"

    # the same as the command line's answer
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmpack",
            "generate",
            str(llama_variant),
            PROMPTS[1],
            "--max-tokens",
            "120",
            "--threads",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == answers[1]["choices"][0]["text"]


def test_a_disconnecting_client_leaves_the_batch_alone(batch_server, engine):
    """One stream of two is dropped after its first piece: the other finishes whole, and the dropped one
    stops generating (the tokens counted are far fewer than both would have made)."""
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0}
    expected = engine.generate(engine.encode_prompt(PROMPTS[0]), SamplingParams(max_tokens=400, temperature=0)).result()
    assert expected.completion_tokens == 400

    def dropped():
        with httpx.stream(
            "POST", f"{batch_server.url}/v1/completions", json={**body, "stream": True}, timeout=60
        ) as response:
            return next(line for line in response.iter_lines() if line.startswith("data:"))

    def kept():
        return httpx.post(f"{batch_server.url}/v1/completions", json=body, timeout=120).json()

    abort = 'vllm:request_success_total{finished_reason="abort",model_name="%s"}'
    before = httpx.get(f"{batch_server.url}/metrics").text
    name = httpx.get(f"{batch_server.url}/v1/models").json()["data"][0]["id"]
    first, answer = _together([dropped, kept])
    assert first
    assert answer["choices"][0]["text"] == expected.text and answer["usage"]["completion_tokens"] == 400
    after = httpx.get(f"{batch_server.url}/metrics").text
    generated = _metric(after, "lmpack_generated_tokens_total") - _metric(before, "lmpack_generated_tokens_total")
    assert 400 < generated < 700
    assert _metric(after, "lmpack_cancelled_requests_total") - _metric(before, "lmpack_cancelled_requests_total") == 1
    assert _metric(after, abort % name) - _metric(before, abort % name) == 1


def test_in_place_cache_gives_the_copied_caches_logits_across_growth(llama_variant):
    """onnxruntime-genai's graph written in place (one buffer bound as past and present) against the same
    graph with presents copied out each step: identical logits for 300 tokens, across buffer growth."""
    from lmpack.runtime.sessions import DecoderRunner

    onnx_path = load_variant(llama_variant).onnx_path
    in_place = DecoderRunner(onnx_path, threads=1, kv_padding="right")
    copied = DecoderRunner(onnx_path, threads=1, kv_padding="left")  # the step path without I/O binding
    assert in_place.in_place and not copied.in_place
    caches = {"in_place": KVCache(), "copied": KVCache()}
    prompt = [5, 17, 33, 8, 2, 40, 41]
    in_place_tokens = list(prompt)
    logits = {"in_place": in_place.step(prompt, caches["in_place"]), "copied": copied.step(prompt, caches["copied"])}
    buffers, grown = None, 0
    for _ in range(300):
        assert np.array_equal(logits["in_place"], logits["copied"])
        token = int(np.argmax(logits["in_place"]))
        in_place_tokens.append(token)
        before = caches["in_place"].values
        logits = {
            "in_place": in_place.step([token], caches["in_place"]),
            "copied": copied.step([token], caches["copied"]),
        }
        after = caches["in_place"].values
        grown += after is not before
        buffers = next(iter(after.values()))
        assert buffers.shape[2] >= caches["in_place"].length  # grown when a step needs room, not before
    assert grown >= 1 and caches["in_place"].length == len(in_place_tokens)


def test_a_prompt_pass_computes_only_the_last_positions_logits(llama_variant):
    """The builder's graph gets num_logits_to_keep: a step computes the LM head for its last position only (not a
    [prompt, vocabulary] array), with the logits every-position validation gives for that position."""
    from lmpack.runtime.sessions import LOGITS_TO_KEEP, DecoderRunner

    runner = DecoderRunner(load_variant(llama_variant).onnx_path, threads=1, kv_padding="right")
    assert LOGITS_TO_KEEP in runner.inputs
    prompt = np.array([5, 17, 33, 8, 2, 40, 41, 9, 12, 77])
    every = runner.logits(prompt)
    assert every.shape[0] == prompt.size
    cache = KVCache()
    last = runner.step(prompt.tolist(), cache)
    assert cache.binding.logits.shape[:2] == (1, 1)
    np.testing.assert_allclose(last, every[-1], rtol=1e-5, atol=1e-5)
    second = runner.step([int(np.argmax(last))], cache)
    np.testing.assert_allclose(second, runner.logits(np.append(prompt, np.argmax(last)))[-1], rtol=1e-5, atol=1e-5)


def test_kv_bound_to_a_device_gives_the_same_logits(llama_variant_optimum):
    """The I/O-binding path GPU providers take (presents bound to the provider's device, here the CPU's),
    single and batched, against run_with_ort_values: identical logits. GPU variants are optimum's
    left-padded graphs. On a GPU the device is "cuda", which has not run here."""
    from lmpack.runtime.sessions import DecoderRunner

    variant = load_variant(llama_variant_optimum)
    plain = DecoderRunner(variant.onnx_path, threads=1, kv_padding="left")
    bound = DecoderRunner(variant.onnx_path, threads=1, kv_padding="left", bind_kv=True)
    assert (plain.bind_kv, bound.bind_kv, bound.kv_device) == (False, True, "cpu")
    caches = [KVCache(), KVCache()]
    logits = [plain.step([3, 9, 27, 4], caches[0]), bound.step([3, 9, 27, 4], caches[1])]
    for _ in range(20):
        assert np.array_equal(*logits)
        token = int(np.argmax(logits[0]))
        logits = [plain.step([token], caches[0]), bound.step([token], caches[1])]
    batches = [plain.new_batch(), bound.new_batch()]
    for runner, batch in zip((plain, bound), batches, strict=True):
        for prompt in ([5, 6, 7], [8, 9, 10, 11, 12]):
            cache = KVCache()
            runner.step(prompt, cache)
            batch.join(cache)
    for _ in range(5):
        rows = [plain.step_batch([1, 2], batches[0]), bound.step_batch([1, 2], batches[1])]
        assert np.array_equal(*rows)


def test_prompt_sized_runs_shrink_the_arena_and_token_steps_do_not():
    """A prompt's activations would stay in onnxruntime's arena for the server's life; a token step's are reused."""
    from lmpack.runtime.sessions import run_options

    assert run_options(1) is None and run_options(64) is None
    assert run_options(65).get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"


def test_chunked_prefill_gives_the_whole_prompts_answers(engine):
    """Prompts run 8 tokens at a time between decode steps answer exactly as when each runs whole and alone."""
    prompts = [engine.encode_prompt(PROMPTS[3] * 3), engine.encode_prompt(PROMPTS[1] * 2), engine.encode_prompt("Hi")]
    params = SamplingParams(max_tokens=30, temperature=0)
    expected = [engine.generate(ids, params).result().text for ids in prompts]
    steps = list(engine.generate(prompts[0], params).prefill_steps(engine.runner, 8))
    assert steps.count(None) == (len(prompts[0]) - 1) // 8 and steps[-1] is not None  # it did run in chunks
    batcher = Batcher(engine.runner, max_batch=4, prefill_chunk=8)
    try:
        answers = _together(
            [lambda ids=ids: engine.generate(ids, params, loop=batcher).result().text for ids in prompts]
        )
    finally:
        batcher.stop()
    assert answers == expected


@pytest.mark.parametrize("variant_fixture", ["llama_variant", "llama_variant_gpu_graph"])
def test_device_buffers_give_the_host_buffers_logits(variant_fixture, request):
    """The GPU path's KV buffers (runtime/device_kv.py: allocated, joined, narrowed and grown by graphs on the
    session's provider, bound by address), run with the CPU as the device: every step's logits are the host
    buffers' exactly, through joins, a leaving row, growth past the first 128 positions and a row that
    arrives as host arrays (a prefix-cache hit)."""
    from lmpack.runtime.sessions import DecoderRunner

    variant = load_variant(request.getfixturevalue(variant_fixture))
    host = DecoderEngine(variant, threads=1)
    device = DecoderRunner(variant.onnx_path, threads=1, kv_padding="right", device_kv=True)
    assert host.runner.device_kv is None and device.device_kv is not None
    prompts = [host.encode_prompt(p) for p in PROMPTS]

    def run(runner) -> list[np.ndarray]:
        seen, batch = [], runner.new_batch(2)
        first = KVCache()
        seen.append(runner.step(prompts[0], first))
        for token in range(140):  # past the first 128 positions: the single cache grows
            seen.append(runner.step([token % 50 + 3], first))
        batch.join(first)
        for prompt in prompts[1:3]:
            cache = KVCache()
            seen.append(runner.step(prompt, cache))
            batch.join(cache)
        again = KVCache(length=first.length, values=first.past())  # host arrays, as a prefix-cache hit gives
        seen.append(runner.step([7], again))
        batch.join(again)
        for step in range(6):
            if step == 3:
                batch.keep([0, 2, 3])
            seen.extend(runner.step_batch([step + 5] * batch.size, batch))
        return seen

    expected, got = run(host.runner), run(device)
    assert len(expected) == len(got)
    for want, have in zip(expected, got, strict=True):
        assert np.array_equal(want, have)
