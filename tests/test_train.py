"""train.py: the update rule, learning, frozen backbone, resume, DDP with gloo, NaN stop."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_script
from model import VCPCLIP, build_vcp_clip, load_clip, vcp_state_dict
from utils.data.dataset import AnomalyDataset
from model.losses import segmentation_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from conftest import make_dataset
    root = tmp_path_factory.mktemp("train") / "root"
    return make_dataset(root, "aux", {"tile": (2, 2), "wall": (2, 2)}, seed=3)


def train_argv(data, archive, save, *extra):
    return ["--dataset", "aux", "--train_data_path", str(data), "--val_data_path", str(data),
            "--pretrained_path", str(archive), "--model", "tiny", "--features_list", "1", "2", "3",
            "4", "--image_size", "56", "--total_d_layer_len", "3", "--save_path", str(save),
            "--device", "cpu", "--num_workers", "0", *extra]


def flat(state):
    out = {}
    for k, v in state.items():
        out.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    return out


def load(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return flat({k: v for k, v in ck.items() if k not in ("vcp_config", "optimizer", "epoch",
                                                          "train_args")})


def oracle_loss(maps, target):
    """Focal + Dice written out in numpy (docs/reproduction.md §7)."""
    g = target.numpy()[:, 0]
    total = 0.0
    for m in maps:
        p = m.detach().numpy().astype(np.float64)
        onehot = np.clip(np.stack([1 - g, g], 1), 1e-5, 1 - 1e-5)
        pt = (onehot * p).sum(1) + 1e-5
        focal = np.mean(-(1 - pt) ** 2 * np.log(pt))
        inter = (p[:, 1] * g).reshape(len(g), -1).sum(1)
        dice = (2 * inter + 1) / (p[:, 1].reshape(len(g), -1).sum(1) + g.reshape(len(g), -1).sum(1) + 1)
        total += focal + 1 - dice.mean()
    return total


def test_one_step_matches_hand_computed_adam_update(tmp_path, train_data, tiny_archive,
                                                    tiny_checkpoint, tiny_vcp_cfg):
    save = tmp_path / "run"
    code = train_script.main(train_argv(train_data, tiny_archive, save, "--epoch", "1",
                                        "--batch_size", "8", "--learning_rate", "1e-3",
                                        "--no_augment", "--prompt_dropout", "0",
                                        "--resume_checkpoint_path", str(tiny_checkpoint)))
    assert code == 0
    after = load(save / "epoch_1_group_id_2.pth")
    # the same step by hand: start weights, the whole batch (8 images), loss, Adam's first step
    cfg = type(tiny_vcp_cfg)(**{**tiny_vcp_cfg.to_dict(), "prompt_dropout": 0.0})
    model = build_vcp_clip(tiny_archive, cfg, checkpoint=tiny_checkpoint).train()
    data = AnomalyDataset(train_data, "aux", "test", image_size=56)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(333 + 1))
    batch = [data[i] for i in order.tolist()]  # DistributedSampler's order: seed + epoch
    images = torch.stack([b["image"] for b in batch])
    masks = torch.stack([b["mask"] for b in batch])
    maps = model(images)
    loss = segmentation_loss(maps.raw + maps.new, masks)
    assert abs(loss.item() - oracle_loss(maps.raw + maps.new, masks)) < 1e-5
    loss.backward()
    before = flat(vcp_state_dict(model))
    grads = flat({k: {n: p.grad for n, p in m.named_parameters()}
                  for k, m in (("trainable_linearlayer", model.linear_layers),
                               ("New_Lan_Embed", model.pre_vcp), ("Zero_try", model.post_vcp))})
    grads.update({n: p.grad for n, p in model.prompts.named_parameters()})
    for key, w0 in before.items():
        g = grads[key]
        if key == "prompt_text_projection":  # never used in the forward: no gradient, no change
            assert g is None and torch.equal(after[key], w0)
            continue
        lr = 0.01 if key.endswith(("prompt_temp", "prompt_temp_l1")) else 1e-3
        expected = w0 - lr * g / (g.abs() + 1e-8)  # Adam, step 1: m_hat = g, v_hat = g^2
        assert torch.allclose(after[key], expected, atol=lr * 1e-3, rtol=0), key
        assert not torch.equal(after[key], w0), key


def test_only_the_vcp_parameters_change(tiny_archive, tiny_vcp_cfg):
    torch.manual_seed(0)
    model = VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg).train()
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    vcp_before = flat(vcp_state_dict(model))
    opt = torch.optim.Adam(train_script.trainable_parameter_groups(model, 1e-3), betas=(0.5, 0.999))
    maps = model(torch.randn(2, 3, 56, 56))
    segmentation_loss(maps.raw + maps.new, (torch.rand(2, 1, 56, 56) > 0.8).float()).backward()
    opt.step()
    assert all(torch.equal(v, clip_before[k]) for k, v in model.clip.state_dict().items())
    changed = {k for k, v in flat(vcp_state_dict(model)).items() if not torch.equal(v, vcp_before[k])}
    assert changed == set(vcp_before) - {"prompt_text_projection"}


@pytest.mark.slow
def test_a_few_dozen_steps_drive_the_loss_down(tmp_path, train_data, tiny_archive):
    save = tmp_path / "run"
    # 40 steps; 112 px gives an 8x8 patch grid, so the small stains are resolvable
    code = train_script.main(train_argv(train_data, tiny_archive, save, "--epoch", "20",
                                        "--batch_size", "4", "--learning_rate", "3e-2",
                                        "--image_size", "112", "--no_augment", "--save_freq", "100"))
    assert code == 0
    losses = [float(x) for x in re.findall(r"mean loss ([\d.]+)", (save / "result.txt").read_text())]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    assert "validation skipped" in (save / "result.txt").read_text()
    assert sorted(p.name for p in save.glob("*.pth")) == ["epoch_20_group_id_2.pth"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, train_data, tiny_archive):
    common = ("--batch_size", "4", "--learning_rate", "1e-3")  # augmentation and dropout on
    assert train_script.main(train_argv(train_data, tiny_archive, tmp_path / "a", "--epoch", "2",
                                        *common)) == 0
    assert train_script.main(train_argv(train_data, tiny_archive, tmp_path / "b", "--epoch", "1",
                                        *common)) == 0
    first = tmp_path / "b" / "epoch_1_group_id_2.pth"
    assert train_script.main(train_argv(train_data, tiny_archive, tmp_path / "b", "--epoch", "2",
                                        "--resume_checkpoint_path", str(first), *common)) == 0
    a, b = load(tmp_path / "a" / "epoch_2_group_id_2.pth"), load(tmp_path / "b" / "epoch_2_group_id_2.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], load(first)[k]) for k in a)


@pytest.mark.subprocess
def test_two_gloo_processes_equal_one_process_with_the_double_batch(tmp_path, train_data,
                                                                    tiny_archive, tiny_checkpoint):
    common = ("--epoch", "1", "--learning_rate", "1e-3", "--no_augment", "--prompt_dropout", "0",
              "--resume_checkpoint_path", str(tiny_checkpoint))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(ROOT / "train.py"),
                          *train_argv(train_data, tiny_archive, tmp_path / "two", "--batch_size",
                                      "8", *common)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert train_script.main(train_argv(train_data, tiny_archive, tmp_path / "one", "--batch_size",
                                        "8", *common)) == 0
    two_ck, one_ck = (torch.load(tmp_path / run / "epoch_1_group_id_2.pth", weights_only=True)
                      for run in ("two", "one"))
    # Adam's first moment after one step is (1 - beta1) * gradient: the gradients agree
    grad_diff = max((a["exp_avg"] - b["exp_avg"]).abs().max().item() / 0.5 for a, b in
                    zip(two_ck["optimizer"]["state"].values(), one_ck["optimizer"]["state"].values()))
    assert grad_diff < 1e-6
    # ... and so do the weights wherever the step is determined: Adam's first step is
    # lr * g / (|g| + eps), which for |g| near eps follows summation-order noise, so compare
    # where the one-process step is a full lr (|g| >> eps)
    w0, a, b = load(tiny_checkpoint), load(tmp_path / "two" / "epoch_1_group_id_2.pth"), \
        load(tmp_path / "one" / "epoch_1_group_id_2.pth")
    firm = total = 0
    for k in w0:
        lr = 0.01 if k.endswith(("prompt_temp", "prompt_temp_l1")) else 1e-3
        full = (b[k] - w0[k]).abs() > 0.99 * lr
        firm, total = firm + full.sum().item(), total + full.numel()
        assert ((a[k] - b[k])[full].abs() < 1e-6).all(), k
    assert firm > 0.5 * total


def test_checkpoint_from_training_is_read_by_test_py(tmp_path, train_data, tiny_archive, capsys):
    import test as test_script
    save = tmp_path / "run"
    assert train_script.main(train_argv(train_data, tiny_archive, save, "--epoch", "1",
                                        "--batch_size", "8")) == 0
    code = test_script.main(["--data_path", str(train_data), "--dataset", "aux",
                             "--checkpoint_path", str(save / "epoch_1_group_id_2.pth"),
                             "--pretrained_path", str(tiny_archive), "--save_path",
                             str(tmp_path / "test"), "--device", "cpu", "--num_workers", "0",
                             "--no_vis"])
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"\| mean +\|", out) and "tile" in out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, train_data, tiny_archive,
                                                           capsys):
    save = tmp_path / "run"
    assert train_script.main(train_argv(train_data, tiny_archive, save, "--epoch", "1",
                                        "--batch_size", "4")) == 0
    good = save / "epoch_1_group_id_2.pth"
    before = good.read_bytes()
    code = train_script.main(train_argv(train_data, tiny_archive, save, "--epoch", "3",
                                        "--batch_size", "4", "--learning_rate", "nan",
                                        "--resume_checkpoint_path", str(good)))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"loss became nan at epoch 2, step 2; last good checkpoint: .*epoch_1", err), err
    assert good.read_bytes() == before and not (save / "epoch_2_group_id_2.pth").exists()


def test_missing_product_folder_fails_before_training(tmp_path, train_data, tiny_archive, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(train_data, broken)
    shutil.rmtree(broken / "aux" / "wall")
    code = train_script.main(train_argv(broken, tiny_archive, tmp_path / "run", "--epoch", "1"))
    assert code == 2 and "wall" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_validation_reports_what_it_can_and_never_ends_the_run(tmp_path, train_data,
                                                               tiny_archive):
    """Training on "visa" validates on meta_mvtec.json; this one holds one of the reference's five
    products ("bottle") beside another, and one of bottle's images is truncated after epoch 1."""
    import json
    import shutil
    root, val_root = tmp_path / "root", tmp_path / "val"
    shutil.copytree(train_data, root)
    shutil.copytree(train_data, val_root)
    meta = json.loads((root / "meta_aux.json").read_text())
    (root / "meta_visa.json").write_text(json.dumps(meta))
    meta["test"] = {"bottle": meta["test"]["tile"], "other": meta["test"]["wall"]}
    for product, entries in meta["test"].items():
        for entry in entries:
            entry["cls_name"] = product
    (val_root / "meta_mvtec.json").write_text(json.dumps(meta))
    save = tmp_path / "run"
    argv = train_argv(root, tiny_archive, save, "--epoch", "3", "--batch_size", "4",
                      "--val_data_path", str(val_root))
    argv[argv.index("aux")] = "visa"
    image = val_root / meta["test"]["bottle"][0]["img_path"]

    def truncate_after_epoch_1(*args, **kwargs):  # the data changes while training runs
        if (save / "epoch_2_group_id_2.pth").exists():
            image.write_bytes(image.read_bytes()[:300])
        return real_validate(*args, **kwargs)
    real_validate = train_script.validate
    train_script.validate = truncate_after_epoch_1
    try:
        assert train_script.main(argv) == 0
    finally:
        train_script.validate = real_validate
    log = (save / "result.txt").read_text()
    assert log.count("product(s) ['hazelnut', 'wood', 'zipper', 'leather'] not in the test "
                     "split") == 1
    assert len(re.findall(r"val mvtec/bottle: pixel AP raw [\d.]+, new [\d.]+", log)) == 1
    assert log.count("warning: validation failed") == 2 and image.name in log
    assert sorted(p.name for p in save.glob("*.pth")) == [f"epoch_{e}_group_id_2.pth"
                                                          for e in (1, 2, 3)]


def test_validation_on_any_dataset_and_products(tmp_path, train_data, tiny_archive):
    save = tmp_path / "run"
    assert train_script.main(train_argv(train_data, tiny_archive, save, "--epoch", "1",
                                        "--batch_size", "8", "--val_dataset", "aux",
                                        "--val_products", "wall", "nothing")) == 0
    log = (save / "result.txt").read_text()
    assert "product(s) ['nothing'] not in the test split" in log
    assert re.search(r"val aux/wall: pixel AP", log) and "val aux/tile" not in log
