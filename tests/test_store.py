"""The global token-confidence store: the plain class on hand-made arrays, then the sharded Ray actors.

Confidence values are chosen exactly representable in float16 (the store keeps the latest visit
in fp16), so the expected masks below are exact.
"""

import json
import math
import os
import time
import uuid

import numpy as np
import pytest

from t3s_ray.store import (
    ConfidenceStore,
    connect_store,
    create_store,
    load_state,
    merge_stats,
    save_state,
    shard_of,
)
from t3s_ray.t3s import cap_anchor_frac, select_forced, select_top_frac

F = np.float32


def arr(values, dtype=F):
    return np.array(values, dtype=dtype)


def masks_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == bool
        np.testing.assert_array_equal(g, np.array(e, dtype=bool))


# Three examples; c0 per example, and one visit whose Δ = latest - c0 is written in the comments.
IDS = np.array([0, 1, 2])
LENGTHS = np.array([5, 4, 3])
C0 = [arr([-1.0, -1.0, -1.0, -1.0, -1.0]), arr([-2.0, -2.0, -2.0, -2.0]), arr([0.0, 0.0, 0.0])]
VISIT = [
    arr([-0.5, -1.25, -1.0, -0.875, -1.125]),  # Δ = [0.5, -0.25, 0, 0.125, -0.125]
    arr([-1.0, -2.5, -1.75, -2.0]),  # Δ = [1.0, -0.5, 0.25, 0]
    arr([-0.25, -0.75, 0.5]),  # Δ = [-0.25, -0.75, 0.5]
]


def filled(**kwargs) -> ConfidenceStore:
    store = ConfidenceStore(**kwargs)
    store.register(IDS, LENGTHS)
    store.set_base(IDS, C0)
    store.record(1, IDS, VISIT)
    return store


# ------------------------------------------------------------------------------------------- rules
def test_delta_rule_masks_by_hand():
    store = filled()
    stats = store.refresh(1)
    version, masks = store.get_masks(IDS)
    masks_equal(masks, [[1, 0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 1]])
    assert version == 1 and stats["version"] == 1 and stats["step"] == 1 and stats["rule"] == "delta"
    assert stats["num_anchor_tokens"] == 5 and stats["anchor_frac"] == pytest.approx(5 / 12)
    assert stats["mean_delta_anchor"] == pytest.approx((0.5 + 0.125 + 1.0 + 0.25 + 0.5) / 5)
    assert stats["mean_delta_other"] == pytest.approx((-0.25 + 0 - 0.125 - 0.5 + 0 - 0.25 - 0.75) / 7)
    assert stats["mean_conf_anchor"] == pytest.approx((-0.5 - 0.875 - 1.0 - 1.75 + 0.5) / 5)
    store.refresh(2, tau=0.3)
    masks_equal(store.get_masks(IDS)[1], [[1, 0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1]])


def test_top_frac_rule_masks_by_hand():
    store = filled()
    store.refresh(1, rule="top_frac", top_frac=0.5)
    # ceil(0.5 n): 3 of 5, 2 of 4, 2 of 3 highest Δ; ties (Δ=0 twice in no example here) by position.
    masks_equal(store.get_masks(IDS)[1], [[1, 0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 1]])


def test_forced_rule_masks_by_hand():
    store = filled()
    store.refresh(1, rule="forced", tau=0.2)
    masks_equal(store.get_masks(IDS)[1], [[0, 1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0]])


def test_max_anchor_frac_caps_highest_delta_and_most_negative_for_forced():
    store = filled()
    # delta rule, tau = -0.2: candidates Δ > -0.2; cap floor(0.4 n) = 2, 1, 1 keeps the highest Δ.
    store.refresh(1, tau=-0.2, max_anchor_frac=0.4)
    masks_equal(store.get_masks(IDS)[1], [[1, 0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1]])
    # forced, tau = 0: candidates Δ < 0; cap keeps the most negative Δ first.
    store.refresh(2, rule="forced", tau=0.0, max_anchor_frac=0.4)
    masks_equal(store.get_masks(IDS)[1], [[0, 1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0]])
    # top_frac + cap: the cap wins when smaller.
    store.refresh(3, rule="top_frac", top_frac=1.0, max_anchor_frac=0.25)
    masks_equal(store.get_masks(IDS)[1], [[1, 0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0]])


def test_per_sequence_rules_match_core_applied_per_example():
    """Length-bucketed padding gives exactly what the core rules give on each 1-D sequence."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 300, size=60)
    ids = np.arange(60) * 3 + 1
    store = ConfidenceStore(shard=1, num_shards=3)
    store.register(ids, lengths)
    base = [rng.normal(size=n).astype(F) for n in lengths]
    # Coarse values so that ties happen and fp16 storage is exact.
    visit = [b + np.round(rng.normal(size=len(b)) * 4) / 4 for b in base]
    visit = [v.astype(np.float16).astype(F) for v in visit]
    store.set_base(ids, base)
    store.record(3, ids, visit)
    deltas = [v - b for v, b in zip(visit, base)]
    for rule, kwargs, expected_fn in [
        ("top_frac", {"top_frac": 0.3, "max_anchor_frac": 0.2},
         lambda d, t: cap_anchor_frac(select_top_frac(d, t, 0.3), d, t, 0.2)),
        ("forced", {"tau": 0.1, "max_anchor_frac": 0.1},
         lambda d, t: cap_anchor_frac(select_forced(d, t, 0.1), -d, t, 0.1)),
    ]:
        store.refresh(4, rule=rule, **kwargs)
        _, masks = store.get_masks(ids)
        for d, m in zip(deltas, masks):
            np.testing.assert_array_equal(m, expected_fn(d, np.ones(len(d), dtype=bool)))


def test_unvisited_or_baseless_examples_keep_their_mask_and_versions_increment():
    store = ConfidenceStore()
    store.register([0, 1, 2, 3], [5, 4, 3, 2])
    store.set_base([0, 1, 2], C0)  # 3 has no base
    store.record(1, [0, 1, 3], [VISIT[0], VISIT[1], arr([9.0, 9.0])])
    stats = store.refresh(1, tau=-10.0)  # every scored token is an anchor
    assert stats["num_refreshed_examples"] == 2 and stats["num_skipped_no_base"] == 1
    version, masks = store.get_masks([0, 1, 2, 3])
    masks_equal(masks, [[1] * 5, [1] * 4, [0] * 3, [0] * 2])
    assert version == 1
    # Only example 0 is visited again; 1 keeps the mask computed from its stored latest, 2 stays unvisited.
    store.record(2, [0], [C0[0] - 1.0])
    store.refresh(2, tau=0.0)
    version, masks = store.get_masks([0, 1, 2, 3])
    masks_equal(masks, [[0] * 5, [1, 0, 1, 0], [0] * 3, [0] * 2])
    assert version == 2 and store.stats()["version"] == 2
    assert [h["step"] for h in store.history()] == [1, 2]
    assert store.history()[0]["num_anchor_tokens"] == 9 and store.history()[1]["num_anchor_tokens"] == 2


def test_refresh_leaves_masks_of_unrefreshed_examples_untouched():
    """A mask that exists without a visit (e.g. restored from a snapshot) survives refreshes."""
    store = ConfidenceStore()
    store.register([0, 1, 2], [5, 4, 3])
    store.set_base([0, 1], C0[:2])
    state = store.state_dict()
    state["mask"][5:12] = [1, 0, 1, 0, 0, 1, 1]  # examples 1 (has a base) and 2 (none), never visited
    store.load_state_dict(state)
    store.record(1, [0, 2], [VISIT[0], VISIT[2]])  # 2 is visited but has no base: skipped
    stats = store.refresh(1)
    masks_equal(store.get_masks([0, 1, 2])[1], [[1, 0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1]])
    assert stats["num_refreshed_examples"] == 1 and stats["num_skipped_no_base"] == 1


# --------------------------------------------------------------------------- summaries and trajectory
def test_ema_summary_matches_hand_loop():
    alpha = 0.3
    store = ConfidenceStore(summary="ema", ema_alpha=alpha)
    store.register([7], [4])
    base = arr([-1.0, -1.0, -1.0, -1.0])
    store.set_base([7], [base])
    visits = [arr([-1.0, -0.5, -2.0, -1.0]), arr([0.0, -1.5, -2.0, -0.5]), arr([-0.25, -3.0, 0.0, -1.0])]
    ema = None
    for step, v in enumerate(visits):
        store.record(step, [7], [v.astype(np.float16)])
        ema = v.copy() if ema is None else (1 - alpha) * ema + alpha * v
        ema = ema.astype(np.float16).astype(F)  # the store keeps the summary in fp16
    _, latest = store.get_confidences([7])
    np.testing.assert_allclose(latest[0], ema, rtol=1e-3, atol=1e-3)
    assert not np.allclose(latest[0], visits[-1])  # not just the last visit
    store.refresh(3)
    np.testing.assert_array_equal(store.get_masks([7])[1][0], ema - base > 0)


def test_latest_summary_keeps_last_visit_and_drops_stale_visits():
    store = ConfidenceStore()
    store.register([4], [3])
    store.record(5, [4], [arr([-1.0, -2.0, -3.0])])
    store.record(3, [4], [arr([0.0, 0.0, 0.0])])  # older than the latest step: stale
    store.record(5, [4], [arr([-0.5, -0.5, -0.5])])  # same step again: a new visit
    c0, latest = store.get_confidences([4])
    np.testing.assert_array_equal(latest[0], [-0.5, -0.5, -0.5])
    assert np.isnan(c0[0]).all() and c0[0].dtype == np.float32 and latest[0].dtype == np.float32
    assert store.stats()["num_stale_visits"] == 1


def test_trajectory_ring_buffer_order_and_steps():
    store = ConfidenceStore(trajectory_len=3)
    store.register([0, 1, 2], [2, 3, 1])
    for step in (1, 2, 4, 7, 9):
        store.record(step, [0], [arr([step, -step])])
    store.record(6, [1], [arr([1.0, 2.0, 3.0])])
    # An id twice in one call is two successive visits.
    store.record(8, [1, 1], [arr([4.0, 5.0, 6.0]), arr([7.0, 8.0, 9.0])])
    steps, conf = store.get_trajectories([1, 0, 2])
    np.testing.assert_array_equal(steps[1], [4, 7, 9])
    np.testing.assert_array_equal(conf[1], [[4, -4], [7, -7], [9, -9]])
    np.testing.assert_array_equal(steps[0], [6, 8, 8])
    np.testing.assert_array_equal(conf[0], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert steps[2].shape == (0,) and conf[2].shape == (0, 1)
    np.testing.assert_array_equal(store.get_confidences([1])[1][0], [7, 8, 9])


def test_bytes_per_token():
    store = ConfidenceStore()
    store.register(np.arange(100), np.full(100, 250))
    stats = store.stats()
    assert stats["num_tokens"] == 25_000 and stats["num_examples"] == 100
    assert stats["bytes_per_token"] <= 8
    assert stats["bytes_per_token"] < stats["bytes_per_token_total"] < 8.5
    with_traj = ConfidenceStore(trajectory_len=4)
    with_traj.register(np.arange(100), np.full(100, 250))
    assert with_traj.stats()["bytes_per_token"] == stats["bytes_per_token"]
    assert with_traj.stats()["bytes_per_token_total"] >= stats["bytes_per_token_total"] + 4 * 2


# ----------------------------------------------------------------------------------------- snapshots
def _history_json(store):
    return json.dumps(store.history())


@pytest.mark.parametrize("summary", ["latest", "ema"])
def test_state_dict_round_trip_through_savez(tmp_path, summary):
    kwargs = {"trajectory_len": 2, "summary": summary, "ema_alpha": 0.5}
    original = filled(**kwargs)
    original.refresh(1, rule="top_frac", top_frac=0.4)
    original.record(2, [1], [C0[1] + 0.5])
    path = tmp_path / "store.npz"
    np.savez(path, **original.state_dict())
    with np.load(path, allow_pickle=False) as data:
        state = {k: data[k] for k in data.files}
    restored = ConfidenceStore(**kwargs)
    restored.load_state_dict(state)
    assert restored.stats() == original.stats()
    assert _history_json(restored) == _history_json(original)
    # Identical behaviour afterwards.
    for store in (original, restored):
        store.record(3, [0, 2], [C0[0] + 0.25, C0[2] - 0.5])
        store.refresh(3, tau=0.1)
    v1, m1 = original.get_masks(IDS)
    v2, m2 = restored.get_masks(IDS)
    assert v1 == v2 == 2
    masks_equal(m2, [m.tolist() for m in m1])
    for a, b in zip(original.get_trajectories(IDS), restored.get_trajectories(IDS)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    for a, b in zip(original.get_confidences(IDS), restored.get_confidences(IDS)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert _history_json(restored) == _history_json(original)
    # save_state / load_state (exact path, nested client-style states too).
    save_state(tmp_path / "nested", {"num_shards": 1, "shards": [original.state_dict()]})
    nested = load_state(tmp_path / "nested")
    again = ConfidenceStore(**kwargs)
    again.load_state_dict(nested["shards"][0])
    assert int(nested["num_shards"]) == 1 and again.stats() == original.stats()


def test_load_state_dict_rejects_other_configuration():
    state = filled(trajectory_len=2).state_dict()
    with pytest.raises(ValueError, match="trajectory_len=2"):
        ConfidenceStore(trajectory_len=0).load_state_dict(state)


# -------------------------------------------------------------------------------------------- errors
def test_errors_name_the_example():
    store = filled()
    with pytest.raises(KeyError, match="unknown example id 42"):
        store.record(2, [0, 42], [VISIT[0], arr([1.0])])
    with pytest.raises(KeyError, match="unknown example id 9"):
        store.get_masks([9])
    with pytest.raises(ValueError, match=r"example id 1: expected 4 confidence values, got 3"):
        store.record(2, [0, 1], [VISIT[0], arr([1.0, 2.0, 3.0])])
    with pytest.raises(ValueError, match=r"example id 2: expected 3 confidence values, got 4"):
        store.set_base([2], [arr([0.0] * 4)])
    # The failing calls above wrote nothing.
    np.testing.assert_array_equal(store.get_confidences([0])[1][0], VISIT[0])
    with pytest.raises(ValueError, match="example id 1 is already registered with length 4, got length 6"):
        store.register([5, 1], [2, 6])
    store.register([2, 0], [3, 5])  # same lengths: no-op
    assert store.stats()["num_tokens"] == 12
    with pytest.raises(ValueError, match="unknown selection rule"):
        store.refresh(2, rule="bogus")
    with pytest.raises(ValueError, match="belongs to shard 1"):
        ConfidenceStore(shard=0, num_shards=2).register([3], [4])


def test_merge_stats_weights_by_tokens():
    a = {"num_tokens": 10, "num_examples": 1, "anchor_frac": 0.5, "num_scored_anchor": 5,
         "mean_conf_anchor": -1.0, "version": 3}
    b = {"num_tokens": 30, "num_examples": 2, "anchor_frac": 0.1, "num_scored_anchor": 0,
         "mean_conf_anchor": math.nan, "version": 3}
    merged = merge_stats([a, b])
    assert merged["num_tokens"] == 40 and merged["num_examples"] == 3
    assert merged["anchor_frac"] == pytest.approx((5 + 3) / 40)
    assert merged["mean_conf_anchor"] == -1.0 and merged["versions_agree"]


# ---------------------------------------------------------------------------------------------- Ray
def _name(tag):
    return f"test-store-{tag}-{uuid.uuid4().hex[:8]}"


def _fill(client):
    ids = np.arange(6)
    lengths = np.array([2, 3, 4, 5, 6, 7])
    client.register(ids, lengths)
    client.set_base(ids, [np.zeros(n, F) for n in lengths])
    # Example i: first i // 2 tokens rise (anchors), the rest fall.
    visits = [np.where(np.arange(n) < i // 2, 0.5, -0.5).astype(np.float16) for i, n in enumerate(lengths)]
    return ids, lengths, visits


def _pid(handle, timeout=10):
    import ray

    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=timeout)


def _wait_for_restart(handle, old_pid, timeout=90.0):
    """Stats of the restarted actor (``ray.kill`` is asynchronous: wait for a new process)."""
    import ray

    deadline = time.time() + timeout
    while True:
        try:
            if _pid(handle) != old_pid:
                return ray.get(handle.stats.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        if time.time() > deadline:
            raise AssertionError(f"store shard did not restart within {timeout} s")
        time.sleep(0.2)


def test_ray_two_shards_route_record_refresh_connect_restart(ray_local, tmp_path):
    """One 2-shard store (each actor start costs seconds here): routing, ordered masks, non-blocking
    record, merged refresh, a second client by name, then a killed shard restored from a snapshot."""
    import ray

    name = _name("ray")
    client = create_store(name, 2, trajectory_len=2)
    try:
        ids, lengths, visits = _fill(client)
        per_shard = ray.get([h.stats.remote() for h in client.handles])
        assert [s["num_examples"] for s in per_shard] == [3, 3]
        assert [s["num_tokens"] for s in per_shard] == [2 + 4 + 6, 3 + 5 + 7]
        assert shard_of(5, 2) == 1 and shard_of(4, 2) == 0
        refs = client.record(1, ids[::-1], visits[::-1])
        assert len(refs) == 2
        ready, pending = ray.wait(refs, num_returns=2, timeout=60)
        assert len(ready) == 2 and not pending
        stats = client.refresh(1)
        assert stats["num_tokens"] == 27 and stats["version"] == 1 and stats["versions_agree"]
        assert stats["num_anchor_tokens"] == 0 + 0 + 1 + 1 + 2 + 2
        request = [5, 0, 3, 2]
        future = client.get_masks_async(request)
        version, masks = future.result()
        assert version == 1 and future.done()
        masks_equal(masks, [[1, 1, 0, 0, 0, 0, 0], [0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0]])
        steps, conf = client.get_trajectories([4, 1])
        np.testing.assert_array_equal(steps[0], [1])
        np.testing.assert_array_equal(conf[1], [visits[1]])
        assert conf[0].shape == (1, 6)
        c0, latest = client.get_confidences([3])
        np.testing.assert_array_equal(latest[0], visits[3])
        np.testing.assert_array_equal(c0[0], np.zeros(5))

        # A second client, by name, sees the same state.
        other = connect_store(name, 2)
        assert other.get_masks(request)[0] == 1
        masks_equal(other.get_masks(request)[1], [m.tolist() for m in masks])
        assert other.stats() == client.stats()
        assert [h["step"] for h in other.history()] == [1]
        assert other.history()[0]["num_anchor_tokens"] == 6
        with pytest.raises(ValueError, match="already exists"):
            create_store(name, 2, trajectory_len=5)  # get_if_exists with another configuration

        # Kill shard 1 with restart: it comes back empty; the snapshot restores it.
        before_stats = client.stats()
        client.save(tmp_path / "store.npz")
        old_pid = _pid(client.handles[1])
        ray.kill(client.handles[1], no_restart=False)
        restarted = _wait_for_restart(client.handles[1], old_pid)
        assert restarted["num_examples"] == 0 and restarted["version"] == 0
        with pytest.raises(KeyError, match="comes back empty"):
            client.get_masks([1])
        client.load(tmp_path / "store.npz")
        after_version, after_masks = client.get_masks(request)
        assert after_version == 1
        masks_equal(after_masks, [m.tolist() for m in masks])
        assert client.stats() == before_stats
        # It keeps working after the restore: example 1 (shard 1) now rises everywhere.
        ray.get(client.record(2, [1], [np.full(3, 1.0, F)]))
        assert client.refresh(2)["num_anchor_tokens"] == before_stats["num_anchor_tokens"] + 3
        assert [h["step"] for h in client.history()] == [1, 2]

        # Shards that disagree on the version are detected.
        ray.get(client.handles[0].refresh.remote(3))
        with pytest.raises(RuntimeError, match="disagree on the mask version"):
            client.get_masks(request)
    finally:
        client.kill()
    # kill() returns once the names are free: a new create_store with this name would start fresh.
    with pytest.raises(ValueError, match="create it first"):
        connect_store(name, 2)
