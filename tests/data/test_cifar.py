import pickle

import numpy as np
import pytest

from rmlib import RmlibError
from rmlib.data import (
    load_cifar100,
    load_market1501,
    make_synthetic_market,
    market_old_ids,
    old_class_mask,
    parse_market_name,
    train_val_split,
)


def test_cifar100_real_data(cifar_root):
    train = load_cifar100("train", cifar_root)
    test = load_cifar100("test", cifar_root)
    assert train.images.shape == (50_000, 3, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 3, 32, 32)
    assert train.labels[0] == 19 and test.labels[0] == 49  # cattle, mountain
    assert (np.bincount(test.labels) == 100).all()
    mean = train.images.reshape(50_000, 3, -1).mean((0, 2)) / 255
    np.testing.assert_allclose(mean, [0.5071, 0.4865, 0.4409], atol=1e-3)
    assert old_class_mask(train.labels).sum() == 25_000


def test_cifar100_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RmlibError, match="CIFAR-100 is not at .*set RMLIB_DATA"):
        load_cifar100("train", tmp_path, download=False)


def test_cifar100_malformed_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with pytest.raises(RmlibError, match="train is missing"):
        load_cifar100("train", tmp_path, download=False)
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(RmlibError, match="not a CIFAR-100 python pickle"):
        load_cifar100("train", tmp_path, download=False)
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": np.zeros((10, 3072), np.uint8), "fine_labels": [0] * 10}, f)
    with pytest.raises(RmlibError, match="expected uint8"):
        load_cifar100("test", tmp_path, download=False)
    with pytest.raises(RmlibError, match="split 'val'"):
        load_cifar100("val", tmp_path)


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls a function of the file's choice."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_cifar100_pickles_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "ran.txt"
    entry = {"data": np.zeros((10_000, 3072), np.uint8), "fine_labels": _RunsCode(marker)}
    with open(folder / "test", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(RmlibError, match="not a plain CIFAR-100 pickle: it asks for .*exec"):
        load_cifar100("test", tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_pickles_of_every_protocol_load(protocol, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    labels = np.repeat(np.arange(100), 100).tolist()
    entry = {"data": np.full((10_000, 3072), 7, np.uint8), "fine_labels": labels,
             "coarse_labels": labels, "filenames": ["x.png"] * 10_000, "batch_label": "test"}
    with open(folder / "test", "wb") as f:
        pickle.dump(entry, f, protocol=protocol)
    test = load_cifar100("test", tmp_path, download=False)
    assert (test.images == 7).all() and test.labels[-1] == 99


def test_train_val_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), 20)
    fit, val = train_val_split(labels, per_class=4, seed=1)
    assert len(val) == 20 and len(fit) == 80
    assert not set(fit) & set(val)
    assert (np.bincount(labels[val]) == 4).all()
    assert np.array_equal(val, train_val_split(labels, 4, seed=1)[1])


def test_market_names():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c3s2_012345_00.jpg") == (-1, 3)
    with pytest.raises(RmlibError, match="not a Market-1501 image name"):
        parse_market_name("0002_c1_000451.jpg")


def test_market_reader_on_synthetic_folder(tmp_path):
    root = make_synthetic_market(tmp_path, n_train_ids=6, n_test_ids=4, n_cams=3, per_cam=2,
                                 n_distractors=3, n_junk=2)
    splits = load_market1501(root)
    train, query, gallery = splits["train"], splits["query"], splits["gallery"]
    assert len(train) == 6 * 3 * 2 and set(train.pids) == set(range(1, 7))
    assert len(query) == 4 * 3 and 0 not in query.pids
    assert (gallery.pids == 0).sum() == 3  # distractors kept
    assert (gallery.pids == -1).sum() == 0  # junk dropped
    assert len(gallery) == 4 * 3 * 2 + 3
    assert set(gallery.cams) <= {1, 2, 3}
    assert market_old_ids(train.pids).tolist() == [1, 2, 3]


def test_market_missing_and_malformed(tmp_path):
    with pytest.raises(RmlibError, match="cannot be downloaded"):
        load_market1501(tmp_path)
    root = make_synthetic_market(tmp_path)
    (root / "Market-1501-v15.09.15" / "query" / "bad_name.jpg").write_bytes(b"")
    with pytest.raises(RmlibError, match="'bad_name.jpg' is not a Market-1501 image name"):
        load_market1501(root)


def _tiny_cifar_archive(tmp_path):
    """A .tar.gz laid out like the official CIFAR-100 archive, and its md5."""
    import hashlib
    import tarfile

    src = tmp_path / "src" / "cifar-100-python"
    src.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (src / name).write_bytes(name.encode())
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path (the download path, without the internet)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_cifar100_checks_the_md5_and_unpacks_atomically(tmp_path, served):
    from rmlib.data import fetch_cifar100

    archive, md5 = _tiny_cifar_archive(tmp_path)
    url = f"{served}/{archive.name}"
    root = tmp_path / "data"
    with pytest.raises(RmlibError, match="could not be downloaded.*set RMLIB_DATA"):
        fetch_cifar100(root / "deep" / "er", url=url, md5="0" * 32)
    assert not root.exists()  # a failed fetch leaves nothing behind, not even its folders
    root.mkdir()
    with pytest.raises(RmlibError, match="could not be downloaded.*set RMLIB_DATA"):
        fetch_cifar100(root, url=url, md5="0" * 32)
    assert list(root.iterdir()) == []  # a folder that was there stays
    folder = fetch_cifar100(root, url=url, md5=md5)
    assert folder == root / "cifar-100-python"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python"]
    assert (folder / "test").read_bytes() == b"test"
    assert fetch_cifar100(root, url="file:///nowhere", md5=md5) == folder  # fetched once


def test_fetch_cifar100_without_a_network_is_one_line(tmp_path):
    from rmlib.data import fetch_cifar100

    with pytest.raises(RmlibError, match="could not be downloaded") as info:
        fetch_cifar100(tmp_path, url="http://127.0.0.1:9/cifar-100-python.tar.gz")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
