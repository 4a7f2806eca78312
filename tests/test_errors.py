"""Bad input and interruptions, through the `t3s` entry point: one `t3s: error:` line and a non-zero
exit, never a traceback from inside Ray (README "Bad input, and what it gets")."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from t3s_ray.cli import main, user_error
from t3s_ray.data import DataError
from t3s_ray.models import ModelRefError

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **sections) -> Path:
    from conftest import tiny_run_data

    data = tiny_run_data(tmp_path, "bad", **sections)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("t3s: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("override,key", [("selection.tau=nan", "selection.tau"), ("train.lr=.inf", "train.lr"),
                                          ("traces.temperature=-.inf", "traces.temperature"),
                                          ("selection.max_anchor_frac=NaN", "selection.max_anchor_frac")])
def test_nan_and_infinity_are_refused_with_the_key_path(tmp_path, capsys, override, key):
    code, err = run_cli(capsys, "config", "show", write_config(tmp_path), "--set", override)
    assert code == 2
    assert f"{key}: must be a finite number" in one_error_line(err)


def test_nan_in_the_yaml_file_itself_is_refused(tmp_path, capsys):
    path = write_config(tmp_path)
    path.write_text(path.read_text() + "probe:\n  temperature: .nan\n")
    code, err = run_cli(capsys, "train", path)
    assert code == 2 and "probe.temperature: must be a finite number" in one_error_line(err) and "bad.yaml" in err


def test_non_utf8_and_empty_config_files_are_clear_errors(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, err = run_cli(capsys, "traces", latin)
    assert code == 2 and "latin.yaml: not UTF-8 text (byte 0xe9 at offset 9)" in one_error_line(err)
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        code, err = run_cli(capsys, "run", empty)
        assert code == 2 and "empty.yaml: the file holds no settings" in one_error_line(err)


def test_a_closed_pipe_ends_quietly():
    """`t3s config reference | head`: the reader closes the pipe before the command writes."""
    proc = subprocess.Popen([sys.executable, "-m", "t3s_ray.cli", "config", "reference"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_ray_wrapped_errors_are_unwrapped_to_the_projects_message():
    import ray.exceptions
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = ModelRefError("could not load model '/models/empty': no weights")
    traceback = ('Traceback (most recent call last):\n  File "t3s_ray/generate.py", line 150, in __init__\n'
                 f"t3s_ray.models.ModelRefError: {cause}")
    task = ray.exceptions.RayTaskError("MapWorker.__init__", traceback, cause)
    wrapped = task.as_instanceof_cause()
    assert isinstance(wrapped, ModelRefError) and "line 150" in str(wrapped)  # why plain printing fails
    assert user_error(wrapped) == str(cause)
    group = WorkerGroupError("Training failed due to worker errors", {0: DataError("only 2 usable traces"),
                                                                       1: RuntimeError("peer gone")})
    assert user_error(group) == "only 2 usable traces"
    chained = RuntimeError("Ray Data execution failed")
    chained.__cause__ = wrapped
    assert user_error(chained) == str(cause)
    # An actor that died in __init__: only the text of its error survives.
    died = ray.exceptions.ActorDiedError(task)
    assert user_error(died) == str(cause)
    assert user_error(RuntimeError("a bug")) is None  # a bug keeps its traceback


def test_a_masked_lm_teacher_or_a_context_beyond_the_teachers_is_refused_before_any_work(tmp_path, capsys):
    cfg = write_config(tmp_path, teacher={"ref": "builtin:tiny-dllm"}, traces={"source": "generate", "backend": "hf"})
    code, err = run_cli(capsys, "traces", cfg)
    assert code == 2 and "teacher.ref builtin:tiny-dllm is a masked LM" in one_error_line(err)
    cfg = write_config(tmp_path, traces={"source": "generate", "backend": "vllm", "max_model_len": 4096})
    code, err = run_cli(capsys, "traces", cfg)
    assert code == 2 and ("traces.max_model_len 4096 is longer than the context of teacher.ref builtin:tiny-llama "
                          "(2048 positions") in one_error_line(err)
    assert not (tmp_path / "runs" / "bad" / "traces" / "samples").exists()


def test_too_few_usable_traces_is_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"builtin_size": 2}, train={"batch_size": 4, "micro_batch_size": 4})
    assert run_cli(capsys, "traces", cfg)[0] == 0
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "only 2 usable traces" in one_error_line(err) and "lower the batch size" in err


@pytest.mark.slow
def test_a_teacher_folder_without_weights_and_no_finished_prompt_are_errors(ray_local, tmp_path, capsys):
    """A teacher without weights is one line (found on the driver since; what an engine actor raises
    still reaches the user as one line: test_ray_wrapped_errors_are_unwrapped_to_the_projects_message),
    and a stage that finishes no prompt exits non-zero with the commonest reason."""
    import shutil

    from t3s_ray.models import resolve

    folder = tmp_path / "no-weights"
    shutil.copytree(resolve("builtin:tiny-llama"), folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    gen = {"source": "generate", "backend": "hf", "concurrency": 1, "batch_size": 4, "max_tokens": 4,
           "max_model_len": 256, "samples_per_prompt": 1}
    code, err = run_cli(capsys, "traces", write_config(tmp_path, teacher={"ref": str(folder)}, traces=gen,
                                                       data={"builtin_size": 3}))
    assert code == 2 and f"model folder {folder} holds no weights" in one_error_line(err)  # on the driver now

    rows = [{"id": f"long-{i}", "prompt": "apples " * 400, "answer": "1"} for i in range(3)]
    src = tmp_path / "long.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path, data={"source": str(src)}, traces=gen)
    code, err = run_cli(capsys, "traces", cfg)
    line = one_error_line(err)
    assert code == 2 and "none of the 3 prompts finished (3 times: prompt too long" in line and "errors.jsonl" in line


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_leaves_no_ray_behind(tmp_path):
    """SIGINT while the teacher generates: one line, exit 130, the embedded Ray shut down, and the
    rerun resumes (tests/test_traces.py checks that no prompt is lost or duplicated)."""
    cfg = write_config(tmp_path, data={"builtin_size": 400}, ray={"num_cpus": 2},
                       traces={"source": "generate", "backend": "hf", "concurrency": 1, "batch_size": 2,
                               "max_tokens": 48, "max_model_len": 256, "samples_per_prompt": 2})
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "t3s_ray.cli", "traces", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    seen = ""
    # Generation has started: its first progress line ("[traces] 1/400 prompts, ..."), not the plan line
    # printed before Ray starts (8 s after that one, on CI's loaded cores, the signal landed while Ray
    # Data started its actors and was not acted on: the run went on to finish; README, the table of bad inputs).
    while time.time() < deadline and not re.search(r"\[traces\] \d+/400 prompts", seen):
        line = proc.stderr.readline()
        assert line or proc.poll() is None, seen[-3000:]
        seen += line
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = seen + err
    assert proc.returncode == 130, err[-3000:]
    tail = err[err.index("[traces] "):]
    assert "t3s: interrupted; rerun the same command to resume" in tail
    assert "Traceback" not in tail and "KeyboardInterrupt" not in tail, tail[-3000:]
    time.sleep(3)
    leftover = subprocess.run(["pgrep", "-f", f"session_[^ ]*_{proc.pid}[ /]"], capture_output=True, text=True).stdout
    assert leftover == "", leftover


# ------------------------------------------------------------------ run folders that never lie


def test_traces_rerun_with_other_settings_is_refused_and_restart_redoes_them(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"builtin_size": 12})
    assert run_cli(capsys, "traces", cfg)[0] == 0
    assert run_cli(capsys, "traces", cfg, "--set", "traces.concurrency=3")[0] == 0  # operational: resumes
    code, err = run_cli(capsys, "traces", cfg, "--set", "traces.temperature=0.9", "--set", "traces.keep=all_correct")
    line = one_error_line(err)
    assert code == 2 and "holds the traces stage of other settings" in line
    assert "traces.keep ('all' -> 'all_correct')" in line and "traces.temperature (0.6 -> 0.9)" in line
    assert "new `name`" in line and "--restart traces" in line
    code, err = run_cli(capsys, "traces", cfg, "--set", "traces.keep=all_correct", "--restart", "traces")
    assert code == 0 and "removing" in err
    settings = json.loads((tmp_path / "runs" / "bad" / "traces" / "settings.json").read_text())["settings"]
    assert settings["traces.keep"] == "all_correct"


def test_a_lost_trace_shard_is_named_by_training_and_regenerated_by_the_rerun(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"builtin_size": 40})
    assert run_cli(capsys, "traces", cfg)[0] == 0
    folder = tmp_path / "runs" / "bad" / "traces"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 5 and manifest["accepted_traces"] == 40
    (folder / "traces" / "part-00002.parquet").unlink()
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "shard part-00002.parquet is missing from traces/" in one_error_line(err)
    code, err = run_cli(capsys, "traces", cfg)  # the pair goes, its 8 prompts are imported again
    assert code == 0 and "part-00002.parquet has no traces/ twin" in err and "8 to import" in err
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["accepted_traces"] == 40 and "part-00002.parquet" not in manifest["shards"]
    from t3s_ray.traces import load_traces

    assert sorted(t["id"] for t in load_traces(folder)) == sorted({t["id"] for t in load_traces(folder)})
    # A shard added behind the manifest's back (an unfinished run) is refused too.
    import shutil

    shutil.copy(folder / "traces" / "part-00000.parquet", folder / "traces" / "part-00009.parquet")
    shutil.copy(folder / "samples" / "part-00000.parquet", folder / "samples" / "part-00009.parquet")
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "part-00009.parquet is not in its manifest" in one_error_line(err)


@pytest.mark.slow
def test_a_finished_training_is_not_returned_for_other_settings(ray_local, tmp_path, capsys):
    cfg = write_config(tmp_path, selection={"protocol": "sft"})  # no probe: one short training
    assert run_cli(capsys, "traces", cfg)[0] == 0
    assert run_cli(capsys, "train", cfg)[0] == 0
    code, err = run_cli(capsys, "train", cfg, "--set", "train.lr=5e-4", "--set", "train.weight_decay=0.1")
    line = one_error_line(err)
    assert code == 2 and "train.lr (0.0001 -> 0.0005)" in line and "train.weight_decay (0.0 -> 0.1)" in line
    assert "already at step" not in err
    # SFT selects nothing: another tau is the same training, returned as it is.
    code, err = run_cli(capsys, "train", cfg, "--set", "selection.tau=0.1")
    assert code == 0 and "already at step" in err
    assert run_cli(capsys, "train", cfg, "--set", "train.keep_last=3")[0] == 0  # operational: same model
    # Traces redone under the same settings but different (a shard lost and regenerated): refused.
    assert run_cli(capsys, "traces", cfg, "--restart", "traces", "--set", "data.builtin_size=9")[0] == 0
    code, err = run_cli(capsys, "train", cfg, "--set", "data.builtin_size=9")
    assert code == 2 and "traces (" in one_error_line(err) and "--restart train" in err


def test_restart_removes_the_stage_and_what_depends_on_it(tmp_path, capsys):
    from t3s_ray import config
    from t3s_ray.pipeline import seed_config
    from t3s_ray.runfolder import restart

    cfg = config.load(write_config(tmp_path))
    for seed in (0, 1):
        run = seed_config(cfg, seed).run_dir
        for folder in ("traces", "probe", "eval", "methods/t3s/train", "methods/t3s/traces"):
            (run / folder).mkdir(parents=True)
    restart(seed_config(cfg, 0), ["probe"], whole_run=True)  # the probe, the trainings, the evaluations
    run0, run1 = seed_config(cfg, 0).run_dir, seed_config(cfg, 1).run_dir
    assert sorted(p.name for p in run0.iterdir()) == ["methods", "traces"]
    assert not (run0 / "methods" / "t3s" / "train").exists() and (run0 / "methods" / "t3s" / "traces").exists()
    assert (run1 / "probe").exists()
    code = main(["run", str(write_config(tmp_path)), "--seeds", "0,1", "--restart", "bogus"])
    assert code == 2 and "--restart bogus: expected one of traces, probe, train, eval" in capsys.readouterr().err


def test_an_evaluation_is_not_returned_for_other_settings_or_a_retrained_model(ray_local, tmp_path, capsys):
    """``t3s eval`` resumes the same evaluation, refuses other sampling settings, a model retrained in
    place and a redefined benchmark, and ``--restart eval`` redoes only that model's evaluation."""
    import shutil

    from safetensors.torch import load_file, save_file

    from t3s_ray.models import resolve

    model = tmp_path / "student"
    shutil.copytree(resolve("builtin:tiny-llama"), model)
    bench = tmp_path / "mine.yaml"
    bench.write_text("name: mine\nsource: builtin:arith\nsplit: test\nsize: 100\nverifier: math\n"
                     "prompt_template: '{prompt}'\n")
    cfg = write_config(tmp_path, eval={"benchmarks": ["builtin:arith"]})
    evals = tmp_path / "runs" / "bad" / "eval"
    assert run_cli(capsys, "eval", cfg, "--model", model)[0] == 0
    assert run_cli(capsys, "eval", cfg, "--model", model, "--label", "other")[0] == 0
    samples = (evals / "student" / "samples.jsonl").read_text()
    code, err = run_cli(capsys, "eval", cfg, "--model", model, "--set", "eval.concurrency=2")  # operational
    assert code == 0 and (evals / "student" / "samples.jsonl").read_text() == samples
    moved = tmp_path / "moved" / "student"  # a model is its weights: a copy elsewhere is the same evaluation
    shutil.copytree(model, moved)
    code, err = run_cli(capsys, "eval", cfg, "--model", moved, "--label", "student")
    assert code == 0 and (evals / "student" / "samples.jsonl").read_text() == samples

    code, err = run_cli(capsys, "eval", cfg, "--model", model, "--set", "eval.temperature=0.9")
    line = one_error_line(err)
    assert code == 2 and "holds the eval stage of other settings: eval.temperature (0.6 -> 0.9)" in line
    assert "another --label" in line and "--restart eval" in line

    # Added benchmarks are run; the finished one is kept.
    code, err = run_cli(capsys, "eval", cfg, "--model", model, "--set", f"eval.benchmarks=[builtin:arith,{bench}]")
    scores = json.loads((evals / "student" / "scores.json").read_text())
    assert code == 0 and sorted(scores["benchmarks"]) == ["builtin:arith", "mine"]
    assert (evals / "student" / "samples.jsonl").read_text().startswith(samples)
    bench.write_text(bench.read_text().replace("'{prompt}'", "'Q: {prompt}'"))
    code, err = run_cli(capsys, "eval", cfg, "--model", model, "--set", f"eval.benchmarks=[builtin:arith,{bench}]")
    assert code == 2 and "benchmark 'mine' was scored with another definition (prompt_template changed)" in \
        one_error_line(err)

    # The model retrained in place (its weights changed, same folder): its old scores are refused.
    weights = next(model.glob("*.safetensors"))
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] * 1.5
    save_file(state, weights, metadata={"format": "pt"})
    code, err = run_cli(capsys, "eval", cfg, "--model", model)
    assert code == 2 and "model.weights (" in one_error_line(err)
    code, err = run_cli(capsys, "eval", cfg, "--model", model, "--restart", "eval")
    assert code == 0 and f"removing {evals / 'student'}" in err
    assert (evals / "other" / "scores.json").exists()  # another model's evaluation is left alone
    assert json.loads((evals / "student" / "settings.json").read_text())["settings"]["model.weights"] != \
        json.loads((evals / "other" / "settings.json").read_text())["settings"]["model.weights"]


def test_a_student_folder_without_weights_is_one_line_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    """Checked on the driver (``models.fetch_weights``), not found by rank 0 inside a Ray worker."""
    import shutil

    import ray

    from t3s_ray.models import resolve

    folder = tmp_path / "no-weights"
    shutil.copytree(resolve("builtin:tiny-llama"), folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    cfg = write_config(tmp_path)
    assert run_cli(capsys, "traces", cfg)[0] == 0
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before the student was checked"))
    code, err = run_cli(capsys, "train", cfg, "--set", f"student.ref={folder}")
    assert code == 2 and f"model folder {folder} holds no weights" in one_error_line(err)


def test_block_diffusion_for_a_student_that_is_not_llada2_is_one_line_before_any_worker_starts(tmp_path, capsys,
                                                                                                monkeypatch):
    """The model-dependent check of ``student.dllm_attention`` runs where the training claims its folder,
    on the driver: a LLaDA-style denoiser asked to train by blocks never reaches a Ray worker."""
    import ray

    cfg = write_config(tmp_path, student={"ref": "builtin:tiny-dllm", "kind": "dllm",
                                          "selector_ref": "builtin:tiny-llama", "dllm_attention": "block_diffusion"},
                       selection={"protocol": "sft"})
    assert run_cli(capsys, "traces", cfg)[0] == 0
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before the student was checked"))
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "student.dllm_attention: block_diffusion is LLaDA2's training regime, but student.ref " \
        "builtin:tiny-dllm is not a LLaDA2 model" in one_error_line(err)
    assert not (tmp_path / "runs" / "bad" / "train").exists()


# ------------------------------------------------------------------ errors that used to surface where no one reads them


def test_an_output_dir_that_is_a_file_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before output_dir was checked"))
    a_file = tmp_path / "runs.txt"
    a_file.write_text("notes")
    for output_dir, culprit in ((a_file, a_file), (a_file / "sub", a_file)):
        cfg = write_config(tmp_path, output_dir=str(output_dir))
        for stage in ("traces", "train", "eval", "run"):
            code, err = run_cli(capsys, stage, cfg)
            line = one_error_line(err)
            assert code == 2 and f"output_dir {output_dir}: {culprit} is a file, not a folder" in line, line


def test_a_corrupt_or_unreadable_trace_shard_is_one_line_naming_it(tmp_path, capsys):
    cfg = write_config(tmp_path, data={"builtin_size": 12})
    assert run_cli(capsys, "traces", cfg)[0] == 0
    folder = tmp_path / "runs" / "bad" / "traces"
    shard = folder / "traces" / "part-00000.parquet"
    good = shard.read_bytes()
    shard.write_bytes(b"PAR1 this is no parquet file")
    code, err = run_cli(capsys, "train", cfg)
    line = one_error_line(err)
    assert code == 2 and f"{shard}: not a readable parquet shard" in line and "rerun `t3s traces`" in line
    shard.write_bytes(good)
    samples = folder / "samples" / "part-00000.parquet"
    samples.write_bytes(good[: len(good) // 2])  # truncated, as a full disk leaves it
    code, err = run_cli(capsys, "traces", cfg)
    assert code == 2 and f"{samples}: not a readable parquet shard" in one_error_line(err)
    samples.unlink()  # the way out the message names: the pair's prompts are imported again
    shard.unlink()
    code, err = run_cli(capsys, "traces", cfg)
    assert code == 0 and json.loads((folder / "manifest.json").read_text())["accepted_traces"] == 12
    (folder / "manifest.json").write_text('{"shards": {')  # a crash mid-write
    code, err = run_cli(capsys, "train", cfg)
    assert code == 2 and f"{folder / 'manifest.json'}: the traces manifest cannot be read" in one_error_line(err)


def test_a_model_folder_without_weights_is_one_line_before_any_engine_starts(tmp_path, capsys, monkeypatch):
    """The teacher of generated traces and a model `t3s eval` scores: checked on the driver
    (``models.check_local_weights``), where they used to fail inside a Ray Data engine actor."""
    import shutil

    import ray

    from t3s_ray.models import resolve

    folder = tmp_path / "no-weights"
    shutil.copytree(resolve("builtin:tiny-llama"), folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before the model was checked"))
    gen = {"source": "generate", "backend": "hf", "max_tokens": 4, "max_model_len": 256}
    code, err = run_cli(capsys, "traces", write_config(tmp_path, teacher={"ref": str(folder)}, traces=gen))
    assert code == 2 and f"model folder {folder} holds no weights" in one_error_line(err)
    code, err = run_cli(capsys, "eval", write_config(tmp_path), "--model", folder)
    assert code == 2 and f"model folder {folder} holds no weights" in one_error_line(err)


def test_a_torn_last_line_of_errors_jsonl_is_redone_and_a_bad_one_elsewhere_named(tmp_path, capsys):
    rows = [{"id": "a", "prompt": "1+1?", "answer": "2", "trace": "The answer is 2."},
            {"id": "b", "prompt": "2+2?", "answer": "4", "trace": ""}]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(tmp_path, data={"source": str(src)}, traces={"response_field": "trace"})
    assert run_cli(capsys, "traces", cfg)[0] == 0
    errors = tmp_path / "runs" / "bad" / "traces" / "errors.jsonl"
    line = errors.read_text()
    errors.write_text(line[: len(line) // 2])  # killed mid-write: prompt b's final error is lost, so b is redone
    code, err = run_cli(capsys, "traces", cfg)
    assert code == 0 and "1 to import" in err, err
    errors.write_text("{oops\n" + errors.read_text())
    code, err = run_cli(capsys, "traces", cfg)
    assert code == 2 and f"{errors}:1: not valid JSON" in one_error_line(err)
