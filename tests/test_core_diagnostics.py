"""Gradient-conflict diagnostics and RRT weight arithmetic."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from t3s_ray.t3s import gradient_conflict, rrt_merge, token_logprobs_from_hidden

B, T, H, V = 2, 7, 5, 9


def lm_head_problem():
    """A tiny "model" (a linear lm head over fixed hidden states) with anchors and targets."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(H, V)
    with torch.no_grad():
        model.weight.copy_(torch.randn(V, H, generator=generator))
        model.bias.copy_(torch.randn(V, generator=generator))
    hidden = torch.randn(B, T, H, generator=generator)
    input_ids = torch.randint(0, V, (B, T), generator=generator)
    targets = torch.zeros(B, T, dtype=torch.bool)
    targets[:, 2:] = True
    anchors = torch.zeros_like(targets)
    anchors[0, [2, 5]] = True
    anchors[1, 3] = True
    return model, hidden, input_ids, targets, anchors


def independent_group_gradient(model, hidden, input_ids, group):
    """Mean CE over ``group`` from a full log-softmax, backpropagated on its own."""
    model.zero_grad()
    logprobs = torch.log_softmax(model(hidden), -1)
    ce = [-logprobs[b, t - 1, input_ids[b, t]] for b in range(B) for t in range(1, T) if group[b, t]]
    (sum(ce) / len(ce)).backward()
    return torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()]).double()


def test_gradient_conflict_matches_separate_backward_passes():
    model, hidden, input_ids, targets, anchors = lm_head_problem()
    token_logprobs = token_logprobs_from_hidden(hidden, model.weight, input_ids, targets, 4, lm_head_bias=model.bias)

    result = gradient_conflict(model, token_logprobs, anchors, targets)

    anchor_grad = independent_group_gradient(model, hidden, input_ids, anchors & targets)
    other_grad = independent_group_gradient(model, hidden, input_ids, targets & ~anchors)
    assert result["anchor_grad_norm"] == pytest.approx(anchor_grad.norm().item(), rel=1e-5)
    assert result["other_grad_norm"] == pytest.approx(other_grad.norm().item(), rel=1e-5)
    assert result["ratio"] == pytest.approx((anchor_grad.norm() / other_grad.norm()).item(), rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(anchor_grad, other_grad, dim=0).item()
    assert result["cosine"] == pytest.approx(cosine, rel=1e-5, abs=1e-7)


def test_gradient_conflict_keeps_the_graph_and_respects_params():
    model, hidden, input_ids, targets, anchors = lm_head_problem()
    token_logprobs = token_logprobs_from_hidden(hidden, model.weight, input_ids, targets, lm_head_bias=model.bias)

    only_bias = gradient_conflict(model, token_logprobs, anchors, targets, params=[model.bias])
    model.zero_grad()
    (-token_logprobs.sum()).backward()  # the graph is still usable for the training step

    anchor_bias_grad = independent_group_gradient(model, hidden, input_ids, anchors & targets)[-V:]
    assert only_bias["anchor_grad_norm"] == pytest.approx(anchor_bias_grad.norm().item(), rel=1e-5)


def test_gradient_conflict_with_an_empty_group_is_nan_not_zero():
    model, hidden, input_ids, targets, _ = lm_head_problem()
    token_logprobs = token_logprobs_from_hidden(hidden, model.weight, input_ids, targets, lm_head_bias=model.bias)

    result = gradient_conflict(model, token_logprobs, torch.zeros_like(targets), targets)

    assert result["anchor_grad_norm"] == 0.0
    assert result["other_grad_norm"] > 0
    assert math.isnan(result["ratio"]) and math.isnan(result["cosine"])


def write_model(folder, tensors, shards=1):
    """A Hugging Face style folder: safetensors (single or sharded) plus non-weight files."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for shard in range(shards):
            file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[shard::shards]}
            save_file(part, str(folder / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file_name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"folder": folder.name}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def random_tensors(seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(6, 4, generator=generator).to(dtype),
        "layers.0.proj.weight": torch.randn(4, 4, generator=generator).to(dtype),
        "layers.0.proj.bias": torch.randn(4, generator=generator).to(dtype),
        "norm.weight": torch.randn(4, generator=generator).to(dtype),
    }


def test_rrt_merge_is_exact_in_fp32_and_copies_non_weight_files(tmp_path):
    theta0, thetaf, thetab = random_tensors(0), random_tensors(1), random_tensors(2)
    theta0["position_ids"] = torch.arange(5)  # integer buffer: taken from θ0
    thetaf["position_ids"] = thetab["position_ids"] = torch.arange(5) * 7
    dirs = [
        write_model(tmp_path / "theta0", theta0),
        write_model(tmp_path / "thetaf", thetaf, shards=2),
        write_model(tmp_path / "thetab", thetab, shards=3),
    ]

    out = rrt_merge(*dirs, tmp_path / "rrt")

    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(theta0)
    for name in random_tensors(0):
        assert torch.equal(merged[name], theta0[name] + (thetaf[name] - thetab[name])), name
    assert torch.equal(merged["position_ids"], theta0["position_ids"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text()) == {"folder": "theta0"}
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "tokenizer.json").exists()
    assert not (out / "model.safetensors.index.json").exists()


def test_rrt_merge_computes_in_fp32_and_stores_theta0_dtype(tmp_path):
    theta0, thetaf, thetab = random_tensors(0, torch.bfloat16), random_tensors(1), random_tensors(2, torch.bfloat16)
    dirs = [
        write_model(tmp_path / role, tensors)
        for role, tensors in zip(("a", "b", "c"), (theta0, thetaf, thetab), strict=True)
    ]

    merged = load_file(str(rrt_merge(*dirs, tmp_path / "rrt") / "model.safetensors"))

    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        expected = (theta0[name].float() + (thetaf[name].float() - thetab[name].float())).to(torch.bfloat16)
        assert torch.equal(tensor, expected), name


def test_rrt_merge_names_folder_and_tensor_on_mismatch(tmp_path):
    theta0 = write_model(tmp_path / "theta0", random_tensors(0))
    thetaf = write_model(tmp_path / "thetaf", random_tensors(1))
    renamed = random_tensors(2)
    renamed["norm.scale"] = renamed.pop("norm.weight")
    thetab = write_model(tmp_path / "thetab", renamed)
    with pytest.raises(ValueError, match=r"thetab.*missing \['norm.weight'\].*extra \['norm.scale'\]"):
        rrt_merge(theta0, thetaf, thetab, tmp_path / "rrt")

    reshaped = random_tensors(3)
    reshaped["layers.0.proj.bias"] = torch.zeros(5)
    other = write_model(tmp_path / "reshaped", reshaped)
    with pytest.raises(ValueError, match=r"'layers.0.proj.bias'.*\(5,\) in .*reshaped"):
        rrt_merge(theta0, other, thetaf, tmp_path / "rrt")

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        rrt_merge(theta0, thetaf, tmp_path / "empty", tmp_path / "rrt")


def test_rrt_merge_of_hugging_face_checkpoints_loads_with_from_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    models = [LlamaForCausalLM(config) for _ in range(3)]
    for model, role in zip(models, ("theta0", "thetaf", "thetab"), strict=True):
        model.save_pretrained(tmp_path / role)

    merged = LlamaForCausalLM.from_pretrained(
        rrt_merge(tmp_path / "theta0", tmp_path / "thetaf", tmp_path / "thetab", tmp_path / "rrt")
    )

    theta0, thetaf, thetab = (m.state_dict() for m in models)
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, theta0[name] + (thetaf[name] - thetab[name]), rtol=0, atol=1e-6)
