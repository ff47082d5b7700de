"""A stand-in's Hugging Face directory as a GGUF, for the llama.cpp peer: llama.cpp's own converter, told the
pre-tokenizer.

    python bench/standin_gguf.py LLAMA_CPP_DIR HF_DIR --outtype f32 --outfile MODEL-f32.gguf

LLAMA_CPP_DIR is llama.cpp's source tree, for instance the `vendor/llama.cpp` of the llama-cpp-python sdist that
bench/README.md builds (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`). Its
convert_hf_to_gguf.py recognises a BPE pre-tokenizer by hashing how a known text tokenizes, and refuses any it
does not know; a stand-in's small fixture tokenizer is unknown by construction, though it splits words as Llama 3's
does (tests/families.py), so the converter is told Llama 3's ("llama-bpe"). The arguments after LLAMA_CPP_DIR
go to the converter as they are.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    llama_cpp = Path(sys.argv.pop(1)).resolve()
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion import base  # llama.cpp's converter package, from its source tree

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"
    sys.argv[0] = str(llama_cpp / "convert_hf_to_gguf.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
