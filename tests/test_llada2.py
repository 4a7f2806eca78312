"""The native LLaDA2 model (``t3s_ray/llada2.py``) and its loading policy (``models``): the Hub's key
names, the router against a brute-force enumeration, the attention masks by perturbation, the causal
mode (Ling 2.0), gradients for every expert, saving and reloading without remote code."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from t3s_ray import models
from t3s_ray.llada2 import (
    BailingMoeV2Config,
    BailingMoeV2ForCausalLM,
    LLaDA2MoeConfig,
    LLaDA2MoeModelLM,
    LLaDA2MoeSparseMoeBlock,
)
from t3s_ray.t3s.diffusion import block_causal_mask

SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
             num_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1, pad_token_id=0, eos_token_id=0,
             max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("builtin:tiny-llada2", dtype="float32").eval()


def test_state_dict_keys_are_the_hub_checkpoints():
    keys = set(load_file(models.materialize_builtin("tiny-llada2") / "model.safetensors"))
    want = {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for n in (0, 1):
        want |= {f"model.layers.{n}.{k}" for k in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "attention.query_key_value.weight",
            "attention.query_layernorm.weight", "attention.key_layernorm.weight", "attention.dense.weight")}
    want |= {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}  # layer 0: dense
    want |= {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.expert_bias"}
    want |= {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")}
    want |= {f"model.layers.1.mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert keys == want
    config = json.loads((models.materialize_builtin("tiny-llada2") / "config.json").read_text())
    assert config["model_type"] == "llada2_moe" and config["architectures"] == ["LLaDA2MoeModelLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 2, 1)
    assert (config["num_experts"], config["n_group"], config["topk_group"], config["num_experts_per_tok"]) == (8, 4, 2, 2)
    assert config["partial_rotary_factor"] == 0.5 and config["first_k_dense_replace"] == 1


def brute_force_route(scores: list[float], bias: list[float], n_group: int, topk_group: int, top_k: int,
                      scale: float) -> dict[int, float]:
    """The routing rule spelled out: group score = sum of its two best biased scores; the best
    set of ``topk_group`` groups by total; the ``top_k`` experts of best biased total among them;
    their unbiased scores normalised, times the scale."""
    per = len(scores) // n_group
    biased = [s + b for s, b in zip(scores, bias)]
    group_score = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
    groups = max(itertools.combinations(range(n_group), topk_group), key=lambda gs: sum(group_score[g] for g in gs))
    allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
    chosen = max(itertools.combinations(allowed, top_k), key=lambda es: sum(biased[e] for e in es))
    total = sum(scores[e] for e in chosen)
    return {e: scores[e] / total * scale for e in chosen}


def test_group_limited_routing_equals_a_brute_force_enumeration():
    torch.manual_seed(0)
    config = LLaDA2MoeConfig(**{**SMALL, "num_experts": 12, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3})
    block = LLaDA2MoeSparseMoeBlock(config)
    torch.nn.init.normal_(block.gate.weight, std=0.5)
    block.gate.expert_bias.copy_(torch.randn(12) * 0.3)
    x = torch.randn(200, 32)
    chosen, weights = block.gate(x)
    scores = torch.sigmoid(x.double() @ block.gate.weight.double().T)
    bias_mattered = 0
    for n in range(len(x)):
        want = brute_force_route(scores[n].tolist(), block.gate.expert_bias.tolist(), 4, 2, 3, 2.5)
        got = dict(zip(chosen[n].tolist(), weights[n].tolist()))
        assert got.keys() == want.keys()
        assert all(math.isclose(got[e], want[e], rel_tol=1e-5) for e in want)
        bias_mattered += want.keys() != brute_force_route(scores[n].tolist(), [0.0] * 12, 4, 2, 3, 2.5).keys()
    assert bias_mattered > 0  # the bias changed some choices, so the test sees it is used for the choice


def test_the_mask_decides_what_attention_sees(tiny):
    ids = torch.tensor([[5, 17, 30, 41, 8, 9, 60, 70]])
    changed = ids.clone()
    changed[0, 6] = 99  # a token of the second block of 4
    pos = torch.arange(8)[None]
    mask = block_causal_mask(8, 4)[None, None]
    with torch.no_grad():
        a = tiny(ids, attention_mask=mask, position_ids=pos).logits
        b = tiny(changed, attention_mask=mask, position_ids=pos).logits
        full_a, full_b = tiny(ids).logits, tiny(changed).logits
        additive = tiny(ids, attention_mask=torch.where(mask, 0.0, float("-inf")), position_ids=pos).logits
        ones = tiny(ids, attention_mask=torch.ones(1, 8, dtype=torch.long)).logits
    assert torch.equal(a[0, :4], b[0, :4])  # block-causal: the first block is blind to the second
    assert not torch.allclose(a[0, 4], b[0, 4])  # bidirectional inside a block: position 4 sees 6
    assert not torch.allclose(full_a[0, 0], full_b[0, 0])  # no mask: everything sees everything
    torch.testing.assert_close(additive, a)  # an additive mask means the same as the boolean one
    torch.testing.assert_close(ones, full_a)  # an all-ones 2-D mask is no mask
    padded = torch.ones(1, 8, dtype=torch.long)
    padded[0, 6:] = 0
    with pytest.raises(ValueError, match="takes no 2-D padding mask"):
        tiny(ids, attention_mask=padded)


def test_the_model_refuses_flash_attention(tmp_path):
    with pytest.raises((ValueError, ImportError), match="(?i)flash"):
        LLaDA2MoeModelLM.from_pretrained(models.materialize_builtin("tiny-llada2"),
                                         attn_implementation="flash_attention_2")


def test_eager_and_sdpa_agree(tiny):
    eager = models.load_model("builtin:tiny-llada2", dtype="float32").eval()
    eager.config._attn_implementation = "eager"
    ids = torch.tensor([[5, 17, 30, 41, 8, 9, 60, 70, 3]])
    mask = block_causal_mask(9, 4)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, attention_mask=mask).logits, tiny(ids, attention_mask=mask).logits)


def test_every_expert_gets_a_gradient_even_when_no_token_chose_it():
    torch.manual_seed(1)
    block = LLaDA2MoeSparseMoeBlock(LLaDA2MoeConfig(**SMALL))
    torch.nn.init.normal_(block.gate.weight)
    for p in block.parameters():
        if p.dim() == 2 and p is not block.gate.weight:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 32)  # one token: 2 of the 8 experts
    out = block(x)
    out.sum().backward()
    used = set(block.gate(x[0])[0][0].tolist())
    assert len(used) == 2
    for e, expert in enumerate(block.experts):
        for p in expert.parameters():
            assert p.grad is not None
            assert (p.grad.abs().sum() > 0) == (e in used)
    with torch.no_grad():  # the zero terms do not change the output
        torch.testing.assert_close(block(x), out.detach())


def test_checkpointed_layers_give_the_same_gradients(tiny):
    ids = torch.tensor([[5, 17, 30, 41, 8, 9, 60, 70]])
    mask = block_causal_mask(8, 4)[None, None]

    def grads(model):
        model.train()
        model.zero_grad()
        model(ids, attention_mask=mask).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(tiny)
    other = models.load_model("builtin:tiny-llada2", dtype="float32")
    other.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in other.model.layers)
    checkpointed = grads(other)
    tiny.eval()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


def test_the_builtin_reloads_without_remote_code():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = models.materialize_builtin("tiny-llada2")
    assert not list(path.glob("*.py"))
    assert AutoConfig.from_pretrained(path).model_type == "llada2_moe"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model) is LLaDA2MoeModelLM
    assert type(AutoModel.from_pretrained(path)).__name__ == "LLaDA2MoeModel"
    ours = models.load_model("builtin:tiny-llada2", dtype="float32")
    for (name, a), (_, b) in zip(model.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name
    tok = models.load_tokenizer("builtin:tiny-llada2")
    assert tok.get_vocab() == models.load_tokenizer("builtin:tiny-llama").get_vocab()  # its AR selector's
    assert tok.mask_token == "<|mask|>" and model.config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert models.fill_token_id(model, tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    assert models.is_masked_lm(model) and models.uses_block_diffusion(model)
    assert models.declares_masked_lm("builtin:tiny-llada2")
    assert models.is_diffusion_config({"model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"]})
    assert not models.is_diffusion_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def hub_like_folder(tmp_path, name: str, config_updates: dict, weights_from) -> str:
    """A folder laid out as a Hub snapshot: config.json with auto_map and keys the network does not
    read, remote-code files that fail if anything runs them, and ``weights_from``'s weights."""
    folder = tmp_path / name
    folder.mkdir()
    config = json.loads((weights_from / "config.json").read_text())
    config.update({"rotary_dim": 16, "use_rmsnorm": True, "router_dtype": "fp32", "norm_softmax": False,
                   "moe_router_enable_expert_bias": True, "embedding_dropout": 0.0, "output_dropout": 0.0,
                   "torch_dtype": "float32", "use_sliding_window": False, "max_window_layers": 28, "rope_theta": 600000},
                  **config_updates)
    (folder / "config.json").write_text(json.dumps(config))
    for module in {ref.split(".")[0] for ref in config["auto_map"].values()}:
        (folder / f"{module}.py").write_text("raise RuntimeError('remote code ran')\n")
    shutil.copyfile(weights_from / "model.safetensors", folder / "model.safetensors")
    for f in weights_from.glob("tokenizer*"):
        shutil.copyfile(f, folder / f.name)
    return str(folder)


def test_a_hub_llada2_folder_loads_natively_even_with_trust_remote_code(tmp_path, tiny):
    source = hub_like_folder(tmp_path, "hub", {"auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig", "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}}, models.materialize_builtin("tiny-llada2"))
    model = models.load_model(source, trust_remote_code=True, strict=True)
    assert type(model) is LLaDA2MoeModelLM and model.config.auto_map
    assert models.load_config(source, trust_remote_code=True).model_type == "llada2_moe"
    assert type(models.empty_model(source, trust_remote_code=True)) is LLaDA2MoeModelLM
    ids = torch.tensor([[5, 17, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, tiny(ids).logits)
    # An export keeps auto_map and carries the snapshot's own code, for dInfer, SGLang, the official class.
    out = tmp_path / "export"
    model.save_pretrained(out)
    json_out = json.loads((out / "config.json").read_text())
    json_out.pop("auto_map")  # as if the export had lost it
    (out / "config.json").write_text(json.dumps(json_out))
    copied = models.complete_export(source, out)
    assert sorted(copied) == ["configuration_llada2_moe.py", "modeling_llada2_moe.py"]  # no generation config there
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoConfig"].startswith("configuration_llada2")
    assert type(models.load_model(str(out), trust_remote_code=True)) is LLaDA2MoeModelLM  # still never runs it
    # no auto_map: no code to carry; the builtin's generation config (its EOS ids) when the export has none
    assert models.complete_export("builtin:tiny-llada2", out) == ["generation_config.json"]
    assert models.complete_export("builtin:tiny-llada2", out) == []


def causal_twin(model: LLaDA2MoeModelLM) -> BailingMoeV2ForCausalLM:
    twin = BailingMoeV2ForCausalLM(BailingMoeV2Config(**{k: v for k, v in model.config.to_dict().items()
                                                          if k not in ("model_type", "architectures")}))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_causal_mode_is_the_same_network_with_a_causal_mask(tiny):
    ling = causal_twin(tiny)
    ids = torch.tensor([[5, 17, 30, 41, 8, 9]])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        torch.testing.assert_close(ling(ids).logits, tiny(ids, attention_mask=causal).logits)
        # Left padding with a 2-D mask: the real tokens' logits are those of the unpadded row.
        padded = torch.tensor([[0, 0, 5, 17, 30, 41, 8, 9]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
        torch.testing.assert_close(ling(padded, attention_mask=mask).logits[:, 2:], ling(ids).logits)
        # Packed rows (positions restarting at 0) are causal per sequence.
        packed = ling(torch.tensor([[5, 17, 30, 41, 8, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]])).logits
        torch.testing.assert_close(packed[:, 3:], ling(torch.tensor([[41, 8, 9]])).logits)
    # generate (with transformers' DynamicCache) is the plain greedy loop without a cache.
    prompt = torch.tensor([[5, 17, 30]])
    out = ling.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    seq = prompt
    for _ in range(5):
        with torch.no_grad():
            seq = torch.cat([seq, ling(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == seq.tolist()


def test_a_ling_folder_loads_in_causal_mode_without_its_remote_code(tmp_path, tiny):
    source = hub_like_folder(tmp_path, "ling", {
        "model_type": "bailing_moe", "architectures": ["BailingMoeV2ForCausalLM"], "num_nextn_predict_layers": 0,
        "auto_map": {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                     "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"}},
        models.materialize_builtin("tiny-llada2"))
    model = models.load_model(source, trust_remote_code=True, strict=True)
    assert type(model) is BailingMoeV2ForCausalLM and not models.is_masked_lm(model)
    assert not models.declares_masked_lm(source)
    ids = torch.tensor([[5, 17, 30, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, causal_twin(tiny)(ids).logits)
    out = tmp_path / "export"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "bailing_moe" and saved["architectures"] == ["BailingMoeV2ForCausalLM"]


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="score_function 'softmax'"):
        LLaDA2MoeConfig(**{**SMALL, "score_function": "softmax"})
    with pytest.raises(ValueError, match="rope_scaling"):
        LLaDA2MoeConfig(**{**SMALL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_the_memory_plan_counts_the_parameters_of_the_native_llada2_mini():
    """``bench/memory_plan.py --llada2`` (the README's arithmetic) has LLaDA2.0-mini's shape: its parameter
    count, and a MoE layer's, equal those of the native class built (on the meta device) from the config
    defaults, which are LLaDA2.0-mini's."""
    import sys
    from pathlib import Path

    from accelerate import init_empty_weights

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.memory_plan import LLADA2_MINI

    config = LLaDA2MoeConfig(pad_token_id=156892, eos_token_id=156892)
    with init_empty_weights():
        model = LLaDA2MoeModelLM(config)
    shape = LLADA2_MINI
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab,
            shape.experts, shape.expert_intermediate, shape.top_k, shape.shared, shape.first_dense) == (
        config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
        config.num_key_value_heads, config.head_dim, config.vocab_size, config.num_experts,
        config.moe_intermediate_size, config.num_experts_per_tok, config.num_shared_experts,
        config.first_k_dense_replace)
    assert shape.params == sum(p.numel() for p in model.parameters()) == 16_255_638_528
    assert shape.moe_layer_params == sum(p.numel() for p in model.model.layers[1].parameters())
