#!/usr/bin/env bash
# Fill .whl/ with the wheels a lent GPU machine needs on top of what it has, for
# experiments/gpu_check.sh (carry `.whl` with the checkout; that machine has no package registry).
#
#   make install && bash experiments/gpu_wheels.sh        # from the repository root, here
#
# The GPU machine has Python 3.12 with torch + CUDA, accelerate, peft, numpy, scipy, psutil,
# ninja, tokenizers, safetensors, huggingface_hub (and an older transformers); it lacks
# deepspeed, hydra-core, omegaconf, qwen-vl-utils, pydantic and hjson, and flash-attn. So .whl/
# gets, for cp312 manylinux x86_64:
#   - as released wheels (pip download --only-binary :all: --no-deps): the pinned transformers,
#     hydra-core, omegaconf and qwen-vl-utils (versions from pyproject.toml), and hjson, pydantic,
#     pydantic-core, annotated-types, typing-inspection, typing-extensions at the versions this
#     project's .venv resolved (pydantic and pydantic-core must be a matching pair);
#   - built here from their sources with the project's .venv (pip wheel --no-deps
#     --no-build-isolation): the pinned deepspeed with DS_BUILD_OPS=0 (no compiled ops; the GPU
#     check uses none) and antlr4-python3-runtime==4.9.3 (hydra's parser runtime, an sdist only).
# About 20 MB. The folder is rebuilt from scratch each run and listed in .git/info/exclude.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
py=.venv/bin/python
if [ ! -x "$py" ]; then
  echo "gpu_wheels.sh: $root/$py is missing: run 'make install' first" >&2
  exit 1
fi

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

pin() {  # the exact pin of $1 in pyproject.toml ("name==version")
  local spec
  spec=$(grep -oE "\"$1==[^\"]+\"" pyproject.toml | head -n1 | tr -d '"') || true
  if [ -z "$spec" ]; then
    echo "gpu_wheels.sh: pyproject.toml has no exact pin \"$1==...\"" >&2
    exit 1
  fi
  echo "$spec"
}
venv_pin() {  # $1 at the version installed in .venv ("name==version")
  echo "$1==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1")"
}

new=.whl.new
rm -rf "$new"
mkdir -p "$new"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
binaries=("$(pin transformers)" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin qwen-vl-utils)")
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  binaries+=("$(venv_pin "$name")")
done
echo "downloading: ${binaries[*]}"
"$py" -m pip download -q --no-deps "${plat[@]}" -d "$new" "${binaries[@]}"

sources=("$(pin deepspeed)" "antlr4-python3-runtime==4.9.3")
echo "building from source: ${sources[*]}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "${sources[@]}"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$new" "$tmp"/*.tar.gz

rm -rf .whl
mv "$new" .whl
ls -la .whl
du -sh .whl
