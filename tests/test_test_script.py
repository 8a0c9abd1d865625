"""test.py end to end on a generated standardized dataset (docs/reproduction.md §10-11)."""
import json
import re
import math

import numpy as np
import pytest
import torch

import test as test_script
import utils.evaluation.protocol as evaluation
from helpers.naive_metrics import naive_evaluate_product
from model import build_vcp_clip, checkpoint_configs, read_checkpoint
from utils.data.dataset import AnomalyDataset
from utils.evaluation.protocol import Evaluator, first_to_read


def run_test(tmp_path, data, archive, checkpoint, *extra):
    argv = ["--data_path", str(data), "--dataset", "toy", "--checkpoint_path", str(checkpoint),
            "--pretrained_path", str(archive), "--model", "tiny", "--save_path",
            str(tmp_path / "out"), "--device", "cpu", "--num_workers", "0", "--batch_size", "4",
            *extra]
    return test_script.main(argv), tmp_path / "out"


def test_table_log_json_and_panels(tmp_path, tiny_data, tiny_archive, tiny_checkpoint, capsys):
    code, out = run_test(tmp_path, tiny_data, tiny_archive, tiny_checkpoint)
    assert code == 0
    printed = capsys.readouterr().out
    for word in ("objects", "auroc_px", "aupro_px", "f1_sp", "threshold", "cube", "disc", "mean"):
        assert word in printed
    assert printed.strip().splitlines()[-1] in (out / "log.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["products"]) == {"cube", "disc"}
    assert {"aupro_px", "aupro_px_official", "auroc_sp"} <= set(metrics["mean"])
    panels = sorted(p.relative_to(out / "imgs").as_posix() for p in (out / "imgs").rglob("*.png"))
    assert len(panels) == 12
    assert "cube/anomaly/vis_zong_toy_anomaly_000000.png" in panels
    assert "disc/good/vis_zong_toy_good_000011.png" in panels


def test_numbers_equal_a_per_image_run_with_naive_metrics(tmp_path, tiny_data, tiny_archive,
                                                          tiny_checkpoint):
    """Oracle: the model on one image at a time + scikit-learn / per-threshold AUPRO.

    The metrics are compared on exactly the maps that test.py scored (the model in test.py's
    batches of 4), so the comparison holds whatever the CPU's kernels round: a near-constant map
    of a random model turns a 1e-7 difference between a batched and a per-image forward into an
    AUROC difference. That the per-image maps equal the batched ones is checked on the maps."""
    code, out = run_test(tmp_path, tiny_data, tiny_archive, tiny_checkpoint, "--no_vis")
    assert code == 0 and not (out / "imgs").exists()
    got = json.loads((out / "metrics.json").read_text())["products"]
    cfg = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    model = build_vcp_clip(tiny_archive, cfg, checkpoint=tiny_checkpoint)
    data = AnomalyDataset(tiny_data, "toy", "test", image_size=cfg.image_size)
    with torch.no_grad():
        batched = [model(torch.stack([data[i]["image"] for i in range(s, min(s + 4, len(data)))]))
                   .abnormal() for s in range(0, len(data), 4)]
        raw_b, new_b = (torch.cat(b).numpy() for b in zip(*batched))  # [N, S, S] each
    for product, indices in data.product_ranges.items():
        raw, new, masks, labels = [], [], [], []
        for i in indices:
            item = data[i]
            with torch.no_grad():
                r, n = model(item["image"][None]).abnormal()
            assert np.allclose(r[0].numpy(), raw_b[i], atol=1e-5, rtol=0)
            assert np.allclose(n[0].numpy(), new_b[i], atol=1e-5, rtol=0)
            raw.append(raw_b[i]), new.append(new_b[i])
            masks.append(item["mask"][0].numpy() > 0.5), labels.append(item["anomaly"])
        expected = naive_evaluate_product(np.stack(raw), np.stack(new), np.stack(masks),
                                          np.array(labels))
        for key, value in expected.items():
            assert math.isclose(got[product][key], value, abs_tol=1e-5), (product, key)


def test_product_without_anomalies_gives_nan_with_warning(tmp_path, tiny_archive,
                                                          tiny_checkpoint, capsys):
    from conftest import make_dataset
    data = make_dataset(tmp_path / "root", "toy", {"plain": (3, 0), "stained": (2, 2)})
    with pytest.warns(UserWarning, match="plain"):
        code, out = run_test(tmp_path, data, tiny_archive, tiny_checkpoint, "--no_vis")
    assert code == 0
    row = json.loads((out / "metrics.json").read_text())["products"]["plain"]
    assert math.isnan(row["auroc_px"]) and math.isnan(row["auroc_sp"])
    assert "nan" in capsys.readouterr().out


def test_missing_inputs_fail_before_model_work(tmp_path, tiny_data, tiny_archive,
                                               tiny_checkpoint, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model must not be built")
    monkeypatch.setattr(test_script, "load_model", no_model)
    code, _ = run_test(tmp_path, tiny_data, tiny_archive, tmp_path / "none.pth")
    assert code == 2 and "none.pth" in capsys.readouterr().err
    code, _ = run_test(tmp_path, tmp_path, tiny_archive, tiny_checkpoint)
    assert code == 2 and "meta_toy.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(tiny_data, broken)
    victim = next((broken / "toy" / "disc" / "test" / "good").iterdir())
    victim.unlink()
    code, _ = run_test(tmp_path, broken, tiny_archive, tiny_checkpoint)
    assert code == 2 and victim.name in capsys.readouterr().err


def test_missing_clip_weights_are_named(tmp_path, tiny_data, tiny_checkpoint, capsys):
    code, _ = run_test(tmp_path, tiny_data, tmp_path / "ViT-L-14-336px.pt", tiny_checkpoint)
    err = capsys.readouterr().err
    assert code == 2 and "ViT-L-14-336px.pt" in err and "Traceback" not in err


def test_btad_style_conversion_is_read_by_test_py(tmp_path, tiny_archive, tiny_checkpoint, capsys):
    """BTAD's own layout (ok/ko folders, masks named like the images) -> test.py --dataset btad."""
    from PIL import Image
    from dataset.make_dataset_new import convert
    from dataset.make_meta import write_meta

    rng = np.random.default_rng(0)
    src = tmp_path / "BTech_Dataset_transformed"
    for product in ("01", "02"):
        for sub in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
            (src / product / sub).mkdir(parents=True)
        for i in range(2):
            for sub in ("train/ok", "test/ok"):
                Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
                    src / product / sub / f"{i:04d}.bmp")
            img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            mask = np.zeros((48, 48), np.uint8)
            mask[10:20, 10:30] = 255
            Image.fromarray(img).save(src / product / "test" / "ko" / f"{i:04d}.bmp")
            Image.fromarray(mask).save(src / product / "ground_truth" / "ko" / f"{i:04d}.png")
    data = tmp_path / "data"
    convert("btad", src, data, progress=False)
    write_meta(data, "btad")
    code = test_script.main(["--data_path", str(data), "--dataset", "btad", "--checkpoint_path",
                             str(tiny_checkpoint), "--pretrained_path", str(tiny_archive),
                             "--save_path", str(tmp_path / "out"), "--device", "cpu",
                             "--num_workers", "0"])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"\| 01 +\|", out) and re.search(r"\| 02 +\|", out)
    assert len(list((tmp_path / "out" / "imgs").rglob("*.png"))) == 8


def test_several_metric_threads_give_the_same_table(tmp_path, tiny_archive, tiny_checkpoint,
                                                    monkeypatch):
    """Products evaluated concurrently: the same rows, in the meta file's product order."""
    from conftest import make_dataset
    data = make_dataset(tmp_path / "root", "toy", {p: (2, 2) for p in ("c", "a", "d", "b")})
    _, one = run_test(tmp_path / "one", data, tiny_archive, tiny_checkpoint)
    monkeypatch.setattr(evaluation, "metric_threads", lambda: 3)
    _, three = run_test(tmp_path / "three", data, tiny_archive, tiny_checkpoint)
    got = [json.loads((out / "metrics.json").read_text()) for out in (one, three)]
    assert list(got[0]["products"]) == list(got[1]["products"])
    assert json.dumps(got[0]) == json.dumps(got[1])
    assert len(list((three / "imgs").rglob("*.png"))) == 16


def test_resume_after_a_failure_equals_an_uninterrupted_run(tmp_path, tiny_data, tiny_archive,
                                                            tiny_checkpoint, capsys):
    """A run that fails in its second product keeps the first one's row (progress.json); with
    --resume it reads only from the batch that holds the second product's first image and ends
    with the uninterrupted run's metrics.json, every number equal."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    assert run_test(tmp_path / "whole", data, tiny_archive, tiny_checkpoint)[0] == 0
    entries = AnomalyDataset(data, "toy", "test", image_size=56).entries  # cube 0-5, disc 6-11
    last = data / entries[-1]["img_path"]  # disc's last image, in the batch [8, 12)
    original = last.read_bytes()
    last.write_bytes(original[:300])
    code, out = run_test(tmp_path, data, tiny_archive, tiny_checkpoint)
    assert code == 2 and "(product 'disc')" in capsys.readouterr().err
    assert list(json.loads((out / "progress.json").read_text())["products"]) == ["cube"]
    assert not (out / "metrics.json").exists()
    last.write_bytes(original)
    (data / entries[0]["img_path"]).write_bytes(b"")  # cube's first image: never read again
    code, _ = run_test(tmp_path, data, tiny_archive, tiny_checkpoint, "--resume", "--seed", "5")
    assert code == 2 and "other flags: --seed" in capsys.readouterr().err
    code, out = run_test(tmp_path, data, tiny_archive, tiny_checkpoint, "--resume")
    assert code == 0 and not (out / "progress.json").exists()
    whole = json.loads((tmp_path / "whole" / "out" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == whole
    assert len(list((out / "imgs").rglob("*.png"))) == 12


@pytest.mark.parametrize("done,batch,first", [((), 4, 0), (("cube",), 4, 4), (("cube",), 3, 6),
                                              (("cube",), 8, 0), (("cube", "disc"), 4, 12)])
def test_resume_reads_from_the_batch_boundary(tiny_data, done, batch, first):
    """cube is images 0-5, disc 6-11: a resumed run starts at the batch (of an uninterrupted
    run) that holds disc's first image, so every image meets the same batch neighbours."""
    dataset = AnomalyDataset(tiny_data, "toy", "test", image_size=56)
    assert {p: (r.start, r.stop) for p, r in dataset.product_ranges.items()} == {
        "cube": (0, 6), "disc": (6, 12)}
    assert first_to_read(dataset, dict.fromkeys(done), batch) == first


def test_ctrl_c_keeps_the_products_handed_over(tmp_path, tiny_data, tiny_archive, tiny_checkpoint,
                                               monkeypatch):
    """Ctrl-C (or SIGTERM, which test.py turns into the same exit) while the second product is
    read: the first one, already handed to the metric threads, is finished and recorded."""
    add = Evaluator.add

    def interrupted(self, product, *rest, **kw):
        add(self, product, *rest, **kw)
        if product == "disc":
            raise KeyboardInterrupt
    monkeypatch.setattr(Evaluator, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_test(tmp_path, tiny_data, tiny_archive, tiny_checkpoint)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert list(progress["products"]) == ["cube"]
    assert not (tmp_path / "out" / "metrics.json").exists()
