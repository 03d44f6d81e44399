import gzip

import numpy as np
import pytest

from dsconv_tvm.accuracy.datasets import load_fashion_mnist
from dsconv_tvm.errors import DSConvError


def test_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert np.bincount(y).tolist() == [1000] * 10          # the test split is balanced


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(DSConvError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=str(tmp_path))


def test_bad_magic(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x00\x00" * 8)
    with pytest.raises(DSConvError, match="not an IDX file"):
        load_fashion_mnist("test", root=str(tmp_path))
