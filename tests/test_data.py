"""utils/data/dataset.py on a tiny standardized dataset built in a temporary folder (docs/reproduction.md
§1, §7, §9)."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

from utils.data.augment import Augment
from utils.errors import DataError
from utils.data.dataset import (CLIP_MEAN, CLIP_STD, AnomalyDataset, image_transform,
                        mask_transform, open_mask)

S = 28  # output side used by most tests (any size works; small keeps the tests fast)
MEAN = np.array(CLIP_MEAN, np.float32)
STD = np.array(CLIP_STD, np.float32)
TILE_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


# ---------------------------------------------------------------------------- independent oracle

def expected_image(path, size=S):
    """docs/reproduction.md §1 written directly with Pillow + numpy: bicubic resize, then RGB, then
    normalize."""
    with Image.open(path) as im:
        im = im.resize((size, size), Image.BICUBIC).convert("RGB")
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def expected_mask(path, size=S):
    """0/255 mask -> Pillow bilinear resize -> [0,1] -> > 0.5."""
    with Image.open(path) as im:
        m = (np.asarray(im.convert("L")) > 0).astype(np.uint8) * 255
    m = Image.fromarray(m).resize((size, size), Image.BILINEAR)
    return (np.asarray(m, dtype=np.float32) / 255.0 > 0.5).astype(np.float32)[None]


# ------------------------------------------------------------------------------- the toy dataset

def _rgb(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                     (xx + yy) * 255 // (h + w)], axis=-1)
    return np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _mask(h, w, box, soft=False):
    """A 0/255 ellipse; soft=True blurs it so the file has anti-aliased (intermediate) values."""
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).ellipse(box, fill=255)
    if soft:
        m = m.filter(ImageFilter.GaussianBlur(1.5))
    return m


def _entry(img, mask, product, anomaly):
    return {"img_path": img, "mask_path": mask, "cls_name": product, "specie_name": "",
            "dataset_name": "toy", "anomaly": anomaly}


def build_toy(root):
    """Products 'widget' (BMP RGB, PNG grey, RGBA PNG) and 'tiles' (3 anomalous flat colours)."""
    w = root / "toy" / "widget"
    t = root / "toy" / "tiles"
    for d in (w / "train/good", w / "test/good", w / "test/anomaly", w / "ground_truth/anomaly",
              t / "test/anomaly", t / "test/good", t / "ground_truth/anomaly"):
        d.mkdir(parents=True, exist_ok=True)
    h, wd = 30, 40  # non-square originals
    Image.fromarray(_rgb(h, wd, 0)).save(w / "train/good/toy_000000.bmp")
    Image.fromarray(_rgb(h, wd, 1)).save(w / "test/good/toy_good_000001.bmp")
    Image.fromarray(_rgb(h, wd, 2)).save(w / "test/anomaly/toy_scratch_000002.bmp")
    _mask(h, wd, (5, 4, 25, 20)).save(w / "ground_truth/anomaly/toy_scratch_000002.png")
    grey = Image.fromarray(_rgb(h, wd, 3)).convert("L")
    assert grey.mode == "L"
    grey.save(w / "test/anomaly/toy_scratch_000003.png")
    _mask(h, wd, (12, 6, 36, 27), soft=True).save(w / "ground_truth/anomaly/toy_scratch_000003.png")
    rgba = np.dstack([_rgb(h, wd, 4), np.tile(np.linspace(0, 255, wd).astype(np.uint8), (h, 1))])
    Image.fromarray(rgba).save(w / "test/anomaly/toy_dent_000004.png")  # alpha ramps 0..255
    _mask(h, wd, (0, 0, 10, 10)).save(w / "ground_truth/anomaly/toy_dent_000004.png")

    # 'tiles': 16x16 flat-colour anomalous images with distinct rectangular masks, one good image.
    tiles = []
    for k, colour in enumerate(TILE_COLOURS):
        name = f"toy_blob_{k + 5:06d}"
        Image.new("RGB", (16, 16), colour).save(t / f"test/anomaly/{name}.bmp")
        m = np.zeros((16, 16), np.uint8)
        m[k * 4:k * 4 + 5, 2 + k * 3:8 + k * 3] = 255
        Image.fromarray(m).save(t / f"ground_truth/anomaly/{name}.png")
        tiles.append(_entry(f"toy/tiles/test/anomaly/{name}.bmp",
                            f"toy/tiles/ground_truth/anomaly/{name}.png", "tiles", 1))
    Image.new("RGB", (16, 16), (90, 90, 90)).save(t / "test/good/toy_good_000008.bmp")
    tiles.append(_entry("toy/tiles/test/good/toy_good_000008.bmp", "", "tiles", 0))

    meta = {
        "train": {"widget": [_entry("toy/widget/train/good/toy_000000.bmp", "", "widget", 0)]},
        "test": {
            "widget": [
                _entry("toy/widget/test/anomaly/toy_dent_000004.png",
                       "toy/widget/ground_truth/anomaly/toy_dent_000004.png", "widget", 1),
                _entry("toy/widget/test/anomaly/toy_scratch_000002.bmp",
                       "toy/widget/ground_truth/anomaly/toy_scratch_000002.png", "widget", 1),
                _entry("toy/widget/test/anomaly/toy_scratch_000003.png",
                       "toy/widget/ground_truth/anomaly/toy_scratch_000003.png", "widget", 1),
                _entry("toy/widget/test/good/toy_good_000001.bmp", "", "widget", 0),
            ],
            "tiles": tiles,
        },
    }
    (root / "meta_toy.json").write_text(json.dumps(meta, indent=1))
    return meta


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    meta = build_toy(root)
    return root, meta


def _copy_toy(toy, tmp_path):
    root, _ = toy
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


# ------------------------------------------------------------------------------- preprocessing

def test_images_and_masks_match_independent_computation(toy):
    root, meta = toy
    ds = AnomalyDataset(root, "toy", products=["widget"], image_size=S)
    entries = meta["test"]["widget"]
    assert len(ds) == len(entries)
    for i, e in enumerate(entries):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, S, S)
        diff = np.abs(item["image"].numpy() - expected_image(root / e["img_path"])).max()
        assert diff < 1e-6, (e["img_path"], diff)
        if e["anomaly"]:
            want = expected_mask(root / e["mask_path"])
            assert np.array_equal(item["mask"].numpy(), want)
            assert 0 < want.sum() < S * S
        else:
            assert not item["mask"].any()
        assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
        assert item["product"] == "widget" and item["anomaly"] == e["anomaly"]
        assert item["path"] == e["img_path"] and item["index"] == i and item["mosaic"] is False


def test_mask_file_is_binarized_before_resizing(tmp_path):
    # The reference reads masks as (value > 0) * 255 before resizing: a faint mask is a full one.
    Image.new("L", (10, 8), 100).save(tmp_path / "faint.png")
    m = open_mask(tmp_path / "faint.png")
    assert m.mode == "L" and set(np.unique(np.asarray(m)).tolist()) == {255}
    assert mask_transform(6)(m).eq(1).all()


def test_resize_then_rgb_order(toy):
    """The reference's order (resize, crop, then RGB) is kept; it matters only for some modes."""
    root, _ = toy
    tf = image_transform(S)

    def convert_first(im):
        return tf(im.convert("RGB"))

    # Grey: bicubic is per channel and L -> RGB copies the channel, so the order is irrelevant.
    grey = Image.open(root / "toy/widget/test/anomaly/toy_scratch_000003.png")
    assert torch.equal(tf(grey), convert_first(grey))
    # RGBA with varying alpha: Pillow resizes with premultiplied alpha, so the order matters.
    rgba = Image.open(root / "toy/widget/test/anomaly/toy_dent_000004.png")
    assert rgba.mode == "RGBA"
    assert not torch.allclose(tf(rgba), convert_first(rgba), atol=1e-3)
    # Palette images are resized with nearest neighbour whatever filter is asked.
    pal = Image.fromarray(_rgb(30, 40, 9)).convert("P")
    assert not torch.allclose(tf(pal), convert_first(pal), atol=1e-3)
    near = np.asarray(pal.resize((S, S), Image.NEAREST).convert("RGB"), np.float32) / 255.0
    assert np.abs(tf(pal).numpy() - ((near - MEAN) / STD).transpose(2, 0, 1)).max() < 1e-6


def test_other_image_sizes(toy):
    root, meta = toy
    e = meta["test"]["widget"][1]
    for size in (14, 37):
        item = AnomalyDataset(root, "toy", products="widget", image_size=size)[1]
        assert item["image"].shape == (3, size, size) and item["mask"].shape == (1, size, size)
        assert np.abs(item["image"].numpy() - expected_image(root / e["img_path"], size)).max() < 1e-6


# ------------------------------------------------------------------------- selection and layout

def test_products_order_ranges_and_train_split(toy):
    root, _ = toy
    ds = AnomalyDataset(root, "toy", image_size=S)
    assert ds.products == ["widget", "tiles"]  # meta-file order
    assert ds.product_ranges == {"widget": range(0, 4), "tiles": range(4, 8)}
    assert [ds[i]["product"] for i in range(len(ds))] == ["widget"] * 4 + ["tiles"] * 4
    # Requested order does not change the meta order; duplicates collapse; a str is accepted.
    assert AnomalyDataset(root, "toy", products=["tiles", "widget", "tiles"]).products == \
        ["widget", "tiles"]
    assert len(AnomalyDataset(root, "toy", products="tiles", image_size=S)) == 4
    train = AnomalyDataset(root, "toy", split="train", image_size=S)
    assert train.products == ["widget"] and len(train) == 1 and train[0]["anomaly"] == 0


def test_default_collate_batches(toy):
    root, _ = toy
    batch = next(iter(DataLoader(AnomalyDataset(root, "toy", image_size=S), batch_size=3)))
    assert batch["image"].shape == (3, 3, S, S) and batch["mask"].shape == (3, 1, S, S)
    assert batch["product"] == ["widget"] * 3 and batch["anomaly"].tolist() == [1, 1, 1]
    assert batch["index"].tolist() == [0, 1, 2]


def test_test_time_loading_does_not_touch_torch_rng(toy):
    root, _ = toy
    ds = AnomalyDataset(root, "toy", image_size=S)
    torch.manual_seed(5)
    ref = torch.rand(3)
    torch.manual_seed(5)
    ds[0], ds[5]
    assert torch.equal(torch.rand(3), ref)


# ---------------------------------------------------------------------------------- the errors

def test_missing_meta_file(tmp_path):
    with pytest.raises(DataError) as exc:
        AnomalyDataset(tmp_path, "mvtec")
    msg = str(exc.value)
    assert str(tmp_path / "meta_mvtec.json") in msg
    assert f"python dataset/make_meta.py --data_path {tmp_path} --dataset mvtec" in msg
    with pytest.raises(DataError, match="does not exist"):
        AnomalyDataset(tmp_path / "nowhere", "visa")


@pytest.mark.parametrize("content,pattern", [
    ("{not json", r"not valid JSON"),
    ('["a"]', r"top level must be an object"),
    ('{"train": {}}', r"missing key 'test'"),
    ('{"train": {}, "test": {"p": {}}}', r"\['test'\]\['p'\] must be a list"),
    ('{"train": {}, "test": {"p": [{"img_path": "x.bmp", "mask_path": "", "cls_name": "p"}]}}',
     r"\['test'\]\['p'\]\[0\]: missing key 'anomaly'"),
    ('{"train": {}, "test": {"p": [{"img_path": "x.bmp", "mask_path": "", "cls_name": "q", '
     '"anomaly": 0}]}}', r"'cls_name' is 'q'"),
    ('{"train": {}, "test": {"p": [{"img_path": "x.bmp", "mask_path": "", "cls_name": "p", '
     '"anomaly": 2}]}}', r"'anomaly' must be 0 or 1"),
    ('{"train": {}, "test": {}}', r"split 'test' has no entries"),
])
def test_malformed_meta(tmp_path, content, pattern):
    (tmp_path / "meta_bad.json").write_text(content)
    with pytest.raises(DataError, match=pattern) as exc:
        AnomalyDataset(tmp_path, "bad")
    if "JSON" in pattern or "key" in pattern or "list" in pattern:
        assert "meta_bad.json" in str(exc.value)


def test_unknown_and_empty_products(toy):
    root, _ = toy
    with pytest.raises(DataError) as exc:
        AnomalyDataset(root, "toy", products=["widget", "bolt", "nut"])
    msg = str(exc.value)
    assert "'bolt'" in msg and "'nut'" in msg and "available: ['widget', 'tiles']" in msg
    with pytest.raises(DataError, match="not in split 'train'"):
        AnomalyDataset(root, "toy", split="train", products=["tiles"])
    with pytest.raises(DataError, match="split must be"):
        AnomalyDataset(root, "toy", split="val")


def test_missing_files_are_listed(toy, tmp_path):
    root = _copy_toy(toy, tmp_path)
    meta = json.loads((root / "meta_toy.json").read_text())
    extra = [_entry(f"toy/widget/test/anomaly/gone_{k:02d}.bmp",
                    f"toy/widget/ground_truth/anomaly/gone_{k:02d}.png", "widget", 1)
             for k in range(6)]
    meta["test"]["widget"].extend(extra)  # 12 missing files: 6 images + 6 masks
    (root / "meta_toy.json").write_text(json.dumps(meta))
    (root / "toy/tiles/ground_truth/anomaly/toy_blob_000006.png").unlink()  # 13th
    with pytest.raises(DataError) as exc:
        AnomalyDataset(root, "toy")
    msg = str(exc.value)
    assert msg.startswith("13 file(s) listed in") and "meta_toy.json" in msg
    assert "toy/widget/test/anomaly/gone_00.bmp" in msg and "gone_00.png" in msg
    assert msg.count("\n  toy/") == 10 and "... and 3 more" in msg


def test_only_selected_products_are_checked(toy, tmp_path):
    root = _copy_toy(toy, tmp_path)
    (root / "toy/tiles/test/anomaly/toy_blob_000005.bmp").unlink()
    assert len(AnomalyDataset(root, "toy", products=["widget"], image_size=S)) == 4
    with pytest.raises(DataError, match=re.escape("toy/tiles/test/anomaly/toy_blob_000005.bmp")):
        AnomalyDataset(root, "toy", products=["tiles"])


# ------------------------------------------------------------------------------------- training

def _quadrants(arr):  # [C, 2h, 2w] -> four [C, h, w] in row-major tile order
    h, w = arr.shape[1] // 2, arr.shape[2] // 2
    return [arr[:, :h, :w], arr[:, :h, w:], arr[:, h:, :w], arr[:, h:, w:]]


def test_mosaic_tiles_images_and_masks_identically(toy):
    root, meta = toy
    # 16x16 tiles -> 32x32 canvas; with S = 32 the final resize is the identity, so each
    # quadrant must be exactly one tile, and the mask quadrant that tile's mask.
    ds = AnomalyDataset(root, "toy", products=["tiles"], image_size=32, mosaic_rate=1.0)
    colours = [((np.array(c, np.float32) / 255.0 - MEAN) / STD) for c in TILE_COLOURS]
    tile_masks = [np.asarray(Image.open(root / e["mask_path"])) > 0
                  for e in meta["test"]["tiles"][:3]]
    seen = set()
    torch.manual_seed(0)
    for trial in range(6):
        for i in range(len(ds)):  # also the good entry: a mosaic is made of anomalous images
            item = ds[i]
            assert item["mosaic"] is True and item["anomaly"] == 1
            assert item["path"] == meta["test"]["tiles"][i]["img_path"] and item["index"] == i
            for q_img, q_mask in zip(_quadrants(item["image"].numpy()),
                                     _quadrants(item["mask"].numpy())):
                k = int(np.argmin([np.abs(q_img - c[:, None, None]).max() for c in colours]))
                assert np.abs(q_img - colours[k][:, None, None]).max() < 1e-6
                assert np.array_equal(q_mask[0] > 0.5, tile_masks[k])
                seen.add(k)
    assert seen == {0, 1, 2}


def test_mosaic_rate_and_products_without_anomalies(toy):
    root, _ = toy
    ds = AnomalyDataset(root, "toy", products=["tiles"], image_size=16, mosaic_rate=0.5)
    torch.manual_seed(1)
    flags = [ds[i % len(ds)]["mosaic"] for i in range(80)]
    assert 20 < sum(flags) < 60
    train = AnomalyDataset(root, "toy", split="train", image_size=16, mosaic_rate=1.0)
    assert train[0]["mosaic"] is False  # no anomalous image to tile


def _collect(ds, seed, num_workers):
    torch.manual_seed(seed)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=num_workers)
    return [(b["image"].clone(), b["mask"].clone(), b["index"].clone()) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_augmented_batches_deterministic_under_seed(toy):
    root, _ = toy
    ds = AnomalyDataset(root, "toy", image_size=S, augment=Augment(), mosaic_rate=0.5)
    first = _collect(ds, 333, 0)
    assert _same(first, _collect(ds, 333, 0))
    assert not _same(first, _collect(ds, 334, 0))
    # The samples are really augmented (not only shuffled): compare with the plain dataset.
    plain = AnomalyDataset(root, "toy", image_size=S)
    aug_by_index = {int(i): img for imgs, _, idx in first for img, i in zip(imgs, idx)}
    assert any(not torch.equal(aug_by_index[i], plain[i]["image"]) for i in aug_by_index)
    # Masks stay binary through augmentation and mosaics.
    assert all(set(torch.unique(m).tolist()) <= {0.0, 1.0} for _, m, _ in first)


def test_augmented_batches_deterministic_with_workers(toy):
    root, _ = toy
    ds = AnomalyDataset(root, "toy", image_size=S, augment=Augment(), mosaic_rate=0.5)
    a = _collect(ds, 7, 2)
    assert _same(a, _collect(ds, 7, 2))
    # Another global seed gives other batches.
    assert not _same(a, _collect(ds, 8, 2))


def test_augmented_sample_matches_manual_pipeline(toy):
    """augment runs on the original-size RGB image and {0,255} mask, before preprocessing."""
    root, meta = toy
    calls = []

    def spy(image, mask, rng):
        calls.append((image.shape, image.dtype, mask.shape, mask.dtype, set(np.unique(mask))))
        return image[::-1].copy(), mask[::-1].copy()  # a vertical flip

    ds = AnomalyDataset(root, "toy", products=["widget"], image_size=S, augment=spy)
    item = ds[1]
    assert calls[0][:4] == ((30, 40, 3), np.uint8, (30, 40), np.uint8)
    assert calls[0][4] <= {0, 255}
    e = meta["test"]["widget"][1]
    img = Image.open(root / e["img_path"]).convert("RGB").transpose(Image.FLIP_TOP_BOTTOM)
    assert torch.equal(item["image"], image_transform(S)(img))
    m = open_mask(root / e["mask_path"]).transpose(Image.FLIP_TOP_BOTTOM)
    assert torch.equal(item["mask"], mask_transform(S)(m))
    good = ds[3]  # a good image is augmented with an all-zero mask and keeps a zero mask
    assert calls[-1][4] == {0} and not good["mask"].any()


def test_seeded_samples_depend_on_seed_epoch_and_index_only(toy):
    """After seed_samples, a sample's augmentation is a function of (seed, epoch, index): the
    same whatever torch's RNG holds and in whatever order or worker it is loaded."""
    root, _ = toy
    ds = AnomalyDataset(root, "toy", image_size=S, augment=Augment(), mosaic_rate=0.5)
    ds.seed_samples(333, 1)
    torch.manual_seed(0)
    first = [ds[i]["image"] for i in range(len(ds))]
    torch.manual_seed(1)
    backwards = [ds[i]["image"] for i in reversed(range(len(ds)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    in_workers = _collect(ds, 5, 2)
    assert all(torch.equal(img, first[i]) for imgs, _, idx in in_workers
               for img, i in zip(imgs, idx.tolist()))
    ds.seed_samples(333, 2)  # another epoch draws again
    assert not all(torch.equal(ds[i]["image"], first[i]) for i in range(len(ds)))
