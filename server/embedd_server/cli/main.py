"""The ``embedd`` command line: serve, run, import, and the client commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from embedd_server.cli import client_commands
from embedd_server.errors import EmbeddError
from embedd_server.settings import SettingsError, add_arguments, load_settings

DESCRIPTION = """\
embedd: embeddings, reranking, classification and sparse vectors from GGUF models, run
by ONNX Runtime or llama.cpp workers. gRPC (embedd.v1.Embedder), with OpenAI's, Ollama's,
Cohere's, Jina's and TEI's REST APIs through Envoy.

  embedd run                  gRPC server + Envoy REST on the default model
  embedd serve                the gRPC server alone
  embedd import DIR           convert a Hugging Face model directory to GGUF
  embedd embed TEXT...        embed texts with a running server
  embedd rerank QUERY DOC...  rank documents (also: classify, embed-sparse, models, ...)
"""


def _serve_command(args: argparse.Namespace) -> int:
    from embedd_server.logs import configure_logging
    from embedd_server.rpc.server import StartupError, serve

    settings = load_settings(args)
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"embedd serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_command(args: argparse.Namespace) -> int:
    from embedd_server.logs import configure_logging
    from embedd_server.run.replicas import run_with_envoy

    settings = load_settings(args)
    configure_logging(settings.log_level, settings.log_json)
    return run_with_envoy(settings)


def _import_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from embedd_server.convert.hf_to_gguf import import_model
    from embedd_server.convert.prompts import parse_prompt

    try:
        prompts = dict(parse_prompt(text) for text in args.prompt)
    except ValueError as exc:
        print(f"embedd import: --prompt: {exc}", file=sys.stderr)
        return 2
    models_dir = load_settings(args).models_dir  # --models-dir > EMBEDD_MODELS_DIR > config
    with tqdm(desc=f"converting {args.source.name}", unit="tensor", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        path = import_model(
            args.source,
            models_dir,
            out_type=args.type,
            name=args.name,
            progress=progress,
            overwrite=args.overwrite,
            prompts=prompts,
            # notes on the bar's stream, above it, not inside it
            report=lambda note: bar.write(note, file=sys.stderr),
        )
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each option's help says what it does."""
    parser = argparse.ArgumentParser(
        prog="embedd", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    add_arguments(serve)
    serve.set_defaults(handler=_serve_command)

    run = commands.add_parser("run", help="run the gRPC server and Envoy's REST listener")
    add_arguments(run)
    run.set_defaults(handler=_run_command)

    imp = commands.add_parser("import", help="convert a Hugging Face model directory to GGUF")
    imp.add_argument("source", type=Path, help="directory with config.json, model.safetensors...")
    imp.add_argument(
        "--type",
        choices=("f32", "f16", "q8_0"),
        help="weight type (default: f16 for an embedding model; f32 for a reranker, classifier "
        "or sparse encoder, whose scores f16 rounding moves past the reference's bars)",
    )
    imp.add_argument("--name", help="model name (file stem); default from the directory name")
    imp.add_argument(
        "--models-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="where to write <name>.gguf (default: the models_dir setting: EMBEDD_MODELS_DIR, "
        "the config file, else ./models)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    imp.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help="store a prompt (repeatable); replaces the directory's or the curated table's "
        "prompt of that name, e.g. --prompt 'query=query: '",
    )
    imp.set_defaults(handler=_import_command)

    client_commands.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embedd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except (EmbeddError, SettingsError) as exc:
        print(f"embedd {args.command}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
