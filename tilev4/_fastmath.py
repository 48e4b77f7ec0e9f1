"""Device math helpers shared by TileLang programs (imported into a kernel with ``T.import_source``).

Each helper is one special-function-unit instruction (``.approx.ftz``) behind a non-volatile ``asm``, so that the
compiler schedules it like any arithmetic instruction. :data:`FAST_SOURCE` defines all three. The attention
epilogues (and their split combine, so that a lone split gives the one-pass program's bits) and the MoE SwiGLU use
them: a handful of dependent instructions where the IEEE division, ``expf`` and ``log2f`` are subroutines of tens.
"""

import tilelang.language as T

__all__ = ["EX2_SOURCE", "FAST_SOURCE", "LN2", "LOG2E", "ex2", "lg2", "rcp"]

LOG2E = 1.4426950408889634  # e^x = 2^(x·log2 e)
LN2 = 0.6931471805599453  # ln x = log2 x · ln 2

EX2_SOURCE = """
__device__ __forceinline__ float tilev4_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
"""

FAST_SOURCE = EX2_SOURCE + """
__device__ __forceinline__ float tilev4_lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float tilev4_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
"""


def ex2(x):
    """2^x on the MUFU (``ex2.approx.ftz``): ``exp2f``'s value wherever that is a normal number, 0 where it is
    subnormal (``exp2f`` adds a rescaling around the same instruction for those). The program must call
    ``T.import_source(EX2_SOURCE)`` (or :data:`FAST_SOURCE`)."""
    return T.call_extern(T.float32, "tilev4_ex2", x)


def lg2(x):
    """log2(x) (``lg2.approx.ftz``); the program must import :data:`FAST_SOURCE`."""
    return T.call_extern(T.float32, "tilev4_lg2", x)


def rcp(x):
    """1/x (``rcp.approx.ftz``, within an ulp); the program must import :data:`FAST_SOURCE`."""
    return T.call_extern(T.float32, "tilev4_rcp", x)
