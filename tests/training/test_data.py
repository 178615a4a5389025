import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from training import data


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = False) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def test_reads_plain_uint8_images(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "x-idx3-ubyte", images)), images)


def test_reads_gzipped_files_by_suffix(tmp_path):
    labels = np.array([7, 2, 9], dtype=np.uint8)
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "y.gz", labels, compress=True)), labels)


def test_reads_big_endian_int32(tmp_path):
    values = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "v", values, type_code=0x0C)), values)


def test_refuses_a_bad_magic_number(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(tmp_path / "bad")


def test_refuses_a_file_shorter_than_its_header_says(tmp_path):
    path = write_idx(tmp_path / "short", np.zeros((2, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="promises"):
        data.read_idx(path)


def test_loads_a_split_from_any_mnist_directory(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8), compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3], np.uint8))
    split = data.load_split("test", tmp_path)
    assert split.images.shape == (4, 28, 28) and split.labels.tolist() == [0, 1, 2, 3]


def test_missing_dataset_names_the_debian_package_and_the_option(tmp_path):
    with pytest.raises(data.DatasetMissing) as missing:
        data.load_split("train", tmp_path)
    assert "dataset-fashion-mnist" in str(missing.value) and "--data-dir" in str(missing.value)


def test_fashion_mnist_from_debian_is_complete():
    train, test = data.load_split("train"), data.load_split("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert set(np.unique(test.labels)) == set(range(10))
