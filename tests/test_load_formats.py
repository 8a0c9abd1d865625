"""CLIP weights from transformers, open_clip and safetensors files (docs/weights.md), checked
against transformers' own CLIP forward, and the weights the loader refuses."""
import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import transformers_clip
from model import WeightsError, infer_config, load_clip, read_clip_state_dict
from model.tokenizer import Tokenizer
from utils.cli import add_model_flags, model_source
from utils.inference.runtime import load_model
from helpers.random_clip import write_archive

PROMPTS = ["a photo of a good bottle", "a photo of a damaged screw", "x", ""]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def text_features(clip, ids: torch.Tensor) -> torch.Tensor:
    """OpenAI's plain (unprompted) text forward through the project's modules: ids [N,77] ->
    [N,E], the end token's row (the largest id) projected."""
    x = clip.token_embedding(ids) + clip.positional_embedding  # [N, 77, T]
    for block in clip.transformer.resblocks:
        x = block(x, causal=True)
    x = clip.ln_final(x)
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ clip.text_projection


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_transformers_checkpoint_equals_transformers_forward(tmp_path, activation):
    hf = transformers_clip(activation, seed=1)
    hf.save_pretrained(tmp_path / "clip", safe_serialization=True)
    clip = load_clip(tmp_path / "clip", 56, activation=activation)
    torch.manual_seed(0)
    images = torch.randn(3, 3, 56, 56)
    ids = Tokenizer().tokenize(PROMPTS, 77)  # [4, 77]
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=images, output_hidden_states=True)
        text = hf.text_model(input_ids=ids)
        logits = hf(input_ids=ids, pixel_values=images).logits_per_image  # [3, 4]
        image_features, tapped = clip.encode_image(images, (1, 2, 3, 4))
        ours_text = text_features(clip, ids)
    # hidden_states[0] is ln_pre's output, [l] block l's: the tapped tokens, before ln_post
    assert len(vision.hidden_states) == 5
    for layer, tokens in zip((1, 2, 3, 4), tapped):
        assert (tokens - vision.hidden_states[layer]).abs().max() < 1e-5
    assert (image_features - hf.visual_projection(vision.pooler_output)).abs().max() < 1e-5
    assert (ours_text - hf.text_projection(text.pooler_output)).abs().max() < 1e-5
    norm = nn.functional.normalize
    ours = clip.logit_scale.exp() * norm(image_features, dim=-1) @ norm(ours_text, dim=-1).T
    assert (ours - logits).abs().max() < 1e-4  # logits are ~exp(2.66) = 14x the embeddings
    assert image_features.abs().max() > 0.1 and ours_text.abs().max() > 0.1  # not trivially 0
    alone = load_clip(tmp_path / "clip" / "model.safetensors", 56, activation=activation)
    assert same_weights(alone, clip)  # the weight file without its folder loads the same


def scripts_model(pretrained, checkpoint):
    """The model test.py and predict.py build from ``--pretrained_path``, at 84 px (so the
    positional embedding is resized from the checkpoint's 56)."""
    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    args = parser.parse_args(["--pretrained_path", str(pretrained), "--image_size", "84"])
    return load_model(model_source(args, str(checkpoint)), torch.device("cpu"))


def test_transformers_folder_and_openai_archive_give_identical_vcp_maps(
        tmp_path, hf_folder, tiny_checkpoint):
    state = read_clip_state_dict(hf_folder)
    archive = write_archive(state, infer_config(state), tmp_path / "converted.pt")
    models = [scripts_model(p, tiny_checkpoint) for p in (hf_folder, archive)]
    for model in models:  # config.json's hidden_act (quick_gelu) does not change the activation
        assert {type(b.mlp.act) for b in model.clip.transformer.resblocks} == {nn.GELU}
        assert {type(b.mlp.act) for b in model.clip.visual.transformer.resblocks} == {nn.GELU}
    torch.manual_seed(0)
    images = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        maps = [model(images) for model in models]
    assert len(maps[0].raw_logits) == len(maps[0].new_logits) == 4
    for branch in ("raw_logits", "new_logits"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(maps[0], branch),
                                                     getattr(maps[1], branch)))
    assert all(torch.equal(a, b) for a, b in zip(maps[0].abnormal(), maps[1].abnormal()))
    assert maps[0].abnormal()[0].shape == (2, 84, 84)


def open_clip_training_checkpoint(state, folder):
    """What open_clip's training writes: the DDP model's state dict under 'state_dict'."""
    path = folder / "epoch_10.pt"
    torch.save({"epoch": 10, "name": "tiny", "state_dict": {f"module.{k}": v
                                                            for k, v in state.items()}}, path)
    return path


def open_clip_custom_text(state, folder):
    """open_clip's CustomTextCLIP names (its convert_to_custom_text_state_dict): the text tower
    under 'text.', in the hub's file name for open_clip safetensors, read as a folder."""
    text = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")
    save_file({f"text.{k}" if k.startswith(text) else k: v for k, v in state.items()},
              folder / "open_clip_model.safetensors")
    return folder


@pytest.mark.parametrize("write", [open_clip_training_checkpoint, open_clip_custom_text])
def test_open_clip_layouts_load_as_the_archive(tmp_path, tiny_archive, write):
    state = read_clip_state_dict(tiny_archive)
    assert same_weights(load_clip(write(state, tmp_path), 56), load_clip(tiny_archive, 56))


def test_safetensors_with_openai_names_loads_without_unpickling(tmp_path, tiny_archive,
                                                                monkeypatch):
    path = tmp_path / "clip.safetensors"
    save_file(read_clip_state_dict(tiny_archive), path)  # fp16, as OpenAI's tensors
    expected = load_clip(tiny_archive, 56)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    assert same_weights(load_clip(path, 56), expected)


def test_the_layout_is_told_by_the_keys_not_the_file_name(tmp_path, hf_folder, tiny_archive):
    (tmp_path / "a").mkdir()
    misnamed_hf = shutil.copy(hf_folder / "model.safetensors", tmp_path / "a" / "ViT-L-14-336px.pt")
    misnamed_pt = tmp_path / "model.safetensors"
    torch.save(read_clip_state_dict(tiny_archive), misnamed_pt)
    assert same_weights(load_clip(misnamed_hf, 56), load_clip(hf_folder, 56))
    assert same_weights(load_clip(misnamed_pt, 56), load_clip(tiny_archive, 56))


def test_a_transformers_folder_with_pytorch_model_bin(tmp_path, hf_folder):
    """The hub's other file: a pickle (torch.save) of the same state dict, read weights-only."""
    folder = tmp_path / "clip"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder)
    torch.save(load_file(hf_folder / "model.safetensors"), folder / "pytorch_model.bin")
    assert same_weights(load_clip(folder, 56), load_clip(hf_folder, 56))


def test_state_dicts_in_any_layout_load_from_memory(hf_folder):
    raw = load_file(hf_folder / "model.safetensors")
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in raw
    assert same_weights(load_clip(raw, 56), load_clip(hf_folder, 56))


def test_unknown_layout_names_the_layouts_accepted_and_the_first_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, path)
    with pytest.raises(WeightsError) as e:
        load_clip(path, 56)
    message = str(e.value)
    assert message.startswith(f"{path} holds no CLIP ViT weights")
    assert "first keys: 'encoder.weight', 'decoder.bias'" in message
    assert "'visual.conv1.weight'" in message
    assert "'vision_model.embeddings.patch_embedding.weight'" in message
    assert "open_clip" in message


def test_a_resnet_clip_is_refused(tmp_path, tiny_archive):
    state = {k: v for k, v in read_clip_state_dict(tiny_archive).items()
             if not k.startswith("visual.")}
    state.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
                  "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                  "visual.attnpool.positional_embedding": torch.zeros(50, 2048)})
    torch.save(state, tmp_path / "RN50.pt")
    with pytest.raises(WeightsError, match="RN50.pt holds a ResNet CLIP.*needs a CLIP ViT"):
        load_clip(tmp_path / "RN50.pt", 56)


def test_transformers_checkpoints_the_loader_cannot_build(tmp_path):
    import transformers
    hf = transformers_clip()
    vision_only = transformers.CLIPVisionModelWithProjection(hf.config.vision_config)
    vision_only.save_pretrained(tmp_path / "vision", safe_serialization=True)
    with pytest.raises(WeightsError, match="'clip_vision_model' model, not transformers' CLIP"):
        load_clip(tmp_path / "vision", 56)
    (tmp_path / "vision" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"lacks \['token_embedding.weight', "
                                           r"'positional_embedding', 'ln_final.weight', "
                                           r"'text_projection'\].*both towers"):
        load_clip(tmp_path / "vision", 56)
    # heads of 32 channels: only config.json says so (the tensors cannot)
    transformers_clip(vision={"num_attention_heads": 4}).save_pretrained(tmp_path / "heads")
    with pytest.raises(WeightsError, match=r"vision_config.num_attention_heads 4 \(this CLIP "
                                           r"builds 2\)"):
        load_clip(tmp_path / "heads", 56)
    # an MLP 3x wide: the tensors' shapes say so
    transformers_clip(vision={"intermediate_size": 384}).save_pretrained(tmp_path / "mlp")
    with pytest.raises(WeightsError, match=r"visual.transformer.resblocks.0.mlp.c_fc.weight "
                                           r"\[384, 128\] \(needs \[512, 128\]\)"):
        load_clip(tmp_path / "mlp", 56)


def test_config_json_is_checked_against_the_tensors(tmp_path, hf_folder):
    folder = shutil.copytree(hf_folder, tmp_path / "clip")
    config = folder / "config.json"
    raw = json.loads(config.read_text())
    raw["vision_config"]["num_hidden_layers"] = 6
    raw["projection_dim"] = 64
    config.write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=f"{config} does not match the CLIP weights beside it "
                                           r"\(config.json vs weights\): projection_dim: 64 vs "
                                           "128; vision_config.num_hidden_layers: 6 vs 4"):
        load_clip(folder, 56)
    config.write_text(json.dumps({"model_type": "clip"}))  # states nothing: nothing to check
    assert same_weights(load_clip(folder, 56), load_clip(hf_folder, 56))
    config.write_text("{not json")
    with pytest.raises(WeightsError, match=f"cannot read {config}"):
        load_clip(folder, 56)


@pytest.mark.parametrize("keep", [20, 4000])
def test_a_truncated_safetensors_file_is_named(tmp_path, hf_folder, keep):
    path = tmp_path / "model.safetensors"
    path.write_bytes((hf_folder / "model.safetensors").read_bytes()[:keep])
    with pytest.raises(WeightsError, match=f"cannot read CLIP weights {path} .*cut short"):
        load_clip(path, 56)


def test_a_folder_without_weights_names_the_files_looked_for(tmp_path):
    with pytest.raises(WeightsError, match=f"{tmp_path} is a folder without CLIP weights: "
                                           "expected one of open_clip_model.safetensors, "
                                           "open_clip_pytorch_model.bin, model.safetensors"):
        load_clip(tmp_path, 56)


def test_a_folder_with_open_clip_and_timm_files_reads_open_clip_s(tmp_path, tiny_archive):
    """As a timm repository on the hub: open_clip's file beside timm's own model.safetensors."""
    state = read_clip_state_dict(tiny_archive)
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    save_file({"patch_embed.proj.weight": torch.zeros(128, 3, 14, 14)},
              tmp_path / "model.safetensors")
    assert same_weights(load_clip(tmp_path, 56), load_clip(tiny_archive, 56))
