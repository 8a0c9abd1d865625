"""predict.py --reference and --mutual: folder by folder, against a per-image oracle."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from model import build_vcp_clip, checkpoint_configs, read_checkpoint
from model.patch_scoring import reference_memory, score_map
from test_patch_scoring import naive_mutual, naive_reference
from utils.data import image_transform
from utils.metrics import image_scores, smoothed_blend
from utils.scoring import fuse_maps


@pytest.fixture()
def photos(tmp_path):
    """Folders a/ (3 images, one corrupt file) and b/ (2 images), and good/ (2 references)."""
    rng = np.random.default_rng(3)
    for folder, names in (("a", ["1", "2", "3"]), ("b", ["4", "5"]), ("good", ["r1", "r2"])):
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{name}.png")
    (tmp_path / "a" / "0_corrupt.png").write_bytes(b"not an image")
    return tmp_path


def run(tmp_path, archive, checkpoint, *args):
    return predict.main([*map(str, args), "--checkpoint_path", str(checkpoint),
                         "--pretrained_path", str(archive), "--save_path", str(tmp_path / "out"),
                         "--device", "cpu", "--num_workers", "0", "--batch_size", "1",
                         "--save_maps"])


def oracle(archive, checkpoint, folders, scores_of, fusion):
    """Per folder: the model per image, scores_of(per-layer [N,L,W] tokens) -> [N,L], fused."""
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint)
    expected = {}
    for paths in folders:
        raw, new, tokens = [], [], []
        for path in paths:
            with torch.no_grad():
                maps = model(image_transform(56)(Image.open(path).convert("RGB"))[None])
            r, n = maps.abnormal()
            raw.append(r[0].numpy()), new.append(n[0].numpy())
            tokens.append([t[0] for t in maps.patch_tokens])
        layers = [torch.stack([t[k] for t in tokens]) for k in range(len(tokens[0]))]
        patch = score_map(scores_of(layers, model), 56).numpy()
        raw, new = fuse_maps(np.stack(raw), np.stack(new), patch, fusion)
        for path, amap, score in zip(paths, smoothed_blend(raw, new), image_scores(raw, new)):
            expected[path.stem] = (amap, score)
    return expected


def check_outputs(out, expected):
    with open(out / "scores.csv") as f:
        rows = {r["path"].rsplit("/", 1)[1][:-4]: float(r["image_score"]) for r in csv.DictReader(f)}
    assert set(rows) == set(expected)
    for stem, (amap, score) in expected.items():
        np.testing.assert_allclose(np.load(out / "maps" / f"{stem}.npy"), amap, rtol=1e-5,
                                   atol=1e-5, err_msg=stem)
        assert rows[stem] == pytest.approx(float(score), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("fusion", ["sum", "geometric"])
def test_reference_maps_per_folder(tmp_path, photos, tiny_archive, tiny_checkpoint, fusion,
                                   capsys):
    code = run(tmp_path, tiny_archive, tiny_checkpoint, photos / "a", photos / "b" / "*.png",
               "--reference", photos / "good", "--fusion", fusion)
    assert code == 0 and "0_corrupt.png" in capsys.readouterr().err
    cfg = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    model = build_vcp_clip(tiny_archive, cfg, checkpoint=tiny_checkpoint)
    refs = torch.stack([image_transform(56)(Image.open(photos / "good" / f"{n}.png"))
                        for n in ("r1", "r2")])
    with torch.no_grad():
        memory = model(refs).patch_tokens  # per layer [2, L, W]

    def reference_scores(layers, model):
        return naive_reference(layers, memory)

    folders = [[photos / "a" / f"{n}.png" for n in "123"], [photos / "b" / f"{n}.png" for n in "45"]]
    check_outputs(tmp_path / "out", oracle(tiny_archive, tiny_checkpoint, folders,
                                           reference_scores, fusion))
    assert reference_memory(memory)[0].shape == (2 * 16, 128)


def test_mutual_maps_per_folder(tmp_path, photos, tiny_archive, tiny_checkpoint):
    assert run(tmp_path, tiny_archive, tiny_checkpoint, photos / "a", photos / "b",
               "--mutual", "--mutual_fraction", "0.5") == 0
    folders = [[photos / "a" / f"{n}.png" for n in "123"], [photos / "b" / f"{n}.png" for n in "45"]]
    expected = oracle(tiny_archive, tiny_checkpoint, folders,
                      lambda layers, model: naive_mutual(layers, 0.5), "sum")
    check_outputs(tmp_path / "out", expected)


def test_bad_scoring_flags(tmp_path, photos, tiny_archive, tiny_checkpoint, capsys):
    (tmp_path / "lone").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "lone" / "x.png")
    for args, words in [((photos / "a", photos / "lone", "--mutual"), ["one image", "lone"]),
                        ((photos / "a", "--mutual", "--reference", photos / "good"),
                         ["choose one"]),
                        ((photos / "a", "--reference", tmp_path / "none*.png"), ["none*.png"]),
                        ((photos / "a", "--reference", photos / "a" / "0_corrupt.png"),
                         ["reference image", "0_corrupt.png"])]:
        assert run(tmp_path, tiny_archive, tiny_checkpoint, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        for word in words:
            assert word in err, (args, err)


def test_mutual_skips_the_only_readable_image_of_a_folder(tmp_path, photos, tiny_archive,
                                                          tiny_checkpoint, capsys):
    (tmp_path / "pair").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "pair" / "x.png")
    (tmp_path / "pair" / "y.png").write_bytes(b"not an image")
    assert run(tmp_path, tiny_archive, tiny_checkpoint, photos / "b", tmp_path / "pair",
               "--mutual") == 0
    err = capsys.readouterr().err
    assert "x.png: mutual scoring needs another readable image in its folder" in err
    assert "y.png: cannot read it (" in err
    assert sorted(p.stem for p in (tmp_path / "out" / "overlays").iterdir()) == ["4", "5"]
