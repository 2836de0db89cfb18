"""``dse`` command line: thin verbs over the library.

Errors the user can fix (a :class:`~dse.core.errors.DseError`: bad YAML, unknown field,
unreachable storage, bad plan ...) are printed as one line ``dse: error: ...`` with exit status 2;
any other exception is a bug and keeps its traceback (exit status 1). Ctrl-C exits with 130 after
the running trial is marked failed (it is retried when the same command runs again); an
interrupted ``dse heal`` resumes from its last checkpoint when run again.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .core.errors import DseError

# dse list KIND: the registry of each kind of plug-in, as (module, attribute)
REGISTRIES = {
    "methods": ("dse.decompose", "METHODS"),
    "families": ("dse.model", "FAMILIES"),
    "objectives": ("dse.evaluate", "OBJECTIVES"),
    "task-sources": ("dse.evaluate", "TASK_SOURCES"),
    "samplers": ("dse.study", "SAMPLERS"),
    "groups": ("dse.space", "GROUPS"),
    "starts": ("dse.space", "STARTS"),
    "baselines": ("dse.space", "BASELINES"),
    "probes": ("dse.space", "PROBE_KINDS"),
    "formats": ("dse.results", "FORMATS"),
}


def _registry(kind: str):
    from importlib import import_module

    module, name = REGISTRIES[kind]
    return getattr(import_module(module), name)


def _cmd_list(args) -> None:
    from .core.errors import ConfigError

    for kind in args.kinds:
        if kind not in REGISTRIES:
            raise ConfigError(f"KIND: unknown {kind!r}; known: {', '.join(REGISTRIES)}")
    for kind in args.kinds or list(REGISTRIES):
        print(f"{kind}:")
        for line in _registry(kind).describe().splitlines():
            print(f"  {line}")


def _cmd_space(args) -> None:
    from .space import load_space

    for path in args.files:
        space = load_space(path)
        print(space.describe(space.table()), end="\n\n" if path != args.files[-1] else "\n")


def _cmd_run(args, join: bool = False) -> None:
    from .core.errors import ConfigError
    from .study.config import load_study_config
    from .study.runner import finished_trials, run_study, run_workers

    config = load_study_config(args.study)
    if getattr(args, "workers", 1) > 1:
        study = run_workers(config, args.workers, n_trials=args.n_trials, storage=args.storage, devices=args.devices)
    elif getattr(args, "devices", None):
        raise ConfigError(
            "--devices: pins several local workers (--workers N); one process uses the study's device or device_map"
        )
    else:
        study = run_study(
            config,
            n_trials=args.n_trials,
            storage=args.storage,
            progress=not args.quiet,
            join=join,
            wait=getattr(args, "wait", 0.0),
        )
    print(
        f"dse: study {config.name!r}: {finished_trials(study)} trials finished, stored in "
        f"{args.storage or config.storage_url}; `dse status {args.study}` for the table",
        file=sys.stderr,
    )


def _cmd_worker(args) -> None:
    _cmd_run(args, join=True)


def _cmd_status(args) -> None:
    from .results.status import format_status

    print(format_status(_open(args)))


def _cmd_estimate(args) -> None:
    from .core.errors import StorageError
    from .study.config import load_study_config
    from .study.estimate import check_inputs, estimate
    from .study.storage import open_study

    config = load_study_config(args.study)
    check_inputs(config)
    try:
        study = open_study(config, args.storage, create=False)
    except StorageError:  # not run yet: no trial to time
        study = None
    print(estimate(config, study).format())


def _open(args):
    from .study.config import load_study_config
    from .study.storage import open_study

    return open_study(load_study_config(args.study), args.storage, create=False)


def _cmd_pareto(args) -> None:
    from .results.front import pareto_front, require_completed, trials_frame
    from .results.status import format_front

    study = _open(args)
    require_completed(study)
    front = pareto_front(study)
    print(format_front(front))
    if args.out:
        from .core.io import atomic_path

        for name, frame in (("front", front), ("trials", trials_frame(study))):
            for ext, write in (("csv", frame.to_csv), ("parquet", frame.to_parquet)):
                with atomic_path(f"{args.out}/{name}.{ext}") as tmp:
                    write(tmp, index=False)
        print(f"dse: wrote front and trials (CSV, Parquet) to {args.out}", file=sys.stderr)


def _cmd_plot(args) -> None:
    from .results.front import require_completed
    from .results.plots import save_plots

    study = _open(args)
    require_completed(study)
    for path in save_plots(study, args.out, x=args.x):
        print(path)


def _cmd_export(args) -> None:
    from .results.export import export_front, rank_config, select_trial

    study = _open(args)
    if args.front:
        for path in export_front(study, args.out):
            print(path)
        return
    trial = select_trial(study, max_params=args.max_params, min_accuracy=args.min_accuracy, max_drop=args.max_drop)
    config = rank_config(study, trial)
    config.save(args.out)
    m = config.metrics
    print(
        f"dse: trial {trial.number} ({config.plan.summary()}, params {m.get('params_ratio', float('nan')):.1%}"
        + (f", accuracy {m['accuracy']:.4f}" if "accuracy" in m else "")
        + f") -> {args.out}",
        file=sys.stderr,
    )


def _cmd_apply(args) -> None:
    from .model import parse_device_map
    from .results.compressed import apply_config
    from .results.rankconfig import load_config_file

    out = apply_config(
        load_config_file(args.config),
        args.out,
        format=args.format,
        merge=args.merge,
        device=args.device,
        device_map=args.device_map and parse_device_map(args.device_map, "--device-map"),
        progress=not args.quiet,
    )
    print(f"dse: wrote the {'merged' if args.merge else args.format} model to {out}", file=sys.stderr)


# dse heal's recipe options: HealConfig's fields, with their help; an option not given keeps
# HealConfig's default (docs/heal.md lists them)
RECIPE = {
    "steps": (int, "optimizer steps"),
    "tokens": (int, "training tokens instead of --steps"),
    "seq_len": (int, "tokens per window"),
    "batch": (int, "windows per step"),
    "lr": (float, "AdamW learning rate"),
    "schedule": (str, "constant or cosine"),
    "warmup": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay"),
    "grad_clip": (float, "gradient norm clip, 0 for none"),
    "train": (str, "factors (the factors themselves) or lora (adapters merged into the factors)"),
    "loss": (str, "lm (next-token cross-entropy) or distill (KL to the dense model's logits)"),
    "freeze": (str, "none or sequential (one factor of every module at a time)"),
    "switch_every": (int, "steps per phase of --freeze sequential"),
    "lora_rank": (int, "LoRA rank"),
    "lora_alpha": (float, "LoRA alpha"),
    "seed": (int, "the data order's seed"),
}


def _rows(value: str, where: str):
    from .core.errors import ConfigError

    first, sep, end = value.partition(":")
    if not (sep and first.isdigit() and end.isdigit() and int(first) < int(end)):
        raise ConfigError(f"{where}: expected FIRST:END row numbers, got {value!r}")
    return [int(first), int(end)]


def _cmd_heal(args) -> None:
    from transformers.utils import logging

    from .decompose import HealConfig
    from .evaluate import PerplexityConfig
    from .model import TextSource
    from .results.heal import heal_compressed

    recipe = {name: getattr(args, name) for name in RECIPE if getattr(args, name) is not None}
    flags = {name: True for name in ("norms", "recompute") if getattr(args, name)}
    config = HealConfig.from_dict({**recipe, **flags})
    text = TextSource.from_dict(
        {"path": args.text, "field": args.field, **({"rows": _rows(args.rows, "--rows")} if args.rows else {})},
        "heal.text",
    )
    eval_path = args.eval_text or (args.text if args.eval_rows else None)
    measures = {}
    for rows in args.eval_rows or ([None] if eval_path else []):
        source = TextSource.from_dict(
            {"path": eval_path, "field": args.field, **({"rows": _rows(rows, "--eval-rows")} if rows else {})},
            "evaluation.text",
        )
        window = {k: v for k, v in (("window", args.eval_window), ("max_tokens", args.eval_tokens)) if v is not None}
        measures[f"rows {rows}" if rows else "eval"] = PerplexityConfig(source, **window)
    bars = logging.is_progress_bar_enabled()
    if args.quiet:  # transformers' bars too (loading weights), for this command
        logging.disable_progress_bar()
    try:
        out = heal_compressed(
            args.source,
            args.out,
            config,
            text,
            measures=measures,
            format=args.format,
            device=args.device,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
        )
    finally:
        if bars:
            logging.enable_progress_bar()
    print(f"dse: wrote the healed {args.format} model to {out}", file=sys.stderr)


def _cmd_speed(args) -> None:
    from .core.io import atomic_write_text
    from .evaluate.speed import SpeedConfig
    from .results.speed import format_reports, reports_csv, reports_json, speed_reports

    if args.against not in (None, "dense"):
        from .core.errors import ConfigError

        raise ConfigError(f"against: only 'dense' is known, got {args.against!r}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    config = SpeedConfig(
        prompt=args.prompt,
        batch=args.batch,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        compile=args.compile,
    )
    reports = speed_reports(
        args.target, config, against_dense=args.against == "dense", device=args.device, dtype=args.dtype
    )
    print(format_reports(reports))
    for path, text in ((args.json, reports_json), (args.csv, reports_csv)):
        if path:
            atomic_write_text(path, text(reports))


def _cmd_characterize(args) -> None:
    from pathlib import Path

    from .study.characterize import model_study, run_characterization

    if args.target.endswith((".yaml", ".yml")):
        from .study.config import load_study_config

        config = load_study_config(args.target)
    else:
        config = model_study(
            args.target,
            tasks=args.tasks,
            limit=args.limit,
            data_dir=args.data_dir,
            method=args.method,
            device=args.device,
            family=args.family,
        )
    frame = run_characterization(
        config,
        args.out,
        rank=args.rank,
        kinds=args.kinds,
        ks=args.k,
        modules_by_perplexity=args.modules_by_perplexity,
        progress=not args.quiet,
    )
    print(f"dse: {len(frame)} rows in {Path(args.out) / 'characterization.csv'}, plots beside it", file=sys.stderr)


def _add_result_verbs(sub) -> None:
    p = sub.add_parser("pareto", help="print the feasible Pareto front; --out writes CSV and Parquet")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage")
    p.add_argument("--out", metavar="DIR", help="write front.{csv,parquet} and trials.{csv,parquet} here")
    p.set_defaults(func=_cmd_pareto)

    p = sub.add_parser("plot", help="front, hypervolume, module heatmap, per-task and healing plots (PNG and SVG)")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage")
    p.add_argument("--out", metavar="DIR", required=True)
    p.add_argument(
        "--x",
        default="params",
        metavar="OBJECTIVE",
        help="also draw the front against this measure: latency (predicted), latency_measured ...",
    )
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("export", help="write the rank config of a front trial chosen by rule (JSON)")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSON file (a folder with --front)")
    p.add_argument("--max-params", type=float, metavar="FRACTION", help="at most this fraction of the parameters")
    p.add_argument("--min-accuracy", type=float, help="at least this mean accuracy")
    p.add_argument(
        "--max-drop",
        type=float,
        metavar="FRACTION",
        help="at most this accuracy drop below the undecomposed model (0.05 = 5 points)",
    )
    p.add_argument("--front", action="store_true", help="export every front config into the --out folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("apply", help="write the compressed model of a rank config (loads with dse.load_compressed)")
    p.add_argument("config", metavar="CONFIG_JSON")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--format",
        default="dse",
        metavar="FORMAT",
        help="dse (low-rank, dse.load_compressed), transformers (low-rank, loads with "
        "from_pretrained(..., trust_remote_code=True) without dse) or merged (`dse list formats`)",
    )
    p.add_argument("--merge", action="store_true", help="the same as --format merged")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--device-map",
        metavar="auto|balanced|sequential",
        help="spread the model over the GPUs and offload the rest (instead of --device)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_apply)


def _add_heal(sub) -> None:
    p = sub.add_parser(
        "heal",
        help="fine-tune a decomposed model briefly and write it as `dse apply` does "
        "(the recipe, its report and perplexity before/after in dse_compressed.json)",
    )
    p.add_argument("source", metavar="CONFIG_JSON|APPLY_DIR", help="a rank config or a `dse apply` folder")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", default="dse", metavar="FORMAT", help="dse or transformers (as `dse apply`)")
    p.add_argument("--text", required=True, metavar="PATH", help="the heal text: a .txt file or a .jsonl file")
    p.add_argument("--field", default="text", help="the JSONL field holding the text (WikiText pages: page)")
    p.add_argument("--rows", metavar="FIRST:END", help="the JSONL rows to heal on (default: all)")
    p.add_argument("--eval-text", metavar="PATH", help="perplexity text before and after (default: --text)")
    p.add_argument(
        "--eval-rows",
        nargs="+",
        metavar="FIRST:END",
        help="measure perplexity on each of these row ranges (must not meet --rows)",
    )
    p.add_argument("--eval-window", type=int, metavar="TOKENS", help="perplexity window (default 512)")
    p.add_argument("--eval-tokens", type=int, metavar="TOKENS", help="first tokens measured (default: all; P1: 4096)")
    for name, (kind, help) in RECIPE.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=help)
    p.add_argument("--norms", action="store_true", help="also train every norm")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="keep only each layer's input for the backward pass (activation checkpointing)",
    )
    p.add_argument("--checkpoint-dir", metavar="DIR", help="where the heal checkpoints (default: OUT.checkpoint)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_heal, interrupted="the heal's last checkpoint is kept")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dse", description=__doc__.splitlines()[0])
    parser.set_defaults(interrupted="the running trial is marked failed")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the registered plug-ins of each kind (methods, families, objectives ...)")
    p.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {', '.join(REGISTRIES)} (default: all)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("space", help="print the size of search spaces, per pruning rule")
    p.add_argument("files", nargs="+", metavar="SPACE_YAML")
    p.set_defaults(func=_cmd_space)

    p = sub.add_parser("run", help="run (or resume) a study")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--n-trials", type=int, help="finished trials to reach in total (default: the study's n_trials)")
    p.add_argument("--storage", help="storage URL (default: the study's, or a SQLite file beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local worker processes (needs a journal:/// or postgresql:// storage), each with its share of the cores",
    )
    p.add_argument(
        "--devices",
        metavar="auto|cuda:0,cuda:1,...",
        help="with --workers: deal these GPUs out to the workers (CUDA_VISIBLE_DEVICES)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("worker", help="join a running study (one process; start as many as you like)")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage", help="the study's storage URL (postgresql://..., journal:///FILE)")
    p.add_argument("--n-trials", type=int, help="stop when the study has this many finished trials")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another process (`dse run`) to create the study",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("estimate", help="memory, disk and per-trial time a study needs, from the model's config")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage", help="the study's storage, to time trials already run")
    p.set_defaults(func=_cmd_estimate)

    p = sub.add_parser("status", help="trials of a study: counts, baseline and best so far")
    p.add_argument("study", metavar="STUDY_YAML")
    p.add_argument("--storage")
    p.set_defaults(func=_cmd_status)
    _add_result_verbs(sub)
    _add_heal(sub)

    p = sub.add_parser(
        "speed",
        help="decode and prefill speed, time to first token and peak memory of a model, "
        "a compressed folder or a rank config",
    )
    p.add_argument("target", metavar="TARGET", help="a rank config JSON, a `dse apply` folder, or a model")
    p.add_argument("--against", metavar="dense", help="also measure the dense model and print the ratios")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the target's)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--batch", type=int, default=8, help="the larger decode batch and the prefill batch")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode over a static KV cache with the step compiled once (torch.compile, gpt-fast's way); "
        "prefill and time to first token stay eager",
    )
    p.add_argument("--json", metavar="FILE", help="write the reports as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the reports as CSV")
    p.set_defaults(func=_cmd_speed)

    from .space import PROBE_KINDS

    kinds = list(PROBE_KINDS)
    p = sub.add_parser("characterize", help="sensitivity of each module, each layer and k-layer patterns (CSV, plots)")
    p.add_argument(
        "target",
        metavar="STUDY_YAML_or_MODEL",
        help="a study (its model, method, calibration and evaluation) or a model name",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="characterization.csv (resumed) and plots")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--kinds", nargs="+", default=kinds, choices=kinds)
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 3, 4, 6], help="layer counts of the k-layer curves")
    p.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy"], help="with a model name: lm-eval tasks")
    p.add_argument("--limit", type=int, default=100, help="with a model name: rows per task")
    p.add_argument("--data-dir", help="with a model name: local task copies (the shared benchmarks folder)")
    p.add_argument(
        "--method", default="svd", help="with a model name: a method without calibration (`dse list methods`)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--family",
        help="with a model name: its architecture family (`dse list families`; default: the one its layers show)",
    )
    p.add_argument(
        "--modules-by-perplexity",
        action="store_true",
        help="measure single modules on the study's perplexity alone (cheaper, less noisy)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_characterize)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"\ndse: interrupted; {args.interrupted}. Run the same command to resume.", file=sys.stderr)
        return 130
    except DseError as e:
        print(f"dse: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # a bug: keep its traceback
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
