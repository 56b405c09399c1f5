"""Channels-last float32 tensors made NCHW-contiguous, fast.

oneDNN returns channels-last (NHWC) results (`hwaware.onednn`), and users pass channels-last
inputs; TVM kernels and PyTorch views need NCHW-contiguous memory. PyTorch's own conversion
(`Tensor.contiguous()`) copies element by element: on the 2-core Zen 3 host 385 us for a
32x112x112 map that a ReLU reads and writes in 33 us. This module's converter transposes 8x8
tiles in AVX2 registers (a scalar loop elsewhere), split over PyTorch's OpenMP team: 68 us for
the same map, 49 against 375 us for 1024x14x14, 119 against 1194 for 256x56x56.

The converter is C, built once per machine with the system C compiler into hwaware's cache
folder (as `hwaware.threads` builds its launcher). Where it cannot be built or loaded (no
libgomp in the process, no compiler, not x86), `to_contiguous` is `Tensor.contiguous()`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from hwaware.threads import openmp_library

MIN_ELEMENTS = 16384  # below this the call's overhead outweighs PyTorch's slow copy
CONVERTER_SOURCE = r"""
#include <stdint.h>
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>

/* An 8x8 tile: 8 pixels' 8 channels (rows c apart) to 8 channels' 8 pixels (rows hw apart). */
__attribute__((target("avx2")))
static void tile_avx2(const float* s, float* d, int64_t c, int64_t hw) {
  __m256 r0 = _mm256_loadu_ps(s + 0 * c), r1 = _mm256_loadu_ps(s + 1 * c);
  __m256 r2 = _mm256_loadu_ps(s + 2 * c), r3 = _mm256_loadu_ps(s + 3 * c);
  __m256 r4 = _mm256_loadu_ps(s + 4 * c), r5 = _mm256_loadu_ps(s + 5 * c);
  __m256 r6 = _mm256_loadu_ps(s + 6 * c), r7 = _mm256_loadu_ps(s + 7 * c);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d + 0 * hw, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + 1 * hw, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * hw, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * hw, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * hw, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * hw, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * hw, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * hw, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

/* A partial tile (np pixels, nc channels), or any tile without AVX2. */
static void tile_scalar(const float* s, float* d, int64_t c, int64_t hw, int64_t np,
                        int64_t nc) {
  for (int64_t j = 0; j < nc; ++j)
    for (int64_t i = 0; i < np; ++i)
      d[j * hw + i] = s[i * c + j];
}

/* dst (n, c, hw) = src (n, hw, c), the tiles of 8 pixels split over the team. */
void hwaware_nhwc_to_nchw(const float* src, float* dst, int64_t n, int64_t c, int64_t hw,
                          int threads) {
#if defined(__x86_64__)
  int avx2 = __builtin_cpu_supports("avx2");
#else
  int avx2 = 0;
#endif
  int64_t pixel_tiles = (hw + 7) / 8, channel_tiles = (c + 7) / 8;
  #pragma omp parallel for num_threads(threads) collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t pt = 0; pt < pixel_tiles; ++pt) {
      const float* s = src + b * hw * c + pt * 8 * c;
      float* d = dst + b * hw * c + pt * 8;
      int64_t np = hw - pt * 8 < 8 ? hw - pt * 8 : 8;
      for (int64_t ct = 0; ct < channel_tiles; ++ct) {
        int64_t nc = c - ct * 8 < 8 ? c - ct * 8 : 8;
#if defined(__x86_64__)
        if (avx2 && np == 8 && nc == 8) {
          tile_avx2(s + ct * 8, d + ct * 8 * hw, c, hw);
          continue;
        }
#endif
        tile_scalar(s + ct * 8, d + ct * 8 * hw, c, hw, np, nc);
      }
    }
}
"""


def to_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` in NCHW-contiguous memory (itself where it is): the converter for a large
    channels-last float32 CPU tensor, `Tensor.contiguous()` otherwise."""
    if t.is_contiguous():
        return t
    convert = _converter() if _channels_last_float(t) else None
    if convert is None:
        return t.contiguous()
    n, c, h, w = t.shape
    out = torch.empty(t.shape, dtype=t.dtype)
    convert(t.data_ptr(), out.data_ptr(), n, c, h * w, torch.get_num_threads())
    return out


def _channels_last_float(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.dtype == torch.float32 and t.device.type == "cpu" and \
        t.numel() >= MIN_ELEMENTS and t.is_contiguous(memory_format=torch.channels_last)


@functools.cache
def _converter() -> Any:
    """The built converter's C function (None: not possible here, see the docstring)."""
    library = openmp_library("nhwc_to_nchw", CONVERTER_SOURCE)
    if library is None:
        return None
    function = library.hwaware_nhwc_to_nchw
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_int]
    function.restype = None
    return function
