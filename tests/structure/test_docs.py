"""The documents that describe the code, held to it: the README's map lists every module, the
route table of docs/rest.md every REST route of the protos, the one-line descriptions (the
package's, the command line's, the proto's) say what embedd serves and on which engines, and
docs/design.md gives the ONNX engine's pack bound the server really uses."""

from __future__ import annotations

import importlib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

from google.api import annotations_pb2  # type: ignore[import-untyped, unused-ignore]

from embedd_server.cli.main import DESCRIPTION
from embedd_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "server" / "embedd_server"
STUBS = ROOT / "client" / "embedd" / "v1"
README = ROOT / "README.md"
# What a one-line description must name: both engines and every task.
ENGINES = ("ONNX Runtime", "llama.cpp")
TASKS = ("embedding", "rerank", "classification", "sparse")


def _section(text: str, start: str, end: str) -> str:
    """The part of ``text`` from the first ``start`` to the next ``end`` after it."""
    begin = text.index(start)
    return text[begin : text.index(end, begin + len(start))]


def test_the_readme_map_lists_every_module() -> None:
    """Each module of the server package is named on the README's map ("How it is built"):
    a module added without a line there fails here."""
    readme = README.read_text()
    layout = _section(readme, "protos/embedd/v1/embedder.proto   the contract", "```")
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and not re.search(rf"\b{re.escape(path.name)}", layout)
    ]
    assert not missing, f"modules missing from the README's map: {missing}"


def _rest_routes() -> Iterator[tuple[str, str]]:
    """(RPC, "VERB /path") for every google.api.http binding of every generated service."""
    for stub in sorted(STUBS.glob("*_pb2.py")):
        module = importlib.import_module(f"embedd.v1.{stub.stem}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(annotations_pb2.http):
                    continue
                first = options.Extensions[annotations_pb2.http]
                for rule in (first, *first.additional_bindings):
                    verb = rule.WhichOneof("pattern")
                    if verb == "custom":
                        yield method.name, f"{rule.custom.kind} {rule.custom.path}"
                    else:
                        yield method.name, f"{verb.upper()} {getattr(rule, verb)}"


def test_the_route_table_of_rest_md_lists_every_route_with_its_rpc() -> None:
    """docs/rest.md's "Every route, and the RPC behind it" table has a row for each REST
    binding of the protos (rerank, /predict and /embed_sparse included), naming its RPC."""
    table = _section(
        (ROOT / "docs" / "rest.md").read_text(), "Every route, and the RPC behind it", "\n\n#"
    )
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    routes = list(_rest_routes())
    assert len(routes) >= 20  # the generated stubs were found
    missing = [
        f"{route} ({rpc})"
        for rpc, route in routes
        if not any(f"`{route}`" in row and f"`{rpc}`" in row for row in rows)
    ]
    assert not missing, f"routes missing from docs/rest.md's table: {missing}"


def test_the_one_line_descriptions_name_both_engines_and_every_task() -> None:
    """pyproject's description, `embedd --help` and the proto's header comment: embedd runs
    ONNX Runtime and llama.cpp and serves embeddings, reranking, classification and sparse
    vectors (they once said "llama.cpp workers" and "text-embedding service" only)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    proto = (ROOT / "protos" / "embedd" / "v1" / "embedder.proto").read_text()
    header = proto[: proto.index("syntax =")]
    for name, text in (("pyproject", pyproject), ("embedd --help", DESCRIPTION), ("proto", header)):
        flat = " ".join(text.replace("//", " ").split())
        absent = [word for word in (*ENGINES, *TASKS) if word.lower() not in flat.lower()]
        assert not absent, f"{name}'s description does not name {absent}: {flat!r}"


def test_design_md_gives_the_onnx_pack_bound_the_server_uses() -> None:
    """docs/design.md's `onnx_batch_tokens` default is the setting's (it said 2048 when the
    setting was 256)."""
    design = (ROOT / "docs" / "design.md").read_text()
    stated = re.findall(r"`onnx_batch_tokens`,? \(?default ([\d,]+)", design)
    assert stated, "docs/design.md no longer states onnx_batch_tokens' default"
    assert {int(value.replace(",", "")) for value in stated} == {Settings().onnx_batch_tokens}
