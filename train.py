"""Train VCP-CLIP on an auxiliary dataset's test split (docs/reproduction.md §7, §11).

    python train.py --dataset visa --learning_rate 4e-5 --save_path ./vcp_weight/train_on_visa
    torchrun --nproc_per_node=4 train.py ...   # data parallel: each process takes its share

Only the prompt parameters, Pre-VCP, Post-VCP and the linear layers train; CLIP stays frozen.

SIGTERM (a cluster's notice before preemption) or Ctrl-C ends the run after the current step with
a resumable checkpoint, ``epoch_{e}_step_{s}_group_id_{g}.pth``; ``--resume_checkpoint_path`` on
it continues in the middle of epoch e and ends with the weights of an uninterrupted run. That
needs every random draw to be a function of where the run is, not of what ran before:
* the data order: DistributedSampler's permutation from (seed, epoch); a resumed epoch skips the
  samples of the steps already done;
* augmentation and mosaic: each sample's generator is seeded with (seed, epoch, index)
  (``AnomalyDataset.seed_samples``), whichever worker process loads it;
* dropout: torch's generator is re-seeded with (seed, epoch, step, rank) before every step.
So a checkpoint needs only the weights, the optimizer, the epoch and the step.
"""
from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from dataset.products import VAL_DATASET_FOR_TRAINING_ON, VAL_PRODUCTS
from model import VCPCLIP, save_checkpoint
from utils.data.augment import build_augment
from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, at_least,
                       check_output_folder, device_of, fail, model_source)
from utils.data.dataset import AnomalyDataset, load_meta, meta_path
from utils.device import autocast, seed_everything
from utils.distributed import World
from utils.errors import DataError, UsageError
from model.losses import segmentation_loss
from utils.evaluation.metrics import average_precision, binary_curve
from utils.paths import DEFAULT_DATA
from utils.inference.runtime import load_model, read_model


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the last good checkpoint is kept."""


class Interrupted(Exception):
    """A stop signal ended the run after a step; ``path`` is the resumable checkpoint."""

    def __init__(self, signum: int, path: Path, epoch: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step {step}")
        self.signum, self.path = signum, path


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Train VCP-CLIP on an auxiliary dataset")
    p.add_argument("--dataset", default="visa", help="auxiliary dataset (its test split)")
    p.add_argument("--train_data_path", default=DEFAULT_DATA)
    p.add_argument("--val_data_path", default=DEFAULT_DATA,
                   help="where the validation dataset's meta file is looked for (report only)")
    p.add_argument("--save_path", default="./vcp_weight/train_on_visa")
    p.add_argument("--resume_checkpoint_path", default=None,
                   help="continue from a checkpoint of ours (also one written mid-epoch on a "
                        "stop signal), or start from a released one")
    p.add_argument("--epoch", type=at_least(1), default=10)
    p.add_argument("--learning_rate", type=float, default=4e-5)
    p.add_argument("--aug_rate", type=float, default=0.2, help="2x2 mosaic rate (MVTec-AD only)")
    p.add_argument("--print_freq", type=at_least(1), default=1, help="epochs between loss reports")
    p.add_argument("--save_freq", type=at_least(1), default=1, help="epochs between checkpoints")
    p.add_argument("--batch_size", type=at_least(1), default=32,
                   help="global batch, over all processes")
    p.add_argument("--seed", type=at_least(0), default=333)
    p.add_argument("--group_id_list", type=int, nargs="+", default=[2], choices=[2],
                   help="2 = every product of the dataset (the paper's setting, the only one)")
    add_model_flags(p)
    g = p.add_argument_group("ours")
    g.add_argument("--val_dataset", default=None,
                   help="NAME of <val_data_path>/meta_NAME.json reported after each epoch "
                        "(default: MVTec-AD when training on VisA and the reverse, as the "
                        "reference; 'none': no validation)")
    g.add_argument("--val_products", nargs="+", default=None, metavar="P",
                   help="its products (default: the reference's five for mvtec and visa, "
                        "else every product)")
    g.add_argument("--num_workers", type=at_least(0), default=2)
    g.add_argument("--no_augment", action="store_true", help="no augmentation (and no mosaic)")
    g.add_argument("--prompt_dropout", type=float, default=None, help="default 0.1")
    return p.parse_args(argv)


class StopSignals:
    """While active, SIGTERM and Ctrl-C (SIGINT) only record that the run should stop; the loop
    stops after the current step. A second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopSignals":
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stopping to the main process (a signal sent to the whole process
    group, as Ctrl-C or a cluster's, would otherwise kill them in the middle of a step)."""
    for s in StopSignals.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start at sample ``start`` of this process's share (the
    steps a resumed run has already done)."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


class Logger:
    """Console + ``{save_path}/result.txt``, on the main process only."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str) -> None:
        if self.active:
            tqdm.write(text)
            with open(self.path, "a") as f:
                f.write(text + "\n")


def trainable_parameter_groups(model: VCPCLIP, lr: float) -> list[dict]:
    """Adam groups (docs/reproduction.md §7): lr for every trainable weight, 0.01 for the two
    temperatures.
    ``prompt_text_projection`` is frozen: it is never used in the forward pass, so it has no
    gradient and would not change anyway (DDP needs every trained parameter to get one)."""
    model.prompts.prompt_text_projection.requires_grad_(False)
    temps = [model.pre_vcp.prompt_temp, model.post_vcp.prompt_temp_l1]
    rest = [p for m in model.trainable_modules().values() for p in m.parameters()
            if p.requires_grad and all(p is not t for t in temps)]
    return [{"params": rest, "lr": lr}, {"params": temps, "lr": 0.01}]


def adam(model: VCPCLIP, lr: float, payload: dict | None) -> torch.optim.Adam:
    """docs/reproduction.md §7's optimizer. A checkpoint of ours brings its moments and step counts
    (a released
    file only weights); the learning rates stay the flags'."""
    optimizer = torch.optim.Adam(trainable_parameter_groups(model, lr), betas=(0.5, 0.999))
    if payload is not None and "optimizer" in payload:
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(payload["optimizer"])
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    return optimizer


def validation_data(args, cfg) -> tuple[AnomalyDataset | None, list[str]]:
    """The products reported after each epoch (docs/reproduction.md §7: five of the other dataset)
    and the log
    lines that say what was left out and why. Validation is a report: nothing here stops a run."""
    name = args.val_dataset or VAL_DATASET_FOR_TRAINING_ON.get(args.dataset)
    if name in (None, "none"):
        why = "--val_dataset none" if name else f"no --val_dataset for {args.dataset}"
        return None, [f"validation skipped: {why}"]
    if not meta_path(args.val_data_path, name).is_file():
        return None, [f"validation skipped: no meta_{name}.json under {args.val_data_path}"]
    try:
        table = load_meta(args.val_data_path, name)["test"]
        wanted = args.val_products or VAL_PRODUCTS.get(name) or [p for p in table if table[p]]
        kept = [p for p in wanted if table.get(p)]
        missing = [p for p in wanted if p not in kept]
        notes = [f"validation: product(s) {missing} not in the test split of "
                 f"{meta_path(args.val_data_path, name)}; skipped"] if missing else []
        if not kept:
            return None, notes + ["validation skipped: no product left"]
        return AnomalyDataset(args.val_data_path, name, "test", products=kept,
                              image_size=cfg.image_size), notes
    except DataError as e:
        return None, [f"warning: validation skipped: {e}"]


def validate(model: VCPCLIP, data: AnomalyDataset, args, device, log) -> None:
    """Pixel AP of each branch per product: a report, never used to choose a checkpoint (that
    would leak the target dataset). Whatever goes wrong is logged and training goes on."""
    model.eval()
    try:
        for product, indices in data.product_ranges.items():
            maps, masks = ([], []), []
            with torch.inference_mode(), autocast(device, args.precision):
                for batch in DataLoader(Subset(data, indices),
                                        batch_size=max(1, args.batch_size // 4)):
                    for out, m in zip(maps, model(batch["image"].to(device)).abnormal()):
                        out.append(m.float().cpu().numpy().ravel())
                    masks.append(batch["mask"].numpy().ravel() > 0.5)
            gt = np.concatenate(masks)
            ap = [average_precision(binary_curve(np.concatenate(m), gt)) * 100 for m in maps]
            log(f"  val {data.dataset_name}/{product}: pixel AP raw {ap[0]:.2f}, new {ap[1]:.2f}")
    except Exception as e:  # a report must never end a run
        log(f"  warning: validation failed ({type(e).__name__}: {e}); training goes on")
    finally:
        model.train()


def resume_point(payload: dict | None, args, world: int) -> tuple[int, int, list[float]]:
    """(epochs done, steps done in the next epoch, their losses) of a checkpoint of ours;
    (0, 0, []) for none or a released file."""
    if payload is None:
        return 0, 0, []
    step = int(payload.get("step", 0))
    if step:  # the steps to skip are counted in batches of this size over this many processes
        was = (payload["train_args"]["batch_size"], payload["world_size"])
        if was != (args.batch_size, world):
            raise UsageError(
                f"{args.resume_checkpoint_path} was written in the middle of an epoch by a run "
                f"with --batch_size {was[0]} on {was[1]} process(es); resume it with the same "
                f"(not {args.batch_size} on {world})")
    return int(payload.get("epoch", 0)), step, list(payload.get("epoch_losses", []))


def train(args: argparse.Namespace) -> Path | None:
    ddp = World()
    device = device_of(args) if ddp.world == 1 or args.device else (
        torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    ddp.setup("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, ddp, device)
    finally:
        ddp.close()


def _train(args, ddp: World, device: torch.device) -> Path | None:
    if args.batch_size % ddp.world:
        raise UsageError(f"--batch_size {args.batch_size} is not divisible by {ddp.world} "
                         "processes")
    seed_everything(args.seed)
    # every input is checked before anything is written: a failed start leaves no output
    source = model_source(args, args.resume_checkpoint_path)
    payload, cfg = read_model(source)
    start_epoch, start_step, resumed_losses = resume_point(payload, args, ddp.world)
    mosaic = args.aug_rate if args.dataset == "mvtec" and not args.no_augment else 0.0
    data = AnomalyDataset(args.train_data_path, args.dataset, "test", image_size=cfg.image_size,
                          augment=None if args.no_augment else build_augment(),
                          mosaic_rate=mosaic)
    data.check_readable()
    save_path = Path(args.save_path)
    check_output_folder(save_path, "--save_path")
    model = load_model(source, device, payload, cfg)  # with the resumed weights, if any
    val_data, val_notes = validation_data(args, cfg)

    log = Logger(save_path / "result.txt", ddp.main)
    log(" ".join(f"--{k} {v}" for k, v in vars(args).items()))
    for note in val_notes:
        log(note)
    optimizer = adam(model, args.learning_rate, payload)
    if payload is not None:
        log(f"resumed from {args.resume_checkpoint_path} at epoch {start_epoch}"
            + (f", step {start_step} of epoch {start_epoch + 1}" if start_step else ""))
    model.train()
    net = DistributedDataParallel(model) if ddp.world > 1 else model
    sampler = ResumableSampler(data, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                               seed=args.seed)
    local_batch = args.batch_size // ddp.world
    loader = DataLoader(data, batch_size=local_batch, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    group = args.group_id_list[0]
    last = Path(args.resume_checkpoint_path) if payload is not None else None
    with StopSignals() as stop:
        for epoch in range(start_epoch + 1, args.epoch + 1):
            first = start_step if epoch == start_epoch + 1 else 0  # steps already done
            losses = resumed_losses if first else []
            sampler.set_epoch(epoch)
            sampler.start = first * local_batch
            data.seed_samples(args.seed, epoch)
            steps = tqdm(loader, desc=f"epoch {epoch}/{args.epoch}", disable=not ddp.main,
                         initial=first, total=first + len(loader))
            for step, batch in enumerate(steps, start=first + 1):
                torch.manual_seed(int(np.random.SeedSequence(
                    [args.seed, epoch, step, ddp.rank]).generate_state(1)[0]))  # dropout
                with autocast(device, args.precision):
                    maps = net(batch["image"].to(device, non_blocking=True))
                loss = segmentation_loss([m.float() for m in maps.raw + maps.new],
                                         batch["mask"].to(device))
                if not torch.isfinite(loss):
                    kept = f"; last good checkpoint: {last}" if last else ""
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {epoch}, step {step}{kept}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if ddp.any(stop.received is not None, device):
                    path = save_path / f"epoch_{epoch}_step_{step}_group_id_{group}.pth"
                    if ddp.main:  # "epoch" counts finished epochs, as in the epoch checkpoints
                        save_checkpoint(model, path, optimizer=optimizer.state_dict(),
                                        epoch=epoch - 1, step=step, epoch_losses=losses,
                                        world_size=ddp.world, train_args=vars(args))
                    ddp.barrier()  # no process leaves before the checkpoint is whole
                    raise Interrupted(stop.received or signal.SIGTERM, path, epoch, step)
            if epoch % args.print_freq == 0:
                log(f"epoch {epoch}: mean loss {np.mean(losses):.4f} over {len(losses)} steps")
            if epoch % args.save_freq == 0 or epoch == args.epoch:
                if ddp.main:
                    last = save_path / f"epoch_{epoch}_group_id_{group}.pth"
                    save_checkpoint(model, last, optimizer=optimizer.state_dict(), epoch=epoch,
                                    train_args=vars(args))
                    if val_data is not None:
                        validate(model, val_data, args, device, log)
    return last


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        last = train(args)
    except (*INPUT_ERRORS, TrainingError) as e:
        return fail(e)
    except Interrupted as e:
        if World().main:
            print(f"{e}; resumable checkpoint: {e.path}\n"
                  f"continue with --resume_checkpoint_path {e.path}", file=sys.stderr)
        return 128 + e.signum  # the shell's status for a process ended by that signal
    if last is not None:
        print(f"done in {time.time() - start:.0f} s; last checkpoint {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
