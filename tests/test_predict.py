"""predict.py on the user's own images: formats, a corrupt file, thresholds, scores."""
import csv

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

import predict


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "a.png")
    Image.fromarray(rgb[:30]).save(d / "b.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(d / "c_grey.bmp")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 128, np.uint8)])).save(d / "d_rgba.png")
    Image.fromarray((rng.integers(0, 65535, (50, 45))).astype(np.uint16)).save(d / "e_16bit.png")
    (d / "f_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (d / "notes.txt").write_text("not an image, not even tried")
    return d


def run(tmp_path, archive, checkpoint, *inputs_and_flags):
    return predict.main([*map(str, inputs_and_flags), "--checkpoint_path", str(checkpoint),
                         "--pretrained_path", str(archive), "--save_path", str(tmp_path / "out"),
                         "--device", "cpu", "--num_workers", "0", "--batch_size", "2"])


def test_formats_corrupt_file_and_threshold(tmp_path, folder, tiny_archive, tiny_checkpoint,
                                            capsys):
    code = run(tmp_path, tiny_archive, tiny_checkpoint, folder, "--threshold", "0.5",
               "--save_maps")
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("warning: skipped") == 1 and "f_corrupt.png" in captured.err
    out = tmp_path / "out"
    stems = ["a", "b", "c_grey", "d_rgba", "e_16bit"]
    assert sorted(p.stem for p in (out / "overlays").iterdir()) == stems
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"].rsplit("/", 1)[1].split(".")[0] for r in rows] == stems
    for stem in stems:
        source = next(folder.glob(f"{stem}.*"))
        size = Image.open(source).size
        mask = Image.open(out / "masks" / f"{stem}.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / "overlays" / f"{stem}.png").size == size
        amap = np.load(out / "maps" / f"{stem}.npy")
        assert amap.shape == (56, 56) and amap.dtype == np.float32
        row = next(r for r in rows if r["path"].endswith(source.name))
        assert float(row["max_pixel_score"]) == pytest.approx(float(amap.max()), abs=1e-6)


def test_large_images_are_read_without_the_decompression_bomb_guard(
        tmp_path, folder, tiny_archive, tiny_checkpoint, monkeypatch, capsys):
    """Pillow refuses images over twice its pixel limit (179 megapixels by default) as
    decompression bombs; predict.py reads the user's own files whatever their size (here the
    limit is set below the test images' size to stand for a 200-megapixel photo)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert run(tmp_path, tiny_archive, tiny_checkpoint, folder / "a.png") == 0
    assert "1 images segmented, 0 skipped" in capsys.readouterr().out


def test_map_is_the_unnormalized_smoothed_blend(tmp_path, folder, tiny_archive, tiny_checkpoint):
    from model import build_vcp_clip, checkpoint_configs, read_checkpoint
    from utils.data.dataset import image_transform
    import torch
    assert run(tmp_path, tiny_archive, tiny_checkpoint, folder / "a.png", "--save_maps") == 0
    cfg = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    model = build_vcp_clip(tiny_archive, cfg, checkpoint=tiny_checkpoint)
    with torch.no_grad():
        raw, new = model(image_transform(56)(Image.open(folder / "a.png"))[None]).abnormal()
    expected = gaussian_filter(0.2 * raw[0].numpy() + 0.8 * new[0].numpy(), sigma=8)
    got = np.load(tmp_path / "out" / "maps" / "a.npy")
    assert np.abs(got - expected).max() < 1e-6
    with open(tmp_path / "out" / "scores.csv") as f:
        score = float(next(csv.DictReader(f))["image_score"])
    top = lambda m: np.sort(m.ravel())[-2000:].mean()
    assert score == pytest.approx(top(raw[0].numpy()) + top(new[0].numpy()), abs=1e-5)


def test_globs_and_nothing_readable(tmp_path, folder, tiny_archive, tiny_checkpoint, capsys):
    assert run(tmp_path, tiny_archive, tiny_checkpoint, str(folder / "*.jpg")) == 0
    assert [p.name for p in (tmp_path / "out" / "overlays").iterdir()] == ["b.png"]
    assert run(tmp_path, tiny_archive, tiny_checkpoint, folder / "f_corrupt.png",
               "--overwrite") == 1
    assert run(tmp_path, tiny_archive, tiny_checkpoint, tmp_path / "nothing*.png") == 2
    assert "nothing*.png" in capsys.readouterr().err


def test_a_used_output_folder_is_refused_or_cleared_and_outputs_are_capped(
        tmp_path, folder, tiny_archive, tiny_checkpoint, capsys):
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.full((300, 200, 3), 90, np.uint8)).save(big / "large.png")
    assert run(tmp_path, tiny_archive, tiny_checkpoint, big, "--threshold", "0.5",
               "--max_output_side", "100") == 0
    out = tmp_path / "out"
    assert f"written in {out.resolve()} (scores.csv, overlays/, masks/)" in capsys.readouterr().out
    for kind in ("overlays", "masks"):  # scaled down to 100 px a side, the aspect kept
        assert Image.open(out / kind / "large.png").size == (67, 100)
    # a second run into the same folder would leave large.png looking like its output
    assert run(tmp_path, tiny_archive, tiny_checkpoint, folder / "a.png") == 2
    err = capsys.readouterr().err
    assert "--save_path" in err and "is not empty" in err and "--overwrite" in err
    assert run(tmp_path, tiny_archive, tiny_checkpoint, folder / "a.png", "--overwrite") == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png"]
    assert not (out / "masks").exists()
    (out / "mine.txt").write_text("the user's own file")
    assert run(tmp_path, tiny_archive, tiny_checkpoint, folder / "a.png", "--overwrite") == 2
    assert "does not write (mine.txt)" in capsys.readouterr().err
    assert (out / "mine.txt").exists() and (out / "overlays" / "a.png").exists()


@pytest.mark.subprocess
def test_two_torchrun_processes_write_the_same_files_as_one(tmp_path, folder, tiny_archive,
                                                          tiny_checkpoint, capsys):
    """Under torchrun each process segments its share; scores.csv (gathered, input order) and
    every other file equal a plain run's, byte for byte; the corrupt file is reported once."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(predict.__file__).resolve().parent
    flags = [str(folder), "--checkpoint_path", str(tiny_checkpoint), "--pretrained_path",
             str(tiny_archive), "--device", "cpu", "--num_workers", "0", "--batch_size", "2",
             "--threshold", "0.5", "--save_maps"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(root / "predict.py"), *flags,
                          "--save_path", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("warning: skipped") == 1 and "f_corrupt.png" in two.stderr
    assert two.stdout.count("5 images segmented, 1 skipped") == 1
    assert predict.main([*flags, "--save_path", str(tmp_path / "one")]) == 0
    files = {run: sorted(p.relative_to(tmp_path / run) for p in (tmp_path / run).rglob("*")
                         if p.is_file()) for run in ("one", "two")}
    assert files["one"] == files["two"] and len(files["one"]) == 1 + 3 * 5
    for rel in files["one"]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_resume_after_a_failure_writes_what_an_uninterrupted_run_writes(
        tmp_path, folder, tiny_archive, tiny_checkpoint, monkeypatch, capsys):
    """A write that fails at the 4th input (d_rgba.png, batches of 2) leaves a, b, c recorded in
    progress/; --resume reads from d's batch on (a.png is not read again) and writes every file of
    an uninterrupted run, byte for byte, and the same summary."""
    from utils.inference.outputs import OutputWriter
    flags = [folder, "--threshold", "0.5", "--save_maps"]
    assert run(tmp_path / "whole", tiny_archive, tiny_checkpoint, *flags) == 0
    whole = capsys.readouterr().out
    write = OutputWriter.write

    def full_disk(self, name, prediction):
        if name == "d_rgba":
            raise OSError(28, "No space left on device")
        write(self, name, prediction)
    monkeypatch.setattr(OutputWriter, "write", full_disk)
    assert run(tmp_path, tiny_archive, tiny_checkpoint, *flags) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: cannot write the outputs of" in err
    assert "d_rgba.png" in err and "No space left on device" in err and "--resume" in err
    monkeypatch.setattr(OutputWriter, "write", write)
    lines = (tmp_path / "out" / "progress" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) == 3 and not (tmp_path / "out" / "scores.csv").exists()
    assert run(tmp_path, tiny_archive, tiny_checkpoint, *flags, "--threshold", "0.6",
               "--resume") == 2
    assert "other --threshold" in capsys.readouterr().err
    (tmp_path / "out" / "progress" / "rank0.jsonl").open("a").write('{"index": 4, "ro')  # cut
    image = (folder / "a.png").read_bytes()
    (folder / "a.png").write_bytes(b"")  # would be skipped if it were read again
    assert run(tmp_path, tiny_archive, tiny_checkpoint, *flags, "--resume") == 0
    (folder / "a.png").write_bytes(image)
    out, ref = tmp_path / "out", tmp_path / "whole" / "out"
    pace = lambda text: [l for l in text.splitlines() if l.startswith("  tiles per image:")]
    resumed = capsys.readouterr().out  # its pace: the images it segmented, this time
    assert pace(resumed) and pace(resumed)[0].startswith("  tiles per image: 1 (2 images);")
    assert resumed.replace(pace(resumed)[0], "") == \
        whole.replace(str(ref.resolve()), str(out.resolve())).replace(pace(whole)[0], "")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert not (out / "progress").exists()
    for rel in files:
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel
