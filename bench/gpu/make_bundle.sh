#!/bin/bash
# Pack what a bare GPU machine with its own Python 3.12 + CUDA PyTorch (and no package index)
# needs to run hwaware's benchmarks: TVM 0.27 and hwaware's other dependencies for Python 3.12,
# compressed to fit a 64 MiB transfer (libtvm_compiler.so: 259 MB -> 58 MB with xz's x86 filter).
# Writes .gpu-bundle/ (git-ignored); on the GPU machine run bench/gpu/run.sh from the repo root.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu-bundle; SITE=$(mktemp -d); WHL=$(mktemp -d); mkdir -p $OUT
TVM=$(.venv/bin/python -c "import tvm, os; print(os.path.dirname(tvm.__file__))")
for p in apache-tvm-ffi==0.1.14.post0 xgboost-cpu==3.2.0 sqlite-utils==4.2.1 sqlite-fts4==1.0.3 \
         click-default-group==1.2.4 tabulate; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHL" "$p"
done
.venv/bin/python -m pip install -q --no-deps --no-index --no-compile --target "$SITE" \
  --python-version 3.12 --only-binary=:all: "$WHL"/*.whl
tar -C "$(dirname "$TVM")" --exclude=tvm/lib/libtvm_compiler.so --exclude=tvm/3rdparty \
  --exclude=tvm/web --exclude=tvm/src --exclude=__pycache__ -cf - tvm | tar -C "$SITE" -xf -
strip --strip-unneeded "$SITE"/xgboost/lib/libxgboost.so
tar -C "$SITE" -cf - . | xz --x86 --lzma2=preset=9e -T0 > $OUT/site312.tar.xz
xz --x86 --lzma2=preset=9e,dict=128MiB -T0 --block-size=130000000 -c \
  "$TVM"/lib/libtvm_compiler.so > $OUT/tvm_compiler.so.xz
rm -rf "$SITE" "$WHL"
du -cb $OUT/* | tail -1
