"""Preemption: SIGTERM in the middle of an epoch writes a resumable checkpoint, and the resumed run
ends with the weights of an uninterrupted one (one process, workers, two gloo processes); SIGKILL
while a checkpoint is being written leaves the previous one loadable."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import train as train_script
from model import build_vcp_clip, checkpoint_configs, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
IMAGES = 16  # per epoch: 16 steps of batch 1, 8 steps of 2 x 1 under two processes


pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The subprocesses run on one thread (ENV), so the in-process runs must too: another thread
    count sums in another order, and Adam turns that float noise (where a gradient is ~eps) into
    weight differences far above 1e-6."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import make_dataset
    root = tmp_path_factory.mktemp("preempt") / "root"
    return make_dataset(root, "aux", {"tile": (4, 4), "wall": (4, 4)}, seed=5)


def argv(data, archive, save, *extra):
    # augmentation and dropout on: their draws must repeat after the resume
    return ["--dataset", "aux", "--train_data_path", str(data), "--val_dataset", "none",
            "--pretrained_path", str(archive), "--model", "tiny", "--features_list", "1", "2",
            "--image_size", "56", "--total_d_layer_len", "3", "--save_path", str(save),
            "--device", "cpu", "--epoch", "2", "--learning_rate", "1e-3", *extra]


def weights(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    flat = {}
    for key in ("trainable_linearlayer", "New_Lan_Embed", "Zero_try"):
        flat.update({f"{key}.{k}": v for k, v in ck[key].items()})
    flat.update({k: v for k, v in ck.items() if torch.is_tensor(v)})
    return flat


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class Running:
    """A subprocess whose stderr is collected as it comes, to wait for a line of progress."""

    def __init__(self, cmd, **kw):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=ENV, cwd=ROOT, **kw)
        self.text = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: os.read(self.proc.stdout.fileno(), 4096), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern, timeout=240):
        end = time.time() + timeout
        while time.time() < end:
            found = re.search(pattern, self.text)
            if found:
                return found
            assert self.proc.poll() is None, f"exited early:\n{self.text[-3000:]}"
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in:\n{self.text[-3000:]}")

    def finish(self, timeout=240):
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code


def progress(steps):
    """tqdm's line once step 1 or later of epoch 1 is done."""
    return rf"epoch 1/2:.*?\|\s*([1-9]\d*)/{steps} "


def stopped_at(text, name="SIGTERM"):
    found = re.search(rf"stopped by {name} at epoch (\d+), step (\d+); resumable checkpoint: "
                      r"(\S+)", text)
    assert found, text[-3000:]
    return int(found[1]), int(found[2]), Path(found[3])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data, tiny_archive):
    save = tmp_path_factory.mktemp("reference")
    assert train_script.main(argv(data, tiny_archive, save, "--batch_size", "1",
                                  "--num_workers", "0")) == 0
    return save


@pytest.mark.parametrize("workers,sig,send", [
    (0, signal.SIGTERM, os.kill),
    (2, signal.SIGTERM, os.killpg),  # the whole process group, loader workers too: a cluster
    (2, signal.SIGINT, os.killpg),  # Ctrl-C
])
def test_stop_signal_mid_epoch_then_resume_equals_uninterrupted(tmp_path, data, tiny_archive,
                                                                uninterrupted, workers, sig,
                                                                send, capsys):
    save = tmp_path / "run"
    cmd = [sys.executable, "train.py", *argv(data, tiny_archive, save, "--batch_size", "1",
                                             "--num_workers", str(workers))]
    run = Running(cmd, start_new_session=True)
    run.wait_for(progress(IMAGES))
    send(run.proc.pid, sig)
    assert run.finish() == 128 + sig
    epoch, step, path = stopped_at(run.text, sig.name)
    assert epoch == 1 and 1 <= step < IMAGES and "Traceback" not in run.text
    assert path == save / f"epoch_1_step_{step}_group_id_2.pth"
    ck = read_checkpoint(path)
    assert (ck["epoch"], ck["step"], len(ck["epoch_losses"])) == (0, step, step)
    assert not (save / "epoch_1_group_id_2.pth").exists()

    resume = argv(data, tiny_archive, save, "--batch_size", "1", "--num_workers", str(workers),
                  "--resume_checkpoint_path", str(path))
    # the steps to skip are counted in batches: another batch size cannot resume mid-epoch
    assert train_script.main(resume + ["--batch_size", "2"]) == 2
    assert "by a run with --batch_size 1 on 1 process(es)" in capsys.readouterr().err
    assert train_script.main(resume) == 0
    final, ref = save / "epoch_2_group_id_2.pth", uninterrupted / "epoch_2_group_id_2.pth"
    assert max_difference(weights(final), weights(ref)) <= 1e-6
    # the interrupted epoch reports the loss of all its steps, as the uninterrupted run did
    losses = [re.findall(r"epoch \d: mean loss .*", (d / "result.txt").read_text())
              for d in (save, uninterrupted)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_sigterm_to_one_of_two_gloo_processes(tmp_path, data, tiny_archive):
    def torchrun(save, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "train.py",
                *argv(data, tiny_archive, save, "--batch_size", "2", "--num_workers", "0",
                      *extra)]

    ref = subprocess.run(torchrun(tmp_path / "ref"), capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    save = tmp_path / "run"
    run = Running(torchrun(save))
    run.wait_for(progress(IMAGES // 2))
    rank1 = next(pid for pid in children(run.proc.pid) if b"\0RANK=1\0" in
                 b"\0" + Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(rank1, signal.SIGTERM)  # only rank 1 is told; both must stop at the same step
    assert run.finish() != 0
    epoch, step, path = stopped_at(run.text)
    assert epoch == 1 and 1 <= step <= IMAGES // 2
    assert run.text.count("resumable checkpoint") == 1  # rank 0 alone reports and writes
    assert read_checkpoint(path)["world_size"] == 2

    resumed = subprocess.run(torchrun(save, "--resume_checkpoint_path", str(path)),
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_difference(weights(save / "epoch_2_group_id_2.pth"),
                          weights(tmp_path / "ref" / "epoch_2_group_id_2.pth")) <= 1e-6


def children(pid):
    """Direct child processes of ``pid`` (torchrun's workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


# train.py as it is, with torch.save made slow for the epoch-2 checkpoint: it writes half the
# file, says so, and waits to be killed (a slow disk; the code under test is unchanged)
SLOW_SAVE = """
import io, runpy, sys, time, torch
real = torch.save
def save(obj, f, *args, **kwargs):
    if "epoch_2_group" in str(f):
        buffer = io.BytesIO()
        real(obj, buffer)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        print("half written:", f, flush=True)
        time.sleep(600)
    return real(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data,
                                                                   tiny_archive, uninterrupted):
    save = tmp_path / "run"
    flags = argv(data, tiny_archive, save, "--batch_size", "1", "--num_workers", "0")
    run = Running([sys.executable, "-c", SLOW_SAVE, *flags])
    temp = Path(run.wait_for(r"half written: (\S+)")[1])
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    assert temp.exists() and temp.parent == save  # killed in the middle of the write
    assert not (save / "epoch_2_group_id_2.pth").exists()
    previous = save / "epoch_1_group_id_2.pth"
    ck = read_checkpoint(previous)
    assert ck["epoch"] == 1
    build_vcp_clip(tiny_archive, checkpoint_configs(ck)[0], checkpoint=previous)  # it loads
    assert train_script.main(flags + ["--resume_checkpoint_path", str(previous)]) == 0
    assert max_difference(weights(save / "epoch_2_group_id_2.pth"),
                          weights(uninterrupted / "epoch_2_group_id_2.pth")) <= 1e-6
