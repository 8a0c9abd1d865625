"""A very small smoke run of every benchmark: it runs, and its last line is the ratio."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKES = {
    "deploy.py": ["--config", "configs/tiny.json", "--image_size", "56", "--batch_size", "2",
                  "--iters", "1", "--warmup", "0", "--features_list", "1", "2", "3", "4"],
    "metrics.py": ["--n", "4", "--size", "64"],
    "forward.py": ["--config", "configs/tiny.json", "--image_size", "56", "--batch_size", "2",
                   "--iters", "1", "--warmup", "0", "--features_list", "1", "2", "3", "4"],
    "test_pipeline.py": ["--products", "2", "--images", "4", "--size", "56"],
    "patch_scoring.py": ["--config", "configs/tiny.json", "--image_size", "56", "--images", "5",
                         "--memory_images", "5", "--memory_patches", "16",
                         "--coreset_references", "2"],
}


pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

@pytest.mark.parametrize("script", sorted(SMOKES))
def test_benchmark_smoke(script):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), *SMOKES[script]],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.fullmatch(r"speedup: \d+(\.\d)?x", run.stdout.strip().splitlines()[-1])
