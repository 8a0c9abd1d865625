"""Threshold calibration: T against an exact-arithmetic oracle and numpy's quantile; the command."""
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from utils.evaluation.calibration import alarm_rate, calibrate, threshold_for


def oracle(scores, rate) -> float:
    """The smallest score t with #{s > t} <= rate * n, counted in exact decimal arithmetic."""
    allowed = Fraction(repr(rate)) * len(scores)
    return min(t for t in scores if sum(s > t for s in scores) <= allowed)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 37, 100, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.07, 0.1, 0.29, 0.5, 0.9])
def test_threshold_is_the_exact_quantile(n, rate):
    rng = np.random.default_rng(n)
    scores = rng.gamma(2.0, 0.1, n).round(2)  # rounded: ties happen
    t = threshold_for(scores, rate)
    assert t == oracle(list(scores), rate)
    assert alarm_rate(scores, t) <= rate  # the guarantee on the calibration images
    assert t in scores


@pytest.mark.parametrize("rate", [0.0, 0.125, 0.25, 0.5, 0.75])  # (1 - rate) * n is exact
def test_same_as_numpys_inverted_cdf(rate):
    scores = np.random.default_rng(0).normal(size=24)
    assert threshold_for(scores, rate) == np.quantile(scores, 1 - rate, method="inverted_cdf")


def test_worked_example_and_report():
    normal = [0.30, 0.10, 0.20, 0.40, 0.90, 0.50, 0.60, 0.70, 0.80, 0.35]
    # 10 images at 10 %: one may alarm, so T is the 9th smallest, 0.8 (0.9 alone is above it)
    c = calibrate(normal, 0.1, defective_scores=[0.95, 0.85, 0.5, 0.81])
    assert c.threshold == 0.8 and c.normal_alarm_rate == 0.1 and c.recall == 0.75
    # below 1 / n the rate cannot be met but by the largest score
    assert threshold_for(normal, 0.05) == 0.9 and threshold_for(normal, 0.0) == 0.9
    assert math.isnan(calibrate(normal, 0.1).recall)
    assert calibrate(normal, 0.1).to_dict()["recall"] is None


@pytest.mark.parametrize("scores,rate,message", [
    ([], 0.01, "no normal images"), ([0.1, 0.2], 1.0, "in [0, 1)"),
    ([0.1, 0.2], -0.1, "in [0, 1)"), ([0.1, float("nan")], 0.1, "finite")])
def test_bad_input(scores, rate, message):
    with pytest.raises(ValueError) as e:
        threshold_for(scores, rate)
    assert message in str(e.value)


@pytest.mark.subprocess
def test_calibrate_command(tmp_path, tiny_archive, tiny_checkpoint, capsys):
    """predict.py --calibrate prints the quantile of the max pixel scores that predict.py writes."""
    import csv

    from PIL import Image

    import predict
    rng = np.random.default_rng(1)
    sets = {}
    for name, n in (("normal", 7), ("defective", 3), ("held_out", 4)):
        sets[name] = tmp_path / name
        sets[name].mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                sets[name] / f"{i}.png")
    (sets["normal"] / "broken.png").write_bytes(b"not a png")
    model = ["--checkpoint_path", str(tiny_checkpoint), "--pretrained_path", str(tiny_archive),
             "--device", "cpu", "--num_workers", "0", "--batch_size", "3"]

    def max_scores(folder):  # through the plain prediction command
        out = tmp_path / f"out_{folder.name}"
        assert predict.main([str(folder), "--save_path", str(out), *model]) == 0
        with open(out / "scores.csv") as f:
            return [float(r["max_pixel_score"]) for r in csv.DictReader(f)]

    normal, defective, held_out = (max_scores(sets[k]) for k in ("normal", "defective", "held_out"))
    capsys.readouterr()
    code = predict.main(["--calibrate", str(sets["normal"]), "--defective", str(sets["defective"]),
                         "--held_out", str(sets["held_out"]), "--false_alarm_rate", "0.3", *model])
    out, err = capsys.readouterr()
    assert code == 0 and "broken.png" in err
    t = float(out.splitlines()[0].removeprefix("T = "))
    assert t == sorted(normal)[7 - 1 - 2]  # 7 images at 30 %: two may be above T
    assert f"{sum(s > t for s in normal)} of 7 above T" in out
    assert f"{sum(s > t for s in defective)} of 3 above T" in out
    assert f"{sum(s > t for s in held_out)} of 4 above T" in out

    # under torchrun each process scores its share: the same report, printed once
    root = Path(predict.__file__).resolve().parent
    flags = ["--calibrate", str(sets["normal"]), "--defective", str(sets["defective"]),
             "--held_out", str(sets["held_out"]), "--false_alarm_rate", "0.3", *model]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(root / "predict.py"), *flags],
                         capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == out
    assert two.stderr.count("warning: skipped") == 1 and "broken.png" in two.stderr


@pytest.mark.parametrize("flags,message", [
    (["--calibrate", "{normal}", "--false_alarm_rate", "1"], "--false_alarm_rate"),
    (["--calibrate", "{normal}", "{normal}"], "takes no INPUTs"),
    (["--calibrate", "{normal}/nothing*.png"], "nothing*.png"),
    (["--calibrate", "{normal}", "--defective", "{empty}"], "--defective"),
    ([], "--calibrate NORMAL")])
def test_calibrate_command_bad_input(tmp_path, tiny_archive, flags, message, capsys):
    import predict
    (tmp_path / "normal").mkdir()
    (tmp_path / "empty").mkdir()
    from PIL import Image
    Image.new("RGB", (20, 20)).save(tmp_path / "normal" / "a.png")
    flags = [f.format(normal=tmp_path / "normal", empty=tmp_path / "empty") for f in flags]
    assert predict.main([*flags, "--pretrained_path", str(tiny_archive), "--checkpoint_path",
                         str(tmp_path / "missing.pth"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
