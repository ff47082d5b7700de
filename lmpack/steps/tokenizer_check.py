"""Is the tokenizer lmpack ships the source's own? Token ids compared on the evaluation texts.

A model fed other ids than it was trained on no longer reads its language, and a quality gate measured with the
same wrong tokenizer on both sides cannot see it; so a difference fails the build, with the first example.

The reference for a GGUF is llama.cpp's own tokenizer (its Python bindings' vocabulary-only load) where
llama-cpp-python is installed on the build host; else, for a SentencePiece vocabulary, the sentencepiece library
on a model made from the GGUF's pieces and scores (what llama.cpp's SPM tokenizer implements); else (a BPE
vocabulary) the check that every id names the GGUF's own piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmpack.data import eval_texts
from lmpack.errors import FidelityError

Encode = Callable[[str], list[int]]
_SHOWN = 6  # tokens shown on each side of an example difference


def check_gguf_tokenizer(
    gguf_path: Path, tokenizer_json: Path, vocabulary: dict[str, Any], spm_file: Path | None
) -> dict[str, Any]:
    """Check lmpack's tokenizer.json against the GGUF's tokenizer; what was compared, for the report."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tokenizer_json))
    check_vocabulary(ours.id_to_token, vocabulary["tokenizer.ggml.tokens"])
    reference = _llama_cpp(gguf_path)
    if reference is not None:
        name = "llama.cpp (llama-cpp-python, vocabulary only)"
    elif spm_file is not None:
        reference, name = _sentencepiece(spm_file), "sentencepiece on the GGUF's pieces and scores"
    else:
        return {"reference": "the GGUF's vocabulary (every id's piece)", "pieces": ours.get_vocab_size()}

    def encode(text: str) -> list[int]:
        return ours.encode(text, add_special_tokens=False).ids

    return compare(encode, reference, reference_name=name, piece=ours.id_to_token)


def compare(ours: Encode, reference: Encode, *, reference_name: str, piece: Callable[[int], str | None]) -> dict:
    """Encode every passage of the evaluation texts both ways; the first difference fails, shown as pieces."""
    passages = tokens = 0
    for domain, passage in _passages():
        got, wanted = ours(passage), reference(passage)
        if got != wanted:
            raise FidelityError(
                f"the converted tokenizer splits text differently from the source's ({reference_name}): in the "
                f"{domain} text, {passage[:60]!r}...: {_difference(got, wanted, piece)}",
                hint="the model would be fed ids it was not trained on; report the model, or build from its "
                "Hugging Face repository, whose tokenizer.json lmpack uses as it is",
            )
        passages += 1
        tokens += len(got)
    return {"reference": reference_name, "passages": passages, "tokens": tokens, "identical": True}


def _difference(got: list[int], wanted: list[int], piece: Callable[[int], str | None]) -> str:
    """The first differing token, with a little context, as pieces on both sides."""
    at = next((i for i, (a, b) in enumerate(zip(got, wanted, strict=False)) if a != b), min(len(got), len(wanted)))
    start = max(0, at - 2)

    def shown(ids: list[int]) -> str:
        return " ".join(repr(piece(i)) for i in ids[start : at + _SHOWN])

    return f"from token {start}: lmpack {shown(got)} vs source {shown(wanted)}"


def check_vocabulary(id_to_token: Callable[[int], str | None], pieces: list[str]) -> None:
    """Every id of the source's vocabulary names the same piece in lmpack's tokenizer."""
    for token_id, wanted in enumerate(pieces):
        got = id_to_token(token_id)
        if got != wanted and not _same_piece(got, wanted):
            raise FidelityError(
                f"the converted tokenizer's id {token_id} is {got!r}, the source's vocabulary says {wanted!r}",
                hint="the model would be fed ids it was not trained on; report the model",
            )


def _same_piece(got: str | None, wanted: str) -> bool:
    # Gemma's converter names the tab piece "\t" where older vocabularies kept only its byte "<0x09>".
    return got == "\t" and wanted == "<0x09>"


def _passages() -> Iterator[tuple[str, str]]:
    """Each evaluation text whole (what the gate tokenizes: the blank lines between paragraphs too, where
    SmolLM2's GGUF as transformers converted it split "\n\n2." unlike llama.cpp), then each of its paragraphs
    (text starts: the dummy prefix), covering newlines, indentation, digits and scripts."""
    for domain, text in eval_texts().items():
        yield domain, text
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                yield domain, paragraph


def _sentencepiece(spm_file: Path) -> Encode:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    return lambda text: list(processor.encode(text))


def _llama_cpp(gguf_path: Path) -> Encode | None:
    """llama.cpp's tokenizer for the GGUF, without its weights; None where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    model = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    return lambda text: list(model.tokenize(text.encode("utf-8"), add_bos=False, special=False))
