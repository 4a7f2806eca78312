"""Diagnostics behind the paper's claims: anchor/other gradient conflict, and RRT weight arithmetic.

* :func:`gradient_conflict` measures how strongly the imitation-anchor tokens dominate the
  update (the paper reports an anchor/other gradient-norm ratio of ~17 early on and a cosine of
  about −0.45 during the accuracy crash).
* :func:`rrt_merge` builds ``θ0 + (θf − θb)`` from three Hugging Face model folders: the final
  weights with the part learnt up to the bottleneck removed again.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .losses import masked_token_loss

__all__ = ["gradient_conflict", "rrt_merge"]

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files of a model folder that hold weights (not copied from θ0; the merged weights replace them).
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def gradient_conflict(model, token_logprobs, anchors, target_mask, params=None) -> dict[str, float]:
    """Compare the gradients of the anchor-token CE and the other-token CE.

    Both losses are token means (``masked_token_loss``) over ``anchors ∩ targets`` and
    ``targets \\ anchors``; their gradients w.r.t. ``params`` (default: the model's parameters
    that require grad) are taken with ``autograd.grad(retain_graph=True)``, so the caller can
    still backpropagate its training loss through the same graph afterwards.

    Returns floats ``anchor_grad_norm``, ``other_grad_norm``, ``ratio`` (anchor / other) and
    ``cosine``.  When a group has no token its norm is 0.0 and ``ratio`` and ``cosine`` are NaN
    (undefined, not 0: an empty group neither agrees nor conflicts); likewise when either norm
    is 0.  Memory: the two gradient sets exist at once, each the size of ``params``.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    target_mask = target_mask.bool()
    anchor_mask = anchors.bool() & target_mask
    other_mask = target_mask & ~anchor_mask

    def group_gradients(group_mask):
        loss = masked_token_loss(token_logprobs, group_mask)
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    empty_group = not anchor_mask.any() or not other_mask.any()
    anchor_grads = group_gradients(anchor_mask) if anchor_mask.any() else [None] * len(params)
    other_grads = group_gradients(other_mask) if other_mask.any() else [None] * len(params)
    anchor_norm = math.sqrt(_dot(anchor_grads, anchor_grads))
    other_norm = math.sqrt(_dot(other_grads, other_grads))
    defined = not empty_group and anchor_norm > 0 and other_norm > 0
    return {
        "anchor_grad_norm": anchor_norm,
        "other_grad_norm": other_norm,
        "ratio": anchor_norm / other_norm if defined else math.nan,
        "cosine": _dot(anchor_grads, other_grads) / (anchor_norm * other_norm) if defined else math.nan,
    }


def _dot(grads_a, grads_b) -> float:
    """Inner product summed over parameters (missing gradients count as 0).

    Products are formed in fp32 one parameter at a time (no flattened copy of the model's
    gradients) and accumulated in fp64.
    """
    total = 0.0  # becomes a tensor on the gradients' device: one host sync at the end
    for a, b in zip(grads_a, grads_b, strict=True):
        if a is not None and b is not None:
            total = total + (a.float() * b.float()).sum(dtype=torch.float64)
    return float(total)


def _weight_locations(model_dir: Path) -> dict[str, Path]:
    """Map every tensor name of a Hugging Face folder to the safetensors file that holds it."""
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name: model_dir / file_name for name, file_name in weight_map.items()}
    single_path = model_dir / SAFETENSORS_SINGLE
    if single_path.is_file():
        with safe_open(str(single_path), framework="pt") as weights:
            return {name: single_path for name in weights.keys()}
    raise FileNotFoundError(f"{model_dir}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} (need safetensors weights)")


def rrt_merge(theta0_dir, thetaf_dir, thetab_dir, out_dir) -> Path:
    """Write the RRT model ``θ0 + (θf − θb)`` to ``out_dir`` and return its path.

    Inputs are Hugging Face model folders with safetensors weights, single-file or sharded.
    The arithmetic is done in fp32 per tensor and the result stored in θ0's dtype, as one
    ``model.safetensors`` with metadata ``{"format": "pt"}``.  Non-floating tensors (integer
    buffers) are taken from θ0 unchanged.  Every non-weight file of θ0 (config, tokenizer,
    generation config, chat template, ...) is copied, so the result loads with
    ``from_pretrained`` like θ0.  Differing tensor names or shapes raise ``ValueError`` naming
    the folder and the tensor.  Weight files already in ``out_dir`` are replaced.
    """
    dirs = {"theta0": Path(theta0_dir), "thetaf": Path(thetaf_dir), "thetab": Path(thetab_dir)}
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == d.resolve() for d in dirs.values()):
        raise ValueError(f"rrt_merge: out_dir {out_dir} must differ from the input folders")
    locations = {role: _weight_locations(d) for role, d in dirs.items()}
    reference_names = set(locations["theta0"])
    for role in ("thetaf", "thetab"):
        names = set(locations[role])
        missing, extra = sorted(reference_names - names), sorted(names - reference_names)
        if missing or extra:
            raise ValueError(
                f"rrt_merge: {dirs[role]} does not have the tensors of {dirs['theta0']}: "
                f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                f"extra {extra[:5]}{' ...' if len(extra) > 5 else ''}"
            )

    merged = {}
    with ExitStack() as stack:
        open_files = {}

        def load(role: str, name: str) -> torch.Tensor:
            path = locations[role][name]
            if path not in open_files:
                open_files[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return open_files[path].get_tensor(name)

        for name in sorted(reference_names):
            theta0 = load("theta0", name)
            thetaf, thetab = load("thetaf", name), load("thetab", name)
            for role, tensor in (("thetaf", thetaf), ("thetab", thetab)):
                if tensor.shape != theta0.shape:
                    raise ValueError(
                        f"rrt_merge: tensor {name!r} has shape {tuple(tensor.shape)} in {dirs[role]} "
                        f"but {tuple(theta0.shape)} in {dirs['theta0']}"
                    )
            if theta0.is_floating_point():
                merged[name] = (theta0.float() + (thetaf.float() - thetab.float())).to(theta0.dtype)
            else:
                merged[name] = theta0

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():  # an earlier sharded result would shadow the new file
        if stale.is_file() and stale.name.endswith(_WEIGHT_FILE_SUFFIXES):
            stale.unlink()
    save_file(merged, str(out_dir / SAFETENSORS_SINGLE), metadata={"format": "pt"})
    for path in dirs["theta0"].iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_FILE_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)
    return out_dir
