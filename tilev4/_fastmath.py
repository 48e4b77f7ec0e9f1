"""Device math helpers shared by TileLang programs (imported into a kernel with ``T.import_source``)."""

import tilelang.language as T

__all__ = ["EX2_SOURCE", "ex2"]

EX2_SOURCE = """
__device__ __forceinline__ float tilev4_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
"""


def ex2(x):
    """2^x on the MUFU (``ex2.approx.ftz``): ``exp2f``'s value wherever that is a normal number, 0 where it is
    subnormal (``exp2f`` adds a rescaling around the same instruction for those). The program must call
    ``T.import_source(EX2_SOURCE)``."""
    return T.call_extern(T.float32, "tilev4_ex2", x)
