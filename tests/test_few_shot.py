"""test.py --k_shot and --mutual end to end, against a per-image run with naive patch scoring."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test as test_script
from helpers.naive_metrics import naive_evaluate_product
from model import build_vcp_clip, checkpoint_configs, read_checkpoint
from test_patch_scoring import naive_mutual, naive_reference
from utils.data import AnomalyDataset, choose_references
from utils.scoring import fuse_maps


@pytest.fixture(scope="module")
def shots_data(tmp_path_factory):
    """meta_toy.json with 2 products of 3 normal + 3 anomalous test images and 3 train images
    (cube) or 1 (disc), through the folder layout's train/ folder."""
    from conftest import make_folder_source
    from dataset.make_dataset_new import convert
    from dataset.make_meta import write_meta

    base = tmp_path_factory.mktemp("shots")
    src = make_folder_source(base / "src", {"cube": (3, 3), "disc": (3, 3)})
    spare = make_folder_source(base / "spare", {"cube": (3, 0), "disc": (1, 0)}, seed=1)
    for product in ("cube", "disc"):
        shutil.copytree(spare / product / "good", src / product / "train")
    convert("toy", src, base / "root", layout="folder", progress=False)
    write_meta(base / "root", "toy")
    return base / "root"


def run(tmp_path, data, archive, checkpoint, *extra, batch_size=4):
    argv = ["--data_path", str(data), "--dataset", "toy", "--checkpoint_path", str(checkpoint),
            "--pretrained_path", str(archive), "--model", "tiny", "--save_path",
            str(tmp_path / "out"), "--device", "cpu", "--num_workers", "0", "--batch_size",
            str(batch_size), "--no_vis", *extra]
    return test_script.main(argv), tmp_path / "out"


def per_image_oracle(data_root, archive, checkpoint, patch_maps, fusion):
    """The model on one image at a time; patch_maps(product, tokens per image) -> [N, L] scores;
    bilinear upsampling, fusion per branch, naive metrics."""
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint)
    data = AnomalyDataset(data_root, "toy", "test", image_size=cfg.image_size)
    rows = {}
    for product, indices in data.product_ranges.items():
        raw, new, tokens, masks, labels = [], [], [], [], []
        for i in indices:
            item = data[i]
            with torch.no_grad():
                maps = model(item["image"][None])
            r, n = maps.abnormal()
            raw.append(r[0].numpy()), new.append(n[0].numpy())
            tokens.append([t[0] for t in maps.patch_tokens])
            masks.append(item["mask"][0].numpy() > 0.5), labels.append(item["anomaly"])
        scores = patch_maps(product, tokens, model)  # [N, L]
        side = int(math.isqrt(scores.shape[1]))
        patch = F.interpolate(scores.view(-1, 1, side, side).float(), size=cfg.image_size,
                              mode="bilinear", align_corners=True)[:, 0].numpy()
        raw, new = fuse_maps(np.stack(raw), np.stack(new), patch, fusion)
        rows[product] = naive_evaluate_product(raw, new, np.stack(masks), np.array(labels))
    return rows


def assert_rows_close(got, expected):
    for product, row in expected.items():
        for key, value in row.items():
            assert math.isclose(got[product][key], value, abs_tol=1e-5), (product, key)


# "sum" divides the random model's nearly constant zero-shot maps by their tiny spread, which
# magnifies the ~1e-7 differences between a batched and a per-image forward: one image per batch
# there. Batches of 3 and 4 mix the two products (6 test images each).
@pytest.mark.parametrize("fusion,batch_size", [("sum", 1), ("geometric", 4), ("alone", 3)])
def test_k_shot_equals_a_per_image_run_with_naive_scores(tmp_path, shots_data, tiny_archive,
                                                         tiny_checkpoint, fusion, batch_size):
    code, out = run(tmp_path, shots_data, tiny_archive, tiny_checkpoint, "--k_shot", "1",
                    "--fusion", fusion, batch_size=batch_size)
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    references = result["scoring"]["references"]
    assert references == choose_references(shots_data, "toy", ["cube", "disc"], 1, 111)
    assert references["disc"] == ["toy/disc/train/good/toy_000015.bmp"]  # its only one (after cube's 3)
    assert "toy/cube/train/good/" in (out / "log.txt").read_text()  # listed in the log too
    cfg = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    train = AnomalyDataset(shots_data, "toy", "train", image_size=cfg.image_size)
    by_path = {train[i]["path"]: train[i]["image"] for i in range(len(train))}

    def reference_scores(product, tokens, model):
        with torch.no_grad():
            refs = model(torch.stack([by_path[p] for p in references[product]])).patch_tokens
        layers = [torch.stack([t[k] for t in tokens]) for k in range(len(refs))]
        return naive_reference(layers, refs)

    expected = per_image_oracle(shots_data, tiny_archive, tiny_checkpoint, reference_scores, fusion)
    assert_rows_close(result["products"], expected)


def test_mutual_equals_a_per_image_run_with_naive_scores(tmp_path, shots_data, tiny_archive,
                                                         tiny_checkpoint):
    code, out = run(tmp_path, shots_data, tiny_archive, tiny_checkpoint, "--mutual",
                    "--mutual_fraction", "0.5", "--fusion", "geometric")
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["scoring"] == {"mutual": True, "fusion": "geometric", "fraction": 0.5}

    def mutual_scores(product, tokens, model):
        layers = [torch.stack([t[k] for t in tokens]) for k in range(len(tokens[0]))]
        return naive_mutual(layers, 0.5)

    expected = per_image_oracle(shots_data, tiny_archive, tiny_checkpoint, mutual_scores,
                                "geometric")
    assert_rows_close(result["products"], expected)


def test_alone_fusion_ignores_the_zero_shot_maps(tmp_path, shots_data, tiny_archive,
                                                 tiny_checkpoint, tiny_vcp_cfg):
    """--fusion alone: the metrics are those of the reference map, whatever the VCP weights."""
    from model import VCPCLIP, load_clip, save_checkpoint
    torch.manual_seed(5)
    other = tmp_path / "other.pth"
    save_checkpoint(VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg), other)
    results = {}
    for extra in ([], ["--k_shot", "1", "--fusion", "alone"]):
        for i, checkpoint in enumerate((tiny_checkpoint, other)):
            code, out = run(tmp_path / f"{i}{len(extra)}", shots_data, tiny_archive, checkpoint,
                            *extra)
            assert code == 0
            results[i, bool(extra)] = json.loads((out / "metrics.json").read_text())["products"]
    assert results[0, False]["cube"]["auroc_px"] != results[1, False]["cube"]["auroc_px"]
    assert_rows_close(results[1, True], results[0, True])


def test_bad_scoring_flags_fail_before_model_work(tmp_path, shots_data, tiny_archive,
                                                  tiny_checkpoint, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be built")
    monkeypatch.setattr(test_script, "load_model", no_model)
    for extra, words in [(["--k_shot", "2"], ["--k_shot 2", "'disc'", "1 normal images",
                                              "meta_toy.json"]),
                         (["--k_shot", "1", "--mutual"], ["--k_shot and --mutual"]),
                         (["--k_shot", "-1"], ["--k_shot", "integer >= 0"]),
                         (["--mutual", "--mutual_fraction", "0"], ["--mutual_fraction"])]:
        try:
            code, _ = run(tmp_path, shots_data, tiny_archive, tiny_checkpoint, *extra)
        except SystemExit as e:  # argparse's errors exit from parse_args
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err
        for word in words:
            assert word in err, (extra, err)


def test_table_script_prints_one_row_per_mode(shots_data, tiny_archive, tiny_checkpoint, capsys):
    from bench import few_shot_table
    assert few_shot_table.main(
        ["--shots", "1", "--fusions", "sum", "alone", "--data_path", str(shots_data),
         "--dataset", "toy", "--checkpoint_path", str(tiny_checkpoint), "--pretrained_path",
         str(tiny_archive), "--model", "tiny", "--device", "cpu", "--num_workers", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| zero-shot", "| K=1, sum", "| K=1, alone", "| mutual, sum", "| mutual, alone"]
    assert all(len(line.split("|")) == 8 for line in lines)
