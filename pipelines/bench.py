"""`python -m pipelines bench --profile P` (`make bench`): what each stage achieves against the bare model.

Ceilings: the profile's model on this machine, at each stage's shapes, doing nothing but the work itself:

    train     a plain training step: next-token cross-entropy (a scalar head's mean score for the reward
              model), forward + backward + AdamW, on a dense [B, L] batch        -> B*L tokens
    forward   one forward pass in inference mode on [B, L]                         -> B*L tokens
    generate  `model.generate` with the KV cache, B prompts of P tokens, exactly R new tokens each -> B*R tokens

Stages: the real stage code, run briefly on the profile shrunk to a batch or two (in a temporary runs directory),
timed by what it records about itself: the preference set's manifest, timings.json, PPO's `time/*` split, the
evaluator's own cost. A stage's rate counts the real (non-padding) tokens its models read, or sampled, so padding,
Python overhead and idle time all show as a ratio below 1. Training stages are timed in steady state, from the
first logged step to the last (the first step's one-off set-up is left out). A ratio above 1 means the stage does
less work per token than the plain step: PPO's log-prob passes skip the LM head over the prompt, and the value
and reward models have no LM head at all.

Prints the table and writes it to reports/<profile>/bench.csv, in the precision the profile resolves to
(`model.precision`; `auto`: bf16 on a GPU, fp16 before Ampere, bf16 on a CPU with native bf16, else fp32). Another
precision is another invocation: `make bench ARGS=model.precision=fp32`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import pandas as pd
import torch

import dpo
from baselines import train_preferred_ft
from pipelines.clock import machine
from ppo.train import train_ppo
from reward_model.train import train_reward_model
from rlhf.atomic import read_jsonl
from rlhf.config import PROJECT_ROOT, Config
from rlhf.data import build_preferences
from rlhf.flops import forward_flops, matmul_limit, pass_parameters, train_flops
from rlhf.models import (
    AUTOCAST_DTYPES,
    autocast,
    default_device,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    resolve_model_path,
    resolve_precision,
)
from rlhf.rundir import peak_memory_mb, reset_peak_memory
from rlhf.sequences import generation_kernel, tokenize_prompts
from rlhf.tasks import load_task

COLUMNS = [
    "precision",
    "stage",
    "kind",
    "shape",
    "tokens",
    "seconds",
    "tokens_per_s",
    "ceiling_tokens_per_s",
    "ratio",
    "tflops_per_s",
    "of_limit",
    "peak_memory_mb",
]


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 2) -> tuple[float, float]:
    """(seconds of the fastest of `repeats` calls after one warm-up call, peak memory MB over them)."""
    fn()
    reset_peak_memory(device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, peak_memory_mb(device)


class Ceilings:
    """The bare model's rates at given shapes, measured once per shape and precision."""

    def __init__(self, cfg: Config, device: torch.device):
        self.path = resolve_model_path(cfg.model, cfg.hub_access)
        self.pad_token_id = load_tokenizer(self.path).pad_token_id
        self.precision, self.device, self.attention = cfg.model.precision, device, cfg.model.attention
        self.lm = load_causal_lm(self.path, self.attention).to(device)
        self.scalar = None  # the reward model's shape of network, loaded when first needed
        self.optimizers: dict[int, torch.optim.Optimizer] = {}  # AdamW's state allocated once, as in a real run
        self.rows: dict[tuple, dict] = {}

    def rate(self, kind: str, batch: int, length: int, new_tokens: int = 0, scalar: bool = False) -> float:
        """Tokens per second of `kind` ('train', 'forward', 'generate') at [batch, length] (+ new_tokens)."""
        key = (kind, batch, length, new_tokens, scalar)
        if key not in self.rows:
            model = self.lm
            if scalar:
                self.scalar = self.scalar or load_scalar_model(self.path, self.pad_token_id, self.attention).to(
                    self.device
                )
                model = self.scalar
            torch.manual_seed(0)
            ids = torch.randint(0, model.config.vocab_size, (batch, length), device=self.device)
            step = {"train": self._train_step, "forward": self._forward, "generate": self._generate}[kind]
            seconds, peak = _timed(lambda: step(model, ids, new_tokens, scalar), self.device)
            n = pass_parameters(model, "scalar" if scalar else "lm")
            flops = (
                train_flops(n, batch * length) if kind == "train" else forward_flops(n, batch * (length + new_tokens))
            )  # generate: prompt and new tokens once each
            row = _row(
                f"bare model: {kind}" + (" (scalar head)" if scalar else ""),
                batch * (new_tokens if kind == "generate" else length),
                seconds,
                peak,
                *key,
                flops=flops,
            )
            del row["ceiling"]
            self.rows[key] = {**row, "ceiling_tokens_per_s": row["tokens_per_s"], "ratio": 1.0}
        return self.rows[key]["tokens_per_s"]

    def _train_step(self, model, ids, _new_tokens, scalar) -> None:
        model.train()
        if id(model) not in self.optimizers:
            # fused, as every training stage's optimizer (PPO's and Trainer's default)
            self.optimizers[id(model)] = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=True)
        optimizer = self.optimizers[id(model)]
        with autocast(self.precision, self.device):
            out = model(input_ids=ids, labels=None if scalar else ids, use_cache=False)
            loss = out.logits.float().mean() if scalar else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def _forward(self, model, ids, _new_tokens, _scalar) -> None:
        model.eval()
        with autocast(self.precision, self.device):
            model(input_ids=ids, use_cache=False)

    @torch.inference_mode()
    def _generate(self, model, ids, new_tokens, _scalar) -> None:
        model.eval()
        with autocast(self.precision, self.device), generation_kernel(model):
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                use_cache=True,
                pad_token_id=self.pad_token_id,
            )


def shrunk(cfg: Config, runs_dir: Path, precision: str) -> Config:
    """The profile cut to a batch or two per stage, a few steps each, one seed, in `runs_dir`."""
    r = dataclasses.replace
    pairs = max(cfg.data.batch_size, 4 * cfg.reward_model.batch_size, 4 * cfg.dpo.batch_size)  # 4 steps each
    return r(
        cfg,
        runs_dir=str(runs_dir),
        seeds=cfg.seeds[:1],
        model=r(cfg.model, precision=precision),
        data=r(cfg.data, n_prompts=pairs * 2 // cfg.data.responses_per_prompt, n_heldout_prompts=cfg.eval.batch_size),
        eval=r(cfg.eval, n_prompts=cfg.eval.batch_size, n_heldout_pairs=cfg.eval.batch_size),
        budget=r(cfg.budget, pairs=None, epochs=1),  # every pair once: 4 steps or more for RM and DPO
        reward_model=r(cfg.reward_model, epochs=None, center_prompts=cfg.eval.batch_size),
        ppo=r(cfg.ppo, iterations=2, eval_every=2),
        dpo=r(cfg.dpo, epochs=None, eval_every=4),
        preferred_ft=r(cfg.preferred_ft, epochs=None, eval_every=4),
    )


def _steady(rows: list[dict]) -> tuple[int, float, float]:
    """(tokens, seconds, FLOPs) from the first logged training step to the last."""
    return (
        rows[-1]["tokens"] - rows[0]["tokens"],
        rows[-1]["wall_seconds"] - rows[0]["wall_seconds"],
        rows[-1]["flops"] - rows[0]["flops"],
    )


def _row(
    stage: str,
    tokens: float,
    seconds: float,
    peak: float,
    kind: str,
    batch: int,
    length: int,
    new_tokens: int = 0,
    scalar: bool = False,
    flops: float = math.nan,
) -> dict:
    """A stage's measurement, with the shape of the ceiling it is compared against (filled in by `bench_precision`)
    and the FLOPs it recorded of itself (rlhf/flops.py), where it splits them out."""
    shape = f"{batch}x{length}" + (f"+{new_tokens}" if kind == "generate" else "")
    return {
        "stage": stage,
        "kind": kind,
        "shape": shape,
        "tokens": int(tokens),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "peak_memory_mb": peak,
        "ceiling": (kind, batch, length, new_tokens, scalar),
    }


def _timings(run_dir: Path) -> dict:
    return json.loads((run_dir / "timings.json").read_text())


def _eval_rows(
    method: str, run_dir: Path, metrics: list[dict], batch: int, prompt_len: int, new_tokens: int
) -> list[dict]:
    """The evaluator's sampling and scoring at the run's last eval point (a trained policy, not pi_ref)."""
    last = [r for r in metrics if r["kind"] == "eval"][-1]
    peak = _timings(run_dir)["eval"]["peak_memory_mb"]
    scorer = "proxy reward" if method == "PPO" else "held-out pairs"  # RM pair scores were computed at step 0
    whole = _row(
        f"eval in {method}: the whole point",
        last["eval/sampled_tokens"] + last["eval/scored_tokens"],
        last["eval/seconds"],
        peak,
        "eval",
        batch,
        prompt_len + new_tokens,
        flops=last["eval/flops"],
    )
    whole["ceiling"] = None  # sampling and scoring together: the FLOP/s only, against the machine's limit
    return [
        _row(
            f"eval in {method}: sampling",
            last["eval/sampled_tokens"],
            last["eval/sampling_seconds"],
            peak,
            "generate",
            batch,
            prompt_len,
            new_tokens,
        ),
        _row(
            f"eval in {method}: scoring (KL, {scorer})",
            last["eval/scored_tokens"],
            last["eval/scoring_seconds"],
            peak,
            "forward",
            batch,
            prompt_len + new_tokens,
        ),
        whole,
    ]


def bench_precision(cfg: Config, precision: str, device: torch.device) -> list[dict]:
    """Every stage's row at one precision, then the ceilings they are measured against (measured after the stages,
    so the ceilings' models and optimizer state never count in a stage's peak memory)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        small = shrunk(cfg, Path(tmp), precision)
        tokenizer = load_tokenizer(resolve_model_path(small.model, small.hub_access))
        task = load_task(small.task, tokenizer, small.hub_access)

        def prompt_len(prompts: list[str]) -> int:  # the padded width of a batch of these prompts
            return tokenize_prompts(tokenizer, prompts)[0].shape[1]

        rows, seed = [], small.seeds[0]
        d, e, p = small.data, small.eval, small.ppo
        eval_len = prompt_len(task.eval_prompts[: e.batch_size])

        reset_peak_memory(device)
        prefs = build_preferences(small)
        stats = [s for s in map(prefs.manifest["stats"].get, ("train", "heldout")) if s and "sampled_tokens" in s]
        if stats:  # a task with a gold reward samples its pairs from pi_ref
            rows.append(
                _row(
                    "data: sampling pi_ref",
                    sum(s["sampled_tokens"] for s in stats),
                    sum(s["sampling_seconds"] for s in stats),
                    peak_memory_mb(device),
                    "generate",
                    d.batch_size * d.responses_per_prompt,
                    prompt_len(task.train_prompts[: d.batch_size]),
                    d.max_new_tokens,
                    flops=sum(s["sampling_flops"] for s in stats),
                )
            )

        rm = train_reward_model(small, prefs, seed)
        rm_train = [r for r in read_jsonl(rm.run_dir / "metrics.jsonl")[0] if r["kind"] == "train"]
        tokens, seconds, flops = _steady(rm_train)
        b = 2 * small.reward_model.batch_size  # chosen and rejected rows
        rows.append(
            _row(
                "reward model: training",
                tokens,
                seconds,
                _timings(rm.run_dir)["reward_model"]["peak_memory_mb"],
                "train",
                b,
                round(tokens / (len(rm_train) - 1) / b),
                scalar=True,
                flops=flops,
            )
        )

        run = train_ppo(small, prefs, rm.path, seed).run_dir
        metrics = read_jsonl(run / "metrics.jsonl")[0]
        last = [r for r in metrics if r["kind"] == "train"][-1]  # steady state: the second iteration
        peak = _timings(run)["train"]["peak_memory_mb"]
        b, length = p.rollout_batch_size, prompt_len(task.train_prompts[: p.rollout_batch_size])
        rows += [
            _row(
                "PPO: rollout",
                last["tokens/rollout"],
                last["time/rollout"],
                peak,
                "generate",
                b,
                length,
                p.max_new_tokens,
                flops=last["flops/rollout"],
            ),
            _row(
                "PPO: scoring (pi_old, pi_ref, V, r_phi)",
                last["tokens/scoring"],
                last["time/scoring"],
                peak,
                "forward",
                b,
                length + p.max_new_tokens,
                flops=last["flops/scoring"],
            ),
            _row(
                "PPO: update (policy + V)",
                last["tokens/update"],
                last["time/update"],
                peak,
                "train",
                p.mini_batch_size,
                length + p.max_new_tokens,
                flops=last["flops/update"],
            ),
            *_eval_rows("PPO", run, metrics, e.batch_size, eval_len, e.max_new_tokens),
        ]

        result = dpo.train(small, prefs, seed)
        timings, metrics = result.timings, read_jsonl(result.run_dir / "metrics.jsonl")[0]
        dpo_train = [r for r in metrics if r["kind"] == "train"]
        tokens, seconds, flops = _steady(dpo_train)
        b = 2 * small.dpo.batch_size * small.dpo.gradient_accumulation_steps
        length = round(tokens / (len(dpo_train) - 1) / b)
        ref = timings["ref_logps"]
        rows += [
            _row(
                "DPO: pi_ref log-probs",
                ref["tokens"],
                ref["seconds"],
                ref["peak_memory_mb"],
                "forward",
                2 * e.batch_size,
                length,
                flops=ref["flops"],
            ),  # TRL's precompute batch: eval.batch_size pairs
            _row("DPO: training", tokens, seconds, timings["train"]["peak_memory_mb"], "train", b, length, flops=flops),
            *_eval_rows("DPO", result.run_dir, metrics, e.batch_size, eval_len, e.max_new_tokens),
        ]

        result = train_preferred_ft(small, prefs, seed)
        sft_train = [r for r in read_jsonl(result.run_dir / "metrics.jsonl")[0] if r["kind"] == "train"]
        tokens, seconds, flops = _steady(sft_train)
        b = small.preferred_ft.batch_size  # one chosen response a row
        rows.append(
            _row(
                "Preferred-FT: training",
                tokens,
                seconds,
                _timings(result.run_dir)["train"]["peak_memory_mb"],
                "train",
                b,
                round(tokens / (len(sft_train) - 1) / b),
                flops=flops,
            )
        )

        ceilings = Ceilings(small, device)
        for row in rows:
            ceiling = row.pop("ceiling")
            row["ceiling_tokens_per_s"] = ceilings.rate(*ceiling) if ceiling else math.nan
            row["ratio"] = row["tokens_per_s"] / row["ceiling_tokens_per_s"]
        limit = matmul_limit(ceilings.lm, AUTOCAST_DTYPES.get(precision, torch.float32), device, repeats=5)
        machine_row = {
            "stage": "machine: dense matmul at the model's shapes",
            "kind": "matmul",
            "shape": "2048 rows",
            "tflops_per_s": limit / 1e12,
        }
        table = [machine_row, *ceilings.rows.values(), *rows]
        for row in table:  # a ratio of the very numbers shown: the machine's own row is exactly 1
            row["of_limit"] = row["tflops_per_s"] / machine_row["tflops_per_s"]
        return [{"precision": precision, **row} for row in table]


def eval_shares(cfg: Config) -> pd.DataFrame:
    """Evaluation's share of each completed PPO / DPO run of the profile so far (its timings.json): the real runs'
    split, which the shrunk runs above cannot give (they evaluate far more often per training step)."""
    rows = []
    for path in sorted((PROJECT_ROOT / cfg.runs_dir / cfg.profile).glob("*/*/timings.json")):
        manifest = json.loads((path.parent / "manifest.json").read_text())
        # the two methods the benchmark compares (PPO-GT trains with PPO's trainer): a choice of the bench, like the
        # stages it measures above, not a list of every method
        if manifest["method"] in ("ppo", "ppo-gt", "dpo") and manifest["status"] == "completed":
            stages = {name: t["seconds"] for name, t in json.loads(path.read_text()).items()}
            total = sum(stages.values())
            rows.append(
                {
                    "run": f"{manifest['method']}/{path.parent.name}",
                    "seconds": total,
                    **{f"{name}_seconds": v for name, v in stages.items()},
                    "eval_share": stages["eval"] / total,
                }
            )
    return pd.DataFrame(rows)


def main(cfg: Config) -> int:
    device = default_device()
    precision = resolve_precision(cfg.model.precision, device)  # what the profile's runs compute in
    table = pd.DataFrame(bench_precision(cfg, precision, device), columns=COLUMNS)
    out = Path(PROJECT_ROOT / cfg.report.out_dir / cfg.profile / "bench.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(
        f"\nbench, profile {cfg.profile}: {machine(device)}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {precision} (model.precision: {cfg.model.precision})"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nwritten: {out}")
    shares = eval_shares(cfg)
    if not shares.empty:
        print(f"\nevaluation's share of each completed run in {cfg.runs_dir}/{cfg.profile} (target: at most 0.15):")
        print(shares.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0
