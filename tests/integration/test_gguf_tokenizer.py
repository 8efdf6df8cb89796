"""GGUF files from elsewhere: the Hugging Face tokenizer rebuilt from the file's vocabulary.

A GGUF written by llama.cpp's converter or pulled by Ollama has no tokenizer.huggingface.json.
For each family (all-MiniLM-L6-v2 f16 from `make setup`; the small BERT cls, cased BERT mean,
XLM-RoBERTa and Qwen3 models of ../shared/models, imported here), a copy with that key removed
must tokenize every reference text (and some harder ones) to the same ids as the original
tokenizer.json, untruncated and truncated, be reported "exact", and give the same vectors
through llama.cpp (in-process) as the original file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedd_server.compute.pack import Pack
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.core.tokenization import HuggingFaceTokenizer
from embedd_server.engines.llama import LlamaEngine, LlamaModelWeights
from embedd_server.model.catalog import read_model_info
from embedd_server.model.gguf_tokenizer import EXACT, gguf_tokenizer, tokenizer_kind
from tests.conftest import MODELS_DIR

ROOT = Path(__file__).resolve().parents[2].parent / "shared"
SMALL_MODELS = ("tiny-bert-cls", "tiny-bert-mean-raw", "tiny-xlmr", "tiny-qwen3")
MINILM = "all-minilm-l6-v2"
HARDER = [
    "naïve Café ÉCOLE résumé",
    "  two  spaces\tand a tab\nand a newline  ",
    "[CLS] [MASK] <s> </s> <|endoftext|> <|im_start|>",
    "ｆｕｌｌｗｉｄｔｈ ﬁ ½ ²",  # noqa: RUF001 (fullwidth letters on purpose)
    "한국어 문장 日本語の文 Ελληνικά",
    "don't I'LL we've 12345 3.14",
    "emoji 😀👍🏽",
    "",
]

# The module's fixture strips a copy of every model, MiniLM's 45 MB included (30 s here).
pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _texts(model: str) -> list[str]:
    path = (
        ROOT / "reference/all-MiniLM-L6-v2/texts.json"
        if model == MINILM
        else ROOT / "models" / model / "reference/texts.json"
    )
    items = json.loads(path.read_text(encoding="utf-8"))
    return [item["text"] if isinstance(item, dict) else item for item in items]


def _strip(source: Path, target: Path) -> Path:
    subprocess.run(
        [
            str(Path(sys.executable).parent / "gguf-new-metadata"),
            "--remove-metadata",
            "tokenizer.huggingface.json",
            "--force",
            str(source),
            str(target),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each model: (the file with tokenizer.json, the copy without it)."""
    out = tmp_path_factory.mktemp("gguf-tokenizer")
    originals = {MINILM: MODELS_DIR / f"{MINILM}.gguf"}
    for model in SMALL_MODELS:
        originals[model] = import_model(ROOT / "models" / model, out, out_type="f16", name=model)
    return {
        model: (path, _strip(path, out / f"{model}-stripped.gguf"))
        for model, path in originals.items()
    }


@pytest.mark.parametrize("model", [MINILM, *SMALL_MODELS])
def test_stripped_copy_tokenizes_and_embeds_as_the_original(
    pairs: dict[str, tuple[Path, Path]], model: str
) -> None:
    original, stripped = pairs[model]
    info, stripped_info = read_model_info(original), read_model_info(stripped)
    assert info.hf_tokenizer_json is not None
    assert stripped_info.hf_tokenizer_json is None
    rebuilt = gguf_tokenizer(stripped)
    assert rebuilt.json is not None, rebuilt.reason
    assert tokenizer_kind(stripped_info) == EXACT
    reference = HuggingFaceTokenizer(info.hf_tokenizer_json)
    candidate = HuggingFaceTokenizer(rebuilt.json)
    texts = _texts(model)
    expected_ids = reference.encode_batch(texts + HARDER)
    assert candidate.encode_batch(texts + HARDER) == expected_ids
    limit = info.max_input_tokens
    truncated = [reference.encode_truncated(t, limit) for t in texts]
    assert [candidate.encode_truncated(t, limit) for t in texts] == truncated

    def embed(path: Path) -> np.ndarray:
        weights = LlamaModelWeights(path)
        engine = LlamaEngine(weights, max_tokens=limit, max_sequences=1, n_threads=1)
        try:
            return np.concatenate([engine.embed(Pack.of([ids])) for ids in truncated])
        finally:
            engine.close()
            weights.close()

    np.testing.assert_array_equal(embed(stripped), embed(original))
