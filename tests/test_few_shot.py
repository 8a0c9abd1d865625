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
from test_coreset import naive_coreset
from test_musc import naive_lnamd, naive_msm, naive_rscin
from test_patch_scoring import naive_reference
from utils.data.dataset import AnomalyDataset, choose_references
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


def oracle_maps(data_root, archive, checkpoint, patch_scores, fusion, image_scores=None):
    """The model on one image at a time; patch_scores(product, the images' outputs, model) ->
    [N, L] scores; bilinear upsampling, fusion per branch; image_scores(fused raw, fused new,
    outputs) -> [N] (None: the top-k score). Per product (raw, new, masks, labels, scores)."""
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint)
    data = AnomalyDataset(data_root, "toy", "test", image_size=cfg.image_size)
    products = {}
    for product, indices in data.product_ranges.items():
        raw, new, outputs, masks, labels = [], [], [], [], []
        for i in indices:
            item = data[i]
            with torch.no_grad():
                maps = model(item["image"][None])
            r, n = maps.abnormal()
            raw.append(r[0].numpy()), new.append(n[0].numpy()), outputs.append(maps)
            masks.append(item["mask"][0].numpy() > 0.5), labels.append(item["anomaly"])
        scores = patch_scores(product, outputs, model)  # [N, L]
        side = int(math.isqrt(scores.shape[1]))
        patch = F.interpolate(scores.view(-1, 1, side, side).float(), size=cfg.image_size,
                              mode="bilinear", align_corners=True)[:, 0].numpy()
        raw, new = fuse_maps(np.stack(raw), np.stack(new), patch, fusion)
        given = image_scores(raw, new, outputs) if image_scores else None
        products[product] = (raw, new, np.stack(masks), np.array(labels), given)
    return products


def per_image_oracle(*args, **kwargs):
    """The naive metrics of ``oracle_maps``' maps, per product."""
    return {product: naive_evaluate_product(*maps)
            for product, maps in oracle_maps(*args, **kwargs).items()}


@pytest.fixture()
def recorded(monkeypatch):
    """What test.py's evaluation hands the metrics, per product: (raw, new, image scores)."""
    import utils.evaluation.protocol
    seen, evaluate_product = {}, utils.evaluation.protocol.evaluate_product

    def record(raw, new, masks, labels, name, scores=None):
        seen[name] = (raw, new, scores)
        return evaluate_product(raw, new, masks, labels, name, scores=scores)
    monkeypatch.setattr(utils.evaluation.protocol, "evaluate_product", record)
    return seen


def assert_maps_then_metrics(rows, recorded, oracle):
    """The fused maps and image scores within float rounding of the oracle's (the naive loops
    run in float64, the library in float32; "sum" fusion magnifies that much, so the metrics of
    slightly different maps can differ by more), and the metrics those very maps give naively."""
    for product, (raw, new, masks, labels, scores) in oracle.items():
        got_raw, got_new, got_scores = recorded[product]
        np.testing.assert_allclose(got_raw, raw, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_new, new, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_scores, scores, rtol=0, atol=2e-5)  # in [0, 1]
        expected = naive_evaluate_product(got_raw, got_new, masks, labels, got_scores)
        assert_rows_close({product: rows[product]}, {product: expected})


def layers_of(outputs, name):
    """Per tapped layer, the images' ``name`` tensors (one image each) stacked: [N, ...]."""
    return [torch.stack([getattr(o, name)[k][0] for o in outputs])
            for k in range(len(getattr(outputs[0], name)))]


def naive_musc(outputs, fraction=0.3, r_list=(1, 3, 5)):
    """MuSc's patch scores [N, L] with the naive loops: LNAMD per image, MSM per patch, float64."""
    layers = layers_of(outputs, "raw_tokens")
    return sum(naive_msm(naive_lnamd(t.double(), r), fraction)
               for t in layers for r in r_list) / (len(layers) * len(r_list))


def naive_rscin_scores(raw, new, outputs, k_list=(1, 2, 3)):
    """The maximum of each image's fused blend, re-scored by the naive RsCIN loop."""
    scores = [float((0.2 * r + 0.8 * n).max()) for r, n in zip(raw, new)]
    embeddings = torch.cat([o.image_features for o in outputs]).double()
    return naive_rscin(scores, embeddings, [min(k, len(scores)) for k in k_list]).numpy()


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
    by_path = train_images(shots_data, tiny_checkpoint)

    def reference_scores(product, outputs, model):
        with torch.no_grad():
            refs = model(torch.stack([by_path[p] for p in references[product]])).patch_tokens
        return naive_reference(layers_of(outputs, "patch_tokens"), refs)

    expected = per_image_oracle(shots_data, tiny_archive, tiny_checkpoint, reference_scores, fusion)
    assert_rows_close(result["products"], expected)


# MuSc's defaults (fraction 0.3: k = 1 of the 5 other images; r 1 3 5; RsCIN 1 2 3); "sum" with
# one image per batch as above
@pytest.mark.parametrize("fusion,batch_size", [("sum", 1), ("geometric", 4), ("alone", 3)])
def test_mutual_is_musc_and_equals_a_per_image_run_of_naive_loops(tmp_path, shots_data,
                                                                   tiny_archive, tiny_checkpoint,
                                                                   recorded, fusion, batch_size):
    code, out = run(tmp_path, shots_data, tiny_archive, tiny_checkpoint, "--mutual",
                    "--fusion", fusion, batch_size=batch_size)
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["scoring"] == {"scoring": "mutual", "fusion": fusion, "mutual_fraction": 0.3,
                                 "mutual_r": [1, 3, 5], "rscin": [1, 2, 3]}
    oracle = oracle_maps(shots_data, tiny_archive, tiny_checkpoint,
                         lambda product, outputs, model: naive_musc(outputs), fusion,
                         naive_rscin_scores)
    assert_maps_then_metrics(result["products"], recorded, oracle)


def test_mutual_settings_reach_lnamd_msm_and_rscin(tmp_path, shots_data, tiny_archive,
                                                   tiny_checkpoint, recorded):
    """--mutual_r 3, --mutual_fraction 0.5 (k = 2 of 5), --rscin 1 9 (9 taken as the 6 images
    of a product: every image's row keeps them all)."""
    code, out = run(tmp_path, shots_data, tiny_archive, tiny_checkpoint, "--mutual",
                    "--mutual_r", "3", "--mutual_fraction", "0.5", "--rscin", "1", "9",
                    "--fusion", "alone", batch_size=6)
    assert code == 0
    oracle = oracle_maps(
        shots_data, tiny_archive, tiny_checkpoint,
        lambda product, outputs, model: naive_musc(outputs, 0.5, (3,)), "alone",
        lambda raw, new, outputs: naive_rscin_scores(raw, new, outputs, (1, 6)))
    assert_maps_then_metrics(json.loads((out / "metrics.json").read_text())["products"],
                             recorded, oracle)


def train_images(data_root, checkpoint):
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    train = AnomalyDataset(data_root, "toy", "train", image_size=cfg.image_size)
    return {train[i]["path"]: train[i]["image"] for i in range(len(train))}


@pytest.mark.parametrize("coreset", [None, "1.0", "0.5"])
def test_k_shot_all_with_and_without_a_coreset_equals_naive_loops(tmp_path, shots_data,
                                                                  tiny_archive, tiny_checkpoint,
                                                                  coreset):
    """Every normal train image (cube 3, disc 1) as references; with --coreset the memory of
    each layer is the naive greedy loop's choice of its K*L patches (1.0: all of them)."""
    extra = ["--coreset", coreset] if coreset else []
    code, out = run(tmp_path, shots_data, tiny_archive, tiny_checkpoint, "--k_shot", "all",
                    "--fusion", "alone", *extra)
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    references = result["scoring"]["references"]
    assert references == choose_references(shots_data, "toy", ["cube", "disc"], None, 111)
    assert [len(references[p]) for p in ("cube", "disc")] == [3, 1]
    assert result["scoring"]["k_shot"] == "all"
    assert result["scoring"]["coreset"] == float(coreset or 1.0)
    by_path = train_images(shots_data, tiny_checkpoint)

    def reference_scores(product, outputs, model):
        with torch.no_grad():
            refs = model(torch.stack([by_path[p] for p in references[product]])).patch_tokens
        memory = [r.reshape(-1, r.shape[-1]) for r in refs]  # per layer [K*L, W]
        kept = [m[naive_coreset(m, round(float(coreset or 1.0) * len(m)))] for m in memory]
        return naive_reference(layers_of(outputs, "patch_tokens"), [m[None] for m in kept])

    expected = per_image_oracle(shots_data, tiny_archive, tiny_checkpoint, reference_scores,
                                "alone")
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
                         (["--k_shot", "some"], ["--k_shot", "integer"]),
                         (["--k_shot", "all", "--coreset", "0"], ["--coreset", "(0, 1]"]),
                         (["--mutual", "--mutual_fraction", "0"], ["--mutual_fraction"]),
                         (["--mutual", "--mutual_fraction", "0.1"],
                          ["--mutual_fraction 0.1: ", "at least 11 images in each product",
                           "cube (6), disc (6)"]),
                         (["--mutual", "--mutual_r", "1", "2"], ["--mutual_r", "odd", "[1, 2]"]),
                         (["--mutual", "--rscin", "0", "2"], ["--rscin", ">= 1"])]:
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
        ["--shots", "1", "all", "--coreset_shots", "all", "--coreset", "0.5", "--fusions", "sum",
         "alone", "--data_path", str(shots_data), "--dataset", "toy", "--checkpoint_path",
         str(tiny_checkpoint), "--pretrained_path", str(tiny_archive), "--model", "tiny",
         "--device", "cpu", "--num_workers", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| zero-shot", "| K=1, sum", "| K=1, alone", "| K=all, sum", "| K=all, alone",
        "| K=all, coreset 0.5, sum", "| K=all, coreset 0.5, alone", "| MuSc, sum",
        "| MuSc, alone"]
    assert all(len(line.split("|")) == 11 for line in lines)
    assert lines[2].endswith("| 0.0 | 1.00 |")  # zero-shot: no scoring; the unit of the last column
