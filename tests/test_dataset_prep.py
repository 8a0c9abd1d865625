"""Dataset preparation (docs/reproduction.md §9): original layouts -> standardized layout -> meta
JSON.

Every test builds a tiny original dataset in tmp_path.  Expected file names, ids, pixel values
and meta entries are written out here or computed here independently of the code under test.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` run without `python -m`
    sys.path.insert(0, str(REPO))

from dataset import make_dataset_new, make_meta, products  # noqa: E402
from dataset.convert import convert  # noqa: E402
from dataset.meta import build_meta  # noqa: E402
from utils.errors import DataError  # noqa: E402

MVTEC = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
         "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]
VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"]
ENTRY_KEYS = ["img_path", "mask_path", "cls_name", "specie_name", "dataset_name", "anomaly"]
FOLDERS = ["train/good", "test/good", "test/anomaly", "ground_truth/anomaly"]


# ----------------------------------------------------------------------------- helpers

class Source:
    """Writes unique tiny source images and remembers the pixels each output must have."""

    def __init__(self):
        self.count = 0

    def image(self, path: Path, grey: bool) -> np.ndarray:
        """Write a unique 8..16 px image; return the expected 3-channel BGR output pixels."""
        self.count += 1
        rng = np.random.default_rng(self.count)
        h, w = 8 + self.count % 9, 16 - self.count % 9
        shape = (h, w) if grey else (h, w, 3)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        write(path, array)
        if path.suffix.lower() in (".jpg", ".jpeg"):  # lossy: expect what OpenCV decodes
            return cv2.imread(str(path), cv2.IMREAD_COLOR)
        return np.repeat(array[..., None], 3, axis=2) if grey else array

    def mask(self, path: Path, image: np.ndarray, values, threshold: int, channels: int = 1):
        """Write a mask of ``image``'s size cycling through ``values``; return the 0/255 output."""
        h, w = image.shape[:2]
        array = np.resize(np.asarray(values, np.uint8), h * w).reshape(h, w)
        write(path, np.repeat(array[..., None], channels, axis=2) if channels > 1 else array)
        return np.where(array > threshold, 255, 0).astype(np.uint8)


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def read(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array


def files_under(root: Path) -> set:
    """Relative POSIX paths of every file under ``root``."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def run_convert(capsys, *argv):
    rc = make_dataset_new.main(list(argv))
    return rc, capsys.readouterr()


def run_meta(capsys, data, name):
    rc = make_meta.main(["--data_path", str(data), "--dataset", name])
    return rc, capsys.readouterr()


def load_meta(data: Path, name: str) -> dict:
    with open(data / f"meta_{name}.json", encoding="utf-8") as f:
        return json.load(f)


def expected_meta(name: str, order, outputs: dict) -> dict:
    """Meta computed from the expected output paths: anomaly < good, then sorted file name."""
    meta = {"train": {}, "test": {}}
    for phase in ("train", "test"):
        for product in order:
            entries = []
            for specie in ("anomaly", "good"):
                prefix = f"{name}/{product}/{phase}/{specie}/"
                for path in sorted(p for p in outputs if p.startswith(prefix)):
                    file_name = path[len(prefix):]
                    entries.append({
                        "img_path": path,
                        "mask_path": (f"{name}/{product}/ground_truth/anomaly/"
                                      f"{file_name[:-4]}.png" if specie == "anomaly" else ""),
                        "cls_name": product, "specie_name": specie,
                        "dataset_name": file_name.split("_")[0],
                        "anomaly": 1 if specie == "anomaly" else 0})
            meta[phase][product] = entries
    return meta


def assert_meta_equal(actual: dict, expected: dict) -> None:
    """Equal, including the order of phases, products, entries and entry keys."""
    assert actual == expected
    assert list(actual) == ["train", "test"]
    for phase in actual:
        assert list(actual[phase]) == list(expected[phase])
        for entries in actual[phase].values():
            for entry in entries:
                assert list(entry) == ENTRY_KEYS


def check_outputs(data: Path, expected: dict) -> None:
    """Every expected image/mask exists under ``data`` with exactly the expected pixels, and
    nothing else does (meta files aside)."""
    assert {p for p in files_under(data) if not p.startswith("meta_")} == set(expected)
    for rel, pixels in expected.items():
        actual = read(data / rel)
        if rel.endswith(".bmp"):
            assert actual.ndim == 3 and actual.shape[2] == 3, rel  # grey sources become BGR
        else:
            assert actual.ndim == 2 and actual.dtype == np.uint8, rel
            assert set(np.unique(actual)) <= {0, 255}, rel
        np.testing.assert_array_equal(actual, pixels, err_msg=rel)


# ----------------------------------------------------------------------------- constants

def test_product_constants():
    assert products.MVTEC_PRODUCTS == tuple(MVTEC)
    assert products.VISA_PRODUCTS == tuple(VISA)
    assert products.FIXED_PRODUCT_ORDERS == {"mvtec": tuple(MVTEC), "visa": tuple(VISA)}
    # docs/reproduction.md §7: validation products of the *other* dataset, in the reference's order
    assert products.VAL_PRODUCTS["mvtec"] == ("bottle", "hazelnut", "wood", "zipper", "leather")
    assert products.VAL_PRODUCTS["visa"] == ("chewinggum", "cashew", "pipe_fryum", "capsules",
                                             "candle")


# ----------------------------------------------------------------------------- MVTec-AD

# Per product: training names, {defect: test names}; creation order != sorted order on purpose.
MVTEC_TRAIN = ["010.png", "002.png"]
MVTEC_TEST = {"crack": ["001.png"], "good": ["005.png", "000.png"]}
BOTTLE_TEST = {"good": ["000.png"], "crack": ["001.png", "000.png"], "broken_large": ["000.png"]}
MASK_VALUES = [0, 1, 127, 128, 129, 200, 254, 255]  # anti-aliased edges


def build_mvtec(root: Path, skip=()):
    """Original MVTec-AD tree; returns {output path: expected pixels} computed independently."""
    source, expected, index = Source(), {}, 0
    for k, product in enumerate(MVTEC):
        if product in skip:
            continue
        grey = k % 2 == 0  # e.g. grid, screw, zipper are grey in MVTec-AD
        for name in MVTEC_TRAIN:
            source.image(root / product / "train" / "good" / name, grey)
        tests = BOTTLE_TEST if product == "bottle" else MVTEC_TEST
        pixels = {}
        for defect, names in tests.items():
            for name in names:
                src = root / product / "test" / defect / name
                pixels[src] = source.image(src, grey)
                if defect != "good":
                    gt = root / product / "ground_truth" / defect / f"{name[:-4]}_mask.png"
                    pixels[gt] = source.mask(gt, pixels[src], MASK_VALUES, 128)
        # expected outputs: train sorted, then test folders sorted, images sorted
        # (docs/reproduction.md §9)
        for name in sorted(MVTEC_TRAIN):
            src = root / product / "train" / "good" / name
            expected[f"mvtec/{product}/train/good/mvtec_{index:06d}.bmp"] = _reread(src, grey)
            index += 1
        for defect in sorted(tests):
            for name in sorted(tests[defect]):
                src = root / product / "test" / defect / name
                if defect == "good":
                    expected[f"mvtec/{product}/test/good/mvtec_good_{index:06d}.bmp"] = pixels[src]
                else:
                    stem = f"mvtec_{defect}_{index:06d}"
                    expected[f"mvtec/{product}/test/anomaly/{stem}.bmp"] = pixels[src]
                    gt = root / product / "ground_truth" / defect / f"{name[:-4]}_mask.png"
                    expected[f"mvtec/{product}/ground_truth/anomaly/{stem}.png"] = pixels[gt]
                index += 1
    return expected


def _reread(path: Path, grey: bool) -> np.ndarray:
    array = read(path)
    return np.repeat(array[..., None], 3, axis=2) if grey else array


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    """(data root, expected outputs) after converting a tiny MVTec-AD tree and writing its meta."""
    tmp = tmp_path_factory.mktemp("mvtec")
    expected = build_mvtec(tmp / "original")
    data = tmp / "data"
    assert make_dataset_new.main(["--dataset", "mvtec", "--src_path", str(tmp / "original"),
                                  "--dst_path", str(data)]) == 0
    assert make_meta.main(["--data_path", str(data), "--dataset", "mvtec"]) == 0
    return data, expected


def test_mvtec_names_ids_and_pixels(mvtec):
    data, expected = mvtec
    # written out by hand for the first product (ids run on across products)
    bottle = sorted(p for p in expected if p.startswith("mvtec/bottle/"))
    assert bottle == [
        "mvtec/bottle/ground_truth/anomaly/mvtec_broken_large_000002.png",
        "mvtec/bottle/ground_truth/anomaly/mvtec_crack_000003.png",
        "mvtec/bottle/ground_truth/anomaly/mvtec_crack_000004.png",
        "mvtec/bottle/test/anomaly/mvtec_broken_large_000002.bmp",
        "mvtec/bottle/test/anomaly/mvtec_crack_000003.bmp",
        "mvtec/bottle/test/anomaly/mvtec_crack_000004.bmp",
        "mvtec/bottle/test/good/mvtec_good_000005.bmp",
        "mvtec/bottle/train/good/mvtec_000000.bmp",
        "mvtec/bottle/train/good/mvtec_000001.bmp",
    ]
    assert "mvtec/cable/train/good/mvtec_000006.bmp" in expected
    assert "mvtec/zipper/test/good/mvtec_good_000075.bmp" in expected  # 6 + 14 * 5 - 1
    assert len([p for p in expected if p.endswith(".bmp")]) == 76
    check_outputs(data, expected)
    for product in MVTEC:
        for folder in FOLDERS:
            assert (data / "mvtec" / product / folder).is_dir()


def test_mvtec_mask_binarized_above_128(mvtec):
    data, _ = mvtec
    mask = read(data / "mvtec/bottle/ground_truth/anomaly/mvtec_crack_000003.png")
    # the source cycles through 0, 1, 127, 128, 129, 200, 254, 255 row-major
    np.testing.assert_array_equal(mask.reshape(-1)[:8], [0, 0, 0, 0, 255, 255, 255, 255])


def test_mvtec_grey_source_becomes_three_channel_bmp(mvtec):
    data, _ = mvtec
    out = read(data / "mvtec/bottle/train/good/mvtec_000000.bmp")  # bottle is grey here
    assert out.ndim == 3 and out.shape[2] == 3
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    with open(data / "mvtec/bottle/train/good/mvtec_000000.bmp", "rb") as f:
        assert f.read(2) == b"BM"


def test_mvtec_meta_exact(mvtec):
    data, expected = mvtec
    meta = load_meta(data, "mvtec")
    assert_meta_equal(meta, expected_meta("mvtec", MVTEC, expected))
    assert list(meta["test"]) == MVTEC
    assert meta["test"]["bottle"][0] == {
        "img_path": "mvtec/bottle/test/anomaly/mvtec_broken_large_000002.bmp",
        "mask_path": "mvtec/bottle/ground_truth/anomaly/mvtec_broken_large_000002.png",
        "cls_name": "bottle", "specie_name": "anomaly", "dataset_name": "mvtec", "anomaly": 1}
    assert meta["test"]["bottle"][-1] == {
        "img_path": "mvtec/bottle/test/good/mvtec_good_000005.bmp", "mask_path": "",
        "cls_name": "bottle", "specie_name": "good", "dataset_name": "mvtec", "anomaly": 0}
    assert [e["img_path"] for e in meta["train"]["bottle"]] == [
        "mvtec/bottle/train/good/mvtec_000000.bmp", "mvtec/bottle/train/good/mvtec_000001.bmp"]


def test_mvtec_missing_items_one_message_nothing_written(tmp_path, capsys):
    original = tmp_path / "original"
    build_mvtec(original, skip=("cable", "wood"))
    os.rename(original / "bottle/train/good", original / "bottle/train/ok")
    os.remove(original / "capsule/ground_truth/crack/001_mask.png")
    for f in (original / "carpet/ground_truth/crack").iterdir():
        f.unlink()
    (original / "carpet/ground_truth/crack").rmdir()
    for f in sorted((original / "grid/test").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (original / "grid/test").rmdir()
    data = tmp_path / "data"
    rc, out = run_convert(capsys, "--dataset", "mvtec", "--src_path", str(original),
                          "--dst_path", str(data))
    assert rc == 1
    assert out.err.count("error:") == 1 and "Traceback" not in out.err
    assert "6 problems" in out.err
    for missing in [original / "cable", original / "wood", original / "bottle/train/good",
                    original / "capsule/ground_truth/crack/001_mask.png",
                    original / "carpet/ground_truth/crack", original / "grid/test"]:
        assert str(missing) in out.err
    assert not data.exists()


def test_mvtec_error_keeps_previous_output(mvtec, tmp_path):
    data, expected = mvtec
    before = files_under(data)
    with pytest.raises(DataError) as info:
        convert("mvtec", tmp_path / "empty", data, progress=False)
    assert str(tmp_path / "empty") in str(info.value)
    assert files_under(data) == before
    assert not [p for p in data.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- VisA

# (split, label, file) rows of one product, in CSV order; products appear reversed and interleaved.
VISA_ROWS = [("train", "normal", "0001.JPG"), ("test", "anomaly", "001.JPG"),
             ("train", "normal", "0000.JPG"), ("test", "normal", "0002.JPG"),
             ("test", "anomaly", "000.JPG")]
VISA_MASK_VALUES = [0, 1, 2, 0, 3]  # class ids


def build_visa(root: Path, skip=()):
    """Original VisA tree + split_csv/1cls.csv; returns expected outputs computed here."""
    source, pixels, rows = Source(), {}, {}
    for k, product in enumerate(VISA):
        if product in skip:
            continue
        rows[product] = []
        for split, label, name in VISA_ROWS:
            folder = "Anomaly" if label == "anomaly" else "Normal"
            image = f"{product}/Data/Images/{folder}/{name}"
            pixels[image] = source.image(root / image, grey=k % 3 == 0)
            mask = ""
            if label == "anomaly":
                mask = f"{product}/Data/Masks/Anomaly/{name[:-4]}.png"
                pixels[mask] = source.mask(root / mask, pixels[image], VISA_MASK_VALUES, 0)
            rows[product].append({"object": product, "split": split, "label": label,
                                  "image": image, "mask": mask})
    # CSV order: products interleaved row by row, the last product first
    ordered = [rows[p][i] for i in range(len(VISA_ROWS)) for p in reversed(list(rows))]
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(ordered)
    expected, index = {}, 0
    for product in VISA:
        mine = [r for r in ordered if r["object"] == product]
        for row in [r for r in mine if r["split"] == "train"] + [r for r in mine
                                                                 if r["split"] == "test"]:
            stem = f"visa_{Path(row['image']).stem}_{index:06d}"
            if row["split"] == "train":
                expected[f"visa/{product}/train/good/{stem}.bmp"] = pixels[row["image"]]
            elif row["label"] == "normal":
                expected[f"visa/{product}/test/good/{stem}.bmp"] = pixels[row["image"]]
            else:
                expected[f"visa/{product}/test/anomaly/{stem}.bmp"] = pixels[row["image"]]
                expected[f"visa/{product}/ground_truth/anomaly/{stem}.png"] = pixels[row["mask"]]
            index += 1
    return expected


@pytest.fixture(scope="module")
def visa(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("visa")
    expected = build_visa(tmp / "original")
    data = tmp / "data"
    assert make_dataset_new.main(["--dataset", "visa", "--src_path", str(tmp / "original"),
                                  "--dst_path", str(data)]) == 0
    assert make_meta.main(["--data_path", str(data), "--dataset", "visa"]) == 0
    return data, expected


def test_visa_names_ids_and_pixels(visa):
    data, expected = visa
    # by hand: candle's rows in CSV order are train 0001, test 001 (anomaly), train 0000,
    # test 0002 (normal), test 000 (anomaly): train rows first, then test rows
    assert sorted(p for p in expected if p.startswith("visa/candle/")) == [
        "visa/candle/ground_truth/anomaly/visa_000_000004.png",
        "visa/candle/ground_truth/anomaly/visa_001_000002.png",
        "visa/candle/test/anomaly/visa_000_000004.bmp",
        "visa/candle/test/anomaly/visa_001_000002.bmp",
        "visa/candle/test/good/visa_0002_000003.bmp",
        "visa/candle/train/good/visa_0000_000001.bmp",
        "visa/candle/train/good/visa_0001_000000.bmp",
    ]
    assert "visa/pipe_fryum/test/anomaly/visa_000_000059.bmp" in expected
    check_outputs(data, expected)


def test_visa_masks_binarized_above_0(visa):
    data, _ = visa
    mask = read(data / "visa/candle/ground_truth/anomaly/visa_001_000002.png")
    np.testing.assert_array_equal(mask.reshape(-1)[:5], [0, 255, 255, 0, 255])


def test_visa_meta_exact(visa):
    data, expected = visa
    meta = load_meta(data, "visa")
    assert_meta_equal(meta, expected_meta("visa", VISA, expected))
    assert list(meta["train"]) == VISA
    # sorted file name, not id order: visa_000_000004 before visa_001_000002
    assert [(e["img_path"], e["mask_path"], e["anomaly"]) for e in meta["test"]["candle"]] == [
        ("visa/candle/test/anomaly/visa_000_000004.bmp",
         "visa/candle/ground_truth/anomaly/visa_000_000004.png", 1),
        ("visa/candle/test/anomaly/visa_001_000002.bmp",
         "visa/candle/ground_truth/anomaly/visa_001_000002.png", 1),
        ("visa/candle/test/good/visa_0002_000003.bmp", "", 0)]
    assert {e["dataset_name"] for p in meta["test"].values() for e in p} == {"visa"}


def test_visa_missing_csv_and_product(tmp_path, capsys):
    original = tmp_path / "original"
    build_visa(original, skip=("pcb4",))
    os.remove(original / "split_csv" / "1cls.csv")
    rc, out = run_convert(capsys, "--dataset", "visa", "--src_path", str(original),
                          "--dst_path", str(tmp_path / "data"))
    assert rc == 1 and out.err.count("error:") == 1 and "Traceback" not in out.err
    assert str(original / "pcb4") in out.err
    assert str(original / "split_csv" / "1cls.csv") in out.err
    assert not (tmp_path / "data").exists()


def test_visa_missing_files_listed(tmp_path):
    original = tmp_path / "original"
    build_visa(original)
    os.remove(original / "cashew/Data/Masks/Anomaly/000.png")
    os.remove(original / "fryum/Data/Images/Normal/0002.JPG")
    with pytest.raises(DataError) as info:
        convert("visa", original, tmp_path / "data", progress=False)
    assert len(info.value.problems) == 2
    assert str(original / "cashew/Data/Masks/Anomaly/000.png") in str(info.value)
    assert str(original / "fryum/Data/Images/Normal/0002.JPG") in str(info.value)
    assert not (tmp_path / "data").exists()


def test_visa_bad_csv_rows_listed(tmp_path):
    original = tmp_path / "original"
    build_visa(original)
    csv_path = original / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    kept = [lines[0]] + [ln for ln in lines[1:] if not ln.startswith("pcb1,")]
    kept.append("pcb9,test,normal,pcb9/Data/Images/Normal/0000.JPG,")
    kept.append("candle,val,normal,candle/Data/Images/Normal/0000.JPG,")
    csv_path.write_text("\n".join(kept) + "\n")
    with pytest.raises(DataError) as info:
        convert("visa", original, tmp_path / "data", progress=False)
    message = str(info.value)
    assert len(info.value.problems) == 3, message
    assert "no rows for product 'pcb1'" in message
    assert f"{csv_path} line {len(kept) - 1}: unknown object 'pcb9'" in message
    assert f"{csv_path} line {len(kept)}: expected split train or test, got 'val'" in message
    csv_path.write_text("object,split,label,image\n")
    with pytest.raises(DataError, match="missing column.*mask"):
        convert("visa", original, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- BTAD, MPDD

def build_btad(root: Path):
    """BTAD tree: 01, 02 with .png masks, 03 with 3-channel .bmp masks; expected outputs."""
    source, expected, index = Source(), {}, 0
    spec = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    for product in ["03", "01", "02"]:  # created unsorted; converted sorted
        ext, mask_ext = spec[product]
        for name in ["0001", "0000"]:
            source.image(root / product / "train" / "ok" / f"{name}{ext}", grey=False)
        good = source.image(root / product / "test" / "ok" / f"0000{ext}", grey=product == "02")
        bad = {}
        for name in ["0001", "0000"]:
            image = source.image(root / product / "test" / "ko" / f"{name}{ext}", grey=False)
            bad[name] = (image, source.mask(root / product / "ground_truth" / "ko" /
                                            f"{name}{mask_ext}", image, MASK_VALUES, 128,
                                            channels=3 if mask_ext == ".bmp" else 1))
        expected[product] = (ext, good, bad)
    out = {}
    for product in ["01", "02", "03"]:
        ext, good, bad = expected[product]
        for name in ["0000", "0001"]:
            out[f"btad/{product}/train/good/btad_{index:06d}.bmp"] = _reread(
                root / product / "train" / "ok" / f"{name}{ext}", grey=False)
            index += 1
        for name in ["0000", "0001"]:  # test/ko before test/ok
            out[f"btad/{product}/test/anomaly/btad_ko_{index:06d}.bmp"] = bad[name][0]
            out[f"btad/{product}/ground_truth/anomaly/btad_ko_{index:06d}.png"] = bad[name][1]
            index += 1
        out[f"btad/{product}/test/good/btad_good_{index:06d}.bmp"] = good
        index += 1
    return out


def test_btad_conversion_and_meta(tmp_path, capsys):
    expected = build_btad(tmp_path / "BTech_Dataset_transformed")
    data = tmp_path / "data"
    rc, out = run_convert(capsys, "--dataset", "btad", "--src_path",
                          str(tmp_path / "BTech_Dataset_transformed"), "--dst_path", str(data))
    assert rc == 0, out.err
    assert "btad/03/test/anomaly/btad_ko_000012.bmp" in expected  # 01: ids 0-4, 02: 5-9
    check_outputs(data, expected)
    assert run_meta(capsys, data, "btad")[0] == 0
    meta = load_meta(data, "btad")
    assert_meta_equal(meta, expected_meta("btad", ["01", "02", "03"], expected))
    assert meta["test"]["01"][0] == {
        "img_path": "btad/01/test/anomaly/btad_ko_000002.bmp",
        "mask_path": "btad/01/ground_truth/anomaly/btad_ko_000002.png",
        "cls_name": "01", "specie_name": "anomaly", "dataset_name": "btad", "anomaly": 1}


def test_mpdd_products_discovered_sorted(tmp_path, capsys):
    src, source = tmp_path / "MPDD", Source()
    for product in ["tubes", "bracket_black"]:
        source.image(src / product / "train" / "good" / "000.png", grey=False)
        image = source.image(src / product / "test" / "bent" / "000.png", grey=False)
        source.mask(src / product / "ground_truth" / "bent" / "000_mask.png", image, [0, 255], 128)
        source.image(src / product / "test" / "good" / "000.png", grey=False)
    (src / "readme.txt").write_text("not a product")
    data = tmp_path / "data"
    assert run_convert(capsys, "--dataset", "mpdd", "--src_path", str(src),
                       "--dst_path", str(data))[0] == 0
    assert files_under(data / "mpdd") == {
        "bracket_black/train/good/mpdd_000000.bmp",
        "bracket_black/test/anomaly/mpdd_bent_000001.bmp",
        "bracket_black/ground_truth/anomaly/mpdd_bent_000001.png",
        "bracket_black/test/good/mpdd_good_000002.bmp",
        "tubes/train/good/mpdd_000003.bmp",
        "tubes/test/anomaly/mpdd_bent_000004.bmp",
        "tubes/ground_truth/anomaly/mpdd_bent_000004.png",
        "tubes/test/good/mpdd_good_000005.bmp"}
    assert run_meta(capsys, data, "mpdd")[0] == 0
    assert list(load_meta(data, "mpdd")["test"]) == ["bracket_black", "tubes"]


# ----------------------------------------------------------------------------- plain folder

def build_folder(src: Path):
    """Two products (masks named <stem>.png and <stem>_mask.png); expected outputs."""
    source = Source()
    bolts_bad = source.image(src / "bolts" / "anomaly" / "b.png", grey=True)
    bolts_mask = source.mask(src / "bolts" / "masks" / "b_mask.png", bolts_bad, MASK_VALUES, 128)
    screws_good = [source.image(src / "screws" / "good" / n, grey=False)
                   for n in ["y.png", "x.png"]]
    screws_bad = source.image(src / "screws" / "anomaly" / "z.jpg", grey=False)
    screws_mask = source.mask(src / "screws" / "masks" / "z.png", screws_bad, [0, 255], 128)
    return {  # products sorted; per product anomaly/ then good/, images sorted
        "shop/bolts/test/anomaly/shop_anomaly_000000.bmp": bolts_bad,
        "shop/bolts/ground_truth/anomaly/shop_anomaly_000000.png": bolts_mask,
        "shop/screws/test/anomaly/shop_anomaly_000001.bmp": screws_bad,
        "shop/screws/ground_truth/anomaly/shop_anomaly_000001.png": screws_mask,
        "shop/screws/test/good/shop_good_000002.bmp": screws_good[1],  # x.png
        "shop/screws/test/good/shop_good_000003.bmp": screws_good[0],  # y.png
    }


def test_folder_conversion_and_meta(tmp_path, capsys):
    expected = build_folder(tmp_path / "photos")
    data = tmp_path / "data"
    rc, out = run_convert(capsys, "--dataset", "shop", "--layout", "folder",
                          "--src_path", str(tmp_path / "photos"), "--dst_path", str(data))
    assert rc == 0, out.err
    check_outputs(data, expected)
    assert (data / "shop/bolts/train/good").is_dir() and (data / "shop/bolts/test/good").is_dir()
    assert run_meta(capsys, data, "shop")[0] == 0
    meta = load_meta(data, "shop")
    assert_meta_equal(meta, expected_meta("shop", ["bolts", "screws"], expected))
    assert meta["train"] == {"bolts": [], "screws": []}


def test_folder_train_images_go_last_to_train_good(tmp_path, capsys):
    """An optional <product>/train/ (normal images, e.g. few-shot references) becomes train/good,
    after all test images, so the test images keep the names they have without it."""
    expected = build_folder(tmp_path / "photos")
    source = Source()
    bolts = source.image(tmp_path / "photos" / "bolts" / "train" / "c.png", grey=True)
    train = [source.image(tmp_path / "photos" / "screws" / "train" / n, grey=False)
             for n in ["b.png", "a.png"]]
    expected["shop/bolts/train/good/shop_000004.bmp"] = bolts
    expected["shop/screws/train/good/shop_000005.bmp"] = train[1]  # a.png
    expected["shop/screws/train/good/shop_000006.bmp"] = train[0]
    data = tmp_path / "data"
    assert run_convert(capsys, "--dataset", "shop", "--layout", "folder",
                       "--src_path", str(tmp_path / "photos"), "--dst_path", str(data))[0] == 0
    check_outputs(data, expected)
    assert run_meta(capsys, data, "shop")[0] == 0
    meta = load_meta(data, "shop")
    assert [e["img_path"] for e in meta["train"]["screws"]] == [
        "shop/screws/train/good/shop_000005.bmp", "shop/screws/train/good/shop_000006.bmp"]
    assert [e["img_path"] for e in meta["train"]["bolts"]] == [
        "shop/bolts/train/good/shop_000004.bmp"]


def test_folder_src_is_one_product(tmp_path, capsys):
    src, source = tmp_path / "widget", Source()
    good = source.image(src / "good" / "a.png", grey=True)
    data = tmp_path / "data"
    assert run_convert(capsys, "--dataset", "own", "--layout", "folder", "--src_path", str(src),
                       "--dst_path", str(data))[0] == 0
    check_outputs(data, {"own/widget/test/good/own_good_000000.bmp": good})


def test_folder_missing_mask(tmp_path, capsys):
    src, source = tmp_path / "photos", Source()
    bad = source.image(src / "p" / "anomaly" / "a.png", grey=False)
    source.image(src / "p" / "anomaly" / "b.png", grey=False)
    source.mask(src / "p" / "masks" / "a.png", bad, [255], 128)
    (src / "q" / "images").mkdir(parents=True)  # neither good/ nor anomaly/
    data = tmp_path / "data"
    rc, out = run_convert(capsys, "--dataset", "own", "--layout", "folder", "--src_path", str(src),
                          "--dst_path", str(data))
    assert rc == 1 and "2 problems" in out.err
    assert f"missing mask {src / 'p' / 'masks' / 'b'}" in out.err
    assert f"(of {src / 'p' / 'anomaly' / 'b.png'})" in out.err
    assert str(src / "q" / "good") in out.err
    assert not data.exists()
    (src / "q" / "images").rmdir()
    (src / "q").rmdir()
    assert run_convert(capsys, "--dataset", "own", "--layout", "folder", "--src_path", str(src),
                       "--dst_path", str(data), "--allow_missing_masks")[0] == 0
    np.testing.assert_array_equal(read(data / "own/p/ground_truth/anomaly/own_anomaly_000001.png"),
                                  0)


# ----------------------------------------------------------------------------- names, re-runs

def test_dataset_name_rules(tmp_path, capsys):
    expected = build_folder(tmp_path / "photos")
    data = tmp_path / "data"
    rc, out = run_convert(capsys, "--dataset", "my_shop", "--layout", "folder",
                          "--src_path", str(tmp_path / "photos"), "--dst_path", str(data))
    assert rc == 1 and "'my_shop'" in out.err and "no '_'" in out.err
    rc, out = run_convert(capsys, "--dataset", "shop", "--src_path", str(tmp_path / "photos"),
                          "--dst_path", str(data))
    assert rc == 1 and "--layout" in out.err
    rc, out = run_convert(capsys, "--dataset", "mvtec", "--layout", "folder",
                          "--src_path", str(tmp_path / "photos"), "--dst_path", str(data))
    assert rc == 1 and "'mvtec'" in out.err
    assert not data.exists()
    assert expected  # the source is untouched and still convertible
    assert run_convert(capsys, "--dataset", "shop", "--layout", "folder",
                       "--src_path", str(tmp_path / "photos"), "--dst_path", str(data))[0] == 0


def test_output_overlapping_source_refused(tmp_path, capsys):
    src, source = tmp_path / "data" / "own", Source()
    source.image(src / "good" / "a.png", grey=True)
    rc, out = run_convert(capsys, "--dataset", "own", "--layout", "folder", "--src_path", str(src),
                          "--dst_path", str(tmp_path / "data"))
    assert rc == 1 and "overlaps the source" in out.err
    assert (src / "good" / "a.png").is_file()


def test_rerun_replaces_and_failure_keeps_old(tmp_path, capsys):
    src = tmp_path / "photos"
    expected = build_folder(src)
    data = tmp_path / "data"
    args = ["--dataset", "shop", "--layout", "folder", "--src_path", str(src),
            "--dst_path", str(data)]
    assert run_convert(capsys, *args)[0] == 0
    (data / "shop" / "stale.txt").write_text("from an older run")
    assert run_convert(capsys, *args)[0] == 0
    assert files_under(data / "shop") == {k[len("shop/"):] for k in expected}
    # an undecodable image fails during writing: the old output stays, no temporary is left
    (src / "screws" / "good" / "x.png").write_bytes(b"not an image")
    rc, out = run_convert(capsys, *args)
    assert rc == 1 and f"cannot read image {src / 'screws' / 'good' / 'x.png'}" in out.err
    assert files_under(data / "shop") == {k[len("shop/"):] for k in expected}
    assert sorted(p.name for p in data.iterdir()) == ["shop"]


def test_meta_errors(tmp_path, capsys, mvtec):
    rc, out = run_meta(capsys, tmp_path, "mvtec")
    assert rc == 1 and str(tmp_path / "mvtec") in out.err and "Traceback" not in out.err
    data, _ = mvtec
    with pytest.raises(DataError, match="cable"):  # fixed product order: all required
        build_meta(_copy_without(data / "mvtec", tmp_path / "copy" / "mvtec", "cable"),
                             "mvtec")
    assert not (tmp_path / "copy" / "meta_mvtec.json").exists()


def _copy_without(src: Path, dst: Path, skip: str) -> Path:
    shutil.copytree(src, dst, ignore=lambda d, names: [skip] if Path(d) == src else [])
    return dst.parent


@pytest.mark.subprocess
def test_scripts_run_from_repo_root(tmp_path):
    """`python dataset/<script>.py` works from the repository root; errors exit 1, no traceback."""
    src, source = tmp_path / "widget", Source()
    source.image(src / "good" / "a.png", grey=True)
    data = tmp_path / "data"
    ok = subprocess.run([sys.executable, "dataset/make_dataset_new.py", "--dataset", "own",
                         "--layout", "folder", "--src_path", str(src), "--dst_path", str(data)],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    ok = subprocess.run([sys.executable, "dataset/make_meta.py", "--data_path", str(data),
                         "--dataset", "own"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_meta(data, "own")["test"]["widget"][0]["img_path"] == \
        "own/widget/test/good/own_good_000000.bmp"
    bad = subprocess.run([sys.executable, "dataset/make_dataset_new.py", "--dataset", "mvtec",
                          "--src_path", str(tmp_path / "nowhere"), "--dst_path", str(data)],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert str(tmp_path / "nowhere") in bad.stderr
