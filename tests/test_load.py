"""Backbone loading from OpenAI-format weights (docs/reproduction.md §1)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model import CLIPConfig, WeightsError, infer_config, load_clip, read_clip_state_dict
from model.clip import ResidualBlock
from model.load import resize_positional_embedding

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_archive_is_openai_format(tiny_archive):
    state = torch.jit.load(str(tiny_archive), map_location="cpu").state_dict()
    assert {"input_resolution", "context_length", "vocab_size"} <= set(state)
    assert state["visual.conv1.weight"].dtype == torch.float16
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "transformer.resblocks.3.mlp.c_proj.bias" in state


def test_inferred_config(tiny_archive, tiny_cfg):
    state = read_clip_state_dict(tiny_archive)
    assert not {"input_resolution", "context_length", "vocab_size"} & set(state)
    assert infer_config(state) == tiny_cfg == CLIPConfig(
        embed_dim=128, image_size=56, vision_layers=4, vision_width=128, patch_size=14,
        text_width=128, text_heads=2, text_layers=4, context_length=77, vocab_size=49408)


def test_vit_l_14_336_shapes_infer_the_published_config():
    cfg = CLIPConfig.from_json(CONFIGS / "ViT-L-14-336.json")
    shapes = {"visual.conv1.weight": (1024, 3, 14, 14), "visual.positional_embedding": (577, 1024),
              "ln_final.weight": (768,), "text_projection": (768, 768),
              "positional_embedding": (77, 768), "token_embedding.weight": (49408, 768)}
    state = {k: torch.empty(s) for k, s in shapes.items()}
    state.update({f"visual.transformer.resblocks.{i}.attn.in_proj_weight": torch.empty(0)
                  for i in range(24)})
    state.update({f"transformer.resblocks.{i}.ln_1.weight": torch.empty(0) for i in range(12)})
    assert infer_config(state) == cfg
    assert (cfg.vision_heads, cfg.text_heads) == (16, 12)


def test_load_casts_to_fp32_resizes_and_appends_class_row(tiny_archive):
    fp16 = read_clip_state_dict(tiny_archive)
    clip = load_clip(tiny_archive, image_size=112)
    assert all(p.dtype == torch.float32 for p in clip.parameters())
    tokens = clip.token_embedding.weight
    assert tokens.shape == (49409, 128)
    assert torch.equal(tokens[-1], torch.zeros(128))  # <|class|> row
    assert torch.equal(tokens[:-1], fp16["token_embedding.weight"].float())
    pos = clip.visual.positional_embedding.detach()
    assert pos.shape == (1 + 8 * 8, 128)
    old = fp16["visual.positional_embedding"].float()
    assert torch.equal(pos[0], old[0])  # class row kept
    # independent oracle: Pillow's bicubic resize of each channel (what antialias=True follows)
    expected = np.stack([np.asarray(Image.fromarray(old[1:, c].reshape(4, 4).numpy(), mode="F")
                                    .resize((8, 8), Image.BICUBIC)) for c in range(128)], -1)
    assert np.abs(pos[1:].numpy() - expected.reshape(64, 128)).max() < 1e-5


def test_resize_24_to_37_grid_matches_pillow():
    torch.manual_seed(0)
    pos = torch.randn(1 + 24 * 24, 6)
    out = resize_positional_embedding(pos, 37)
    assert out.shape == (1370, 6)
    expected = np.stack([np.asarray(Image.fromarray(pos[1:, c].reshape(24, 24).numpy(), mode="F")
                                    .resize((37, 37), Image.BICUBIC)) for c in range(6)], -1)
    assert np.abs(out[1:].numpy() - expected.reshape(-1, 6)).max() < 1e-4


def test_plain_state_dict_file_loads(tmp_path, tiny_archive):
    path = tmp_path / "clip_state.pt"
    torch.save(read_clip_state_dict(tiny_archive), path)
    a, b = load_clip(path, 56), load_clip(tiny_archive, 56)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_and_unreadable_weights_name_the_path_and_the_official_file(tmp_path):
    missing = tmp_path / "ViT-L-14-336px.pt"
    with pytest.raises(WeightsError, match=f"{missing}.*ViT-L-14-336px.pt"):
        load_clip(missing, 518)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=f"cannot read CLIP weights {junk}.*ViT-L-14-336px"):
        load_clip(junk, 518)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"no CLIP ViT weights .*first keys: 'foo'"):
        load_clip(tmp_path / "other.pt", 518)


def test_config_that_disagrees_names_the_field(tiny_archive, tmp_path):
    wrong = CLIPConfig.from_json(CONFIGS / "ViT-B-16.json")
    with pytest.raises(WeightsError, match="embed_dim: 512 vs 128"):
        load_clip(tiny_archive, 56, expected=wrong)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        load_clip(tiny_archive, 60)
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 1}')
    with pytest.raises(ValueError, match=f"{bad}.*vision_cfg"):
        CLIPConfig.from_json(bad)


@pytest.mark.parametrize("causal", [False, True])
def test_residual_block_equals_torch_multihead_attention(causal):
    """Oracle: the same weights in nn.MultiheadAttention + an explicit exact-GELU MLP."""
    torch.manual_seed(0)
    block = ResidualBlock(16, 4, "gelu")
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    mha.load_state_dict(block.attn.state_dict())
    x = torch.randn(3, 7, 16)
    mask = torch.triu(torch.full((7, 7), float("-inf")), 1) if causal else None
    h = x + mha(block.ln_1(x), block.ln_1(x), block.ln_1(x), attn_mask=mask,
                need_weights=False)[0]
    mlp = block.mlp
    expected = h + mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(block.ln_2(h))))
    assert (block(x, causal) - expected).abs().max() < 1e-5


def test_vision_tower_taps_layers(tiny_archive):
    clip = load_clip(tiny_archive, 56)
    feats, tokens = clip.encode_image(torch.randn(2, 3, 56, 56), (2, 4))
    assert feats.shape == (2, 128) and len(tokens) == 2
    assert all(t.shape == (2, 1 + 16, 128) for t in tokens)
    # the last tapped block is the input of ln_post: image_features = ln_post(x[:, 0]) @ proj
    expected = clip.visual.ln_post(tokens[1][:, 0]) @ clip.visual.proj
    assert torch.allclose(feats, expected, atol=1e-6)


def test_quick_gelu_is_an_option(tiny_archive):
    a = load_clip(tiny_archive, 56, activation="quick_gelu")
    x = torch.randn(1, 3, 56, 56)
    assert not torch.allclose(a.encode_image(x, (4,))[0], load_clip(tiny_archive, 56).encode_image(x, (4,))[0])
    with pytest.raises(ValueError, match="activation"):
        load_clip(tiny_archive, 56, activation="relu")
