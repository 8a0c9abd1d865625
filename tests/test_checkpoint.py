"""The released checkpoint layout (docs/reproduction.md §8): exact keys and shapes, round trip,
clear errors."""
import pytest
import torch

from model import (CheckpointError, VCPCLIP, build_vcp_clip, checkpoint_configs, load_clip,
                   read_checkpoint, save_checkpoint, vcp_state_dict)


@pytest.fixture()
def model(tiny_archive, tiny_vcp_cfg):
    torch.manual_seed(1)
    return VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg)


def released_layout_shapes(W=128, E=128, T=128, r=2, n=1, D=3, layers=4):
    """docs/reproduction.md §8, written out."""
    shapes = {"trainable_linearlayer": {}, "New_Lan_Embed": {
        "prompt_query": (1, r, T), "prompt_temp": (), "prompt_linear1.fc.weight": (r, 1, 3),
        "prompt_linear1.fc.bias": (r,)}, "Zero_try": {"prompt_temp_l1": ()}}
    for k in range(layers):
        shapes["trainable_linearlayer"].update({f"fc.{k}.weight": (E, W), f"fc.{k}.bias": (E,)})
    for name, cin in (("q_proj_pre", T), ("k_proj_pre_1", W), ("v_proj_pre_1", W), ("proj_post_t", W)):
        shapes["Zero_try"].update({f"{name}.weight": (W, cin, 1), f"{name}.bias": (W,)})
    shapes.update({"prompt_embeddings": (1, n, T), "deep_prompt_embeddings": (D, n, T),
                   "prompt_proj.weight": (T, T), "prompt_proj.bias": (T,),
                   "prompt_norm.weight": (T,), "prompt_norm.bias": (T,),
                   "prompt_text_projection": (T, E)})
    return shapes


def shapes_of(state):
    return {k: shapes_of(v) if isinstance(v, dict) else tuple(v.shape) for k, v in state.items()}


def test_layout_is_exactly_the_released_one(model):
    assert shapes_of(vcp_state_dict(model)) == released_layout_shapes()


def test_round_trip_is_bit_exact(model, tmp_path, tiny_archive, tiny_vcp_cfg):
    path = tmp_path / "ck.pth"
    save_checkpoint(model, path)
    fresh = build_vcp_clip(tiny_archive, tiny_vcp_cfg, checkpoint=path)
    a, b = vcp_state_dict(model), vcp_state_dict(fresh)
    for key in a:
        pairs = a[key].items() if isinstance(a[key], dict) else [(key, a[key])]
        for k, v in pairs:
            w = b[key][k] if isinstance(a[key], dict) else b[key]
            assert torch.equal(v, w), k
    vcp_cfg, clip_cfg = checkpoint_configs(read_checkpoint(path))
    assert vcp_cfg == tiny_vcp_cfg and clip_cfg == model.clip.cfg


def test_released_reader_ignores_our_config_key(model, tmp_path, tiny_archive, tiny_vcp_cfg):
    """A reader that knows only the released keys: three groups + non-strict top level."""
    path = tmp_path / "ck.pth"
    save_checkpoint(model, path)
    ck = torch.load(path, map_location="cpu")
    assert "vcp_config" in ck
    other = VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg)
    other.linear_layers.load_state_dict(ck["trainable_linearlayer"])
    other.pre_vcp.load_state_dict(ck["New_Lan_Embed"])
    other.post_vcp.load_state_dict(ck["Zero_try"])
    result = other.prompts.load_state_dict(ck, strict=False)
    assert not result.missing_keys
    assert torch.equal(other.prompts.prompt_embeddings, model.prompts.prompt_embeddings)


def test_a_released_file_without_config_loads(model, tmp_path, tiny_archive, tiny_vcp_cfg):
    path = tmp_path / "train_visa.pth"
    torch.save(vcp_state_dict(model), path)  # exactly the released keys, nothing else
    assert checkpoint_configs(read_checkpoint(path)) == (None, None)
    fresh = build_vcp_clip(tiny_archive, tiny_vcp_cfg, checkpoint=path)
    assert torch.equal(fresh.post_vcp.q_proj_pre.weight, model.post_vcp.q_proj_pre.weight)


def test_wrong_shape_and_missing_key_are_named(model, tmp_path, tiny_archive, tiny_vcp_cfg):
    state = vcp_state_dict(model)
    state["Zero_try"]["q_proj_pre.weight"] = torch.zeros(128, 64, 1)
    del state["deep_prompt_embeddings"]
    del state["New_Lan_Embed"]["prompt_temp"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build_vcp_clip(tiny_archive, tiny_vcp_cfg, checkpoint=path)
    msg = str(err.value)
    assert str(path) in msg
    assert "Zero_try.q_proj_pre.weight: expected shape [128, 128, 1], found [128, 64, 1]" in msg
    assert "deep_prompt_embeddings: missing (expected shape [3, 1, 128])" in msg
    assert "New_Lan_Embed.prompt_temp: missing" in msg


def test_missing_or_unreadable_checkpoint(tmp_path, tiny_archive, tiny_vcp_cfg):
    with pytest.raises(CheckpointError, match="not found at .*nope.pth"):
        build_vcp_clip(tiny_archive, tiny_vcp_cfg, checkpoint=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(CheckpointError, match="cannot read VCP checkpoint .*junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")


def test_write_is_atomic(model, tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    save_checkpoint(model, path)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]


def test_unknown_config_field_is_named(model, tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint(model, path)
    payload = read_checkpoint(path)
    payload["vcp_config"]["vcp"]["future_knob"] = 1
    with pytest.raises(CheckpointError, match="future_knob"):
        checkpoint_configs(payload)
