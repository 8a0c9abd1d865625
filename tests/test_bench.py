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


def test_service_load_smoke():
    """The service's load run, small: every job and call comes back, none lost or failed, with
    and without a profile; the memory's costs at the tiny model's shapes."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "service_load.py"), "--clients",
                          "3", "--jobs", "2", "--api_clients", "2", "--api_calls", "2", "--big",
                          "1500", "--profile_references", "2", "--memory_config",
                          "configs/tiny.json", "--memory_size", "56", "--memory_references", "2",
                          "4", "--memory_forwards", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "lost: 0, failed: 0"
    assert run.stdout.count("page jobs: 6 done") == run.stdout.count("API calls: 4 done") == 2
    assert "a profile of 2 normal images" in run.stdout
    assert re.search(r"1500x1500 upload.*peak RSS \d+\.\d\d GiB", run.stdout)
    assert re.search(r"2 references: whole 0\.1 MiB \(2 forwards measured.*coreset 0\.1 "
                     r"0\.0 MiB \(3 of 32 patches", run.stdout)
    assert "4 references: whole 0.1 MiB (4 forwards not run" in run.stdout
