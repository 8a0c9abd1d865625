"""What the benchmarks share: timing, peak memory, and a VCP-CLIP with random weights of a
config's real shapes (bench/ is run from the repository root or as ``python bench/NAME.py``)."""
from __future__ import annotations

import resource
import time

import torch

from model import CLIPConfig, VCPCLIP, VCPConfig, load_clip
from tests.helpers.random_clip import random_clip_state_dict


def timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU, allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def evenly_spaced_layers(n_layers: int, k: int = 4) -> tuple[int, ...]:
    """k tapped layers, 1-based, the last one included: (6, 12, 18, 24) for ViT-L."""
    return tuple(n_layers * (i + 1) // k for i in range(k))


def build(args, device) -> VCPCLIP:
    cfg = CLIPConfig.from_json(args.config)
    layers = args.features_list or evenly_spaced_layers(cfg.vision_layers)
    vcp = VCPConfig(features_list=tuple(layers), image_size=args.image_size,
                    total_d_layer_len=cfg.text_layers - 1)
    clip = load_clip(random_clip_state_dict(cfg), args.image_size)
    return VCPCLIP(clip, vcp).to(device).eval()


def per_image_text(model: VCPCLIP, feats: torch.Tensor) -> torch.Tensor:
    """The reference's way: one image and one template per text-encoder call."""
    out = []
    for b in range(feats.shape[0]):
        tokens = model.pre_vcp(feats[b:b + 1])
        out.append(torch.cat([model.clip.encode_text_prompted(
            model.template_ids[s:s + 1], model.class_pos[s:s + 1], model.eot_pos[s:s + 1],
            tokens, model.prompts) for s in range(len(model.template_ids))], dim=1))
    return torch.cat(out)
