"""DPO (eq. 6): the loss by hand, against TRL's DPOTrainer, and `make dpo` end to end (its bandit: test_bandit.py)."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

import dpo
from dpo import dpo_gradient_weight, dpo_loss
from dpo.trainer import build_trainer
from rlhf.atomic import read_jsonl
from rlhf.config import PROJECT_ROOT, load_config
from rlhf.data import budget_pairs, build_preferences, load_preferences
from rlhf.errors import UserError
from rlhf.models import freeze, load_causal_lm
from rlhf.sequences import encode_pairs, response_logprobs
from rlhf.trl_compat import ReferencePassDPOTrainer

TRAIN_KEYS = {
    "kind",
    "step",
    "wall_seconds",
    "tokens",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
    "dpo/grad_weight_mean",
    "dpo/grad_weight_std",
}
EVAL_KEYS = {
    "kind",
    "step",
    "wall_seconds",
    "tokens",
    "eval/gold",
    "eval/gold_sem",
    "eval/kl",
    "eval/kl_k3",
    "heldout/gold_accuracy",
}
IMPLICIT_KEYS = {"heldout/implicit_accuracy", "heldout/implicit_margin"}  # the last eval point only


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One tiny preference set for the module (the end-to-end test reuses it, as `make dpo` would)."""
    cfg = load_config("tiny", [f"runs_dir={tmp_path_factory.mktemp('runs')}"])
    return cfg, build_preferences(cfg)


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)  # hand-worked numbers to 1e-9 need double precision


def test_dpo_loss_by_hand():
    beta = 0.1
    # pair 1: the policy moved 1 nat towards y_w and 1 nat away from y_l; pair 2: 2 nats the wrong way on y_w
    losses, chosen, rejected = dpo_loss(f64(-10.0, -7.0), f64(-12.0, -5.0), f64(-11.0, -5.0), f64(-11.0, -5.0), beta)
    # rewards beta * (log pi - log pi_ref): pair 1 (0.1, -0.1), pair 2 (-0.2, 0.0)
    assert chosen.tolist() == pytest.approx([0.1, -0.2]) and rejected.tolist() == pytest.approx([-0.1, 0.0])
    # eq. (6): -log sigmoid(0.1 - (-0.1)) = log(1 + e^-0.2) and -log sigmoid(-0.2 - 0) = log(1 + e^0.2)
    assert losses.tolist() == pytest.approx([0.5981388693, 0.7981388693], abs=1e-9)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log1p(math.exp(0.2))], abs=1e-9)
    # no underflow where sigmoid(margin) rounds to 0: the loss is -margin
    far, _, _ = dpo_loss(f64(-1000.0), f64(0.0), f64(0.0), f64(0.0), 1.0)
    assert far.item() == pytest.approx(1000.0)


def test_gradient_weight_by_hand_and_is_the_gradient_of_eq6():
    weights = dpo_gradient_weight(f64(0.1, -0.2, 3.0), f64(-0.1, 0.0, 0.0))
    # sigmoid(r_l - r_w): sigmoid(-0.2) = 1 / (1 + e^0.2), sigmoid(0.2) = 1 / (1 + e^-0.2), sigmoid(-3)
    assert weights.tolist() == pytest.approx([0.4501660027, 0.5498339973, 0.0474258732], abs=1e-9)
    # docs/dpo.md: d loss / d log pi(y_w|x) = -beta * weight and d loss / d log pi(y_l|x) = +beta * weight
    beta = 0.5
    policy_chosen = torch.tensor([-3.0, -4.0, -1.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0, -6.0, -9.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-2.5, -4.5, -1.0]), torch.tensor([-2.5, -5.0, -8.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    losses.sum().backward()
    weights = dpo_gradient_weight(chosen_rewards, rejected_rewards)
    torch.testing.assert_close(policy_chosen.grad, -beta * weights)
    torch.testing.assert_close(policy_rejected.grad, beta * weights)


def _trl_loss_and_our_logps(cfg, prefs, tiny_path, tokenizer, tmp_path, n=4):
    """TRL's loss for `cfg` on the first n training pairs, for a policy moved off pi_ref (so the log-ratios and the
    loss are not trivial), beside the same pairs' sequence log-probs and response lengths through the project's own
    encoding and log-prob function: (trainer, loss, logps[(model, side)], lengths[side])."""
    ref = freeze(load_causal_lm(tiny_path))
    policy = load_causal_lm(tiny_path)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trainer = build_trainer(cfg, policy, ref, tokenizer, prefs.train, seed=0, output_dir=tmp_path, callbacks=[])
    n = 4
    rows = trainer.train_dataset.select(range(n)).select_columns(["prompt", "chosen", "rejected"]).to_dict()
    policy.train()
    loss = trainer.compute_loss(policy, trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))
    batches = dict(
        zip(("chosen", "rejected"), encode_pairs(tokenizer, rows["prompt"], rows["chosen"], rows["rejected"]))
    )
    with torch.no_grad():
        logps = {
            (name, side): response_logprobs(model, batch)[0].sum(dim=1)
            for name, model in (("policy", policy), ("ref", ref))
            for side, batch in batches.items()
        }
    return trainer, loss.item(), logps, {side: b.response_mask.sum(dim=1) for side, b in batches.items()}


def test_dpo_loss_matches_what_trl_dpo_trainer_computes_on_tiny(tiny_runs, tiny_path, tokenizer, tmp_path):
    cfg, prefs = tiny_runs
    trainer, loss, logps, _ = _trl_loss_and_our_logps(cfg, prefs, tiny_path, tokenizer, tmp_path)
    trainer.log({"loss": loss})
    reported = trainer.state.log_history[-1]

    # eq. (6) on the same pairs
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps["policy", "chosen"],
        logps["policy", "rejected"],
        logps["ref", "chosen"],
        logps["ref", "rejected"],
        cfg.beta,
    )
    weights = dpo_gradient_weight(chosen_rewards, rejected_rewards)
    assert abs(chosen_rewards).mean() > 0.01  # the comparison below (to 1e-4) is not between zeros
    assert loss == pytest.approx(losses.mean().item(), abs=1e-4)
    assert reported["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-4)
    assert reported["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-4)
    assert reported["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-4)
    assert reported["logps/chosen"] == pytest.approx(logps["policy", "chosen"].mean().item(), abs=1e-3)
    assert reported["dpo/grad_weight_mean"] == pytest.approx(weights.mean().item(), abs=1e-5)
    assert reported["dpo/grad_weight_std"] == pytest.approx(weights.std(unbiased=False).item(), abs=1e-5)
    # TRL tokenised and cached its own copy: the shared preference set on disk still matches its manifest
    assert load_preferences(cfg).sha256 == prefs.sha256


@pytest.mark.parametrize("loss_type, epsilon", [("ipo", 0.0), ("robust", 0.2)])
def test_variants_are_trls_ipo_and_robust_dpo_losses(tiny_runs, tiny_path, tokenizer, tmp_path, loss_type, epsilon):
    cfg, prefs = tiny_runs
    cfg = load_config(
        "tiny", [f"runs_dir={cfg.runs_dir}", f"dpo.loss_type={loss_type}", f"dpo.label_smoothing={epsilon}"]
    )
    assert dpo.method_name(cfg) == f"dpo-{loss_type}"  # runs/<profile>/dpo-<variant>/: never pooled with DPO's
    trainer, loss, logps, lengths = _trl_loss_and_our_logps(cfg, prefs, tiny_path, tokenizer, tmp_path)
    ratio_w = logps["policy", "chosen"] - logps["ref", "chosen"]
    ratio_l = logps["policy", "rejected"] - logps["ref", "rejected"]
    beta = cfg.beta
    if loss_type == "ipo":  # Azar et al. 2023, eq. (17), on per-token log-ratios (TRL's normalisation); beta is tau
        losses = (ratio_w / lengths["chosen"] - ratio_l / lengths["rejected"] - 1 / (2 * beta)) ** 2
    else:  # Chowdhury et al. 2024: eq. (6)'s loss de-biased for labels flipped with probability epsilon
        u = beta * (ratio_w - ratio_l)
        losses = ((1 - epsilon) * -F.logsigmoid(u) - epsilon * -F.logsigmoid(-u)) / (1 - 2 * epsilon)
    assert loss == pytest.approx(losses.mean().item(), abs=1e-4)
    assert (
        abs(
            loss
            - dpo_loss(
                logps["policy", "chosen"],
                logps["policy", "rejected"],
                logps["ref", "chosen"],
                logps["ref", "rejected"],
                beta,
            )[0]
            .mean()
            .item()
        )
        > 1e-2
    )  # not eq. (6) itself
    trainer.log({"loss": loss})
    assert "dpo/grad_weight_mean" not in trainer.state.log_history[-1]  # eq. (6)'s weight is not these losses'


def test_dpo_precomputes_reference_logps_only_for_the_budget_pairs(tiny_runs, tiny_path, tokenizer, tmp_path):
    cfg, prefs = tiny_runs
    cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, pairs=8))
    ref = freeze(load_causal_lm(tiny_path))
    trainer = build_trainer(
        cfg,
        load_causal_lm(tiny_path),
        ref,
        tokenizer,
        budget_pairs(cfg, prefs),
        seed=0,
        output_dir=tmp_path,
        callbacks=[],
    )
    used = trainer.train_dataset
    assert len(used) == 8 < len(prefs.train) and "ref_chosen_logps" in used.column_names
    assert sorted(used["prompt"]) == sorted(prefs.train["prompt"][:8])  # the first budget.pairs of the set
    lengths = [
        len(p) + max(len(c), len(r)) for p, c, r in zip(used["prompt_ids"], used["chosen_ids"], used["rejected_ids"])
    ]
    assert lengths[0] < lengths[-1]  # ordered by length, so precompute batches carry little padding
    # our pi_ref pass (response positions only) gives what TRL's own precompute gives
    theirs = ReferencePassDPOTrainer.reference_logps(
        trainer, used.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]), "check", 3
    )
    for side in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(used[side]), torch.tensor(theirs[side]), atol=1e-4, rtol=1e-5)
    # Another seed trains on the same pairs (its sampler, seeded with data_seed = seed, draws their order)
    again = build_trainer(
        cfg,
        load_causal_lm(tiny_path),
        ref,
        tokenizer,
        budget_pairs(cfg, prefs),
        seed=1,
        output_dir=tmp_path,
        callbacks=[],
    )
    assert again.train_dataset["chosen"] == used["chosen"] and again.args.data_seed == 1 != trainer.args.data_seed


def test_every_run_on_the_same_pairs_reads_pi_refs_pass_from_the_cache(tiny_runs, tiny_path, tokenizer, tmp_path):
    """The first run computes pi_ref's log-probs of its pairs and keeps them; another seed reads the very numbers
    and is charged the seconds they took; other pairs are computed afresh."""
    cfg, prefs = tiny_runs
    cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, pairs=8))
    ref, cache = freeze(load_causal_lm(tiny_path)), tmp_path / "eval-cache"

    budget = budget_pairs(cfg, prefs)

    def build(seed, pairs=budget):
        return build_trainer(
            cfg,
            load_causal_lm(tiny_path),
            ref,
            tokenizer,
            pairs,
            seed=seed,
            output_dir=tmp_path / str(seed),
            callbacks=[],
            ref_logps_cache=cache,
        )

    first = build(0)
    assert first.ref_logps_cached_seconds == 0 and len(list(cache.glob("dpo-ref-logps-*.pt"))) == 1
    again = build(1)
    assert again.ref_logps_cached_seconds > 0
    for side in ("ref_chosen_logps", "ref_rejected_logps"):
        assert again.train_dataset[side] == first.train_dataset[side]
    build(2, prefs.train.select(range(1, 9)))  # other pairs: another key, computed
    assert len(list(cache.glob("dpo-ref-logps-*.pt"))) == 2


def test_dpo_config_rejects_bad_values():
    with pytest.raises(UserError, match="dpo.eval_every"):
        load_config("tiny", ["dpo.eval_every=0"])
    with pytest.raises(UserError, match="dpo.learning_rate"):
        load_config("tiny", ["dpo.learning_rate=-1e-5"])
    with pytest.raises(UserError, match="'dpo.loss_type': 'hinge' is not one of"):
        load_config("tiny", ["dpo.loss_type=hinge"])
    with pytest.raises(UserError, match=r"dpo.label_smoothing.*\(0, 0.5\)"):
        load_config("tiny", ["dpo.loss_type=robust", "dpo.label_smoothing=0.5"])
    with pytest.raises(UserError, match="dpo.label_smoothing.*only by dpo.loss_type=robust"):
        load_config("tiny", ["dpo.label_smoothing=0.1"])  # sigmoid would silently ignore it


def test_make_dpo_tiny_end_to_end(tiny_runs, tiny_path):
    cfg, prefs = tiny_runs
    out = subprocess.run(
        [sys.executable, "-m", "pipelines", "dpo", "--profile", "tiny", f"runs_dir={cfg.runs_dir}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "preference set reused" in out.stdout  # the very same pairs the reward model reads

    (run,) = (PROJECT_ROOT / cfg.runs_dir / "tiny" / "dpo").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["method"] == "dpo"
    assert manifest["data_sha256"] == prefs.sha256 and manifest["seed"] == cfg.seeds[0]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["beta"] == cfg.beta and saved["dpo"]["eval_every"] == cfg.dpo.eval_every

    rows, bad = read_jsonl(run / "metrics.jsonl")
    assert not bad
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = math.ceil(len(prefs.train) / cfg.dpo.batch_size)  # one epoch; TRL drops no pair of the tiny set
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert [r["step"] for r in evals] == sorted({0, *range(cfg.dpo.eval_every, steps + 1, cfg.dpo.eval_every), steps})
    for r in train:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert 0 < r["dpo/grad_weight_mean"] < 1 and r["dpo/grad_weight_std"] >= 0
    for r in evals:
        assert EVAL_KEYS <= set(r), EVAL_KEYS - set(r)
    # DPO's implicit reward on the held-out pairs is measured where the report reads it, at the last point only
    assert IMPLICIT_KEYS <= set(evals[-1]) and not any(IMPLICIT_KEYS & set(r) for r in evals[:-1])
    assert evals[0]["wall_seconds"] == 0 and evals[0]["tokens"] == 0 and evals[0]["eval/kl"] == pytest.approx(0)
    assert all(a["tokens"] < b["tokens"] and a["wall_seconds"] < b["wall_seconds"] for a, b in zip(train, train[1:]))
    # The training clock stops during evaluation: the last eval point's clock equals the last step's.
    assert evals[-1]["wall_seconds"] == pytest.approx(train[-1]["wall_seconds"], abs=0.5)
    assert evals[-1]["tokens"] == train[-1]["tokens"]

    timings = json.loads((run / "timings.json").read_text())
    assert {"ref_logps", "train", "eval", "save"} <= set(timings)
    assert timings["train"]["seconds"] == pytest.approx(train[-1]["wall_seconds"], abs=0.5)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        f"eval_step{r['step']:06d}{suffix}" for r in evals for suffix in (".jsonl", ".prompts.csv")
    ]
    final, ref = load_causal_lm(str(run / "checkpoints" / "final")), load_causal_lm(tiny_path)
    assert not torch.equal(final.lm_head.weight, ref.lm_head.weight)  # the trained policy, not a copy of pi_ref


def test_trls_fused_lm_head_projects_only_the_response_positions_on_a_cpu(tiny_path, monkeypatch):
    """rlhf.trl_compat has TRL's fused LM head (DPO's, RLOO's, Preferred-FT's log-probs) project only the labelled
    positions on a CPU, as TRL does on a GPU: the prompt's rows are never projected, and the log-probs and gradients
    equal those of projecting every row (up to rounding)."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton as every_position_on_a_cpu

    from rlhf import trl_compat

    trl_compat.install()
    real = trl_utils._ChunkedLogProbFunction
    projected = []

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return real.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    torch.manual_seed(0)
    model = load_causal_lm(tiny_path)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    labels = ids.masked_fill(torch.arange(12) < 7, -100)  # a 7-token prompt, then the response

    def logps_and_grads():
        model.zero_grad()
        logps = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        logps.sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    compact, compact_grads = logps_and_grads()
    monkeypatch.setattr(trl_utils, "_use_triton", every_position_on_a_cpu)
    every, every_grads = logps_and_grads()
    assert projected == [3 * 5, 3 * 11]  # the 5 labelled next-token positions a row, then all 11
    torch.testing.assert_close(compact, every)
    for a, b in zip(compact_grads, every_grads, strict=True):
        torch.testing.assert_close(a, b)
