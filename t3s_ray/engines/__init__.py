"""The generation engines, and the table that picks one for a ``GenerationSpec``'s ``engine.backend``.

* ``hf`` (:mod:`.hf`): transformers ``generate`` with left padding in a Ray Data actor pool;
* ``vllm`` (:mod:`.vllm`): ``ray.data.llm`` engine actors;
* ``openai`` (:mod:`.openai`): requests to an OpenAI-compatible server (traces, and evaluation of a
  served model).

Each engine's ``generate_dataset(ds, spec, actors, placement_groups)`` maps a Ray Dataset of
requests (one row per sample, built by ``t3s_ray.generate.prepare_requests``) to a Dataset of
samples, lazily; :mod:`.rows` converts between Ray Data's numpy batches and plain rows for all three.
``t3s_ray.generate`` runs the requests and verifies the samples, whatever the engine.
"""

from __future__ import annotations

from . import hf, openai, vllm

# A spec's backend -> its engine's generate_dataset.
ENGINES = {"hf": hf.generate_dataset, "vllm": vllm.generate_dataset, "openai": openai.generate_dataset}


def generate_dataset(ds, spec, actors: int, placement_groups: list):
    """``ds`` (one request per row) mapped to samples by ``actors`` actors of ``spec.engine.backend``'s engine;
    lazy. Multi-GPU vLLM engines append their placement groups to ``placement_groups``."""
    backend = spec.engine.backend
    if backend != "hf" and spec.sampler == "diffusion":
        raise ValueError("masked-diffusion models are sampled by the hf backend only (vLLM does not serve them)")
    if backend not in ENGINES:
        raise ValueError(f"unknown generation backend {backend!r} (use 'hf', 'vllm' or 'openai')")
    return ENGINES[backend](ds, spec, actors, placement_groups)
