import os

# Tests spawn small worker groups on a 2-core machine: keep BLAS single-threaded in the driver too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
