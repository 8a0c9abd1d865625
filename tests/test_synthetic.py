"""dataset/synthetic.py: the demo's data generator (deterministic, exact masks, folder layout)."""
import cv2
import numpy as np
import pytest
from PIL import Image

from dataset import synthetic
from dataset.make_dataset_new import convert
from dataset.make_meta import write_meta
from utils.data.dataset import AnomalyDataset

SIZE = 64
AUX, TARGET = ("brick", "coffee"), ("chelsea",)


def small(out, seed=0, **kw):
    args = dict(aux=AUX, target=TARGET, size=SIZE, n_good=2, n_anomalous=4, seed=seed,
                progress=False)
    args.update(kw)
    return synthetic.generate(out, **args)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return small(tmp_path_factory.mktemp("syn"))


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_other_seed_other_images(generated, tmp_path):
    again = small(tmp_path / "again")
    for a, b in zip(generated, again):
        assert files(a) == files(b)
    other = small(tmp_path / "other", seed=1)
    assert files(generated[0]) != files(other[0])


def test_a_product_does_not_depend_on_the_others(generated, tmp_path):
    alone = small(tmp_path / "alone", aux=("coffee",), target=("brick",))
    assert files(generated[0] / "coffee") == files(alone[0] / "coffee")


def test_folder_layout_and_binary_masks_exactly_for_anomalous_images(generated):
    aux, target = generated
    assert sorted(p.name for p in aux.iterdir()) == sorted(AUX)
    assert [p.name for p in target.iterdir()] == list(TARGET)
    for product in (*AUX, *TARGET):
        folder = (aux if product in AUX else target) / product
        good = sorted(p.name for p in (folder / "good").iterdir())
        anomalous = sorted(p.name for p in (folder / "anomaly").iterdir())
        masks = sorted(p.name for p in (folder / "masks").iterdir())
        assert len(good) == 2 and len(anomalous) == 4 and masks == anomalous
        for name in good:
            image = np.asarray(Image.open(folder / "good" / name))
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        for name in anomalous:
            mask = np.asarray(Image.open(folder / "masks" / name))
            assert mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) == {0, 255}  # non-empty, not everything, only 0/255
            kind = name[:-4].split("_", 1)[1]
            assert kind in synthetic.DEFECTS


@pytest.mark.parametrize("kind", synthetic.DEFECTS)
def test_a_defect_changes_the_image_inside_its_mask_only(kind):
    rng = np.random.default_rng(7)
    photo = synthetic.load_source("coffee")
    donor = synthetic.load_source("brick")
    for _ in range(5):
        normal = synthetic.normal_image(photo, synthetic.SOURCES["coffee"], 96, rng)
        image, mask = synthetic.add_defect(normal, kind, rng, donor)
        assert image.shape == normal.shape and image.dtype == np.uint8
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        changed = np.abs(image.astype(int) - normal.astype(int)).max(axis=2)
        near = cv2.dilate(mask, np.ones((2 * synthetic.EDGE + 3,) * 2, np.uint8)) > 0
        assert changed[~near].max(initial=0) == 0, "pixels changed away from the mask"
        assert changed[mask > 0].mean() >= synthetic.MIN_VISIBILITY - 1e-9, "defect hardly visible"


def test_defect_kinds_take_turns():
    kinds = [k for _, k, _, _ in synthetic.make_product("brick", 0, 8, 32, seed=3)]
    assert sorted(kinds) == sorted(synthetic.DEFECTS * 2)


def test_normal_images_of_a_product_look_alike_but_differ():
    rng = np.random.default_rng(0)
    photo = synthetic.load_source("brick")
    a, b = (synthetic.normal_image(photo, synthetic.SOURCES["brick"], SIZE, rng) for _ in range(2))
    assert not np.array_equal(a, b)
    assert abs(a.mean() - b.mean()) < 20


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="both groups"):
        small(tmp_path, aux=("brick",), target=("brick",))
    with pytest.raises(ValueError, match="unknown products"):
        small(tmp_path, target=("unicorn",))
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic.add_defect(np.zeros((32, 32, 3), np.uint8), "dent", np.random.default_rng(0))
    assert synthetic.main(["--out_path", str(tmp_path), "--aux", "brick",
                           "--target", "brick"]) == 1


def test_converts_to_the_standardized_layout_and_a_readable_meta_file(generated, tmp_path):
    data = tmp_path / "data"
    for name, root in zip(("demoaux", "demotarget"), generated):
        convert(name, root, data, layout="folder", progress=False)
        write_meta(data, name)
    aux = AnomalyDataset(data, "demoaux", "test", image_size=32)
    assert len(aux) == len(AUX) * 6
    target = AnomalyDataset(data, "demotarget", "test", image_size=32)
    assert len(target) == 6
    samples = [target[i] for i in range(len(target))]
    assert [s["product"] for s in samples] == ["chelsea"] * 6
    assert sorted(s["anomaly"] for s in samples) == [0, 0, 1, 1, 1, 1]
    for s in samples:
        assert s["image"].shape == (3, 32, 32)
        assert (s["mask"].sum() > 0) == bool(s["anomaly"])


def test_target_train_images_change_no_other_image(generated, tmp_path):
    """--target_n_train adds normal images under <target>/train/ only; the rest is unchanged."""
    roots = small(tmp_path / "t", target_n_train=3)
    before = {r.name: files(r) for r in generated}
    after = {r.name: files(r) for r in roots}
    added = {p for p in after["src_target"] if p.parts[1] == "train"}
    assert sorted(str(p) for p in added) == [f"chelsea/train/00{i}.png" for i in range(3)]
    assert {p: b for p, b in after["src_target"].items() if p not in added} == before["src_target"]
    assert after["src_aux"] == before["src_aux"]
