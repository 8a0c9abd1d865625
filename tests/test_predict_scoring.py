"""predict.py --reference and --mutual: folder by folder, against a per-image oracle."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from model import build_vcp_clip, checkpoint_configs, read_checkpoint
from model.patch_scoring import reference_memory, score_map
from test_musc import naive_lnamd, naive_msm, naive_rscin
from test_patch_scoring import naive_reference
from utils.data.dataset import image_transform
from utils.evaluation.metrics import image_scores, smoothed_blend
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


@pytest.fixture()
def crowds(tmp_path):
    """Folders c/ (5 images, the fewest that MuSc's fraction 0.3 scores) and d/ (6 images)."""
    rng = np.random.default_rng(4)
    folders = []
    for folder, count in (("c", 5), ("d", 6)):
        (tmp_path / folder).mkdir()
        folders.append([tmp_path / folder / f"{folder}{i}.png" for i in range(count)])
        for path in folders[-1]:
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return folders


def run(tmp_path, archive, checkpoint, *args):
    return predict.main([*map(str, args), "--checkpoint_path", str(checkpoint),
                         "--pretrained_path", str(archive), "--save_path", str(tmp_path / "out"),
                         "--device", "cpu", "--num_workers", "0", "--batch_size", "1",
                         "--save_maps"])


def oracle(archive, checkpoint, folders, scores_of, fusion, image_scores_of=None):
    """Per folder: the model per image, scores_of(per-layer [N,L,W] tokens, model) -> [N,L]
    (with image_scores_of: of the images' outputs), fused; image_scores_of(fused raw, fused new,
    outputs) -> [N] (None: the top-k score)."""
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint)
    expected = {}
    for paths in folders:
        raw, new, outputs = [], [], []
        for path in paths:
            with torch.no_grad():
                maps = model(image_transform(56)(Image.open(path).convert("RGB"))[None])
            r, n = maps.abnormal()
            raw.append(r[0].numpy()), new.append(n[0].numpy()), outputs.append(maps)
        layers = [torch.stack([o.patch_tokens[k][0] for o in outputs])
                  for k in range(len(outputs[0].patch_tokens))]
        patch = score_map(scores_of(outputs if image_scores_of else layers, model), 56).numpy()
        raw, new = fuse_maps(np.stack(raw), np.stack(new), patch, fusion)
        scores = (image_scores_of(raw, new, outputs) if image_scores_of
                  else image_scores(raw, new))
        for path, amap, score in zip(paths, smoothed_blend(raw, new), scores):
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


def test_reference_coreset_per_folder(tmp_path, photos, tiny_archive, tiny_checkpoint):
    """--coreset 0.25: each layer's memory is the naive greedy loop's 8 of the 2 x 16 patches."""
    from test_coreset import naive_coreset
    assert run(tmp_path, tiny_archive, tiny_checkpoint, photos / "b", "--reference",
               photos / "good", "--coreset", "0.25", "--fusion", "geometric") == 0
    cfg = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    model = build_vcp_clip(tiny_archive, cfg, checkpoint=tiny_checkpoint)
    with torch.no_grad():  # one reference at a time, as predict.py reads them (--batch_size 1)
        refs = [model(image_transform(56)(Image.open(photos / "good" / f"{n}.png"))[None])
                .patch_tokens for n in ("r1", "r2")]
    memory = [torch.cat([r[k][0] for r in refs]) for k in range(len(refs[0]))]  # [32, W]
    kept = [m[naive_coreset(m, 8)][None] for m in memory]  # [1, 8, W]

    def reference_scores(layers, model):
        return naive_reference(layers, kept)

    folders = [[photos / "b" / f"{n}.png" for n in "45"]]
    check_outputs(tmp_path / "out", oracle(tiny_archive, tiny_checkpoint, folders,
                                           reference_scores, "geometric"))


def naive_musc(outputs, model):
    """MuSc's patch scores with the naive loops (LNAMD per image, MSM per patch), r 1 3 5."""
    layers = [torch.stack([o.raw_tokens[k][0] for o in outputs]).double()
              for k in range(len(outputs[0].raw_tokens))]
    return sum(naive_msm(naive_lnamd(t, r), 0.3) for t in layers for r in (1, 3, 5)) / (
        3 * len(layers))


def naive_rscin_scores(raw, new, outputs):
    scores = [float((0.2 * r + 0.8 * n).max()) for r, n in zip(raw, new)]
    embeddings = torch.cat([o.image_features for o in outputs]).double()
    return naive_rscin(scores, embeddings, [1, 2, 3]).numpy()


def test_mutual_is_musc_per_folder(tmp_path, crowds, tiny_archive, tiny_checkpoint):
    """MuSc's defaults (fraction 0.3, r 1 3 5, RsCIN 1 2 3); one image per batch, as the
    oracle runs them, so that the maps can be compared closely."""
    assert run(tmp_path, tiny_archive, tiny_checkpoint, *(p.parent for p in
                                                          (crowds[0][0], crowds[1][0])),
               "--mutual") == 0
    expected = oracle(tiny_archive, tiny_checkpoint, crowds, naive_musc, "sum",
                      naive_rscin_scores)
    check_outputs(tmp_path / "out", expected)
    scores = [expected[p.stem][1] for p in crowds[1]]
    assert 0 <= min(scores) and max(scores) <= 1  # RsCIN's: relative to the folder


def test_bad_scoring_flags(tmp_path, photos, tiny_archive, tiny_checkpoint, capsys):
    (tmp_path / "lone").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "lone" / "x.png")
    for args, words in [((photos / "a", photos / "lone", "--mutual"),
                         ["--mutual_fraction 0.3: ", "at least 5 images in each folder",
                          "a (4), ", "lone (1)"]),
                        ((photos / "a", "--mutual", "--mutual_fraction", "1.0", "--rscin", "0"),
                         ["--rscin"]),
                        ((photos / "a", "--reference", photos / "good", "--coreset", "2"),
                         ["--coreset", "(0, 1]"]),
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
               "--mutual", "--mutual_fraction", "1.0") == 0  # k = N - 1: 2 images are enough
    err = capsys.readouterr().err
    assert "x.png: mutual scoring needs 2 readable images in its folder, it has 1" in err
    assert "y.png: cannot read it (" in err
    assert sorted(p.stem for p in (tmp_path / "out" / "overlays").iterdir()) == ["4", "5"]
