"""``t3s models export CHECKPOINT OUT``: a sharded training checkpoint as a Hugging Face model folder.

A training checkpoint (``train/ray_train/checkpoint_step-N``, or ``train/checkpoints/step-N`` of a
training without Ray) holds each rank's shard of the model and the optimizer (``dcp/``, written by
``distributed.save_sharded``) and the trainer state, whose settings name the student
(``trainer_state.json``: ``student.ref``, ``dtype``, ...). The export reads only the model's tensors
(``distributed.read_sharded_model``, in one process, whatever the world size that wrote them), puts
them into the student's architecture built empty from its config, and writes the folder the
training's own exports are (``training.module.export_hf_model``): safetensors in the student's dtype,
its config and tokenizer, loadable by plain ``transformers`` and by vLLM; ``models.complete_export``
adds the student's ``generation_config.json`` and remote-code files where it has them. A dLLM's static probe trains the
AR selector (``student.selector_ref``): its checkpoints are exported as the selector, which the
tensors' names tell.

``CHECKPOINT`` may also be a training folder (``train/``, ``probe/``, ``methods/M/train``) or its
``ray_train`` / ``checkpoints`` folder: its latest checkpoint is exported (and named). ``OUT`` must not
exist or be empty: an export never overwrites.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .errors import DataError

STATE_FILE = "trainer_state.json"  # the trainer's CHECKPOINT_STATE, read here without importing torch early


def is_checkpoint(folder: Path) -> bool:
    return (folder / "dcp" / ".metadata").is_file() and (folder / STATE_FILE).is_file()


def find_checkpoint(path: str | Path) -> Path:
    """``path`` when it is a checkpoint, else the latest checkpoint (highest step) inside a training
    folder or its checkpoint folder; a one-line ``DataError`` naming ``path`` otherwise."""
    from .runfolder import TrainFolder

    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a checkpoint folder")
    if is_checkpoint(folder):
        return folder
    trained = TrainFolder(folder)
    found = [p for parent in (folder, trained.ray_train, trained.checkpoints) if parent.is_dir()
             for p in parent.iterdir() if p.is_dir() and is_checkpoint(p)]
    if not found:
        raise DataError(f"{folder} is not a training checkpoint (a folder with dcp/.metadata and {STATE_FILE}, "
                        "such as train/ray_train/checkpoint_step-000050) nor a training folder holding one")
    return max(found, key=lambda p: (_step(p), p.name))


def _step(checkpoint: Path) -> int:
    digits = re.findall(r"\d+", checkpoint.name)
    return int(digits[-1]) if digits else -1


def check_out(out: str | Path) -> Path:
    """``out`` as the export's folder: absent, or an empty folder."""
    folder = Path(out).expanduser()
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise DataError(f"{folder} exists and is {'a file' if not folder.is_dir() else 'not empty'}: "
                        "export into a new folder (an export never overwrites)")
    return folder


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``checkpoint`` (or the latest one in a training folder) to ``out`` as a Hugging Face model
    folder; returns ``out``."""
    import torch

    from .distributed import read_sharded_model
    from .models import complete_export, empty_model, load_tokenizer, saved_dtype
    from .training.module import export_hf_model

    out = check_out(out)  # before anything is read
    ckpt = find_checkpoint(checkpoint)
    if ckpt != Path(checkpoint).expanduser():
        print(f"[export] the latest checkpoint of {checkpoint}: {ckpt}", file=sys.stderr, flush=True)
    settings = json.loads((ckpt / STATE_FILE).read_text()).get("settings") or {}
    student = settings.get("student.ref")
    if not student:
        raise DataError(f"{ckpt / STATE_FILE} names no student.ref: not a t3s_ray training checkpoint")
    trust = bool(settings.get("student.trust_remote_code"))
    saved = _saved_tensors(ckpt)
    # The student, or (a dLLM's static probe) its AR selector: the one whose tensors these are.
    candidates = [student] + ([settings["student.selector_ref"]] if settings.get("student.kind") == "dllm"
                              and settings.get("student.selector_ref") else [])
    problems = []
    for ref in candidates:
        revision = settings.get("student.revision") if ref == student else None
        # The training's wrapper holds the model under ``.model`` (its checkpoints' names say so);
        # export_hf_model takes the same shape of module.
        wrapper = torch.nn.Module()
        wrapper.model = empty_model(ref, revision=revision, trust_remote_code=trust)
        expected = {k: tuple(v.shape) for k, v in wrapper.state_dict().items()}
        if expected != {k: shape for k, (shape, _) in saved.items()}:
            missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            odd = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k][0])
            problems.append(f"{ref}: missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {odd[:3]}")
            continue
        dtype = (saved_dtype(ref, revision=revision, trust_remote_code=trust)
                 if settings.get("student.dtype", "auto") == "auto" else getattr(torch, settings["student.dtype"]))
        wrapper.load_state_dict(read_sharded_model(ckpt / "dcp", dtype), strict=True, assign=True)
        wrapper.model.tie_weights()  # assign= replaced tied parameters one by one
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            out.rmdir()  # empty (checked): export_hf_model moves its finished folder here
        export_hf_model(wrapper, load_tokenizer(ref, revision=revision, trust_remote_code=trust), dtype, out)
        complete_export(ref, out, revision=revision)
        print(f"[export] {ckpt} (step {_step(ckpt)}, {ref}) -> {out} ({str(dtype).removeprefix('torch.')})",
              file=sys.stderr, flush=True)
        return out
    raise DataError(f"{ckpt}: its model's tensors are not those of {' nor '.join(candidates)} "
                    f"({'; '.join(problems)})")


def _saved_tensors(ckpt: Path) -> dict:
    from .distributed import sharded_model_keys

    try:
        return sharded_model_keys(ckpt / "dcp")
    except Exception as e:  # a truncated or foreign file: name it, in one line
        raise DataError(f"{ckpt / 'dcp'}: cannot read the checkpoint's metadata ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
