"""The build is faithful to its source: the tokenizer it ships splits text as the source's own does."""

from __future__ import annotations

import json

import pytest
from families import make_family_model
from gguf_models import write_gguf

from lmpack.data import eval_texts
from lmpack.errors import FidelityError


@pytest.fixture(scope="module", params=["mistral", "gemma2", "llama3", "qwen2"])
def family_gguf(request, tmp_path_factory):
    """(family, its Hugging Face directory, the GGUF llama.cpp's converter would write of it): SentencePiece
    vocabularies in Llama's and Gemma's styles, byte-level BPE with Llama 3's and Qwen2's pre-tokenizers."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = make_family_model(family, root / "hf")
    return family, model_dir, write_gguf(model_dir, root / "model.gguf", family)


def test_a_gguf_is_pulled_with_the_tokenizer_its_source_ships(family_gguf, tmp_path):
    """Gemma's and Mistral's GGUFs keep pieces and scores, no merges (transformers' Gemma converter made words fall
    into letters); Llama 3's keeps merges and names its pre-tokenizer (transformers gave it GPT-2's, which splits
    numbers otherwise). The pulled tokenizer.json gives the ids the source's own tokenizer.json gives, on every
    evaluation text, whole and by paragraph (scripts, digits, blank lines, indentation, byte fallback)."""
    from tokenizers import Tokenizer

    from lmpack.steps.gguf_file import to_hf_directory

    family, model_dir, gguf_path = family_gguf
    info = to_hf_directory(gguf_path, tmp_path)
    assert "tokens" not in info["tokenizer"] or info["tokenizer"]["identical"]
    source = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    pulled = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for domain, text in eval_texts().items():
        for passage in [text, *filter(str.strip, text.split("\n\n"))]:  # whole, and paragraph by paragraph
            wanted = source.encode(passage, add_special_tokens=False).ids
            assert pulled.encode(passage, add_special_tokens=False).ids == wanted, (family, domain, passage[:40])


def test_a_tokenizer_that_splits_words_apart_fails_the_pull_with_an_example(family_gguf, tmp_path):
    """The check that guards the pull: a tokenizer.json whose BPE lost its merges (so words fall apart into
    letters, as a mis-converted vocabulary does) is refused with the pieces on both sides."""
    from lmpack.steps.gguf_file import read_fields, to_hf_directory
    from lmpack.steps.gguf_tokenizer import spm_model_proto
    from lmpack.steps.tokenizer_check import check_gguf_tokenizer

    family, _, gguf_path = family_gguf
    if family not in ("mistral", "gemma2"):
        pytest.skip("without llama.cpp a BPE vocabulary is checked id by id, which lost merges do not change")
    to_hf_directory(gguf_path, tmp_path)
    document = json.loads((tmp_path / "tokenizer.json").read_text())
    document["model"]["merges"] = []
    (tmp_path / "broken.json").write_text(json.dumps(document))
    vocabulary = read_fields(gguf_path, "tokenizer.ggml.")
    (tmp_path / "spm.model").write_bytes(spm_model_proto(vocabulary))
    with pytest.raises(FidelityError) as caught:
        check_gguf_tokenizer(gguf_path, tmp_path / "broken.json", vocabulary, tmp_path / "spm.model")
    message = caught.value.message
    assert "in the prose text" in message and "lmpack '" in message and "vs source '" in message
    assert caught.value.exit_code == 22


def test_a_vocabulary_that_names_another_piece_for_an_id_is_refused():
    from lmpack.steps.tokenizer_check import check_vocabulary

    pieces = ["<unk>", "<s>", "</s>", "▁the", "▁capital"]
    check_vocabulary(lambda i: pieces[i], pieces)
    swapped = pieces[:3] + ["▁capital", "▁the"]
    with pytest.raises(FidelityError, match="id 3 is '▁capital'.*says '▁the'"):
        check_vocabulary(lambda i: swapped[i], pieces)


def test_the_gate_measures_every_domain_and_the_kl_divergence(tiny_llama, session_cache, tmp_path):
    from lmpack import api
    from lmpack.data import DOMAINS

    report = api.build(
        str(tiny_llama), target="cpu-x86", profile="int8", output_dir=tmp_path, cache_dir=session_cache
    ).report
    quality = report["quality"]
    assert set(quality["domains"]) == set(DOMAINS)
    assert quality["tokens"] == sum(d["tokens"] for d in quality["domains"].values())
    for numbers in [quality, *quality["domains"].values()]:
        assert numbers["tokens"] > 100 and 0.0 <= numbers["kl_mean"] <= numbers["kl_p99"]
    assert report["fidelity"]["export_parity"]["max_abs_diff"] <= report["fidelity"]["export_parity"]["tolerance"]


def test_a_source_that_reads_english_at_random_warns_and_fails_under_strict(session_cache, tmp_path):
    """Random weights read plain English at about the vocabulary's size in perplexity: the optimized copy agrees
    with it perfectly, so only the absolute check can say the source itself is broken."""
    from click.testing import CliRunner
    from families import make_family_model

    from lmpack.cli.main import cli

    model = make_family_model("qwen2", tmp_path / "random-qwen2")
    args = ["build", str(model), "--target", "cpu-x86", "--profile", "fp32", "--cache-dir", str(session_cache)]
    warned = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "out")])
    assert warned.exit_code == 0, warned.output
    assert "WARNING:   the source model reads plain English at perplexity" in warned.output
    strict = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "strict"), "--strict"])
    assert strict.exit_code == 8 and "its weights or its tokenizer are broken" in strict.output
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())
