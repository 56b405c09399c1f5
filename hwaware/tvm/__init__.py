"""The only place hwaware imports TVM (besides the lowering half of each kernel family).

One module per role: `setup` (thread-pool environment, version, import-time patch, targets),
`ir` (importers, fusion, workloads), `database` (MetaSchedule's database over sqlite),
`search` (tuning policy), `schedules` (build and default schedules), `vm` (runtime).
Importing this package does not import TVM; its modules do. It sets TVM's thread-pool
environment first, before any of them imports TVM (worker processes inherit it).
"""

import os

# TVM's thread pool otherwise starts one thread on this machine (it counts "physical" cores
# wrongly under KVM): kernels then run 2x slower than the MetaSchedule runner measured them.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
# TVM's idle workers spin; next to PyTorch's spinning OpenMP threads on few cores that turned a
# 25 us element-wise kernel into 3.8 ms now and then. Idle TVM workers sleep instead.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

