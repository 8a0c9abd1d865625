"""A very small smoke run of every benchmark: it runs, and its last line is the ratio
(bench/test_pipeline.py's runs in the GPU suite's tiny run)."""
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
    "tiling.py": ["--config", "configs/tiny.json", "--image_size", "56", "--scale", "0.1",
                  "--products", "grass", "--anomalous", "1", "--normal", "0", "--references", "1"],
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


def run_gpu_suite(log_dir, *extra):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--device",
                           "cpu", "--tiny", "--log_dir", str(log_dir), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_gpu_suite_tiny(tmp_path):
    """The GPU suite's steps on the CPU: each one ran, wrote its log and gave the summary its
    numbers; the benchmarks' logs end with their ratio, the compiled maps equal eager's."""
    run = run_gpu_suite(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for step in ("gpu_tests", "pipeline", "forward", "tiling"):
        assert re.search(rf"^{step}: ok in \d+\.\d s", out, flags=re.M), out
        assert (tmp_path / f"{step}.log").read_text().startswith("$ ")
    for step in ("pipeline", "forward"):
        last = (tmp_path / f"{step}.log").read_text().strip().splitlines()[-1]
        assert re.fullmatch(r"speedup: \d+(\.\d)?x", last)
    assert re.search(r"^  \d+ (passed|skipped) in \d+\.\d+s", out, flags=re.M)
    ours = re.search(r"ours \(test\.py\): (\d+\.\d) s end to end = (\d+\.\d\d) x forward", out)
    ref = re.search(r"reference way: (\d+\.\d) s end to end; forward (\d+\.\d) s, metrics "
                    r"(\d+\.\d) s, panels (\d+\.\d) s", out)
    assert ours and ref and float(ours[1]) > 0 and float(ours[2]) > 0
    compiled = re.search(r"compiled \(aot_eager, mode default\): (\d+\.\d) images/s .*first "
                         r"call (\d+\.\d) s, .*, (\d+) graphs, (\d+) graph breaks; maps vs eager "
                         r"max \|diff\| raw (\S+), new (\S+)$", out, flags=re.M)
    assert compiled and float(compiled[1]) > 0 and int(compiled[3]) >= 1
    assert max(float(compiled[5]), float(compiled[6])) <= 1e-5  # aot_eager: eager's kernels
    for side in (56, 112):
        assert re.search(rf"^  SIDE {side}: \d+ tiles in \d+\.\d\d s: \d+\.\d tiles/s, "
                         r"\d+\.\d\d megapixels/s$", out, flags=re.M), out
    assert re.search(r"^  compile criterion \(> 1\.10x eager, maps within 1e-03\): (met|not met)",
                     out, flags=re.M)
    assert re.fullmatch(r"total: \d+\.\d s of a 300 s budget; every step ok",
                        out.strip().splitlines()[-1])
    assert out.strip().endswith((tmp_path / "summary.txt").read_text().strip())


def test_gpu_suite_stops_a_step_at_its_deadline(tmp_path):
    """Out of budget: every step is stopped, said so, and the run fails."""
    run = run_gpu_suite(tmp_path, "--budget_s", "0.5")
    assert run.returncode == 1
    for step in ("gpu_tests", "pipeline", "forward", "tiling"):
        assert re.search(rf"^{step}: stopped at its deadline in \d+\.\d s", run.stdout, flags=re.M)
    assert run.stdout.strip().endswith("failed: gpu_tests, pipeline, forward, tiling")
