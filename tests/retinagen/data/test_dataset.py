"""`ZipImageDataset` / `read_dataset_json`: round trip from prepare, validation, worker safety."""

from __future__ import annotations

import json
import pickle
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from retinagen.data.dataset import ZipImageDataset, read_dataset_json
from retinagen.data.prepare import encode_png, member_name, prepare_dataset
from retinagen.errors import RetinagenError

RES = 32


@cache
def retina(size: int = 128) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.retina()).resize((size, size), Image.Resampling.BOX))


GRADES = {
    "1_left": 0,
    "1_right": 1,
    "2_left": 4,
    "2_right": 4,
    "3_left": 2,
    "3_right": 0,
    "4_left": 0,
    "4_right": 3,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eyepacs")
    (root / "train").mkdir()
    for i, stem in enumerate(GRADES):
        img = (retina().astype(np.float32) * (0.7 + 0.04 * i)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img[:, ::-1] if "right" in stem else img).save(
            root / "train" / f"{stem}.jpeg", quality=92
        )
    (root / "trainLabels.csv").write_text("image,level\n" + "".join(f"{s},{g}\n" for s, g in GRADES.items()))
    out = tmp_path_factory.mktemp("ds") / "eyepacs.zip"
    s = prepare_dataset("eyepacs", root, RES, out, workers=1, progress=False)
    assert s.n_kept == len(GRADES)
    return out


def write_zip(path: Path, images: list[np.ndarray], meta: dict[str, Any] | None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(images):
            zf.writestr(member_name(i), encode_png(img))
        if meta is not None:
            zf.writestr("dataset.json", json.dumps(meta))
    return path


def test_round_trip_shapes_range_and_labels(prepared: Path) -> None:
    ds = ZipImageDataset(prepared)
    meta = read_dataset_json(prepared)
    assert len(ds) == len(GRADES) and ds.resolution == RES and ds.num_classes == 5
    expected = {meta["keys"][n]: lab for n, lab in meta["labels"]}
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == torch.float32 and img.shape == (3, RES, RES)
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert img.max() > 0.0 and img.min() == -1.0  # a bright fundus on a black (masked) surround
        assert label.dtype == torch.int64 and label.ndim == 0
        assert (
            int(label) == expected[meta["keys"][ds.names[i]]] == GRADES[Path(meta["keys"][ds.names[i]]).stem]
        )
    assert ds.labels.dtype == np.int64
    assert ds.label_counts() == {0: 3, 1: 1, 2: 1, 3: 1, 4: 2}
    # Pixel values: the model-range tensor is exactly the stored PNG / 127.5 - 1.
    u8 = ds.read_uint8(0)
    torch.testing.assert_close(ds[0][0], torch.from_numpy(u8).permute(2, 0, 1).float() / 127.5 - 1.0)


def test_splits_partition_the_dataset_and_keep_patients_together(prepared: Path) -> None:
    full = ZipImageDataset(prepared)
    parts = {
        s: ZipImageDataset(prepared, split=s).names
        for s in ("train", "val", "test")
        if _nonempty(prepared, s)
    }
    assert sorted(n for names in parts.values() for n in names) == sorted(full.names)
    meta = read_dataset_json(prepared)
    split_of = meta["splits"]
    for n, pid in meta["patients"].items():
        same = [m for m, q in meta["patients"].items() if q == pid]
        assert {split_of[m] for m in same} == {split_of[n]}
    with pytest.raises(RetinagenError, match="split must be"):
        ZipImageDataset(prepared, split="validation")


def _nonempty(path: Path, split: str) -> bool:
    return split in read_dataset_json(path)["splits"].values()


def test_dataloader_workers_open_their_own_zip(prepared: Path) -> None:
    ds = ZipImageDataset(prepared)
    _ = ds[0]  # the parent has an open handle now: workers must not reuse it
    serial = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = [b for b, _ in loader]
    torch.testing.assert_close(torch.cat(batches), serial)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zip is None and torch.equal(clone[1][0], ds[1][0])


def test_fingerprint_is_stable_and_content_sensitive(prepared: Path, tmp_path: Path) -> None:
    a = ZipImageDataset(prepared).fingerprint()
    assert a == ZipImageDataset(prepared).fingerprint() and len(a) == 64
    assert ZipImageDataset(prepared, split="train").fingerprint() == a  # one dataset, whatever the split
    meta = read_dataset_json(prepared)
    meta["labels"][0][1] = (meta["labels"][0][1] + 1) % 5
    with zipfile.ZipFile(prepared) as src, zipfile.ZipFile(tmp_path / "b.zip", "w") as dst:
        for n in src.namelist():
            dst.writestr(n, json.dumps(meta) if n == "dataset.json" else src.read(n))
    assert ZipImageDataset(tmp_path / "b.zip").fingerprint() != a


def test_attrs_and_unlabelled(tmp_path: Path) -> None:
    imgs = [np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 255)]
    names = [member_name(i) for i in range(3)]
    meta = {
        "labels": None,
        "resolution": 8,
        "attrs": {
            "names": ["Smiling", "Male"],
            "values": {names[0]: [1, 0], names[1]: [0, 1], names[2]: [1, 1]},
        },
    }
    ds = ZipImageDataset(write_zip(tmp_path / "c.zip", imgs, meta), return_attrs=True)
    assert ds.num_classes == 0 and ds.label_counts() == {} and ds.attr_names == ["Smiling", "Male"]
    img, label, attrs = ds[1]
    assert int(label) == -1 and attrs.tolist() == [0, 1] and attrs.dtype == torch.int64
    assert torch.allclose(ds[2][0], torch.ones(3, 8, 8)) and torch.allclose(ds[0][0], -torch.ones(3, 8, 8))
    with pytest.raises(RetinagenError, match="no 'attrs'"):
        ZipImageDataset(write_zip(tmp_path / "d.zip", imgs, {"labels": None}), return_attrs=True)


def test_nvlabs_zip_without_resolution_is_read(tmp_path: Path) -> None:
    imgs = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(4)]
    meta = {"labels": [[member_name(i), i % 2] for i in range(4)]}
    ds = ZipImageDataset(write_zip(tmp_path / "n.zip", imgs, meta))
    assert ds.resolution == 16 and ds.num_classes == 2 and ds.labels.tolist() == [0, 1, 0, 1]


def test_missing_dataset_json(tmp_path: Path) -> None:
    p = write_zip(tmp_path / "x.zip", [np.zeros((8, 8, 3), np.uint8)], None)
    with pytest.raises(RetinagenError, match="no dataset.json"):
        ZipImageDataset(p)
    with pytest.raises(RetinagenError, match="no dataset.json"):
        read_dataset_json(p)


def test_not_a_zip_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "t.zip").write_text("hello")
    with pytest.raises(RetinagenError, match="not a readable ZIP"):
        ZipImageDataset(tmp_path / "t.zip")
    with pytest.raises(RetinagenError, match="does not exist"):
        ZipImageDataset(tmp_path / "absent.zip")


def test_wrong_size_member_is_named(tmp_path: Path) -> None:
    imgs = [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((12, 12, 3), np.uint8)]
    p = write_zip(tmp_path / "w.zip", imgs, {"labels": None, "resolution": 8})
    ds = ZipImageDataset(p)
    _ = ds[1]
    with pytest.raises(RetinagenError, match=r"00000/img00000002.png is 12 x 12, expected 8 x 8"):
        _ = ds[2]
    with pytest.raises(RetinagenError, match=r"00000/img00000002.png"):
        ds.validate()
    bad_first = write_zip(tmp_path / "w2.zip", imgs[::-1], {"labels": None, "resolution": 8})
    with pytest.raises(RetinagenError, match="img00000000.png is 12 x 12"):
        ZipImageDataset(bad_first)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"labels": [["00000/img00000009.png", 0]]}, "does not hold"),
        ({"labels": [["00000/img00000000.png", "a"]]}, r"\[name, int\]"),
        ({"labels": "x"}, r"\[name, int\]"),
        ({"labels": None, "resolution": "big"}, "resolution"),
        ({"labels": [["00000/img00000000.png", 7]], "num_classes": 5}, "num_classes"),
    ],
)
def test_bad_dataset_json(tmp_path: Path, meta: dict[str, Any], match: str) -> None:
    p = write_zip(tmp_path / "m.zip", [np.zeros((8, 8, 3), np.uint8)], meta)
    with pytest.raises(RetinagenError, match=match):
        ZipImageDataset(p)


def test_png_members_decode_to_stored_rgb(tmp_path: Path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # pure red: a BGR/RGB mix-up would show as blue
    ds = ZipImageDataset(write_zip(tmp_path / "r.zip", [img], {"labels": None, "resolution": 8}))
    np.testing.assert_array_equal(ds.read_uint8(0), img)
    assert cv2.imdecode(np.frombuffer(encode_png(img), np.uint8), cv2.IMREAD_COLOR)[0, 0, 2] == 255
