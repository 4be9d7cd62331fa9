"""The ``nla-rl`` command line.

    nla-rl run RECIPE [key=value …] [--verbose]   run a recipe's stages (python -m launch.train);
                                          --verbose: vLLM/Ray/transformers output on the console
    nla-rl datagen RECIPE [key=value …]   only the data: base model, activations, labels, splits
    nla-rl sft-ar RECIPE [key=value …]    only the AR-SFT stage (run.resume=true to resume)
    nla-rl sft-av RECIPE [key=value …]    only the AV-SFT stage
    nla-rl recipe show RECIPE [key=value …]   print the resolved recipe (secrets redacted)
    nla-rl recipe keys                    every recipe key with its type, default and meaning
    nla-rl sidecar check CHECKPOINT_DIR [--injection-family add|replace]
                                          validate nla_meta.yaml against the dir's tokenizer/config
    nla-rl export RUN_DIR [--from rl|sft|init|checkpoint] [--step N]
                                          verified HF exports of the AV/AR pair in RUN_DIR/export
    nla-rl extract --base DIR --layer K --text "…" --out v.npy   activations of a base model
    nla-rl explain --av DIR --ar DIR --vectors v.npy   explanations, MSE, cosine, FVE
    nla-rl eval RUN_DIR [--av DIR --ar DIR] [--rows N]   the eval report of a run
"""

from __future__ import annotations

import argparse
import sys

import yaml

from launch.stop import stop_on_sigterm
from nla_rl.errors import NLAError


def _cmd_run(args) -> int:
    from launch.train import run
    from nla_rl.run_logs import with_verbose

    print(f"run directory: {run(args.recipe, with_verbose(args))}")
    return 0


def _cmd_datagen(args) -> int:
    from launch.train import run
    from nla_rl.run_logs import with_verbose

    print(f"run directory: {run(args.recipe, [*with_verbose(args), 'run.stages=[prepare,datagen]'])}")
    return 0


def _cmd_sft(stage: str):
    def command(args) -> int:
        from launch.train import run
        from nla_rl.run_logs import with_verbose

        print(f"run directory: {run(args.recipe, [*with_verbose(args), f'run.stages=[{stage}]'])}")
        return 0
    return command


def _cmd_recipe_show(args) -> int:
    from nla_rl.config import load_recipe, redact

    cfg = load_recipe(args.recipe, args.overrides)
    print(yaml.safe_dump(redact(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def _cmd_recipe_keys(args) -> int:
    from nla_rl.config import describe

    print(describe())
    return 0


def _cmd_export(args) -> int:
    from launch.export import export_run

    export_run(args.run_dir, source=args.source, step=args.step)
    return 0


def _cmd_sidecar_check(args) -> int:
    import logging

    from transformers import AutoConfig, AutoTokenizer

    from nla_rl.sidecar import read_model_sidecar, validate_model_sidecar

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    config = AutoConfig.from_pretrained(args.checkpoint, local_files_only=True)
    logging.getLogger("nla_rl.sidecar").setLevel(logging.ERROR)  # the notes are printed below
    sidecar = read_model_sidecar(args.checkpoint, injection_family=args.injection_family,
                                 tokenizer=tokenizer, config=config)
    validate_model_sidecar(sidecar, tokenizer, config)
    t = sidecar.tokens
    filled = "; ".join(n.removeprefix("filled ") for n in sidecar.notes)
    print(f"ok: role={sidecar.role} stage={sidecar.stage} d_model={sidecar.d_model} "
          f"K={sidecar.extraction_layer_index} injection={sidecar.injection_family} "
          f"marker={t.char!r} id={t.token_id} neighbours=({t.left_id}, {t.right_id})"
          + (f"; filled in: {filled}" if filled else "; nothing filled in"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nla-rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from nla_rl.run_logs import add_verbose_flag

    run = sub.add_parser("run", help="run a recipe's stages")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*")
    add_verbose_flag(run)
    run.set_defaults(func=_cmd_run)

    datagen = sub.add_parser("datagen", help="build a recipe's data (prepare + datagen stages)")
    datagen.add_argument("recipe")
    datagen.add_argument("overrides", nargs="*")
    add_verbose_flag(datagen)
    datagen.set_defaults(func=_cmd_datagen)

    for name, stage in (("sft-ar", "ar_sft"), ("sft-av", "av_sft")):
        sft = sub.add_parser(name, help=f"run the {stage} stage")
        sft.add_argument("recipe")
        sft.add_argument("overrides", nargs="*")
        add_verbose_flag(sft)
        sft.set_defaults(func=_cmd_sft(stage))

    recipe = sub.add_parser("recipe", help="inspect recipes").add_subparsers(dest="action", required=True)
    show = recipe.add_parser("show", help="print the resolved recipe")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=_cmd_recipe_show)
    recipe.add_parser("keys", help="document every recipe key").set_defaults(func=_cmd_recipe_keys)

    sidecar = sub.add_parser("sidecar", help="checkpoint sidecars").add_subparsers(dest="action", required=True)
    check = sidecar.add_parser("check", help="validate a checkpoint's nla_meta.yaml (says what "
                               "it filled in from the tokenizer/config, or why it refuses)")
    check.add_argument("checkpoint")
    check.add_argument("--injection-family", choices=("add", "replace"),
                       help="the AV's family when the sidecar does not record it (nanoNLA: add)")
    check.set_defaults(func=_cmd_sidecar_check)

    export = sub.add_parser("export", help="export a run's AV/AR pair as verified HF directories")
    export.add_argument("run_dir")
    export.add_argument("--from", dest="source", choices=("rl", "sft", "init", "checkpoint"),
                        help="default: the most trained pair present (rl, then sft, then init)")
    export.add_argument("--step", type=int, help="with --from checkpoint: this step (default latest)")
    export.set_defaults(func=_cmd_export)

    from launch.ablate import add_ablate_command
    from launch.cli_inference import add_inference_commands
    add_inference_commands(sub)
    add_ablate_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with stop_on_sigterm():
            return args.func(args)
    except NLAError as err:  # bad input: one clear line, exit 2, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
