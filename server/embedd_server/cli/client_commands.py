"""The client subcommands of ``embedd``: embed, models, tokenize and embed-file.

They talk to a running server through :class:`embedd.Client`. The server's address is
``--target``, else the gRPC address of the settings (flag-less: environment and config file,
as ``embedd serve`` reads them). A failure prints one line, ``embedd <command>: <message>``,
and exits with status 2; there is never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from embedd_server.cli.embed_file import CommandError, embed_file, json_rows
from embedd_server.settings import CONFIG_ENV, load_settings

if TYPE_CHECKING:
    from embedd import Client
    from embedd_server.compute.engine import FloatMatrix


EXIT_FAILURE = 2
SERVER_HINT = "is the server running? start it with `embedd serve`"
LABEL_WIDTH = 30
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")

Body = Callable[[argparse.Namespace, "Client"], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# --- registration -------------------------------------------------------------------------


def add_commands(commands: Commands) -> None:
    """Registers embed, rerank, classify, embed-sparse, models, tokenize and embed-file on the
    ``embedd`` parser: each command's help is its body's docstring."""
    for name, body, add_arguments in (
        ("embed", _embed, _embed_arguments),
        ("rerank", _rerank, _rerank_arguments),
        ("classify", _classify, _classify_arguments),
        ("embed-sparse", _embed_sparse, _sparse_arguments),
        ("models", _models, None),
        ("tokenize", _tokenize, _tokenize_arguments),
        ("embed-file", _embed_file, _embed_file_arguments),
    ):
        summary, description, epilog = _help_of(body)
        parser = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if add_arguments is not None:
            add_arguments(parser)
        _add_connection(parser)
        parser.set_defaults(handler=_client_command(body))


def _help_of(body: Body) -> tuple[str, str, str | None]:
    """A command's help from its body's docstring: the first line is the summary, the
    paragraphs after it the description (wrapped), an "example(s):" paragraph the epilog
    (kept line by line)."""
    summary, *paragraphs = (inspect.getdoc(body) or "").split("\n\n")
    examples = [text for text in paragraphs if text.startswith("example")]
    description = [text for text in paragraphs if text not in examples]
    return summary, _describe(*description), "\n\n".join(examples) or None


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    _add_texts(parser, "a text to embed (quote it)")
    _add_model(parser)
    _add_dimensions(parser)
    parser.add_argument(
        "--similarity",
        action="store_true",
        help="print the cosine-similarity matrix of the texts as a table",
    )
    _add_json(parser, 'with --similarity: print {"model", "texts", "similarity"} as JSON')


def _rerank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", metavar="QUERY", help="the text to rank the documents by")
    parser.add_argument("documents", nargs="+", metavar="DOC", help="a document (quote it)")
    _add_model(parser, "the reranker to use (default: the server's first reranker model)")
    _add_count(parser, "--top-n", "print only the best N documents (default: all)")
    _add_json(parser, "print the ranking as JSON instead of a table")


def _classify_arguments(parser: argparse.ArgumentParser) -> None:
    _add_texts(parser, "a text (quote it)")
    parser.add_argument(
        "--pair", metavar="TEXT2", help="the second text of a pair (then exactly one TEXT)"
    )
    _add_model(parser, "the classifier to use (default: the server's first classifier model)")
    parser.add_argument(
        "--raw-scores", action="store_true", help="print the logits instead of probabilities"
    )
    _add_json(parser, "print the results as JSON instead of a table")


def _sparse_arguments(parser: argparse.ArgumentParser) -> None:
    _add_texts(parser, "a text (quote it)")
    _add_model(parser, "the sparse encoder to use (default: the server's first sparse encoder)")
    parser.add_argument(
        "--prompt-name", default="", metavar="NAME", help="a prompt of the model's, by name"
    )
    _add_count(
        parser, "--top", "print each text's N heaviest token ids and their weights as a table"
    )


def _tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", metavar="TEXT", help="the text to tokenize (quote it)")
    _add_model(parser)


def _embed_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="INPUT", help="text or .jsonl file")
    parser.add_argument("output", type=Path, metavar="OUTPUT", help=".npy or .jsonl file")
    _add_model(parser)
    _add_dimensions(parser)
    _add_count(parser, "--batch-size", "texts per request of the stream (default: %(default)s)", 64)
    parser.add_argument(
        "--text-key",
        default="text",
        metavar="KEY",
        help="field of each .jsonl object holding the text (default: %(default)s)",
    )


# --- the arguments several commands take ---------------------------------------------------


def _add_texts(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("texts", nargs="+", metavar="TEXT", help=help_text)


def _add_model(
    parser: argparse.ArgumentParser,
    help_text: str = "model name (default: the server's default)",
) -> None:
    parser.add_argument("--model", default="", metavar="NAME", help=help_text)


def _add_dimensions(parser: argparse.ArgumentParser) -> None:
    _add_count(
        parser,
        "--dimensions",
        "keep the first N components of each vector, re-normalized (default: all)",
    )


def _add_count(
    parser: argparse.ArgumentParser, flag: str, help_text: str, default: int | None = None
) -> None:
    """A flag taking a whole number of at least 1."""
    parser.add_argument(flag, type=_positive_int, default=default, metavar="N", help=help_text)


def _add_json(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--json", action="store_true", help=help_text)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="the server's gRPC address (default: the grpc_host and grpc_port settings, "
        "127.0.0.1:50051 unless EMBEDD_GRPC_PORT or the config file say otherwise)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up on the server after this long (default: no limit)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"TOML settings file to read the server's address from. Env: {CONFIG_ENV}.",
    )
    _add_tls(parser)


def _add_tls(parser: argparse.ArgumentParser) -> None:
    # dest client_tls_*: the server's own tls_* settings (load_settings) must not see them.
    tls = parser.add_argument_group(
        "TLS",
        "A server started with --tls-cert speaks TLS: `embedd serve` on its gRPC port, "
        "`embedd run` on Envoy's port (--target HOST:HTTP_PORT). Any of these options, or a "
        "target https://HOST:PORT, connects with TLS.",
    )
    tls.add_argument(
        "--tls",
        dest="client_tls",
        action="store_true",
        help="connect with TLS, checking the server's certificate against grpc's bundle of "
        "public CAs (or --tls-ca)",
    )
    tls.add_argument(
        "--tls-ca",
        dest="client_tls_ca",
        metavar="PEM",
        help="CA certificate(s) that signed the server's certificate",
    )
    tls.add_argument(
        "--tls-cert",
        dest="client_tls_cert",
        metavar="PEM",
        help="this client's certificate chain, for a server that requires one (mutual TLS, "
        "the server's --tls-client-ca); needs --tls-key",
    )
    tls.add_argument(
        "--tls-key", dest="client_tls_key", metavar="PEM", help="the private key of --tls-cert"
    )
    tls.add_argument(
        "--tls-server-name",
        dest="client_tls_server_name",
        metavar="NAME",
        help="the name the server's certificate must carry, when it is not --target's host",
    )


def _describe(*paragraphs: str) -> str:
    """A --help description: paragraphs wrapped (the formatter keeps the epilog's lines)."""
    return "\n\n".join(textwrap.fill(paragraph, 79) for paragraph in paragraphs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


# --- running a command --------------------------------------------------------------------


def _connection(args: argparse.Namespace) -> tuple[str, int]:
    """The target address and message size limit: --target, else the settings."""
    if args.target:
        return args.target, 64
    settings = load_settings(args)
    host, port = settings.grpc_host, settings.grpc_port
    if host in WILDCARD_HOSTS:  # a server listening everywhere is reachable on loopback
        return f"127.0.0.1:{port}", settings.max_message_mb
    if ":" in host and not host.startswith("["):  # an IPv6 address needs brackets
        return f"[{host}]:{port}", settings.max_message_mb
    return settings.grpc_address, settings.max_message_mb


def _client_command(body: Body) -> Callable[[argparse.Namespace], int]:
    """A handler running ``body`` with a connected Client; failures become one line, exit 2."""

    def handler(args: argparse.Namespace) -> int:
        from embedd import Client, EmbeddClientError, Unavailable

        target, max_message_mb = _connection(args)
        try:
            with Client(
                target,
                timeout=args.timeout,
                max_message_mb=max_message_mb,
                **_tls_options(args),
            ) as client:
                return body(args, client)
        except ValueError as exc:  # contradicting TLS options (the client says which)
            return _fail(args, str(exc))
        except Unavailable as exc:
            tls = bool(_tls_options(args)) or target.lower().startswith("https://")
            return _fail(args, _unavailable_message(target, exc.details, tls))
        except EmbeddClientError as exc:
            return _fail(args, exc.details or str(exc))
        except CommandError as exc:
            return _fail(args, str(exc))
        except OSError as exc:
            return _fail(args, _os_error_message(exc))

    return handler


def _tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Client's tls_* keywords from the TLS flags (those given)."""
    options = {
        "tls": True if args.client_tls else None,
        "tls_ca": args.client_tls_ca,
        "tls_cert": args.client_tls_cert,
        "tls_key": args.client_tls_key,
        "tls_server_name": args.client_tls_server_name,
    }
    return {name: value for name, value in options.items() if value is not None}


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"embedd {args.command}: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _unavailable_message(target: str, details: str, tls: bool = False) -> str:
    lowered = details.lower()
    if any(word in lowered for word in ("ssl", "handshake", "certificate", "tls")):
        return (
            f"the TLS handshake with the server at {target} failed ({details}): check --tls-ca "
            "(the CA of the server's certificate) and, if the server requires client "
            "certificates, --tls-cert and --tls-key"
        )
    # A TLS server closes a plaintext connection, and a mutual-TLS server one without a
    # client certificate it trusts, with nothing more said than this.
    if "socket closed" in lowered or "connection reset" in lowered:
        if tls:
            return (
                f"the server at {target} closed the connection ({details}): if it requires "
                "client certificates (mutual TLS), give --tls-cert and --tls-key of a "
                "certificate its CA signed"
            )
        return (
            f"the server at {target} closed the connection ({details}): if it serves TLS, "
            "connect with --tls-ca PEM (or --tls, or an https:// target)"
        )
    if "connect" in lowered or "dns" in lowered or "unreachable" in lowered:
        return f"cannot reach the server at {target}: {SERVER_HINT}"
    return f"the server at {target} is unavailable ({details}); {SERVER_HINT}"


def _os_error_message(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


# --- embed, models, tokenize --------------------------------------------------------------


def _embed(args: argparse.Namespace, client: Client) -> int:
    """embed texts with a running server (JSON, or a similarity table)

    Embeds the TEXTs with a running server and prints {"model": ..., "embeddings": [[...],
    ...]} as JSON, one row per text. With --similarity, prints the texts' cosine-similarity
    matrix instead.

    examples:
      embedd embed "hello world" "the cat sat"
      embedd embed --similarity "a dog runs" "a cat sat" "the dog runs fast"
      embedd embed --dimensions 128 --model all-minilm-l6-v2 "hello"
    """
    result = client.embed_with_usage(args.texts, model=args.model, dimensions=args.dimensions)
    if not args.similarity:
        print(json.dumps({"model": result.model, "embeddings": json_rows(result.vectors)}))
        return 0
    matrix = _cosine_similarity(result.vectors)
    if args.json:
        rows = [[round(value, 6) for value in row] for row in matrix.tolist()]
        print(json.dumps({"model": result.model, "texts": args.texts, "similarity": rows}))
    else:
        print(_similarity_table(args.texts, matrix))
    return 0


def _rerank(args: argparse.Namespace, client: Client) -> int:
    """rank documents by relevance to a query with a reranker model

    Scores each DOC against QUERY with a reranker (cross-encoder) model of a running server
    and prints them best first: rank, score (sigmoid of the model's logit, 0 to 1), the
    document's position among the DOCs, and its text. With --json, prints {"model",
    "results": [{"index", "score", "document"}]} instead.

    examples:
      embedd rerank "how do cats purr" "Cats purr by vibrating their larynx." "Dogs bark."
      embedd rerank --top-n 3 --model bge-reranker-base "query" doc1 doc2 doc3 doc4
    """
    result = client.rerank(
        args.query, args.documents, model=args.model, top_n=args.top_n, return_documents=True
    )
    if args.json:
        results = [
            {"index": r.index, "score": round(r.score, 6), "document": r.document}
            for r in result.results
        ]
        print(json.dumps({"model": result.model, "results": results}, ensure_ascii=False))
        return 0
    rows = [
        [str(rank), f"{r.score:.4f}", f"[{r.index + 1}]", _label(r.document or "", 60)]
        for rank, r in enumerate(result.results, 1)
    ]
    print(f"model: {result.model}")
    print(_table(["RANK", "SCORE", "DOC", "TEXT"], rows))
    return 0


def _models(args: argparse.Namespace, client: Client) -> int:
    """list a running server's models

    Lists the models of a running server: name, family, task (embed, rerank, classify or
    sparse), dimensions, maximum input tokens, pooling, quantization, the engine serving it
    (once loaded) and a classifier's labels.
    """
    rows = [
        [
            model.name,
            model.family,
            model.task,
            str(model.dimensions),
            str(model.max_input_tokens),
            model.pooling,
            model.quantization,
            model.engine or "-",
            "yes" if model.loaded else "no",
            ",".join(model.labels) if model.task == "classify" else "",
        ]
        for model in client.models()
    ]
    headers = [
        "NAME",
        "FAMILY",
        "TASK",
        "DIMS",
        "MAX TOKENS",
        "POOLING",
        "QUANTIZATION",
        "ENGINE",
        "LOADED",
        "LABELS",
    ]
    print(_table(headers, rows))
    return 0


def _classify(args: argparse.Namespace, client: Client) -> int:
    """classify texts (or text pairs) with a classifier model

    Classifies each TEXT with a sequence-classification model of a running server (e.g. a
    sentiment model) and prints, for each, its labels best first with their scores (softmax
    over the labels; a sigmoid per label for a multi-label model). --pair TEXT2 makes the
    one TEXT a pair, read as a cross-encoder reads a query and a document. With --json,
    prints {"model", "results": [[{"label", "score"}]]}.

    examples:
      embedd classify "I loved this film" "The food was cold"
      embedd classify --model roberta-sentiment --json "What a day"
    """
    if args.pair is not None and len(args.texts) != 1:
        return _fail(args, "--pair makes one pair: give exactly one TEXT with it")
    inputs = [(args.texts[0], args.pair)] if args.pair is not None else list(args.texts)
    result = client.classify(inputs, model=args.model, raw_scores=args.raw_scores)
    if args.json:
        results = [
            [{"label": p.label, "score": round(p.score, 6)} for p in predictions]
            for predictions in result.predictions
        ]
        print(json.dumps({"model": result.model, "results": results}, ensure_ascii=False))
        return 0
    rows = [
        [f"[{index + 1}]", _label(args.texts[index], 40), p.label, f"{p.score:.4f}"]
        for index, predictions in enumerate(result.predictions)
        for p in predictions
    ]
    print(f"model: {result.model}")
    print(_table(["TEXT", "", "LABEL", "SCORE"], rows))
    return 0


def _embed_sparse(args: argparse.Namespace, client: Client) -> int:
    """sparse (SPLADE) vectors of texts: weights by vocabulary token

    Embeds each TEXT with a sparse encoder (SPLADE) of a running server and prints its
    non-zero weights as JSON: {"model", "dimensions", "vectors": [{"indices": [...],
    "values": [...]}]}. --top N prints each text's N heaviest tokens as a table instead.

    examples:
      embedd embed-sparse "what is hybrid search"
      embedd embed-sparse --top 10 --model splade-v3 "the cat sat on the mat"
    """
    result = client.embed_sparse(args.texts, model=args.model, prompt_name=args.prompt_name)
    if args.top is None:
        vectors = [
            {"indices": v.indices.tolist(), "values": [round(x, 6) for x in v.values.tolist()]}
            for v in result.vectors
        ]
        print(
            json.dumps({"model": result.model, "dimensions": result.dimensions, "vectors": vectors})
        )
        return 0
    rows: list[list[str]] = []
    for index, vector in enumerate(result.vectors):
        heaviest = sorted(zip(vector.values.tolist(), vector.indices.tolist(), strict=True))[::-1]
        for value, token_id in heaviest[: args.top]:
            rows.append([f"[{index + 1}]", str(token_id), f"{value:.4f}"])
    print(f"model: {result.model}")
    print(_table(["TEXT", "TOKEN ID", "WEIGHT"], rows))
    return 0


def _tokenize(args: argparse.Namespace, client: Client) -> int:
    """show a text's tokens with a model's tokenizer

    Prints the token ids, the token strings and the token count of TEXT with the model's own
    tokenizer (special tokens included, untruncated).

    example:
      embedd tokenize "the cat sat on the mat"
    """
    result = client.tokenize(args.text, model=args.model)
    print(f"model:  {result.model}")
    print(f"count:  {result.count} (max input tokens: {result.max_input_tokens})")
    print(f"ids:    {json.dumps(result.ids)}")
    print(f"tokens: {json.dumps(result.tokens, ensure_ascii=False)}")
    return 0


def _embed_file(args: argparse.Namespace, client: Client) -> int:
    """embed every line of a file into .npy or .jsonl

    Embeds a file of texts with a running server over one EmbedStream, batch by batch, with
    a progress bar on stderr; memory stays flat however large the file.

    INPUT is a text file with one text per line, or a .jsonl file whose lines are JSON
    objects with the text under --text-key. Blank lines are skipped; embedding i is the i-th
    non-blank line.

    OUTPUT is .npy (a float32 matrix, one row per text) or .jsonl (one {"index": i,
    "embedding": [...]} per line). It is written only once every text is embedded.

    examples:
      embedd embed-file corpus.txt corpus.npy
      embedd embed-file docs.jsonl vectors.jsonl --text-key body --batch-size 128
    """
    return embed_file(args, client)


def _cosine_similarity(vectors: FloatMatrix) -> Any:
    import numpy as np

    unit = vectors.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit /= np.maximum(norms, 1e-12)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _label(text: str, width: int = LABEL_WIDTH) -> str:
    """A text on one line, cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3].rstrip() + "..."


def _similarity_table(texts: Sequence[str], matrix: Any) -> str:
    labels = [f"[{index}] {_label(text)}" for index, text in enumerate(texts, 1)]
    width = max(len(label) for label in labels)
    header = " " * width + "".join(f"{f'[{index}]':>8}" for index in range(1, len(texts) + 1))
    lines = [header]
    for label, row in zip(labels, matrix.tolist(), strict=True):
        lines.append(f"{label:<{width}}" + "".join(f"{value:8.3f}" for value in row))
    return "\n".join(lines)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    )
