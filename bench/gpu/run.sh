#!/bin/bash
# On the GPU machine, from the repo root: unpack .gpu-bundle/ (bench/gpu/make_bundle.sh), then
# run the command given, e.g.
#   bash bench/gpu/run.sh "python3 bench/kernels.py --target cuda-sm90 --trials 16 --db cuda.db"
set -uo pipefail
SITE=/tmp/hwaware-site
mkdir -p $SITE && tar -C $SITE -xJf .gpu-bundle/site312.tar.xz && \
  xz -dc -T0 .gpu-bundle/tvm_compiler.so.xz > $SITE/tvm/lib/libtvm_compiler.so || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PATH=/usr/local/cuda/bin:$PATH
for d in $(find / -name 'libcudart.so.13' -printf '%h\n' 2>/dev/null | head -2); do
  export LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}; done
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, tvm; print('torch', torch.__version__, 'tvm', tvm.__version__, \
'tvm sees the GPU:', tvm.cuda().exist)"
bash -c "$1"
