"""Bad inputs and faults (docs/faults.md): each is one `error:` line that
names the file, key or flag, a non-zero exit status, no traceback and no partial output."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict as predict_script
import test as test_script
import train as train_script
from dataset import make_dataset_new, make_meta
from conftest import TINY_CONFIG
from model import CLIPConfig, read_clip_state_dict
from helpers.random_clip import write_openai_archive


def first_image(root: Path, dataset: str, product: str, state: str = "anomaly") -> Path:
    return sorted((root / dataset / product / "test" / state).iterdir())[0]


def truncate(path: Path, keep: int = 300) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture()
def env(tmp_path, tiny_data, tiny_archive, tiny_checkpoint, hf_folder):
    """A private copy of the toy data, the tiny CLIP (also as a transformers folder) and a
    checkpoint; cases break one thing."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return {"data": data, "archive": tiny_archive, "checkpoint": tiny_checkpoint,
            "hf": hf_folder, "tmp": tmp_path, "out": tmp_path / "out"}


def argv_test_py(env):
    return ["--data_path", env["data"], "--dataset", "toy", "--checkpoint_path", env["checkpoint"],
            "--pretrained_path", env["archive"], "--save_path", env["out"], "--device", "cpu",
            "--num_workers", "0", "--batch_size", "4"]


def argv_train_py(env):
    return ["--dataset", "toy", "--train_data_path", env["data"], "--val_data_path", env["data"],
            "--pretrained_path", env["archive"], "--model", "tiny", "--features_list", "1", "2",
            "3", "4", "--image_size", "56", "--total_d_layer_len", "3", "--save_path",
            env["out"], "--device", "cpu", "--num_workers", "0", "--batch_size", "4",
            "--epoch", "1"]


def argv_predict_py(env):
    return [env["data"] / "toy" / "cube" / "test" / "good", "--checkpoint_path", env["checkpoint"],
            "--pretrained_path", env["archive"], "--save_path", env["out"], "--device", "cpu",
            "--num_workers", "0"]


SCRIPTS = {"test": (test_script, argv_test_py), "train": (train_script, argv_train_py),
           "predict": (predict_script, argv_predict_py),
           "make_meta": (make_meta, lambda env: []),
           "make_dataset_new": (make_dataset_new, lambda env: [])}


def other_backbone(env):
    """Weights of another architecture (a deeper text tower) than the checkpoint was trained on."""
    raw = json.loads(TINY_CONFIG.read_text())
    raw["text_cfg"]["layers"] = 5
    return write_openai_archive(CLIPConfig.from_json_dict(raw), env["tmp"] / "other.pt")


def not_json(path: Path) -> Path:
    path.write_text("{this is not json")
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(b"\x00not a torch file" * 10)
    return path


def wrong_layout(path: Path) -> Path:
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    return path


def truncated_copy(src: Path, dst: Path, keep: int) -> Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def siglip_folder(env) -> Path:
    """A transformers checkpoint of a model the loader cannot build (a tiny SigLIP: patch
    embeddings named as CLIP's, no class token, other heads)."""
    import transformers
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1)
    config = transformers.SiglipConfig(text_config=dict(vocab_size=1000, **sizes),
                                       vision_config=dict(image_size=28, patch_size=14, **sizes))
    transformers.SiglipModel(config).save_pretrained(env["tmp"] / "siglip")
    return env["tmp"] / "siglip"


def resnet_clip(env) -> Path:
    """OpenAI's layout of a ResNet CLIP (RN50's vision tower keys), with the tiny text tower."""
    state = {k: v for k, v in read_clip_state_dict(env["archive"]).items()
             if not k.startswith("visual.")}
    state.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
                  "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                  "visual.attnpool.positional_embedding": torch.zeros(50, 2048)})
    torch.save(state, env["tmp"] / "RN50.pt")
    return env["tmp"] / "RN50.pt"


def config_json_disagreeing(env) -> Path:
    """A transformers folder whose config.json says 6 text blocks; its tensors have 4."""
    folder = shutil.copytree(env["hf"], env["tmp"] / "hf")
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 6
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def a_file(env) -> Path:
    (env["tmp"] / "plain_file").write_text("x")
    return env["tmp"] / "plain_file"


# (name, script, break: env -> extra flags (later flags override earlier ones; it may also damage
# the env's files), what the error must name)
CASES = [
    ("config not JSON", "test", lambda e: ["--config_path", not_json(e["tmp"] / "bad.json")],
     "bad.json"),
    ("layer outside the backbone", "test", lambda e: ["--features_list", "3", "6", "9", "40"],
     "features_list [3, 6, 9, 40]"),
    ("truncated test image", "test",
     lambda e: truncate(first_image(e["data"], "toy", "disc")) or [],
     "toy_anomaly_000006.bmp (product 'disc')"),
    ("test image that is not an image", "test",
     lambda e: first_image(e["data"], "toy", "cube", "good").write_text("hello") and [],
     "toy_good_000003.bmp (product 'cube')"),
    ("truncated mask", "test",
     lambda e: truncate(sorted((e["data"] / "toy" / "cube" / "ground_truth" / "anomaly")
                               .iterdir())[1], 60) or [],
     "mask"),
    ("CLIP weights missing", "test", lambda e: ["--pretrained_path", e["tmp"] / "nothing.pt"],
     "nothing.pt"),
    ("CLIP weights truncated", "test",
     lambda e: ["--pretrained_path", truncated_copy(e["archive"], e["tmp"] / "cut.pt", 2000)],
     "cut.pt"),
    ("CLIP weights of the wrong layout", "test",
     lambda e: ["--pretrained_path", wrong_layout(e["tmp"] / "layout.pt")],
     "visual.conv1.weight"),
    ("CLIP weights: a transformers model the loader cannot build", "test",
     lambda e: ["--pretrained_path", siglip_folder(e)], "config.json describes a 'siglip' model"),
    ("CLIP weights: a ResNet CLIP", "test", lambda e: ["--pretrained_path", resnet_clip(e)],
     "RN50.pt holds a ResNet CLIP"),
    ("CLIP weights: truncated safetensors", "test",
     lambda e: ["--pretrained_path", truncated_copy(e["hf"] / "model.safetensors",
                                                    e["tmp"] / "model.safetensors", 4000)],
     "model.safetensors (a safetensors file, cut short or damaged"),
    ("CLIP weights: config.json disagrees with the tensors", "test",
     lambda e: ["--pretrained_path", config_json_disagreeing(e)],
     "config.json does not match the CLIP weights beside it (config.json vs weights): "
     "text_config.num_hidden_layers: 6 vs 4"),
    ("checkpoint of another backbone", "test",
     lambda e: ["--pretrained_path", other_backbone(e)], "another CLIP backbone"),
    ("checkpoint missing", "test", lambda e: ["--checkpoint_path", e["tmp"] / "no.pth"], "no.pth"),
    ("checkpoint not a checkpoint", "test",
     lambda e: ["--checkpoint_path", garbage(e["tmp"] / "junk.pth")], "junk.pth"),
    ("meta file not JSON", "test", lambda e: not_json(e["data"] / "meta_toy.json") and [],
     "meta_toy.json: not valid JSON"),
    ("unknown --dataset (no meta file)", "test", lambda e: ["--dataset", "nosuch"],
     "meta_nosuch.json"),
    ("missing product folder", "test",
     lambda e: shutil.rmtree(e["data"] / "toy" / "disc") or [], "toy/disc/test"),
    ("image size not a multiple of the patch", "test", lambda e: ["--image_size", "50"],
     "image size 50 is not a multiple of the patch size 14"),
    ("--batch_size 0", "test", lambda e: ["--batch_size", "0"], "--batch_size"),
    ("unwritable --save_path", "test", lambda e: ["--save_path", a_file(e) / "out"],
     "plain_file is a file, not a folder"),
    ("unknown --device", "test", lambda e: ["--device", "gpu7"], "--device 'gpu7'"),
    ("unknown flag", "test", lambda e: ["--batchsize", "4"], "--batchsize"),
    ("train: truncated training image", "train",
     lambda e: truncate(first_image(e["data"], "toy", "cube")) or [],
     "toy_anomaly_000000.bmp (product 'cube')"),
    ("train: layer outside the backbone", "train", lambda e: ["--features_list", "1", "9"],
     "layers [9] are outside 1..4"),
    ("train: --epoch 0", "train", lambda e: ["--epoch", "0"], "--epoch"),
    ("train: unwritable --save_path", "train", lambda e: ["--save_path", a_file(e) / "run"],
     "plain_file is a file, not a folder"),
    ("train: CLIP weights missing", "train",
     lambda e: ["--pretrained_path", e["tmp"] / "nothing.pt"], "nothing.pt"),
    ("predict: config not JSON", "predict",
     lambda e: ["--config_path", not_json(e["tmp"] / "bad.json")], "bad.json"),
    ("predict: --batch_size 0", "predict", lambda e: ["--batch_size", "0"], "--batch_size"),
    ("predict: unwritable --save_path", "predict", lambda e: ["--save_path", a_file(e) / "p"],
     "plain_file is a file, not a folder"),
    ("make_meta: no such dataset folder", "make_meta",
     lambda e: ["--data_path", e["out"], "--dataset", "toy"], "missing folder"),
    ("make_dataset_new: output under a file", "make_dataset_new",
     lambda e: ["--dataset", "toy", "--layout", "folder", "--src_path", e["data"] / "toy",
                "--dst_path", a_file(e) / "out"], "plain_file exists and is not a folder"),
]


def run_main(module, argv) -> int:
    try:
        return module.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors exit from parse_args
        return e.code


@pytest.mark.parametrize("name,script,edit,named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_no_output(name, script, edit, named, env, capsys):
    module, argv = SCRIPTS[script]
    code = run_main(module, argv(env) + edit(env))
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert named in err[err.index("error: "):], err
    for partial in ("metrics.json", "log.txt", "result.txt", "scores.csv", "overlays",
                    "meta_toy.json"):
        assert not (env["out"] / partial).exists(), partial
    assert not list(env["out"].glob("*.pth"))


@pytest.mark.subprocess
def test_truncated_image_read_by_a_loader_worker(env):
    """The issue's case as a user runs it: a DataLoader worker meets the file."""
    truncate(first_image(env["data"], "toy", "disc"))
    argv = [str(a) for a in argv_test_py(env)]
    argv[argv.index("--num_workers") + 1] = "2"
    run = subprocess.run([sys.executable, "test.py", *argv], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "toy_anomaly_000006.bmp (product 'disc')" in errors[0]
    assert "image file is truncated" in errors[0]
    assert not (env["out"] / "metrics.json").exists() and not (env["out"] / "log.txt").exists()
