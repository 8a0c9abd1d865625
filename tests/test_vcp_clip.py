"""Prompted text encoding, Pre-VCP, Post-VCP and the two branches (docs/reproduction.md §3-6)."""
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import VCPCLIP, VCPConfig, load_clip
from model.vcp_clip import AnomalyMaps
from model.post_vcp import PostVCP
from model.pre_vcp import PreVCP
from model.tokenizer import CLASS_ID


@pytest.fixture(scope="module")
def clip(tiny_archive):
    return load_clip(tiny_archive, 56)


def oracle_text(model: VCPCLIP, class_tokens: torch.Tensor) -> torch.Tensor:
    """One image and one template at a time, building each sequence as a list of rows."""
    clip, prompts, cfg = model.clip, model.prompts, model.cfg
    r, n = cfg.prompt_len, cfg.deep_prompt_len
    out = []
    for b in range(class_tokens.shape[0]):
        states = []
        for ids in model.template_ids:
            ids = ids.tolist()
            p, e = ids.index(CLASS_ID), ids.index(49407)
            rows = [clip.token_embedding.weight[i] for i in ids]
            rows = (rows[:p] + list(class_tokens[b]) + rows[p + 1:])[:77]
            x = torch.stack(rows) + clip.positional_embedding
            shallow = prompts.prompt_proj(prompts.prompt_embeddings[0])  # [n, T]
            x = torch.cat([x[:1], shallow, x[1:]])[:77]
            for i, block in enumerate(clip.transformer.resblocks):
                if 1 <= i <= cfg.total_d_layer_len:
                    x = x.clone()
                    x[1:1 + n] = prompts.prompt_proj(prompts.deep_prompt_embeddings[i - 1])
                x = block(x[None], causal=True)[0]
            x = torch.cat([x[:1], x[1 + n:]])
            x = clip.ln_final(prompts.prompt_norm(x))
            f = x[e + r - 1] @ clip.text_projection
            states.append(f / f.norm())
        out.append(torch.stack(states))
    return torch.stack(out)  # one template per state: averaging is the identity


@pytest.mark.parametrize("r,n,depth", [(2, 1, 3), (3, 2, 2), (1, 1, 0)])
def test_batched_text_encoding_equals_per_image_loop(clip, r, n, depth):
    torch.manual_seed(r)
    cfg = VCPConfig(features_list=(4,), image_size=56, prompt_len=r, deep_prompt_len=n,
                    total_d_layer_len=depth)
    model = VCPCLIP(clip, cfg).eval()
    for p in model.prompts.parameters():  # make the prompts matter
        p.data.normal_(0, 0.5)
    image_features = torch.randn(5, 128)
    with torch.no_grad():
        batched = model.encode_text(image_features)
        expected = oracle_text(model, model.pre_vcp(image_features))
    assert batched.shape == (5, 2, 128)
    assert (batched - expected).abs().max() < 1e-5
    # each image gets its own text: the rows differ across images
    assert (batched[0] - batched[1]).abs().max() > 1e-4


def test_prompt_dropout_only_in_training(clip, tiny_vcp_cfg):
    model = VCPCLIP(clip, tiny_vcp_cfg)
    feats = torch.randn(2, 128)
    model.train()
    assert not torch.equal(model.encode_text(feats), model.encode_text(feats))
    model.eval()
    assert torch.equal(model.encode_text(feats), model.encode_text(feats))


def test_pre_vcp_worked_example():
    pre = PreVCP(prompt_len=2, width=4, embed_dim=4)
    with torch.no_grad():
        pre.prompt_query.copy_(torch.tensor([[[0.1] * 4, [0.0] * 4]]))
        pre.prompt_linear1.fc.weight.copy_(torch.tensor([[[0.0, 1.0, 0.0]], [[1.0, 0.0, -1.0]]]))
        pre.prompt_linear1.fc.bias.copy_(torch.tensor([0.0, 0.5]))
    feats = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # channel 0 copies the feature; channel 1 is x[i-1] - x[i+1] + 0.5 with zero padding
    expected = torch.tensor([[[1.1, 2.1, 3.1, 4.1], [-1.5, -1.5, -1.5, 3.5]]])
    assert torch.allclose(pre(feats), expected)
    assert math.isclose(pre.prompt_temp.item(), math.log(1 / 0.07), rel_tol=1e-6)
    pre.use_global = False
    assert torch.equal(pre(feats.repeat(3, 1)), pre.prompt_query.expand(3, 2, 4))


def test_pre_vcp_init_is_truncated_normal():
    q = PreVCP(prompt_len=2, width=768, embed_dim=768).prompt_query
    assert q.abs().max() <= 2 and 0.8 < q.std() < 1.0  # std of N(0,1) cut at +-2 is 0.88


def test_post_vcp_worked_example_has_no_sqrt_d_scaling():
    post = PostVCP(text_width=2, vision_width=2, heads=1)
    with torch.no_grad():
        for conv in (post.q_proj_pre, post.k_proj_pre_1, post.v_proj_pre_1, post.proj_post_t):
            conv.weight.copy_(torch.eye(2)[:, :, None])
            conv.bias.zero_()
    text = torch.tensor([[[1.0, 0.0]]])  # [B=1, S=1, T=2]
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, L=2, W=2]
    # scores q.k = [1, 0] -> softmax [e/(e+1), 1/(e+1)] = [0.7311, 0.2689]; out = that vector,
    # normalized: [0.9385, 0.3452]. (With 1/sqrt(2) it would be [0.8969, 0.4422].)
    a = math.e / (math.e + 1)
    expected = torch.tensor([a, 1 - a]) / math.hypot(a, 1 - a)
    assert torch.allclose(post(text, patches)[0, 0], expected, atol=1e-6)


def test_post_vcp_multihead_equals_naive_loop():
    torch.manual_seed(0)
    post = PostVCP(text_width=12, vision_width=16, heads=8)
    text, patches = torch.randn(3, 2, 12), F.normalize(torch.randn(3, 9, 16), dim=-1)
    conv = lambda c, x: torch.nn.functional.conv1d(x.transpose(1, 2), c.weight, c.bias).transpose(1, 2)
    q, k, v = conv(post.q_proj_pre, text), conv(post.k_proj_pre_1, patches), conv(post.v_proj_pre_1, patches)
    heads = []
    for h in range(8):
        sl = slice(2 * h, 2 * h + 2)
        attn = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2), dim=-1)  # over patches
        heads.append(attn @ v[..., sl])
    expected = F.normalize(conv(post.proj_post_t, torch.cat(heads, -1)), dim=-1)
    assert (post(text, patches) - expected).abs().max() < 1e-5


def test_maps_corners_equal_patch_probabilities(clip, tiny_vcp_cfg):
    """align_corners=True: the map's corner pixels are exactly the corner patches' softmax."""
    torch.manual_seed(0)
    model = VCPCLIP(clip, tiny_vcp_cfg).eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        maps = model(images)
        feats, tokens = clip.encode_image(images, tiny_vcp_cfg.features_list)
        text = model.encode_text(feats)
    assert len(maps.raw) == len(maps.new) == 4
    for k, layer in enumerate(tokens):
        patches = layer[:, 1:]
        raw = model.pre_vcp.prompt_temp.exp() * F.normalize(model.linear_layers.fc[k](patches), dim=-1) @ text.transpose(1, 2)
        pn = F.normalize(patches, dim=-1)
        new = model.post_vcp.prompt_temp_l1.exp() * pn @ model.post_vcp(text, pn).transpose(1, 2)
        for got, logits in ((maps.raw[k], raw), (maps.new[k], new)):
            assert got.shape == (2, 2, 56, 56)
            assert torch.allclose(got.sum(1), torch.ones(2, 56, 56), atol=1e-6)
            probs = logits.softmax(-1)  # [B, L, 2]
            assert torch.allclose(got[:, :, 0, 0], probs[:, 0], atol=1e-6)
            assert torch.allclose(got[:, :, -1, -1], probs[:, -1], atol=1e-6)
    raw_mean, new_mean = maps.abnormal()
    assert torch.equal(raw_mean, torch.stack([m[:, 1] for m in maps.raw]).mean(0))
    assert torch.equal(new_mean, torch.stack([m[:, 1] for m in maps.new]).mean(0))
    assert new_mean.shape == (2, 56, 56)


def reference_layout_maps(logits: torch.Tensor, size: int) -> torch.Tensor:
    """The original code's maps: [B,L,2] logits permuted and viewed as [B,2,h,h] (a channels-last
    view, no copy), upsampled, softmax over the channel."""
    b, n, c = logits.shape
    h = int(n ** 0.5)
    view = logits.permute(0, 2, 1).view(b, c, h, h)
    assert view.is_contiguous(memory_format=torch.channels_last)
    return F.interpolate(view, size=(size, size), mode="bilinear", align_corners=True).softmax(1)


@pytest.mark.parametrize("b, grid, size", [(3, 4, 56), (2, 37, 518), (5, 16, 224), (1, 3, 42)])
def test_maps_equal_the_reference_layout_bit_for_bit(b, grid, size):
    """Contiguous upsampling and one image at a time change nothing: maps, test-time means and
    gradients equal the original layout's exactly."""
    torch.manual_seed(grid)
    raw = (torch.randn(4, b, grid * grid, 2) * 5).requires_grad_()
    new = torch.randn(4, b, grid * grid, 2) * 5
    maps = AnomalyMaps(size, list(raw), list(new))
    expected = [reference_layout_maps(x, size) for x in raw]
    for got, want in zip(maps.raw, expected):
        assert torch.equal(got, want)
    weights = torch.randn(b, 2, size, size)
    grads = [torch.autograd.grad(sum((m * weights).sum() for m in ms), raw)[0]
             for ms in (maps.raw, expected)]
    assert torch.equal(*grads)
    with torch.no_grad():
        want = tuple(torch.stack([reference_layout_maps(x, size)[:, 1] for x in branch]).mean(0)
                     for branch in (raw, new))
        for per_image in (True, False, None):
            for got, w in zip(maps.abnormal(per_image), want):
                assert torch.equal(got, w)


def test_each_image_is_independent_of_its_batch(clip, tiny_vcp_cfg):
    model = VCPCLIP(clip, tiny_vcp_cfg).eval()
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        together = model(images).abnormal()
        alone = model(images[1:2]).abnormal()
    for a, b in zip(together, alone):
        assert (a[1:2] - b).abs().max() < 1e-5


def test_bad_model_config_is_named(clip):
    with pytest.raises(ValueError, match=r"layers \[6\] are outside 1..4"):
        VCPCLIP(clip, VCPConfig(features_list=(1, 6), image_size=56, total_d_layer_len=3))
    with pytest.raises(ValueError, match="total_d_layer_len 11 must be in 0..3"):
        VCPCLIP(clip, VCPConfig(features_list=(1,), image_size=56))


def test_model_package_never_names_cuda():
    model_dir = Path(__file__).resolve().parents[1] / "model"
    found = subprocess.run(["grep", "-rn", "--include=*.py", "cuda", str(model_dir)],
                           capture_output=True, text=True)
    assert found.stdout == ""
