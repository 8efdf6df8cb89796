"""A model file's vocabulary without its weights: what an engine that computes from token ids
alone (ONNX Runtime) still answers for the runtime protocol's ``tokenize``, ``token_text`` and
``vocab_size``.

The file's own tokenizer.json (or the one rebuilt from its vocabulary, model/gguf_tokenizer.py)
where it has one; else llama.cpp's tokenizer, loaded without the weights, as the llama.cpp
engine would tokenize it. Here rather than in the llama.cpp engine's module, so that an engine
needing only a vocabulary does not import another engine.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer

from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import HF_TOKENIZER_KEY, OWN_ARCHITECTURES, read_model_info
from embedd_server.model.gguf_tokenizer import gguf_tokenizer


class Vocabulary(Protocol):
    """What a runtime needs of a model's vocabulary."""

    vocab_size: int

    def tokenize(self, text: bytes) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def close(self) -> None: ...


class HfVocabulary:
    """A vocabulary from a Hugging Face tokenizer.json."""

    def __init__(self, tokenizer_json: str, vocab_size: int = 0) -> None:
        """``vocab_size``: the file's token count (0: the tokenizer's)."""
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self.vocab_size = vocab_size or self._tokenizer.get_vocab_size()

    def tokenize(self, text: bytes) -> list[int]:
        """The text's ids with the tokenizer's special tokens around them."""
        ids: list[int] = self._tokenizer.encode(text.decode("utf-8", "replace")).ids
        return ids

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id) or ""

    def close(self) -> None:
        """Nothing to free."""


class LlamaVocabulary:
    """llama.cpp's vocabulary of a GGUF file, loaded without the weights."""

    def __init__(self, path: Path) -> None:
        import llama_cpp  # heavy, and only for files without an exact tokenizer
        from llama_cpp import _internals

        # Its log goes to Python logging (verbose=False would redirect fds 1/2 while loading,
        # unsafe in a threaded server).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True  # the tokenizer and metadata only: no weights
        try:
            # llama-cpp-python's classes are untyped.
            self._model: Any = _internals.LlamaModel(
                path_model=str(path), params=params, verbose=True
            )
        except ValueError as exc:
            raise ModelLoadError(
                f"llama.cpp could not read the vocabulary of {path.name}: {exc}. Is it a GGUF "
                "file of a supported architecture? Re-create it with `embedd import`."
            ) from None
        self.vocab_size = int(self._model.n_vocab())
        self._lock = threading.Lock()  # llama.cpp's vocabulary calls are not thread-safe

    def tokenize(self, text: bytes) -> list[int]:
        return llama_tokenize(self._model, self._lock, text)

    def token_text(self, token_id: int) -> str:
        return llama_token_text(self._model, self._lock, token_id)

    def close(self) -> None:
        self._model.close()


def llama_tokenize(model: Any, lock: threading.Lock, text: bytes) -> list[int]:
    """llama.cpp's own tokenizer of a loaded llama_cpp model (special tokens added, like
    BERT's [CLS] ... [SEP]); ``lock`` serializes the calls, which are not thread-safe."""
    with lock:
        return list(model.tokenize(text, add_bos=True, special=False))


def llama_token_text(model: Any, lock: threading.Lock, token_id: int) -> str:
    """A token's text in a loaded llama_cpp model's vocabulary."""
    with lock:
        piece: bytes = model.token_to_piece(token_id, special=True)
    return piece.decode("utf-8", "replace")


def file_vocabulary(path: Path) -> Vocabulary:
    """The vocabulary of the GGUF file at ``path``: its tokenizer.json (stored, or rebuilt from
    its vocabulary); else llama.cpp's, except for an architecture of ours (e.g. MPNet), which
    llama.cpp cannot read and whose file `embedd import` always gives a tokenizer.json."""
    info = read_model_info(path)
    if info.hf_tokenizer_json:
        return HfVocabulary(info.hf_tokenizer_json, info.vocab_size)
    if info.architecture in OWN_ARCHITECTURES:
        raise ModelLoadError(
            f"{path.name} has no {HF_TOKENIZER_KEY}, and llama.cpp cannot read the "
            f"vocabulary of a {info.architecture!r} file; re-create it with `embedd import`"
        )
    rebuilt = gguf_tokenizer(path).json
    if rebuilt is not None:
        return HfVocabulary(rebuilt, info.vocab_size)
    return LlamaVocabulary(path)
