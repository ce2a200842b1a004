"""sipt: Self-Improving Pretraining as a toolkit of resumable, Parquet-in/Parquet-out stages."""

import os

__version__ = "0.1.0"

# Intel MKL picks its matrix-multiply kernels by thread count, so a float32 forward pass on 1 and on
# 2 threads can differ in the last bits, and a sampled token near a boundary then flips. MKL's
# strict conditional-numerical-reproducibility mode makes its GEMM results independent of the
# thread count (for one CPU code path). It must be set before MKL's first call, so it is set on
# import; a user's own MKL_CBWR wins. See README "Reproducibility" for what it does and does not cover.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
