"""The build is faithful to its source: the tokenizer it ships splits text as the source's own does."""

from __future__ import annotations

import json

import pytest
from gguf_models import train_spm, write_spm_gguf

from lmpack.data import eval_texts
from lmpack.errors import FidelityError


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def spm_gguf(request, tmp_path_factory):
    """(family, the SentencePiece model it was written with, the GGUF)."""
    family = request.param
    spm_model = train_spm(family)
    return family, spm_model, write_spm_gguf(tmp_path_factory.mktemp(family) / "model.gguf", family, spm_model)


def test_a_sentencepiece_gguf_is_pulled_with_the_tokenizer_it_was_written_with(spm_gguf, tmp_path):
    """Gemma's and Llama's GGUFs keep pieces and scores, no merges; the pulled tokenizer.json gives the ids the
    original SentencePiece model gives, on every evaluation text (scripts, digits, indentation, byte fallback)."""
    import sentencepiece
    from tokenizers import Tokenizer

    from lmpack.steps.gguf_file import to_hf_directory

    _, spm_model, gguf_path = spm_gguf
    info = to_hf_directory(gguf_path, tmp_path)
    assert info["tokenizer"]["identical"] and info["tokenizer"]["reference"].startswith("sentencepiece")
    original = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    pulled = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for domain, text in eval_texts().items():
        for paragraph in filter(str.strip, text.split("\n\n")):
            assert pulled.encode(paragraph, add_special_tokens=False).ids == original.encode(paragraph), domain


def test_a_tokenizer_that_splits_words_apart_fails_the_pull_with_an_example(spm_gguf, tmp_path):
    """The check that guards the pull: a tokenizer.json whose BPE lost its merges (so words fall apart into
    letters, as a mis-converted SentencePiece vocabulary does) is refused with the pieces on both sides."""
    from lmpack.steps.gguf_file import read_fields, spm_model_proto, to_hf_directory
    from lmpack.steps.tokenizer_check import check_gguf_tokenizer

    _, _, gguf_path = spm_gguf
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
