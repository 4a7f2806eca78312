"""The protocol and method tables (``t3s_ray.protocols``) and every decision read from them, each
checked against a hand-written expectation where it is made: config validation, the pipeline, the
worker's selection plan and the core's keep rules."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from conftest import tiny_run_data

from t3s_ray import config, protocols
from t3s_ray.config import ConfigError, RunConfig, SelectionConfig
from t3s_ray.pipeline import _check_methods, _static_method, method_config
from t3s_ray.protocols import METHODS, PROTOCOLS
from t3s_ray.t3s import KEEP_ALL, KEEP_METHODS, keep_mask
from t3s_ray.worker import SelectionPlan

DLLM = {"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"}

# protocol: (keep rule, online, needs the probe, masks from the first step, allowed for a dLLM student)
EXPECTED_PROTOCOLS = {
    "sft": ("all", False, False, False, True),
    "t3s_static": ("t3s", False, True, True, True),
    "t3s_online": ("t3s", True, False, True, False),
    "inverse": ("inverse", False, True, True, False),
    "random": ("random", False, True, True, False),
}
# method: (trained (has a trajectory), allowed for a dLLM student)
EXPECTED_METHODS = {
    "base": (False, True), "teacher": (False, True), "sft": (True, True), "t3s": (True, True),
    "inverse": (True, False), "random": (True, False), "rrt": (False, False), "t3s_online": (True, False),
}


def run_config(tmp_path, **over) -> RunConfig:
    return config.from_dict(tiny_run_data(tmp_path, "protocols", **over))


def test_the_config_literals_are_the_tables_keys():
    protocol = typing.get_type_hints(SelectionConfig)["protocol"]
    (compare_item,) = typing.get_args(typing.get_type_hints(RunConfig)["compare"])
    assert typing.get_args(protocol) == tuple(PROTOCOLS)
    assert typing.get_args(compare_item) == tuple(METHODS)
    assert set(EXPECTED_PROTOCOLS) == set(PROTOCOLS) and set(EXPECTED_METHODS) == set(METHODS)


def test_the_keep_rules_are_the_cores():
    assert {p.keep for p in PROTOCOLS.values()} == set(KEEP_METHODS)
    assert protocols.KEEP_ALL == KEEP_ALL == "all"
    assert all(p in PROTOCOLS for m in METHODS.values() for p in m.protocols)


def test_the_tables_are_frozen():
    with pytest.raises(TypeError):
        PROTOCOLS["new"] = PROTOCOLS["sft"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROTOCOLS["sft"].online = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["rrt"].needs = ()  # type: ignore[misc]


@pytest.mark.parametrize("name", list(EXPECTED_PROTOCOLS))
def test_the_worker_plan_of_each_protocol(tmp_path, name):
    keep, online, needs_probe, masks_from_start, _ = EXPECTED_PROTOCOLS[name]
    plan = SelectionPlan.for_protocol(run_config(tmp_path), name)
    assert (plan.keep_method, plan.online, plan.needs_probe, plan.masking_from_start()) == \
        (keep, online, needs_probe, masks_from_start)
    if online:  # with switch: bottleneck the online protocol masks only once the bottleneck is passed
        late = SelectionPlan.for_protocol(run_config(tmp_path, selection={"switch": "bottleneck"}), name)
        assert not late.masking_from_start()


def test_the_plan_follows_the_configs_protocol(tmp_path):
    cfg = run_config(tmp_path, selection={"protocol": "t3s_online"})
    assert SelectionPlan.for_protocol(cfg).online and SelectionPlan.for_protocol(cfg).keep_method == "t3s"
    assert SelectionPlan.for_protocol(cfg, "sft").keep_method == KEEP_ALL


@pytest.mark.parametrize("name", list(EXPECTED_PROTOCOLS))
def test_config_validation_allows_the_dllm_protocols_only(tmp_path, name):
    data = tiny_run_data(tmp_path, "protocols", student=DLLM, selection={"protocol": name})
    if EXPECTED_PROTOCOLS[name][4]:
        assert config.from_dict(data).selection.protocol == name
    else:
        with pytest.raises(ConfigError, match=r"selection.protocol a dLLM student supports 'sft' and 't3s_static' \("):
            config.from_dict(data)


def test_each_method_trains_under_its_protocol(tmp_path):
    expected = {  # configured protocol -> method -> the protocol its run gets
        "sft": {"sft": "sft", "t3s": "t3s_static", "inverse": "inverse", "random": "random",
                "t3s_online": "t3s_online"},
        "t3s_static": {"t3s": "t3s_static"},
        "t3s_online": {"sft": "sft", "t3s": "t3s_online", "inverse": "inverse"},
        "random": {"t3s": "t3s_static", "random": "random"},
    }
    for configured, by_method in expected.items():
        cfg = run_config(tmp_path, selection={"protocol": configured})
        for method, protocol in by_method.items():
            assert method_config(cfg, method).selection.protocol == protocol, (configured, method)
    assert {m for m, row in METHODS.items() if row.trained} == {m for m, e in EXPECTED_METHODS.items() if e[0]}


def test_which_method_runs_the_static_probe(tmp_path):
    def static(compare, protocol="t3s_static"):
        return _static_method(run_config(tmp_path, selection={"protocol": protocol}, compare=compare))

    assert static(["base", "sft", "t3s"]) == "t3s"
    assert static(["base", "sft", "t3s"], "t3s_online") is None
    assert static(["base", "sft", "t3s_online", "t3s"], "t3s_online") is None
    assert static(["base", "sft", "t3s", "random", "inverse"], "t3s_online") == "random"
    assert static(["sft", "inverse", "t3s"]) == "inverse"
    assert static(["base", "teacher", "sft", "rrt"]) is None
    assert {m for m, row in METHODS.items() if row.may_probe} == {"t3s", "inverse", "random"}


@pytest.mark.parametrize("compare, ok", [
    (["base", "sft", "t3s", "rrt"], True),
    (["sft", "inverse", "rrt"], True),
    (["random", "sft", "rrt", "rrt"], True),
    (["base", "rrt", "sft", "t3s"], False),
    (["base", "sft", "rrt", "t3s"], False),
    (["t3s", "rrt"], False),
    (["base", "sft", "t3s_online", "rrt"], False),
])
def test_rrt_needs_sft_and_a_static_probe_before_it(tmp_path, compare, ok):
    cfg = run_config(tmp_path, compare=compare)
    if ok:
        _check_methods(cfg)
    else:
        with pytest.raises(ConfigError) as err:
            _check_methods(cfg)
        assert str(err.value) == ("compare: 'rrt' merges θ0 + (θ_sft − θb): list it after 'sft' and a method with "
                                  "a static probe ('t3s' with t3s_static, 'inverse' or 'random')")


@pytest.mark.parametrize("method", list(EXPECTED_METHODS))
def test_a_dllm_student_compares_its_methods_only(tmp_path, method):
    compare = ["base", "sft", "t3s", method]
    cfg = run_config(tmp_path, student=DLLM, compare=compare)
    if EXPECTED_METHODS[method][1]:
        _check_methods(cfg)
    else:
        with pytest.raises(ConfigError) as err:
            _check_methods(cfg)
        assert str(err.value) == f"compare: a dLLM student supports base, teacher, sft and t3s; got {compare}"


def test_keep_all_keeps_every_target_and_none_is_its_old_name():
    targets = torch.tensor([[True, True, False, True]])
    anchors = torch.tensor([[True, False, False, False]])
    assert torch.equal(keep_mask("all", anchors, targets), targets)
    with pytest.warns(DeprecationWarning, match="keep method 'none' is now called 'all'"):
        assert torch.equal(keep_mask("none", anchors, targets), targets)
    assert "none" not in KEEP_METHODS


@pytest.mark.parametrize("name", list(EXPECTED_PROTOCOLS))
def test_a_rehearsal_refreshes_within_its_steps_for_an_online_protocol_only(tmp_path, name):
    from t3s_ray.rehearse import rehearsal_config

    cfg = run_config(tmp_path, selection={"protocol": name, "refresh_interval": 50})
    refresh = rehearsal_config(cfg, backend="hf", vllm_available=False).config.selection.refresh_interval
    assert (refresh < 50) == EXPECTED_PROTOCOLS[name][1]
