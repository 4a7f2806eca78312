"""A short loss curve of the real training recipe, pinned (as torchtune's recipe tests pin theirs):
a refactor that silently changes a number fails here. The worker without Ray, builtin:tiny-llama,
fixed seeds, `sft` and `t3s_static` (θb a fixed perturbation of θ0, so that Δc picks real anchors).

If a change is *meant* to alter the numbers (a new loss normalisation, another data order), rerun
with ``T3S_PRINT_PINNED=1`` and replace the values below, saying why in the commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_worker import make_job, tiny_examples

from t3s_ray.distributed import Ranks
from t3s_ray.models import resolve
from t3s_ray.worker import train_standalone

PINNED = {  # [loss, kept fraction, gradient norm] per step, measured 2026-12-05 (torch 2.13.0 CPU)
    "sft": [[6.24751615524292, 1.0, 2.6128950119018555], [5.79561448097229, 1.0, 3.2668814659118652],
            [5.940535545349121, 1.0, 27.82379913330078], [4.636607646942139, 1.0, 1.435206651687622]],
    "t3s_static": [[6.229069232940674, 0.4648648648648649, 4.013664245605469],
                   [5.708357810974121, 0.48299319727891155, 3.731990098953247],
                   [6.952548503875732, 0.49327354260089684, 17.89847755432129],
                   [4.479750871658325, 0.43119266055045874, 2.239208936691284]],
}


def perturbed_copy(folder: Path) -> Path:
    """θb: tiny-llama with every weight moved by a fixed pseudo-random amount."""
    source = Path(resolve("builtin:tiny-llama"))
    shutil.copytree(source, folder)
    weights = load_file(str(folder / "model.safetensors"))
    generator = torch.Generator().manual_seed(7)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype)
             for k, v in sorted(weights.items())}
    save_file(moved, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def curve(tmp_path: Path, protocol: str) -> list[list[float]]:
    job = make_job(tmp_path / protocol, train={"max_steps": 4, "checkpoint_every": 4, "micro_batch_size": 2},
                   selection={"protocol": protocol, "tau": 0.0})
    if protocol == "t3s_static":
        job = dataclasses.replace(job, anchor_model=str(perturbed_copy(tmp_path / "theta_b")))
    train_standalone(job, tiny_examples(8, ragged=True), Ranks())
    rows = [json.loads(x) for x in (tmp_path / protocol / "train" / "metrics.jsonl").read_text().splitlines()]
    return [[r["loss"], r["kept_frac"], r["grad_norm"]] for r in rows]


@pytest.mark.parametrize("protocol", list(PINNED))
def test_the_loss_curve_is_pinned(tmp_path, protocol):
    got = curve(tmp_path, protocol)
    if os.environ.get("T3S_PRINT_PINNED"):
        print(f"\n    {protocol!r}: {got},")
    assert len(got) == 4
    if protocol == "t3s_static":
        assert all(0 < kept < 1 for _, kept, _ in got)  # the perturbation made real anchors
    # Tolerance: summation order differs between CPU kernels (AVX2 / AVX-512); a change of logic
    # (normalisation, masks, data order, learning rate) moves these by far more.
    for step, (row, pinned) in enumerate(zip(got, PINNED[protocol]), start=1):
        assert row == pytest.approx(pinned, rel=2e-4), f"step {step}: {row} != pinned {pinned}"
