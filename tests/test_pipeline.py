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
                "probe": {"steps": 2, "eval_every": 1, "samples": 1, "max_prompts": 2, "max_tokens": 4},
                "compare": ["base", "sft", "t3s", "rrt"]}
    return tiny_run_data(tmp_path, "pipe", **{**sections, **over})


def test_method_configs_share_settings_and_set_the_protocol(tmp_path):
    cfg = config.from_dict(pipeline_data(tmp_path, selection={"protocol": "sft"}))
    assert method_config(cfg, "t3s").selection.protocol == "t3s_static"  # the config's own sft is not T3S
    m = method_config(cfg, "inverse")
    assert m.selection.protocol == "inverse" and m.train == cfg.train and m.run_dir.parent.name == "methods"


def test_rrt_needs_sft_and_a_probe_before_it(tmp_path):
    cfg = config.from_dict(pipeline_data(tmp_path, compare=["base", "rrt", "sft", "t3s"]))
    with pytest.raises(ConfigError, match="list it after 'sft'"):
        run_pipeline(cfg)


def test_dllm_students_compare_base_sft_and_t3s_only(tmp_path):
    dllm = {"ref": "builtin:tiny-dllm", "kind": "dllm", "selector_ref": "builtin:tiny-llama"}
    cfg = config.from_dict(pipeline_data(tmp_path, student=dllm, compare=["base", "sft", "t3s", "rrt"]))
    with pytest.raises(ConfigError, match=r"a dLLM student supports base, sft and t3s; got \['base', 'sft', 't3s', 'rrt'\]"):
        run_pipeline(cfg)


@pytest.mark.slow
def test_pipeline_end_to_end_with_report_and_resume(ray_local, tmp_path, capsys, monkeypatch):
    cfg = config.from_dict(pipeline_data(tmp_path))
    scores = run_pipeline(cfg)
    run_dir = cfg.run_dir
    out = capsys.readouterr().out
    assert list(scores) == ["base", "sft", "t3s", "rrt"]
    for method in scores:  # the printed table has a row per method
        assert any(line.startswith(method) for line in out.splitlines())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["scores"] == scores and results["models"]["base"] == "builtin:tiny-llama"
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
    for name in ("confidence_bifurcation.png", "train_curves.png", "anchor_fraction.png", "scores.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG", name
    page = (report / "report.md").read_text()
    assert "confidence_bifurcation.png" in page and "t3s" in page
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
        assert f'main(["{stage}", *sys.argv[1:]])' in text
    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["name"] == "demo"
