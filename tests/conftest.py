import os

# Tests spawn small worker groups on a 2-core machine: keep BLAS single-threaded in the driver too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


import pytest  # noqa: E402

# A small corpus every training test can share: 52 distinct characters, ~12 k of text.
TEXT = "".join(f"{i} little pigs went to market, {i * 7 % 13} came home.\n" for i in range(300))


@pytest.fixture
def corpus(tmp_path) -> str:
    """Path of a file holding TEXT."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)
