"""Train VCP-CLIP on an auxiliary dataset's test split (SPEC §7, §11).

    python train.py --dataset visa --learning_rate 4e-5 --save_path ./vcp_weight/train_on_visa
    torchrun --nproc_per_node=4 train.py ...   # data parallel: each process takes its share

Only the prompt parameters, Pre-VCP, Post-VCP and the linear layers train; CLIP stays frozen.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dataset.products import VAL_DATASET_FOR_TRAINING_ON, VAL_PRODUCTS
from model import VCPCLIP, save_checkpoint
from utils.augment import build_augment
from utils.cli import (INPUT_ERRORS, UsageError, add_model_flags, autocast, build_model, fail,
                       read_checkpoint_and_config, seed_everything, select_device)
from utils.data import AnomalyDataset, meta_path
from utils.losses import segmentation_loss
from utils.metrics import average_precision, binary_curve

class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the last good checkpoint is kept."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train VCP-CLIP on an auxiliary dataset")
    p.add_argument("--dataset", default="visa", help="auxiliary dataset (its test split)")
    p.add_argument("--train_data_path", default="./dataset/mvisa/data")
    p.add_argument("--val_data_path", default="./dataset/mvisa/data",
                   help="where the other dataset's meta file is looked for (report only)")
    p.add_argument("--save_path", default="./vcp_weight/train_on_visa")
    p.add_argument("--resume_checkpoint_path", default=None,
                   help="continue from a checkpoint of ours, or start from a released one")
    p.add_argument("--epoch", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=4e-5)
    p.add_argument("--aug_rate", type=float, default=0.2, help="2x2 mosaic rate (MVTec-AD only)")
    p.add_argument("--print_freq", type=int, default=1, help="epochs between loss reports")
    p.add_argument("--save_freq", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--batch_size", type=int, default=32, help="global batch, over all processes")
    p.add_argument("--seed", type=int, default=333)
    p.add_argument("--group_id_list", type=int, nargs="+", default=[2], choices=[2],
                   help="2 = every product of the dataset (the paper's setting, the only one)")
    add_model_flags(p)
    g = p.add_argument_group("ours")
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--no_augment", action="store_true", help="no augmentation (and no mosaic)")
    g.add_argument("--prompt_dropout", type=float, default=None, help="default 0.1")
    return p.parse_args(argv)


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0

    def setup(self, device: torch.device) -> None:
        if self.world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


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
    """Adam groups (SPEC §7): lr for every trainable weight, 0.01 for the two temperatures.
    ``prompt_text_projection`` is frozen: it is never used in the forward pass, so it has no
    gradient and would not change anyway (DDP needs every trained parameter to get one)."""
    model.prompts.prompt_text_projection.requires_grad_(False)
    temps = [model.pre_vcp.prompt_temp, model.post_vcp.prompt_temp_l1]
    rest = [p for m in model.trainable_modules().values() for p in m.parameters()
            if p.requires_grad and all(p is not t for t in temps)]
    return [{"params": rest, "lr": lr}, {"params": temps, "lr": 0.01}]


def validate(model: VCPCLIP, args, cfg, device, log) -> None:
    """Pixel AP of each branch on five products of the other dataset: a report, never used to
    choose a checkpoint (that would leak the target dataset)."""
    other = VAL_DATASET_FOR_TRAINING_ON.get(args.dataset)
    if other is None:
        log(f"  validation skipped: it is defined for visa and mvtec, not {args.dataset}")
        return
    if not meta_path(args.val_data_path, other).is_file():
        log(f"  validation skipped: no meta_{other}.json under {args.val_data_path}")
        return
    model.eval()
    for product in VAL_PRODUCTS[other]:
        data = AnomalyDataset(args.val_data_path, other, "test", products=[product],
                              image_size=cfg.image_size)
        maps, masks = ([], []), []
        with torch.inference_mode(), autocast(device, args.precision):
            for batch in DataLoader(data, batch_size=max(1, args.batch_size // 4)):
                for out, m in zip(maps, model(batch["image"].to(device)).abnormal()):
                    out.append(m.float().cpu().numpy().ravel())
                masks.append(batch["mask"].numpy().ravel() > 0.5)
        gt = np.concatenate(masks)
        ap = [average_precision(binary_curve(np.concatenate(m), gt)) * 100 for m in maps]
        log(f"  val {other}/{product}: pixel AP raw {ap[0]:.2f}, new {ap[1]:.2f}")
    model.train()


def train(args: argparse.Namespace) -> Path | None:
    ddp = Distributed()
    device = select_device(args) if ddp.world == 1 or args.device else (
        torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu"))
    ddp.setup(device)
    try:
        return _train(args, ddp, device)
    finally:
        ddp.close()


def _train(args, ddp: Distributed, device: torch.device) -> Path | None:
    if args.batch_size % ddp.world:
        raise UsageError(f"--batch_size {args.batch_size} is not divisible by {ddp.world} processes")
    seed_everything(args.seed)
    payload, cfg = read_checkpoint_and_config(args, args.resume_checkpoint_path)
    mosaic = args.aug_rate if args.dataset == "mvtec" and not args.no_augment else 0.0
    data = AnomalyDataset(args.train_data_path, args.dataset, "test", image_size=cfg.image_size,
                          augment=None if args.no_augment else build_augment(),
                          mosaic_rate=mosaic)
    save_path = Path(args.save_path)
    log = Logger(save_path / "result.txt", ddp.main)
    log(" ".join(f"--{k} {v}" for k, v in vars(args).items()))

    model = build_model(args, cfg, payload, device)  # with the resumed weights, if any
    optimizer = torch.optim.Adam(trainable_parameter_groups(model, args.learning_rate),
                                 betas=(0.5, 0.999))
    start = 0
    if payload is not None:  # ours also resumes optimizer + epoch; a released file only weights
        if "optimizer" in payload:  # moments and step counts; the learning rates are the flags'
            lrs = [g["lr"] for g in optimizer.param_groups]
            optimizer.load_state_dict(payload["optimizer"])
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        start = int(payload.get("epoch", 0))
        log(f"resumed from {args.resume_checkpoint_path} at epoch {start}")
    model.train()
    net = DistributedDataParallel(model) if ddp.world > 1 else model
    sampler = DistributedSampler(data, num_replicas=ddp.world, rank=ddp.rank, shuffle=True,
                                 seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch_size // ddp.world, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    group = args.group_id_list[0]
    last = Path(args.resume_checkpoint_path) if payload is not None else None
    for epoch in range(start + 1, args.epoch + 1):
        torch.manual_seed(args.seed + epoch)  # dropout, augmentation: a resumed run repeats them
        sampler.set_epoch(epoch)
        losses = []
        for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{args.epoch}",
                                          disable=not ddp.main), start=1):
            with autocast(device, args.precision):
                maps = net(batch["image"].to(device, non_blocking=True))
            loss = segmentation_loss([m.float() for m in maps.raw + maps.new],
                                     batch["mask"].to(device))
            if not torch.isfinite(loss):
                kept = f"; last good checkpoint: {last}" if last else ""
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}, step {step}{kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if epoch % args.print_freq == 0:
            log(f"epoch {epoch}: mean loss {np.mean(losses):.4f} over {len(losses)} steps")
        if epoch % args.save_freq == 0 or epoch == args.epoch:
            if ddp.main:
                last = save_path / f"epoch_{epoch}_group_id_{group}.pth"
                save_checkpoint(model, last, optimizer=optimizer.state_dict(), epoch=epoch,
                                train_args=vars(args))
                validate(model, args, cfg, device, log)
    return last


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        last = train(args)
    except (*INPUT_ERRORS, TrainingError) as e:
        return fail(e)
    if last is not None:
        print(f"done in {time.time() - start:.0f} s; last checkpoint {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
