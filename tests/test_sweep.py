"""Stage 4: Ray Tune sweeps on a builtin tiny model (each trial = a TorchTrainer run + an evaluation)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from t3s_ray import config
from t3s_ray.config import ConfigError
from t3s_ray.sweep import run_sweep, trial_config, trial_name

ROOT = Path(__file__).resolve().parents[1]


def sweep_config(tmp_path: Path, space: dict, **sweep) -> Path:
    base = tmp_path / "base.yaml"
    from conftest import tiny_run_data

    base.write_text(yaml.safe_dump(tiny_run_data(tmp_path, "sw", selection={"protocol": "t3s_online",
                                                                           "refresh_interval": 1})))
    path = tmp_path / "sweep.yaml"  # a sweep config inherits a run config and adds its sweep section
    path.write_text(yaml.safe_dump({"base": "base.yaml", "sweep": {"space": space, **sweep}}))
    return path


def read_table(run_dir: Path) -> list[dict]:
    with open(run_dir / "sweep" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_trial_config_applies_values_and_names_bad_ones(tmp_path):
    base = config.load(sweep_config(tmp_path, {"selection.tau": {"grid": [0.0]}})).to_dict()
    cfg = trial_config(base, {"selection.tau": 0.25, "train.lr": 3e-4}, tmp_path / "t", "trial-x")
    assert cfg.selection.tau == 0.25 and cfg.train.lr == 3e-4 and cfg.name == "trial-x" and not cfg.sweep.space
    with pytest.raises(ConfigError, match=r"train.lr must be > 0 in sweep trial \(train.lr=-1.0\)"):
        trial_config(base, {"train.lr": -1.0}, tmp_path / "t", "trial-y")
    assert trial_name({"a": 1, "b": 2}) == trial_name({"b": 2, "a": 1}) != trial_name({"a": 1, "b": 3})


def test_space_keys_and_specs_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.space.selection.tua 'tua' is not a key; did you mean 'tau'"):
        config.load(sweep_config(tmp_path, {"selection.tua": {"grid": [0.0]}}))
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr.loguniform must be \[low, high\]"):
        config.load(sweep_config(tmp_path, {"train.lr": {"loguniform": [1e-3, 1e-5]}}))


@pytest.mark.slow
def test_asha_sweep_writes_table_best_config_and_plot(ray_local, tmp_path):
    # ASHA with an evaluation after every step: each trial trains in two segments (stop at step 1,
    # evaluate, resume to step 2, evaluate) and weak trials may be stopped after the first.
    # (Two trials at once keep this test short; crossing grids is tested without running trials.)
    path = sweep_config(tmp_path, {"selection.tau": {"grid": [0.0, 0.5]}},
                        max_concurrent_trials=2, scheduler="asha", eval_every=1)
    cfg = config.load(path)
    rows = run_sweep(cfg)
    table = read_table(cfg.run_dir)
    assert len(rows) == len(table) == 2
    assert {float(r["selection.tau"]) for r in table} == {0.0, 0.5}
    assert all(r["status"] in ("DONE", "STOPPED") and r["score"] != "" and float(r["wall_s"]) > 0 for r in table)
    assert any(r["status"] == "DONE" for r in table)
    for r in table:  # each trial trained its own student and evaluated it at each report
        trial_dir = cfg.run_dir / "sweep" / "trials" / r["trial"]
        reports = [json.loads(line) for line in (trial_dir / "reports.jsonl").read_text().splitlines()]
        assert [x["step"] for x in reports] == ([1, 2] if r["status"] == "DONE" else [1])
        for x in reports:
            assert (trial_dir / "eval" / f"step-{x['step']:06d}" / "scores.json").exists()
        steps = [json.loads(line)["step"] for line in (trial_dir / "train" / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, reports[-1]["step"] + 1))  # resumed, not restarted
        assert (trial_dir / "train" / "model" / "config.json").exists()
    best = config.load(cfg.run_dir / "sweep" / "best.yaml")  # ready to run: loads and validates
    assert best.selection.tau == float(rows[0]["selection.tau"]) and best.selection.refresh_interval == 1
    assert best.name == "sw-best" and not best.sweep.space
    png = (cfg.run_dir / "sweep" / "score_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


RANDOM_SPACE = {"selection.tau": {"uniform": [0.0, 1.0]}, "selection.refresh_interval": {"grid": [1, 2]}}


def _random_search_draws(tmp_path, seed: int, space=RANDOM_SPACE, num_samples=2, max_concurrent=2) -> list[dict]:
    """The configurations `search: random` proposes for a run with this seed, drawn from the
    search algorithm that run_sweep hands to Tune (no trial runs)."""
    from ray.tune.experiment import Experiment

    from t3s_ray.sweep import _tune_config, search_space

    cfg = config.load(sweep_config(tmp_path, space, num_samples=num_samples, max_concurrent_trials=max_concurrent))
    tune_config = _tune_config(cfg.sweep, seed)
    assert tune_config.max_concurrent_trials is None and tune_config.search_alg.max_concurrent == max_concurrent
    tune_config.search_alg.add_configurations(
        [Experiment("draws", lambda c: None, config=search_space(cfg.sweep), num_samples=cfg.sweep.num_samples)])
    draws = []
    while (trial := tune_config.search_alg.next_trial()) is not None:
        draws.append(trial.config)
    return draws


def test_random_search_is_seeded_by_the_run_seed(tmp_path):
    first, again, other = (_random_search_draws(tmp_path, seed) for seed in (7, 7, 8))
    # 4 trials (num_samples 2 x the 2-point grid), but at most 2 at once and none has finished
    assert [d["selection.refresh_interval"] for d in first] == [1, 2]
    assert first == again  # a rerun of the sweep tries the same values
    assert [d["selection.tau"] for d in first] != [d["selection.tau"] for d in other]


def test_grid_entries_are_crossed(tmp_path):
    space = {"selection.tau": {"grid": [0.0, 0.5]}, "selection.refresh_interval": {"grid": [1, 2]},
             "train.lr": {"choice": [1e-4]}}
    draws = _random_search_draws(tmp_path, 0, space, num_samples=1, max_concurrent=8)
    assert sorted((d["selection.tau"], d["selection.refresh_interval"], d["train.lr"]) for d in draws) == [
        (0.0, 1, 1e-4), (0.0, 2, 1e-4), (0.5, 1, 1e-4), (0.5, 2, 1e-4)]


def test_optuna_search_takes_no_grid(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr grid is not supported with search: optuna"):
        config.load(sweep_config(tmp_path, {"train.lr": {"grid": [1e-4]}}, search="optuna"))


@pytest.mark.slow
def test_optuna_sweep_proposes_the_seeded_tpe_values(ray_local, tmp_path):
    # Two one-step trials proposed by Optuna. Its TPE sampler, seeded with the run's seed, must have
    # chosen them: an Optuna study of our own with the same seed and space proposes the same pairs
    # (Tune's random search would not).
    optuna = pytest.importorskip("optuna")
    space = {"train.lr": {"loguniform": [1e-5, 1e-3]}, "selection.refresh_interval": {"choice": [1, 2, 3]}}
    path = sweep_config(tmp_path, space, search="optuna", num_samples=2, max_concurrent_trials=2)
    data = yaml.safe_load((tmp_path / "base.yaml").read_text())
    data["seed"], data["train"]["max_steps"] = 11, 1
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(data))
    cfg = config.load(path)
    rows = run_sweep(cfg)
    assert len(rows) == 2 and all(r["status"] == "DONE" and r["score"] != "" for r in rows)
    got = sorted((float(r["train.lr"]), int(r["selection.refresh_interval"])) for r in read_table(tmp_path / "runs" / "sw"))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=11), direction="maximize")
    make = {"loguniform": lambda v: optuna.distributions.FloatDistribution(*v, log=True),
            "choice": optuna.distributions.CategoricalDistribution}
    # in the config's key order: the sampler draws one value per key in turn
    dists = {key: make[kind](values) for key, spec in cfg.sweep.space.items() for kind, values in spec.items()}
    want = []
    for _ in range(2):  # both proposed before either finished (2 at once), so no result is told
        trial = study.ask(dists)
        want.append((trial.params["train.lr"], trial.params["selection.refresh_interval"]))
    assert [x for pair in got for x in pair] == pytest.approx([x for pair in sorted(want) for x in pair])


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_a_failing_trial_is_reported(ray_local, tmp_path):
    # Three trials run one at a time; lr=-1 is invalid and must fail alone, with its error in the table.
    path = sweep_config(tmp_path, {"train.lr": {"grid": [1e-4, -1.0, 2e-4]}})
    sweep_dir = tmp_path / "runs" / "sw" / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "t3s_ray.cli", "sweep", str(path)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ.copy())
    deadline = time.time() + 600
    while time.time() < deadline and not list(sweep_dir.glob("trials/*/done")):
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep driver and the Ray instance it started
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/done")}
    assert 1 <= len(finished) < 2, "the interruption was meant to land after the first trial"
    rows = run_sweep(config.load(path))
    by_lr = {float(r["train.lr"]): r for r in read_table(tmp_path / "runs" / "sw")}
    assert set(by_lr) == {1e-4, -1.0, 2e-4}
    assert by_lr[-1.0]["status"] == "ERROR" and "train.lr must be > 0" in by_lr[-1.0]["error"]
    assert by_lr[1e-4]["status"] == by_lr[2e-4]["status"] == "DONE"
    for name, mtime in finished.items():  # finished trials were not run again
        assert (sweep_dir / "trials" / name / "done").stat().st_mtime_ns == mtime
    assert rows[0]["status"] == "DONE"


def test_a_restarted_trial_reports_its_scored_stops_from_file_and_trains_on(tmp_path, monkeypatch):
    """A trial restarted after an interruption does not evaluate its scored stops again (its training
    may have moved the model past them): it reports them from reports.jsonl and goes on from the next."""
    import ray.tune

    import t3s_ray.evaluate
    import t3s_ray.train
    from t3s_ray.sweep import _trial

    base = config.load(sweep_config(tmp_path, {"train.lr": {"grid": [1e-4]}}, eval_every=2)).to_dict()
    base["train"]["max_steps"] = 6
    params = {"train.lr": 1e-4}
    trial_dir = tmp_path / "sweep" / "trials" / trial_name(params)
    trial_dir.mkdir(parents=True)
    scored = {"score": 0.25, "avg@k": 0.25, "pass@1": 0.25, "step": 2, "wall_s": 1.0}
    (trial_dir / "reports.jsonl").write_text(json.dumps(scored) + "\n" + '{"score": 0.5, "step": 99}\n')
    reported, trained, evaluated = [], [], []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    monkeypatch.setattr(t3s_ray.train, "run_train", lambda cfg, stop_at: trained.append(stop_at))

    def fake_evaluate(cfg, model_ref, label, quiet):
        evaluated.append(label)
        return {"benchmarks": {"builtin:arith": {"avg@k": 0.5, "pass@1": 0.5}}, "mean": {"avg@k": 0.5, "pass@1": 0.5}}

    monkeypatch.setattr(t3s_ray.evaluate, "evaluate", fake_evaluate)
    _trial(params, base=base, sweep_dir=str(tmp_path / "sweep"), traces_dir=str(tmp_path / "traces"))
    assert trained == [4, 6] and evaluated == ["step-000004", "step-000006"]
    assert [m["step"] for m in reported] == [2, 4, 6] and reported[0] == scored
    lines = [json.loads(line) for line in (trial_dir / "reports.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6] and (trial_dir / "done").exists()
