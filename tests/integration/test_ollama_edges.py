"""Ollama's edge cases, each as Ollama behaves (its server/routes.go, types/model/name.go), with
the official ``ollama`` client and LangChain's OllamaEmbeddings through a real Envoy in front
of a server on the fake engine.

The fake tokenizer is word-level: "the cat sat on the mat" is [CLS] + 6 words + [SEP], 8
tokens; the fake model 'fake' (the default) takes 16. ``nomic-embed-text`` is an alias of
'fake'; 'spare' is a model nothing else here loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import ollama
import openai
import pytest
from langchain_ollama import OllamaEmbeddings
from langchain_ollama._utils import validate_model

from tests.envoy_proc import EnvoyProcess, http
from tests.fakes import write_fake_gguf
from tests.servers import ServerThread

ALIAS = "nomic-embed-text"
SENTENCE = "the cat sat on the mat"  # 8 tokens
LONG = " ".join(["cat"] * 30)  # 32 tokens; the model takes 16
TOO_LONG = "the input length exceeds the context length"  # Ollama's words


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    root = tmp_path_factory.mktemp("ollama-edges")
    write_fake_gguf(root / "models" / "spare.gguf")
    with (
        ServerThread.with_fake_models(root / "models", model_aliases=f"{ALIAS}=fake") as server,
        EnvoyProcess.start([server.target], root / "envoy") as proc,
    ):
        yield proc


@pytest.fixture(scope="module")
def client(envoy: EnvoyProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=envoy.base_url) as made:
        yield made


def refused(call: object, *args: object, **kwargs: object) -> ollama.ResponseError:
    """The ResponseError that ``call(*args, **kwargs)`` raises."""
    assert callable(call)
    with pytest.raises(ollama.ResponseError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- 1. options.num_ctx ----------------------------------------------------------------------


def test_num_ctx_cuts_inputs_to_it(client: ollama.Client) -> None:
    cut = client.embed(model="fake", input=SENTENCE, options={"num_ctx": 3})
    # [CLS] the [SEP]: the same tokens, so the same vector, as "the" alone.
    assert cut.prompt_eval_count == 3
    assert cut.embeddings == client.embed(model="fake", input="the").embeddings
    # A num_ctx above the model's limit is the model's limit; 0 or less is unset (Ollama's).
    for num_ctx in (1000, 0, -1, None):
        whole = client.embed(model="fake", input=SENTENCE, options={"num_ctx": num_ctx})
        assert whole.prompt_eval_count == 8, num_ctx


def test_num_ctx_with_truncate_false_is_ollamas_400(client: ollama.Client) -> None:
    error = refused(
        client.embed, model="fake", input=SENTENCE, truncate=False, options={"num_ctx": 3}
    )
    assert error.status_code == 400
    assert error.error.startswith(TOO_LONG + ":")
    assert "8 tokens" in error.error and "context length of 3 (options.num_ctx)" in error.error
    # Within num_ctx, truncate false embeds.
    fits = client.embed(model="fake", input=SENTENCE, truncate=False, options={"num_ctx": 8})
    assert fits.prompt_eval_count == 8


def test_num_ctx_without_room_for_text_and_of_the_wrong_type(client: ollama.Client) -> None:
    # [CLS] and [SEP] take 2: a num_ctx of 2 leaves nothing of the text (Ollama's ctxLen <= 0).
    error = refused(client.embed, model="fake", input=SENTENCE, options={"num_ctx": 2})
    assert error.status_code == 400
    assert error.error.startswith("input after truncation exceeds maximum context length")
    assert "give at least 3" in error.error
    error = refused(client.embed, model="fake", input=SENTENCE, options={"num_ctx": "3"})
    assert (error.status_code, error.error) == (400, 'option "num_ctx" must be of type integer')


def test_langchain_num_ctx(envoy: EnvoyProcess, client: ollama.Client) -> None:
    embeddings = OllamaEmbeddings(model="fake", base_url=envoy.base_url, num_ctx=3)
    try:
        assert (
            embeddings.embed_query(SENTENCE)
            == client.embed(model="fake", input="the").embeddings[0]
        )
    finally:
        if embeddings._client is not None:  # it offers no close() of its own
            embeddings._client._client.close()


# --- 2. the over-long input, in Ollama's words --------------------------------------------------


def test_over_long_input_is_a_400_in_ollamas_words(
    envoy: EnvoyProcess, client: ollama.Client
) -> None:
    error = refused(client.embed, model="fake", input=["hello", LONG], truncate=False)
    assert error.status_code == 400
    assert error.error.startswith(TOO_LONG + ":")
    assert "input 1 has 32 tokens, more than the context length of 16" in error.error
    assert '"truncate": true' in error.error
    # The body is Ollama's {"error": "..."}, nothing else.
    reply = http(
        envoy.base_url + "/api/embed",
        "POST",
        body={"model": "fake", "input": LONG, "truncate": False},
    )
    assert reply.status == 400 and set(reply.json()) == {"error"}
    assert "context length" in reply.json()["error"]


# --- 3. aliases ------------------------------------------------------------------------------


def test_aliases_are_listed_and_answer_their_own_id(envoy: EnvoyProcess) -> None:
    with ollama.Client(host=envoy.base_url) as client:
        tags = {model.model: model for model in client.list().models}
    assert {"fake:latest", "other:latest", "spare:latest", f"{ALIAS}:latest"} <= set(tags)
    assert tags[f"{ALIAS}:latest"].digest == tags["fake:latest"].digest  # as `ollama cp` lists
    with openai.OpenAI(base_url=envoy.base_url + "/v1", api_key="unused") as openai_client:
        listed = {model.id: model.model_extra or {} for model in openai_client.models.list().data}
        assert listed[ALIAS]["alias_of"] == "fake"
        assert listed["fake"]["alias_of"] == ""
        assert openai_client.models.retrieve(ALIAS).id == ALIAS
        assert openai_client.models.retrieve("fake").id == "fake"


def test_langchain_validates_an_alias_and_tagged_names(
    envoy: EnvoyProcess, client: ollama.Client
) -> None:
    expected = client.embed(model="fake", input="hello").embeddings[0]
    for name in (ALIAS, f"{ALIAS}:latest", "fake", "fake:latest"):
        embeddings = OllamaEmbeddings(
            model=name, base_url=envoy.base_url, validate_model_on_init=True
        )
        try:
            assert embeddings.embed_query("hello") == expected, name
        finally:
            if embeddings._client is not None:
                embeddings._client._client.close()
    # The check validate_model_on_init runs, on a client this test closes: a name that is
    # neither a model nor an alias still fails it.
    with pytest.raises(ValueError, match="not found"):
        validate_model(client, "nope")


# --- 4. an empty input loads the model -----------------------------------------------------------


def test_empty_input_answers_no_vectors_and_loads_the_model(
    envoy: EnvoyProcess, client: ollama.Client
) -> None:
    def running() -> set[str]:
        return {model.model or "" for model in client.ps().models}

    assert "spare" not in running()
    preloaded = client.embed(model="spare")  # the client sends "input": ""
    assert (preloaded.model, preloaded.embeddings) == ("spare", [])
    assert "spare" in running()
    for body in (
        {"model": "spare", "input": []},
        {"model": "spare", "input": ""},
        {"model": "spare"},
        {"model": "spare", "input": None},
    ):
        reply = http(envoy.base_url + "/api/embed", "POST", body=body)
        # Ollama's answer, exactly: no durations or counts where nothing was embedded.
        assert (reply.status, reply.json()) == (200, {"model": "spare", "embeddings": []}), body
    error = refused(client.embed, model="nope", input=[])
    assert error.status_code == 404


# --- 5. name:latest is name ------------------------------------------------------------------


def test_latest_tag_and_default_namespace_name_the_model(client: ollama.Client) -> None:
    expected = client.embed(model="fake", input="hello").embeddings
    for name in (
        "fake:latest",
        "fake:LATEST",
        "library/fake",
        "registry.ollama.ai/library/fake:latest",
    ):
        assert client.embed(model=name, input="hello").embeddings == expected, name
        assert client.show(name).modelinfo is not None, name
        assert client.embeddings(model=name, prompt="hello").embedding == expected[0], name
    assert client.embed(model=f"{ALIAS}:latest", input="hello").embeddings == expected
    # Any other tag is a model of its own, which is not here.
    for name in ("fake:v2", "other-namespace/fake", "fake:latest:latest"):
        assert refused(client.embed, model=name, input="hello").status_code == 404, name
        assert refused(client.show, name).status_code == 404, name


# --- 6. the name as sent ---------------------------------------------------------------------


def test_embed_echoes_the_model_name_as_sent(envoy: EnvoyProcess, client: ollama.Client) -> None:
    for name in (ALIAS, "fake:latest", "library/fake", "fake"):
        assert client.embed(model=name, input="hello").model == name
    # No model (which Ollama refuses, and its client does not send) is embedd's default one.
    reply = http(envoy.base_url + "/api/embed", "POST", body={"input": "hello"})
    assert reply.json()["model"] == "fake"


# --- 7. /api/pull ----------------------------------------------------------------------------


def test_pull_of_a_model_that_is_here_succeeds_at_once(
    envoy: EnvoyProcess, client: ollama.Client
) -> None:
    assert client.pull("fake").status == "success"  # the client sends "stream": false
    streamed = [progress.status for progress in client.pull(f"{ALIAS}:latest", stream=True)]
    assert streamed == ["pulling manifest", "success"]
    reply = http(envoy.base_url + "/api/pull", "POST", body={"name": "fake"})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in reply.body.splitlines()] == [
        {"status": "pulling manifest"},
        {"status": "success"},
    ]


def test_pull_of_a_model_that_is_not_here_says_to_import_it(
    envoy: EnvoyProcess, client: ollama.Client
) -> None:
    def pull_all(stream: bool) -> object:
        return list(client.pull("all-minilm", stream=True)) if stream else client.pull("all-minilm")

    for stream in (False, True):
        error = refused(pull_all, stream)
        assert error.status_code == 404, stream
        assert "model 'all-minilm' not found" in error.error
        assert "does not download" in error.error and "embedd import" in error.error
        assert "fake" in error.error  # the models that are here
    reply = http(envoy.base_url + "/api/pull", "POST", body={})
    assert (reply.status, reply.json()) == (400, {"error": "model is required"})
