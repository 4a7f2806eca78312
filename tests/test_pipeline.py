"""The whole pipeline (`t3s run`) and its report, on a builtin tiny model."""

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from t3s_ray import config
from t3s_ray.cli import main as cli_main
from t3s_ray.config import ConfigError
from t3s_ray.pipeline import method_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def pipeline_data(tmp_path: Path, **over) -> dict:
    from conftest import tiny_run_data

    sections = {"train": {"lr": 1e-3}, "selection": {"protocol": "t3s_static", "tau": 0.0},
                "probe": {"steps": 2, "eval_every": 1, "sampling": {"samples": 1, "max_tokens": 4}, "max_prompts": 2},
                "compare": ["base", "sft", "t3s", "rrt"]}
    return tiny_run_data(tmp_path, "pipe", **{**sections, **over})


def test_method_configs_share_settings_and_set_the_protocol(tmp_path):
    cfg = config.from_dict(pipeline_data(tmp_path, selection={"protocol": "sft"}))
    assert method_config(cfg, "t3s").selection.protocol == "t3s_static"  # the config's own sft is not T3S
    m = method_config(cfg, "inverse")
    assert m.selection.protocol == "inverse" and m.train == cfg.train and m.run_dir.parent.name == "methods"


def test_sft_is_the_probe_only_when_they_are_the_same_training(tmp_path):
    from t3s_ray.pipeline import sft_is_the_probe

    def decide(**over):
        return sft_is_the_probe(config.from_dict(pipeline_data(tmp_path, **over)))

    assert decide(probe={"steps": 2})  # train.max_steps is 2 in these runs; t3s is static
    assert not decide(probe={"steps": 3})  # the probe would stop elsewhere
    assert not decide(compare=["base", "sft"])  # no static method: the probe would not run at all
    assert not decide(selection={"protocol": "t3s_online"}, compare=["base", "sft", "t3s"])
    assert decide(selection={"protocol": "t3s_online"}, compare=["base", "sft", "t3s", "inverse"])
    dllm = {"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"}
    assert not decide(student=dllm, compare=["base", "sft", "t3s"])  # its probe trains the selector


def test_rrt_needs_sft_and_a_probe_before_it(tmp_path):
    cfg = config.from_dict(pipeline_data(tmp_path, compare=["base", "rrt", "sft", "t3s"]))
    with pytest.raises(ConfigError, match="list it after 'sft'"):
        run_pipeline(cfg)


def test_dllm_students_compare_base_sft_and_t3s_only(tmp_path):
    dllm = {"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"}
    cfg = config.from_dict(pipeline_data(tmp_path, student=dllm, compare=["base", "sft", "t3s", "rrt"]))
    with pytest.raises(ConfigError, match=r"a dLLM student supports base, teacher, sft and t3s; got \['base', 'sft', 't3s', 'rrt'\]"):
        run_pipeline(cfg)


@pytest.mark.slow
def test_pipeline_end_to_end_with_report_and_resume(ray_local, tmp_path, capsys, monkeypatch):
    cfg = config.from_dict(pipeline_data(tmp_path, compare=["base", "teacher", "sft", "t3s", "rrt"],
                                         eval={"trajectory_every": 2}))
    scores = run_pipeline(cfg)
    run_dir = cfg.run_dir
    out = capsys.readouterr().out
    assert list(scores) == ["base", "teacher", "sft", "t3s", "rrt"]
    for method in scores:  # the printed table has a row per method
        assert any(line.startswith(method) for line in out.splitlines())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["models"]["base"] == "builtin:tiny-llama" and results["models"]["teacher"] == "builtin:tiny-llama"
    for method, s in scores.items():  # results.json has the scores; per-problem lists stay in each scores.json
        bench = s["benchmarks"]["builtin:arith"]
        assert results["scores"][method]["benchmarks"]["builtin:arith"] == {
            k: v for k, v in bench.items() if k != "per_problem"}
        assert len(bench["per_problem"]) == bench["n"] == 3
    # Paired differences of every method with sft and base, on the same problems.
    assert set(results["paired"]["t3s"]) == {"vs_sft", "vs_base"} and "vs_sft" not in results["paired"]["sft"]
    d = results["paired"]["t3s"]["vs_sft"]["builtin:arith"]
    per = {m: scores[m]["benchmarks"]["builtin:arith"]["per_problem"] for m in ("t3s", "sft")}
    assert d["diff"] == pytest.approx(sum(per["t3s"][i] - per["sft"][i] for i in per["sft"]) / 3)
    assert "paired difference" in out
    # Trajectories: the probe's and every trained method's saved models, step 0 being the base.
    traj = results["trajectories"]
    assert set(traj) == {"probe", "sft", "t3s"}
    # probe.steps == train.max_steps: the probe's run is the sft method (not trained twice, its saved
    # models evaluated once), and its trajectory is the probe's.
    assert (run_dir / "methods" / "sft" / "train").resolve() == (run_dir / "probe").resolve()
    assert [p["step"] for p in traj["probe"]] == [0, 1, 2] and [p["step"] for p in traj["t3s"]] == [0, 2]
    assert [p["heldout"] for p in traj["sft"]] == [p["heldout"] for p in traj["probe"]]
    assert not (run_dir / "eval" / "sft@1").exists() and not (run_dir / "eval" / "probe@2").exists()
    assert traj["sft"][-1]["heldout"] == scores["sft"]["mean"]["avg@k"]
    assert traj["probe"][1]["train_accuracy"] is not None
    assert traj["sft"][0]["train_accuracy"] is None and traj["sft"][1]["train_accuracy"] is None
    assert (run_dir / "eval" / "probe@1" / "scores.json").exists()
    for method in ("sft", "t3s"):
        model = Path(results["models"][method])
        assert model == (run_dir / "methods" / method / "train" / "model").resolve() and (model / "config.json").exists()
        assert (run_dir / "eval" / method / "scores.json").exists()
    # Methods differ as they should: sft keeps every target, t3s drops the anchors the probe found.
    sft_m = [json.loads(x) for x in (run_dir / "methods/sft/train/metrics.jsonl").read_text().splitlines()]
    t3s_m = [json.loads(x) for x in (run_dir / "methods/t3s/train/metrics.jsonl").read_text().splitlines()]
    assert all(r["kept_frac"] == 1.0 for r in sft_m)
    assert all(r["kept_frac"] == pytest.approx(1 - r["anchor_frac"]) for r in t3s_m)
    # rrt = θ0 + (θ_sft − θb), checked on one tensor.
    probe = json.loads((run_dir / "probe" / "result.json").read_text())
    from t3s_ray.models import resolve

    def weights(folder):
        return load_file(str(next(Path(folder).glob("*.safetensors"))))

    theta0, sft, thetab, rrt = (weights(resolve("builtin:tiny-llama")), weights(results["models"]["sft"]),
                                weights(probe["bottleneck_model"]), weights(results["models"]["rrt"]))
    key = next(k for k in theta0 if k.endswith("q_proj.weight"))
    expected = theta0[key].float() + sft[key].float() - thetab[key].float()
    assert rrt[key].float().sub(expected).abs().max() < 1e-2
    # The report: every figure and the page.
    report = run_dir / "report"
    for name in ("confidence_bifurcation.png", "train_curves.png", "anchor_fraction.png", "scores.png",
                 "anchor_classes.png", "trajectories.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG", name
    page = (report / "report.md").read_text()
    assert "confidence_bifurcation.png" in page and "t3s" in page and "paired difference" in page
    anchors = json.loads((report / "anchors.json").read_text())
    assert sum(c["tokens"] for c in anchors["classes"].values()) == anchors["tokens"] > 0
    assert set(anchors["classes"]) <= {"digit", "word", "punctuation/space", "special"}
    # Rerunning resumes every stage: nothing is trained or generated again, the table is the same.
    import t3s_ray.generate as generate
    import t3s_ray.train as train

    def forbidden(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(generate, "run_requests", forbidden)
    monkeypatch.setattr(train, "fit", forbidden)
    assert run_pipeline(cfg) == scores
    # `t3s report RUN_DIR` redraws the report from the files alone.
    (report / "scores.png").unlink()
    assert cli_main(["report", str(run_dir)]) == 0 and (report / "scores.png").exists()
    # The run folder moved elsewhere (another machine's mount point) resumes too, still without
    # training or generating: its links are relative, the probe's and trainings' model paths are
    # read as they are now, and an evaluation is keyed by its model's weights, not its path.
    import shutil

    moved_root = tmp_path / "moved"
    shutil.move(str(tmp_path / "runs"), str(moved_root))
    moved_cfg = config.from_dict({**cfg.to_dict(), "output_dir": str(moved_root)})
    moved = run_pipeline(moved_cfg)
    assert {m: s["benchmarks"] for m, s in moved.items()} == {m: s["benchmarks"] for m, s in scores.items()}
    models = json.loads((moved_cfg.run_dir / "results.json").read_text())["models"]
    assert all(models[m].startswith(str(moved_root.resolve())) for m in ("sft", "t3s", "rrt"))


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "is not a t3s run folder" in capsys.readouterr().err


def test_demo_config_is_the_readme_first_command():
    readme = (ROOT / "README.md").read_text()
    assert "t3s run configs/demo.yaml" in readme or "make demo" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert "t3s run configs/demo.yaml" in makefile
    cfg = config.load(ROOT / "configs" / "demo.yaml")
    assert {"base", "sft", "t3s"} <= set(cfg.compare) and cfg.ray.address is None


def test_jobs_scripts_call_their_stage():
    for stage in ("traces", "train", "eval", "sweep", "run"):
        text = (ROOT / "jobs" / f"{stage}.py").read_text()
        assert f'run(["{stage}", *sys.argv[1:]])' in text
    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["name"] == "demo"


def test_seeds_repeat_the_run_and_aggregate_mean_and_sd(tmp_path, monkeypatch, capsys):
    import t3s_ray.pipeline as pipeline

    cfg = config.from_dict(pipeline_data(tmp_path, compare=["base", "sft", "t3s"]))
    made = {}
    accuracy = {0: {"base": 0.5, "sft": 0.4, "t3s": 0.6}, 1: {"base": 0.5, "sft": 0.5, "t3s": 0.7},
                2: {"base": 0.5, "sft": 0.6, "t3s": 0.8}}

    def fake_pipeline(scfg):  # stands in for the real run: writes what run_pipeline writes
        seed = scfg.seed
        made[seed] = scfg
        scfg.run_dir.mkdir(parents=True)
        scores = {m: {"benchmarks": {"builtin:arith": {"avg@k": a}}, "mean": {"avg@k": a}}
                  for m, a in accuracy[seed].items()}
        paired = {"t3s": {"vs_sft": {"builtin:arith": {"diff": accuracy[seed]["t3s"] - accuracy[seed]["sft"],
                                                       "ci95": [0.0, 0.4]}}}}
        (scfg.run_dir / "results.json").write_text(json.dumps({"scores": scores, "paired": paired}))

    monkeypatch.setattr(pipeline, "run_pipeline", fake_pipeline)
    summary = pipeline.run_seeds(cfg, [0, 1, 2])
    assert [made[s].name for s in (0, 1, 2)] == ["pipe-seed0", "pipe-seed1", "pipe-seed2"]
    assert all(made[s].train.seed == made[s].traces.seed == s for s in (0, 1, 2))
    assert made[1].data == cfg.data and made[1].eval == cfg.eval  # same prompts and benchmarks
    t3s = summary["methods"]["t3s"]["benchmarks"]["builtin:arith"]
    assert t3s["mean"] == pytest.approx(0.7) and t3s["sd"] == pytest.approx(0.1)
    assert summary["methods"]["base"]["benchmarks"]["builtin:arith"]["sd"] == 0
    md = (cfg.run_dir.with_name("pipe-seeds") / "summary.md").read_text()
    assert "| t3s | 70.0 ± 10.0 | 60.0 | 70.0 | 80.0 |" in md and "+20.0 [+0.0, +40.0]" in md
    assert json.loads((cfg.run_dir.with_name("pipe-seeds") / "summary.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="distinct seeds"):
        pipeline.run_seeds(cfg, [1, 1])


def test_cli_seeds_must_be_integers(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(pipeline_data(tmp_path)))
    assert cli_main(["run", str(path), "--seeds", "0,x"]) == 2
    assert "--seeds '0,x': expected comma-separated integers" in capsys.readouterr().err


def test_shared_folders_are_linked_relatively_so_a_moved_run_still_works(tmp_path):
    import os
    import shutil

    from t3s_ray.pipeline import link_shared_folder

    run = tmp_path / "runs" / "x"
    (run / "traces").mkdir(parents=True)
    (run / "traces" / "manifest.json").write_text("{}")
    link = run / "methods" / "sft" / "traces"
    link_shared_folder(run / "traces", link)
    assert not os.path.isabs(os.readlink(link)) and (link / "manifest.json").exists()
    moved = tmp_path / "elsewhere" / "x"
    shutil.move(str(run), str(moved))  # another machine, another mount point
    assert (moved / "methods" / "sft" / "traces" / "manifest.json").exists()
    # A run folder moved with an absolute link (as written before): the dangling link is pointed again.
    old = moved / "methods" / "t3s" / "traces"
    old.parent.mkdir(parents=True)
    old.symlink_to(run / "traces", target_is_directory=True)
    assert not old.exists()
    link_shared_folder(moved / "traces", old)
    assert (old / "manifest.json").exists()
