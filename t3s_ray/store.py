"""The global token-confidence store of the online T3S protocol (README, "Stage 2: training").

Every training forward pass computes ``c_t = log p(y_t | y_<t, x)`` for the response tokens of its
batch and pushes it here (detached, with the step number).  The store keeps, per token,

* ``c0``: the base confidence from the scoring pass before training (float32, NaN until set),
* ``latest``: the confidence of the latest visit (float16, NaN until visited); with
  ``summary="ema"`` this slot holds an exponential moving average over visits instead,
* ``mask``: the anchor mask of the current version (bool),

which is 7 bytes per token, plus optionally the last ``trajectory_len`` visits (float16 per token,
the step of each visit per example).  Every ``refresh_interval`` steps the trainer calls
:meth:`ConfidenceStore.refresh`: ``Δc = latest − c0`` per token, a selection rule from
:mod:`t3s_ray.t3s.selection` picks the anchors, and a new mask *version* is published.

Memory layout: all per-token data lives in a handful of flat arrays (examples concatenated in
registration order, ``offsets[row]:offsets[row + 1]`` is one example), per-example data in arrays
indexed by row, and example ids are looked up with a sorted index (``np.searchsorted``), so a
visit of a batch is a few vectorised numpy operations and 1M tokens are a few numpy arrays.

Semantics worth knowing:

* An example is *reclassified* by a refresh when it has been visited at least once and has a base
  (``set_base``); every other example keeps its mask (initially no anchors).  Visited examples
  without a base are counted in ``num_skipped_no_base``.  Reclassification recomputes the mask of
  every visited example from its current summary, so a refresh with the same rule and no new
  visits publishes identical masks.
* ``rule="forced"`` selects the dLLM forced set ``Δc < −tau``; its ``max_anchor_frac`` cap keeps
  the most negative Δc first (the most "yet-to-learn" tokens).  For ``delta`` / ``top_frac`` the
  cap keeps the highest Δc first.  In the stats "anchor" always means "selected by the rule".
* A visit whose step is older than the example's latest recorded step is stale (a late push from
  another worker) and is dropped and counted (``num_stale_visits``); a repeated step is a new visit.
  An id repeated in one ``record`` call is processed as successive visits in call order.
* The trajectory keeps the raw visit values even with ``summary="ema"``.
* ``register`` copies the per-token arrays (no over-allocation, so ``bytes_per_token`` stays
  exact): register many examples per call, not one at a time.

The Ray side: :func:`create_store` starts one named actor per shard (examples are sharded by
``example_id % num_shards``), :func:`connect_store` finds them from a worker, and
:class:`StoreClient` routes ids to shards.  A restarted shard comes back empty; the trainer
restores it from the snapshot in its checkpoint (:meth:`StoreClient.load_state_dict`).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from .t3s.selection import cap_anchor_frac, delta_latest, ema_update, select_delta, select_forced, select_top_frac

__all__ = [
    "RULES",
    "ConfidenceStore",
    "MaskFuture",
    "StoreClient",
    "connect_store",
    "create_store",
    "flatten_state",
    "local_store",
    "load_state",
    "merge_stats",
    "save_state",
    "shard_of",
    "unflatten_state",
]

RULES = ("delta", "top_frac", "forced")
SUMMARIES = ("latest", "ema")
STATE_FORMAT = 1

# Per-sequence rules pad examples of similar length together: lengths in one bucket differ by at
# most a factor 2**(1/_BUCKETS_PER_OCTAVE), so padding wastes at most ~19% of the work.
_BUCKETS_PER_OCTAVE = 4

# Count keys summed over shards; mean keys and the count that weighs them when shards merge.
_COUNT_KEYS = ("num_examples", "num_tokens", "num_visited_examples", "num_visited_tokens", "num_anchor_tokens",
               "num_scored_anchor", "num_scored_other", "num_stale_visits", "num_refreshed_examples",
               "num_skipped_no_base", "num_changed_tokens")
_WEIGHTED_KEYS = {
    "visited_frac": "num_tokens",
    "anchor_frac": "num_tokens",
    "bytes_per_token": "num_tokens",
    "bytes_per_token_total": "num_tokens",
    "mean_conf_anchor": "num_scored_anchor",
    "mean_delta_anchor": "num_scored_anchor",
    "mean_conf_other": "num_scored_other",
    "mean_delta_other": "num_scored_other",
}


def shard_of(example_id: int, num_shards: int) -> int:
    """The shard that holds an example: ``example_id % num_shards`` (also vectorised over arrays)."""
    return example_id % num_shards


# --------------------------------------------------------------------------------------------------
# Input checking helpers
# --------------------------------------------------------------------------------------------------

def _as_ids(example_ids) -> np.ndarray:
    ids = np.asarray(example_ids)
    if ids.ndim != 1:
        raise ValueError(f"example_ids must be a 1-D sequence of ints, got shape {ids.shape}")
    if ids.size == 0:
        return ids.astype(np.int64)
    if ids.dtype.kind not in "iu":
        if ids.dtype.kind != "f" or not np.all(ids == np.round(ids)):
            raise ValueError(f"example_ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _as_value_list(example_ids: np.ndarray, values) -> list[np.ndarray]:
    if len(values) != len(example_ids):
        raise ValueError(f"got {len(values)} value arrays for {len(example_ids)} example ids")
    out = []
    for example_id, value in zip(example_ids, values):
        value = np.asarray(value)
        if value.ndim != 1:
            raise ValueError(f"example id {int(example_id)}: values must be 1-D, got shape {value.shape}")
        if value.dtype.kind != "f":
            raise ValueError(f"example id {int(example_id)}: values must be floats, got dtype {value.dtype}")
        out.append(value)
    return out


def _flat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n): the flat indices of a set of examples."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _occurrence(ids: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same id (0 for the first occurrence)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    new_group = np.ones(len(ids), dtype=bool)
    new_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(ids)), 0))
    occurrence = np.empty(len(ids), dtype=np.int64)
    occurrence[order] = np.arange(len(ids)) - group_start
    return occurrence


def _nanmean(values: np.ndarray) -> float:
    return float(values.mean(dtype=np.float64)) if values.size else math.nan


def _scalar(value) -> Any:
    """A plain Python scalar from a scalar or a 0-d array (what ``np.load`` gives back)."""
    return np.asarray(value).item()


# --------------------------------------------------------------------------------------------------
# The store (plain class, one shard)
# --------------------------------------------------------------------------------------------------

class ConfidenceStore:
    """Per-token confidences of one shard of the training set, and the anchor masks derived from them.

    Args:
        shard: Index of this shard; it only accepts ids with ``id % num_shards == shard``.
        num_shards: Number of shards of the whole store.
        trajectory_len: Also keep the last this many visits of every token (0: none).
        summary: ``latest`` (Δc = last visit − c0) or ``ema`` (Δc = EMA over visits − c0).
        ema_alpha: Weight of the newest visit in the EMA.
    """

    def __init__(self, shard: int = 0, num_shards: int = 1, trajectory_len: int = 0,
                 summary: str = "latest", ema_alpha: float = 0.5):
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, num_shards), got shard={shard}, num_shards={num_shards}")
        if trajectory_len < 0:
            raise ValueError(f"trajectory_len must be >= 0, got {trajectory_len}")
        if summary not in SUMMARIES:
            raise ValueError(f"summary must be one of {', '.join(SUMMARIES)}, got {summary!r}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        self.shard = int(shard)
        self.num_shards = int(num_shards)
        self.trajectory_len = int(trajectory_len)
        self.summary = summary
        self.ema_alpha = float(ema_alpha)
        self._reset()

    def _reset(self) -> None:
        k = self.trajectory_len
        # Per example (indexed by row = registration order).
        self._ids = np.zeros(0, dtype=np.int64)
        self._lengths = np.zeros(0, dtype=np.int64)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._last_step = np.zeros(0, dtype=np.int64)     # step of the latest visit, -1: never visited
        self._num_visits = np.zeros(0, dtype=np.int64)
        self._has_base = np.zeros(0, dtype=bool)
        self._traj_steps = np.full((0, k), -1, dtype=np.int64)
        # Per token (flat, examples concatenated).
        self._c0 = np.zeros(0, dtype=np.float32)
        self._latest = np.zeros(0, dtype=np.float16)
        self._mask = np.zeros(0, dtype=bool)
        self._traj_conf = np.zeros((k, 0), dtype=np.float16)  # ring buffer, slot = visit number % k
        # Id lookup.
        self._sorted_ids = np.zeros(0, dtype=np.int64)
        self._sorted_rows = np.zeros(0, dtype=np.int64)
        self._version = 0
        self._num_stale_visits = 0
        self._history: list[dict] = []

    # ---------------------------------------------------------------- configuration and lookup
    def config(self) -> dict:
        return {"shard": self.shard, "num_shards": self.num_shards, "trajectory_len": self.trajectory_len,
                "summary": self.summary, "ema_alpha": self.ema_alpha}

    @property
    def version(self) -> int:
        return self._version

    def _rebuild_index(self) -> None:
        self._offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=self._offsets[1:])
        self._sorted_rows = np.argsort(self._ids, kind="stable").astype(np.int64)
        self._sorted_ids = self._ids[self._sorted_rows]

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids`` and whether each id is registered."""
        if len(self._sorted_ids) == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), len(self._sorted_ids) - 1)
        return self._sorted_rows[pos], self._sorted_ids[pos] == ids

    def _rows(self, example_ids) -> np.ndarray:
        ids = _as_ids(example_ids)
        rows, found = self._lookup(ids)
        if not found.all():
            bad = int(ids[~found][0])
            hint = ""
            if len(self._ids) == 0:
                hint = (" (this shard holds no examples: a restarted store shard comes back empty; "
                        "restore it with load_state_dict)")
            elif shard_of(bad, self.num_shards) != self.shard:
                hint = f" (it belongs to shard {shard_of(bad, self.num_shards)}, this is shard {self.shard})"
            raise KeyError(f"unknown example id {bad}{hint}")
        return rows

    def _check_values(self, ids: np.ndarray, rows: np.ndarray, values) -> np.ndarray:
        """Validate one value array per example against the registered lengths; return them concatenated."""
        values = _as_value_list(ids, values)
        got = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        expected = self._lengths[rows]
        wrong = np.nonzero(got != expected)[0]
        if len(wrong):
            i = wrong[0]
            raise ValueError(f"example id {int(ids[i])}: expected {int(expected[i])} confidence values, "
                             f"got {int(got[i])}")
        if not values:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(values)

    # ---------------------------------------------------------------- writes
    def register(self, example_ids, lengths) -> None:
        """Add examples with their number of response tokens; re-registering the same length is a no-op."""
        ids = _as_ids(example_ids)
        lengths = np.asarray(lengths)
        if lengths.shape != ids.shape:
            raise ValueError(f"got {lengths.size} lengths for {ids.size} example ids")
        if ids.size == 0:
            return
        if lengths.dtype.kind not in "iu" and not np.all(lengths == np.round(lengths)):
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
        lengths = lengths.astype(np.int64)
        if (lengths < 0).any():
            i = int(np.nonzero(lengths < 0)[0][0])
            raise ValueError(f"example id {int(ids[i])}: length must be >= 0, got {int(lengths[i])}")
        foreign = shard_of(ids, self.num_shards) != self.shard
        if foreign.any():
            bad = int(ids[foreign][0])
            raise ValueError(f"example id {bad} belongs to shard {shard_of(bad, self.num_shards)}, "
                             f"this is shard {self.shard} of {self.num_shards}")
        rows, found = self._lookup(ids)
        known_mismatch = found & (self._lengths[rows] != lengths) if found.any() else found
        if known_mismatch.any():
            i = int(np.nonzero(known_mismatch)[0][0])
            raise ValueError(f"example id {int(ids[i])} is already registered with length "
                             f"{int(self._lengths[rows[i]])}, got length {int(lengths[i])}")
        new_ids, new_lengths = ids[~found], lengths[~found]
        if new_ids.size == 0:
            return
        # Duplicates inside the call: same length collapses to one example, different lengths are an error.
        order = np.argsort(new_ids, kind="stable")
        sid, slen = new_ids[order], new_lengths[order]
        same = sid[1:] == sid[:-1]
        clash = same & (slen[1:] != slen[:-1])
        if clash.any():
            i = int(np.nonzero(clash)[0][0])
            raise ValueError(f"example id {int(sid[i])} given twice with lengths {int(slen[i])} and "
                             f"{int(slen[i + 1])}")
        if same.any():
            keep = np.ones(len(sid), dtype=bool)
            keep[1:] = ~same
            first = np.sort(order[keep])          # first occurrences, in call order
            new_ids, new_lengths = new_ids[first], new_lengths[first]
        n_new, t_new = len(new_ids), int(new_lengths.sum())
        k = self.trajectory_len
        self._ids = np.concatenate([self._ids, new_ids])
        self._lengths = np.concatenate([self._lengths, new_lengths])
        self._last_step = np.concatenate([self._last_step, np.full(n_new, -1, dtype=np.int64)])
        self._num_visits = np.concatenate([self._num_visits, np.zeros(n_new, dtype=np.int64)])
        self._has_base = np.concatenate([self._has_base, np.zeros(n_new, dtype=bool)])
        self._traj_steps = np.concatenate([self._traj_steps, np.full((n_new, k), -1, dtype=np.int64)])
        self._c0 = np.concatenate([self._c0, np.full(t_new, np.nan, dtype=np.float32)])
        self._latest = np.concatenate([self._latest, np.full(t_new, np.nan, dtype=np.float16)])
        self._mask = np.concatenate([self._mask, np.zeros(t_new, dtype=bool)])
        self._traj_conf = np.concatenate([self._traj_conf, np.full((k, t_new), np.nan, dtype=np.float16)], axis=1)
        self._rebuild_index()

    def set_base(self, example_ids, values: Sequence[np.ndarray]) -> None:
        """Store ``c0`` (the confidence under the weights before training) of each example."""
        ids = _as_ids(example_ids)
        rows = self._rows(ids)
        flat = self._check_values(ids, rows, values)
        self._c0[_flat_ranges(self._offsets[rows], self._lengths[rows])] = flat
        self._has_base[rows] = True

    def record(self, step: int, example_ids, values: Sequence[np.ndarray]) -> None:
        """One visit per example at ``step``: the confidences its training forward pass computed."""
        step = int(step)
        ids = _as_ids(example_ids)
        rows = self._rows(ids)
        flat = self._check_values(ids, rows, values)   # everything is checked before anything is written
        if ids.size == 0:
            return
        if len(np.unique(ids)) == len(ids):
            self._visit(step, rows, flat)
            return
        occurrence = _occurrence(ids)
        value_starts = np.concatenate([[0], np.cumsum(self._lengths[rows])])
        for level in range(int(occurrence.max()) + 1):
            pick = np.nonzero(occurrence == level)[0]
            self._visit(step, rows[pick], flat[_flat_ranges(value_starts[pick], self._lengths[rows[pick]])])

    def _visit(self, step: int, rows: np.ndarray, flat: np.ndarray) -> None:
        """Apply one visit to distinct ``rows`` (``flat``: their values, concatenated)."""
        stale = step < self._last_step[rows]
        if stale.any():
            self._num_stale_visits += int(stale.sum())
            lengths = self._lengths[rows]
            starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
            fresh = ~stale
            flat = flat[_flat_ranges(starts[fresh], lengths[fresh])]
            rows = rows[fresh]
        lengths = self._lengths[rows]
        idx = _flat_ranges(self._offsets[rows], lengths)
        if self.summary == "ema":
            ema = ema_update(self._latest[idx].astype(np.float32), flat.astype(np.float32, copy=False),
                             self.ema_alpha, np.ones(len(idx), dtype=bool))
            self._latest[idx] = ema
        else:
            self._latest[idx] = flat
        if self.trajectory_len:
            slots = self._num_visits[rows] % self.trajectory_len
            self._traj_conf[np.repeat(slots, lengths), idx] = flat
            self._traj_steps[rows, slots] = step
        self._num_visits[rows] += 1
        self._last_step[rows] = step

    # ---------------------------------------------------------------- refresh
    def refresh(self, step: int, rule: str = "delta", tau: float = 0.0, top_frac: float = 0.2,
                max_anchor_frac: float = 1.0) -> dict:
        """Reclassify every visited example with a base and publish a new mask version.

        Rules: ``delta`` (anchors Δc > tau), ``top_frac`` (the ``ceil(top_frac · n)`` highest Δc of
        each example) and ``forced`` (the dLLM forced set Δc < −tau).  ``max_anchor_frac`` then keeps
        at most ``floor(max_anchor_frac · n)`` selected tokens per example: the highest Δc for
        ``delta`` / ``top_frac``, the most negative Δc for ``forced``.  Examples never visited, or
        without a base, keep their mask.  The version goes up by one even when nothing changed.

        Returns the stats after the refresh plus ``step``, the rule and its parameters,
        ``num_refreshed_examples``, ``num_skipped_no_base`` and ``num_changed_tokens``.
        """
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; expected one of {', '.join(RULES)}")
        if not 0.0 <= top_frac <= 1.0:
            raise ValueError(f"top_frac must be in [0, 1], got {top_frac}")
        if not 0.0 <= max_anchor_frac <= 1.0:
            raise ValueError(f"max_anchor_frac must be in [0, 1], got {max_anchor_frac}")
        visited = self._num_visits > 0
        refreshed = visited & self._has_base
        delta = delta_latest(self._latest, self._c0)
        token_refreshed = np.repeat(refreshed, self._lengths)
        target = token_refreshed & ~np.isnan(delta)
        capped = max_anchor_frac < 1.0
        if rule == "delta" and not capped:
            selected = select_delta(delta, target, tau)
        elif rule == "forced" and not capped:
            selected = select_forced(delta, target, tau)
        else:
            selected = self._per_sequence(np.nonzero(refreshed)[0], delta, target, rule, tau, top_frac,
                                          max_anchor_frac)
        new_mask = np.where(token_refreshed, selected, self._mask)
        changed = int(np.count_nonzero(new_mask != self._mask))
        self._mask = new_mask
        self._version += 1
        stats = {"step": int(step), "rule": rule, "tau": float(tau), "top_frac": float(top_frac),
                 "max_anchor_frac": float(max_anchor_frac), **self._stats(delta),
                 "num_refreshed_examples": int(refreshed.sum()),
                 "num_skipped_no_base": int((visited & ~self._has_base).sum()),
                 "num_changed_tokens": changed}
        self._history.append(stats)
        return dict(stats)

    def _per_sequence(self, rows: np.ndarray, delta: np.ndarray, target: np.ndarray, rule: str, tau: float,
                      top_frac: float, max_frac: float) -> np.ndarray:
        """Apply a per-sequence rule (and the cap) to ``rows``, padding examples of similar length together."""
        selected = np.zeros(len(delta), dtype=bool)
        lengths = self._lengths[rows]
        rows, lengths = rows[lengths > 0], lengths[lengths > 0]
        if rows.size == 0:
            return selected
        buckets = np.floor(np.log2(lengths) * _BUCKETS_PER_OCTAVE).astype(np.int64)
        for bucket in np.unique(buckets):
            group = rows[buckets == bucket]
            group_lengths = self._lengths[group]
            width = int(group_lengths.max())
            positions = np.arange(width)
            valid = positions[None, :] < group_lengths[:, None]
            index = np.where(valid, self._offsets[group][:, None] + positions[None, :], 0)
            d, t = delta[index], target[index] & valid
            if rule == "top_frac":
                chosen = select_top_frac(d, t, top_frac)
            elif rule == "delta":
                chosen = select_delta(d, t, tau)
            else:
                chosen = select_forced(d, t, tau)
            if max_frac < 1.0:
                # forced: keep the most negative Δc first (cap ranks by -Δc).
                chosen = cap_anchor_frac(chosen, -d if rule == "forced" else d, t, max_frac)
            selected[index[valid]] = chosen[valid]
        return selected

    # ---------------------------------------------------------------- reads
    def _split(self, flat_index_rows: np.ndarray, array: np.ndarray, dtype) -> list[np.ndarray]:
        lengths = self._lengths[flat_index_rows]
        flat = array[_flat_ranges(self._offsets[flat_index_rows], lengths)].astype(dtype, copy=False)
        return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []

    def get_masks(self, example_ids) -> tuple[int, list[np.ndarray]]:
        """``(version, [bool mask per example])`` in the order of ``example_ids`` (copies)."""
        return self._version, self._split(self._rows(example_ids), self._mask, bool)

    def get_masks_flat(self, example_ids) -> tuple[int, np.ndarray, np.ndarray]:
        """``(version, masks concatenated, lengths)``: one buffer, what the Ray client transfers."""
        rows = self._rows(example_ids)
        lengths = self._lengths[rows]
        return self._version, self._mask[_flat_ranges(self._offsets[rows], lengths)], lengths

    def get_confidences(self, example_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(c0 per example, latest per example)`` as float32 (NaN where not set / never visited)."""
        rows = self._rows(example_ids)
        return self._split(rows, self._c0, np.float32), self._split(rows, self._latest, np.float32)

    def get_trajectories(self, example_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per example: steps ``[k]`` and confidences ``[k, length]`` (float32) of its last k visits, oldest first."""
        rows = self._rows(example_ids)
        steps_out, conf_out = [], []
        for row in rows:
            k_total = self.trajectory_len
            k = int(min(self._num_visits[row], k_total))
            start, end = self._offsets[row], self._offsets[row + 1]
            slots = (np.arange(self._num_visits[row] - k, self._num_visits[row]) % k_total) if k else np.zeros(0, int)
            steps_out.append(self._traj_steps[row, slots].copy())
            conf_out.append(self._traj_conf[slots, start:end].astype(np.float32))
        return steps_out, conf_out

    def _nbytes(self) -> tuple[int, int]:
        per_token = self._c0.nbytes + self._latest.nbytes + self._mask.nbytes
        other = sum(a.nbytes for a in (self._ids, self._lengths, self._offsets, self._last_step, self._num_visits,
                                       self._has_base, self._traj_steps, self._traj_conf, self._sorted_ids,
                                       self._sorted_rows))
        return per_token, per_token + other

    def stats(self) -> dict:
        """Sizes, visit coverage, anchor fraction and mean confidence / Δc of anchors vs other tokens.

        ``visited_frac`` is the fraction of tokens whose example was visited at least once;
        ``anchor_frac`` is over all stored tokens; the means are over tokens with a defined Δc
        (visited, with a base), split by the current mask, NaN when there are none.  Confidences
        are the ``latest`` slot (the EMA with ``summary="ema"``).
        """
        return self._stats(delta_latest(self._latest, self._c0))

    def _stats(self, delta: np.ndarray) -> dict:
        num_tokens = int(len(self._c0))
        scored = ~np.isnan(delta)
        anchor_scored, other_scored = scored & self._mask, scored & ~self._mask
        visited = self._num_visits > 0
        per_token, total = self._nbytes()
        latest = self._latest
        return {
            "num_examples": int(len(self._ids)),
            "num_tokens": num_tokens,
            "num_visited_examples": int(visited.sum()),
            "num_visited_tokens": int(self._lengths[visited].sum()),
            "visited_frac": float(self._lengths[visited].sum() / num_tokens) if num_tokens else math.nan,
            "version": int(self._version),
            "num_anchor_tokens": int(self._mask.sum()),
            "anchor_frac": float(self._mask.sum() / num_tokens) if num_tokens else math.nan,
            "num_scored_anchor": int(anchor_scored.sum()),
            "num_scored_other": int(other_scored.sum()),
            "mean_conf_anchor": _nanmean(latest[anchor_scored]),
            "mean_conf_other": _nanmean(latest[other_scored]),
            "mean_delta_anchor": _nanmean(delta[anchor_scored]),
            "mean_delta_other": _nanmean(delta[other_scored]),
            "num_stale_visits": int(self._num_stale_visits),
            "bytes_per_token": per_token / num_tokens if num_tokens else math.nan,
            "bytes_per_token_total": total / num_tokens if num_tokens else math.nan,
        }

    def history(self) -> list[dict]:
        """The stats dict of every refresh (with its step and rule), oldest first."""
        return [dict(h) for h in self._history]

    # ---------------------------------------------------------------- snapshots
    def state_dict(self) -> dict:
        """Everything, as numpy arrays and plain scalars (``np.savez``-able; copies)."""
        return {
            "format": STATE_FORMAT, **self.config(),
            "version": int(self._version), "num_stale_visits": int(self._num_stale_visits),
            "ids": self._ids.copy(), "lengths": self._lengths.copy(), "last_step": self._last_step.copy(),
            "num_visits": self._num_visits.copy(), "has_base": self._has_base.copy(),
            "traj_steps": self._traj_steps.copy(), "c0": self._c0.copy(), "latest": self._latest.copy(),
            "mask": self._mask.copy(), "traj_conf": self._traj_conf.copy(),
            # JSON keeps ints as ints and floats (NaN included) exactly.
            "history_json": json.dumps(self._history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the whole content by a snapshot from :meth:`state_dict` (possibly through ``np.load``)."""
        if _scalar(state["format"]) != STATE_FORMAT:
            raise ValueError(f"unsupported store snapshot format {_scalar(state['format'])}")
        for key, mine in self.config().items():
            theirs = _scalar(state[key])
            if theirs != mine:
                raise ValueError(f"store snapshot has {key}={theirs!r} but this store has {key}={mine!r}")
        arrays = {key: np.array(state[key]) for key in ("ids", "lengths", "last_step", "num_visits", "has_base",
                                                        "traj_steps", "c0", "latest", "mask", "traj_conf")}
        n, t, k = len(arrays["ids"]), int(arrays["lengths"].sum()), self.trajectory_len
        shapes = {"lengths": (n,), "last_step": (n,), "num_visits": (n,), "has_base": (n,), "traj_steps": (n, k),
                  "c0": (t,), "latest": (t,), "mask": (t,), "traj_conf": (k, t)}
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise ValueError(f"store snapshot array {key!r} has shape {arrays[key].shape}, expected {shape}")
        self._reset()
        dtypes = {"ids": np.int64, "lengths": np.int64, "last_step": np.int64, "num_visits": np.int64,
                  "has_base": bool, "traj_steps": np.int64, "c0": np.float32, "latest": np.float16, "mask": bool,
                  "traj_conf": np.float16}
        for key, dtype in dtypes.items():
            setattr(self, "_" + key, arrays[key].astype(dtype, copy=False))
        self._version = int(_scalar(state["version"]))
        self._num_stale_visits = int(_scalar(state["num_stale_visits"]))
        self._history = json.loads(str(_scalar(state["history_json"])))
        self._rebuild_index()

    def save(self, path: str | os.PathLike) -> None:
        save_state(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path))


# --------------------------------------------------------------------------------------------------
# Snapshot files
# --------------------------------------------------------------------------------------------------

def flatten_state(state: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / lists of states -> one flat ``{"a/b/0/c": array}`` dict for ``np.savez``."""
    flat: dict[str, Any] = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    if isinstance(state, (list, tuple)):
        flat[prefix + "__len__"] = len(state)
    for key, value in items:
        key = str(key)
        if "/" in key:
            raise ValueError(f"state key {key!r} must not contain '/'")
        if isinstance(value, (dict, list, tuple)):
            flat.update(flatten_state(value, prefix + key + "/"))
        else:
            flat[prefix + key] = value
    return flat


def unflatten_state(flat: dict[str, Any]) -> dict:
    """Inverse of :func:`flatten_state`; 0-d arrays stay 0-d arrays (the loaders accept them)."""
    root: dict = {}
    for key, value in flat.items():
        node = root
        *parents, leaf = key.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        if "__len__" in node:
            return [listify(node[str(i)]) for i in range(int(_scalar(node["__len__"])))]
        return {k: listify(v) for k, v in node.items()}

    return listify(root)


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write a (possibly nested) store state with ``np.savez`` to exactly ``path``, atomically."""
    path = os.fspath(path)
    buffer = io.BytesIO()
    np.savez(buffer, **flatten_state(state))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict:
    """Read a state written by :func:`save_state` (``np.load(allow_pickle=False)``)."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return unflatten_state({key: data[key] for key in data.files})


def merge_stats(parts: Sequence[dict]) -> dict:
    """Merge per-shard stats (or one refresh's per-shard history entries): counts add up, means and
    fractions are weighted by their token counts, everything else is taken from the first shard."""
    if not parts:
        return {}
    merged = dict(parts[0])
    for key in _COUNT_KEYS:
        if key in merged:
            merged[key] = int(sum(p[key] for p in parts))
    for key, weight_key in _WEIGHTED_KEYS.items():
        if key not in merged:
            continue
        pairs = [(p[key], p[weight_key]) for p in parts if p[weight_key] > 0 and not math.isnan(p[key])]
        weight = sum(w for _, w in pairs)
        merged[key] = float(sum(v * w for v, w in pairs) / weight) if weight else math.nan
    versions = [p["version"] for p in parts]
    merged["version"] = int(max(versions))
    merged["versions_agree"] = len(set(versions)) == 1
    if "step" in merged and len({p["step"] for p in parts}) != 1:
        raise RuntimeError(f"store shards disagree on the refresh step: {[p['step'] for p in parts]}")
    return merged


# --------------------------------------------------------------------------------------------------
# Ray side
# --------------------------------------------------------------------------------------------------

_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(ConfidenceStore)
    return _ACTOR_CLASS


def _shard_name(name: str, shard: int) -> str:
    return f"{name}-shard{shard}"


class _InProcessShard:
    """A shard in this process behind the call shape of a Ray actor handle (``shard.method.remote(...)``
    returns the result itself), so that one ``StoreClient`` serves both."""

    def __init__(self, store: ConfidenceStore):
        self._store = store

    def __getattr__(self, name: str):
        return _Remote(getattr(self._store, name))


class _Remote:
    def __init__(self, method):
        self.remote = method


class MaskFuture:
    """Masks being fetched from the shards; :meth:`result` assembles them in request order."""

    def __init__(self, refs: list, positions: list[np.ndarray], count: int, local: bool = False):
        self._refs, self._positions, self._count, self._local = refs, positions, count, local

    def done(self) -> bool:
        if self._local:
            return True
        import ray

        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)

    def result(self, timeout: float | None = None) -> tuple[int, list[np.ndarray]]:
        parts = _get(self._refs, self._local, timeout)
        versions = [int(p[0]) for p in parts]
        if len(set(versions)) != 1:
            raise RuntimeError(f"store shards disagree on the mask version: {versions} (a shard was restarted "
                               f"and not restored, or a refresh did not reach every shard)")
        out: list[np.ndarray] = [None] * self._count  # type: ignore[list-item]
        for (_, flat, lengths), positions in zip(parts, self._positions):
            pieces = np.split(np.array(flat, dtype=bool), np.cumsum(lengths)[:-1]) if len(lengths) else []
            for position, piece in zip(positions, pieces):
                out[position] = piece
        return versions[0], out


def _get(refs, local: bool, timeout: float | None = None):
    """``ray.get`` for actor shards; in-process shards already returned their results."""
    if local:
        return refs
    import ray

    return ray.get(refs, timeout=timeout)


class StoreClient:
    """Routes example ids to the shard actors of one store; picklable, so workers can hold it.

    With ``local=True`` the shards are :class:`ConfidenceStore` objects in this process (see
    :func:`local_store`): the same client, for a training worker that runs without Ray.
    """

    def __init__(self, name: str, handles: list, namespace: str | None = None, local: bool = False):
        self.name, self.namespace, self.handles, self.local = name, namespace, list(handles), local
        self.num_shards = len(self.handles)

    def wait(self, pending: list) -> None:
        """Wait until the pushes returned by :meth:`record` have reached their shards (raises their errors)."""
        _get(list(pending), self.local)

    # ---------------------------------------------------------------- routing
    def _route(self, example_ids) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(shard, positions in the request, ids)`` for every shard that gets a part of the request."""
        ids = _as_ids(example_ids)
        shards = shard_of(ids, self.num_shards)
        routes = []
        for shard in range(self.num_shards):
            positions = np.nonzero(shards == shard)[0]
            if positions.size:
                routes.append((shard, positions, ids[positions]))
        return routes

    def _call_all(self, method: str, *args) -> list:
        return _get([getattr(h, method).remote(*args) for h in self.handles], self.local)

    def register(self, example_ids, lengths) -> None:
        lengths = np.asarray(lengths)
        _get([self.handles[s].register.remote(ids, lengths[pos]) for s, pos, ids in self._route(example_ids)],
             self.local)

    def set_base(self, example_ids, values) -> None:
        _get(self._send("set_base", (), example_ids, values), self.local)

    def record(self, step: int, example_ids, values) -> list:
        """Non-blocking: the refs of the shard calls, one per shard touched.

        Wait on them (:meth:`wait`) before the next refresh: that is where a bad id or length of this
        push raises.  Calls from one process to a shard run in submission order, so a refresh sent
        by the same process after its records sees them; records pushed by other processes (training
        workers) are only guaranteed to be in once their refs have completed.
        """
        return self._send("record", (int(step),), example_ids, values)

    def _send(self, method: str, leading: tuple, example_ids, values) -> list:
        if len(values) != len(np.asarray(example_ids)):
            raise ValueError(f"got {len(values)} value arrays for {len(np.asarray(example_ids))} example ids")
        return [getattr(self.handles[s], method).remote(*leading, ids, [values[i] for i in pos])
                for s, pos, ids in self._route(example_ids)]

    def refresh(self, step: int, **rule) -> dict:
        """Refresh every shard with the same rule (blocking); the merged stats."""
        return merge_stats(_get([h.refresh.remote(int(step), **rule) for h in self.handles], self.local))

    def get_masks_async(self, example_ids) -> MaskFuture:
        routes = self._route(example_ids)
        if not routes:  # still ask a shard, for the version
            routes = [(0, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))]
        refs = [self.handles[s].get_masks_flat.remote(ids) for s, _, ids in routes]
        return MaskFuture(refs, [pos for _, pos, _ in routes], len(np.asarray(example_ids)), self.local)

    def get_masks(self, example_ids) -> tuple[int, list[np.ndarray]]:
        return self.get_masks_async(example_ids).result()

    def _gather(self, method: str, example_ids) -> tuple[list, list]:
        routes = self._route(example_ids)
        parts = _get([getattr(self.handles[s], method).remote(ids) for s, _, ids in routes], self.local)
        n = len(np.asarray(example_ids))
        first, second = [None] * n, [None] * n
        for (_, positions, _), (a, b) in zip(routes, parts):
            for position, x, y in zip(positions, a, b):
                first[position], second[position] = x, y
        return first, second

    def get_confidences(self, example_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self._gather("get_confidences", example_ids)

    def get_trajectories(self, example_ids) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self._gather("get_trajectories", example_ids)

    def stats(self) -> dict:
        """Stats merged over shards (token-weighted); ``versions_agree`` says whether shard versions match."""
        return merge_stats(self._call_all("stats"))

    def history(self) -> list[dict]:
        histories = self._call_all("history")
        lengths = {len(h) for h in histories}
        if len(lengths) != 1:
            raise RuntimeError(f"store shards have different refresh histories: lengths {[len(h) for h in histories]}")
        return [merge_stats(entries) for entries in zip(*histories)]

    def config(self) -> list[dict]:
        return self._call_all("config")

    def reset(self) -> None:
        """Forget every example, visit and mask version (the shards keep their configuration)."""
        self.load_state_dict({"num_shards": self.num_shards,
                              "shards": [ConfidenceStore(**c).state_dict() for c in self.config()]})

    # ---------------------------------------------------------------- snapshots
    def state_dict(self) -> dict:
        return {"num_shards": self.num_shards, "shards": self._call_all("state_dict")}

    def load_state_dict(self, state: dict) -> None:
        num_shards = int(_scalar(state["num_shards"]))
        if num_shards != self.num_shards or len(state["shards"]) != self.num_shards:
            raise ValueError(f"store snapshot has {num_shards} shards, this store has {self.num_shards}")
        _get([h.load_state_dict.remote(s) for h, s in zip(self.handles, state["shards"])], self.local)

    def save(self, path: str | os.PathLike) -> None:
        save_state(path, self.state_dict())

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_state(path))

    def kill(self, wait_s: float = 30.0) -> None:
        """``ray.kill`` every shard (no restart), then wait up to ``wait_s`` until their names are free,
        so that a ``create_store`` with the same name right after starts fresh actors."""
        if self.local:
            return
        import time

        import ray

        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + wait_s
        for shard in range(self.num_shards):
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(_shard_name(self.name, shard), namespace=self.namespace)
                except ValueError:
                    break
                time.sleep(0.05)


def create_store(name: str, num_shards: int, namespace: str | None = None, **store_kwargs) -> StoreClient:
    """Start (or get, when they exist) the named shard actors ``{name}-shard{i}`` of a store.

    Existing actors must have been created with the same configuration, else ValueError.
    """
    import ray

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    actor_class = _actor_class()
    handles = [
        actor_class.options(name=_shard_name(name, i), namespace=namespace, num_cpus=0, max_restarts=-1,
                            get_if_exists=True).remote(shard=i, num_shards=num_shards, **store_kwargs)
        for i in range(num_shards)
    ]
    expected = ConfidenceStore(0, num_shards, **store_kwargs).config()
    for i, config in enumerate(ray.get([h.config.remote() for h in handles])):
        if {**config, "shard": 0} != expected or config["shard"] != i:
            raise ValueError(f"store actor {_shard_name(name, i)!r} already exists with {config}, "
                             f"which differs from the requested {dict(expected, shard=i)}")
    return StoreClient(name, handles, namespace)


def connect_store(name: str, num_shards: int, namespace: str | None = None) -> StoreClient:
    """The client of an existing store (from a training worker); ValueError when a shard is missing."""
    import ray

    handles = []
    for i in range(num_shards):
        try:
            handles.append(ray.get_actor(_shard_name(name, i), namespace=namespace))
        except ValueError as e:
            raise ValueError(f"confidence store {name!r} has no shard {i} (actor {_shard_name(name, i)!r}) in "
                             f"namespace {namespace or ray.get_runtime_context().namespace!r}: create it first "
                             f"with create_store") from e
    configs = ray.get([h.config.remote() for h in handles])
    for config in configs:
        if config["num_shards"] != num_shards:
            raise ValueError(f"confidence store {name!r} has {config['num_shards']} shards, not {num_shards}")
    return StoreClient(name, handles, namespace)


def local_store(num_shards: int = 1, **store_kwargs) -> StoreClient:
    """A store whose shards live in this process: for one training process without Ray (a plain
    ``torch.distributed`` run of world size 1, ``bench/gpu_check.py``). Ranks of a multi-process
    run each need the same store, which only the Ray actors give."""
    shards = [_InProcessShard(ConfidenceStore(shard=i, num_shards=num_shards, **store_kwargs))
              for i in range(num_shards)]
    return StoreClient("in-process", shards, local=True)
