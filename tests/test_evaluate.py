import math

import pytest
import torch

from rlhf.data import build_preferences
from rlhf.evaluate import distinct_n, evaluate, kl_estimates, mean_std_sem, pair_accuracy_margin
from rlhf.evaluate import make_eval_context
from rlhf.models import load_causal_lm
from rlhf.rundir import PROMPT_COLUMNS


def test_distinct_n_by_hand():
    # bigrams: (a b) (b a) (a b) | (c d) -> 3 distinct of 4
    assert distinct_n(["a b a b", "c d"], 2) == 3 / 4
    assert distinct_n(["one"], 2) == 0.0


def test_mean_std_sem_by_hand():
    mean, std, sem = mean_std_sem([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and math.isclose(std, math.sqrt(5 / 3)) and math.isclose(sem, math.sqrt(5 / 3) / 2)


def test_pair_accuracy_margin_by_hand():
    acc, margin = pair_accuracy_margin([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, -1.0])
    assert acc == (1 + 0 + 0.5 + 1) / 4 and margin == (1 - 1 + 0 + 2) / 4


def test_kl_estimates_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -5.0]])
    lr = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    k1, k3 = kl_estimates(lp, lr, mask)
    assert math.isclose(k1.item(), 0.5 + -1.0, rel_tol=1e-6)
    want_k3 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    assert math.isclose(k3.item(), want_k3, rel_tol=1e-6)


def test_evaluator_kl_zero_for_reference_and_positive_after_perturbation(tiny_cfg, tiny_model, tiny_path, tokenizer):
    prefs = build_preferences(tiny_cfg)
    ctx = make_eval_context(tiny_cfg, prefs, tiny_model, tokenizer, torch.device("cpu"))
    policy = load_causal_lm(tiny_path)
    m0, samples = evaluate(policy, ctx, implicit_beta=0.1)
    assert abs(m0["eval/kl"]) < 1e-5 and abs(m0["eval/kl_k3"]) < 1e-5
    assert abs(m0["heldout/implicit_margin"]) < 1e-6 and m0["heldout/implicit_accuracy"] == 0.5  # all ties
    assert 0 <= m0["heldout/gold_accuracy"] <= 1 and "eval/gold" in m0 and m0["eval/n"] == 8
    # every eval prompt's record, with every number the per-prompt file keeps; their means are the metrics
    assert [s["prompt_index"] for s in samples] == list(range(8)) and {"prompt", "response"} <= set(samples[0])
    assert set(PROMPT_COLUMNS) - {"proxy"} <= set(samples[0])  # no reward model given: no proxy
    for column, metric in (
        ("gold", "eval/gold"),
        ("kl", "eval/kl"),
        ("kl_k3", "eval/kl_k3"),
        ("length", "eval/length"),
        ("eos", "eval/eos_rate"),
    ):
        assert sum(s[column] for s in samples) / 8 == pytest.approx(m0[metric], abs=1e-9), column

    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng_before = torch.get_rng_state()
    m1, trained = evaluate(policy, ctx, implicit_beta=0.1)  # a trained policy: sampled for real (pi_ref's is cached)
    assert m1["eval/sampled_tokens"] > 0
    assert torch.equal(rng_before, torch.get_rng_state())  # the eval seed does not disturb training RNG
    assert m1["eval/kl"] > 0.01 and m1["eval/kl_k3"] > 0.01
    assert sum(s["kl"] for s in trained) / 8 == pytest.approx(m1["eval/kl"]) and all(s["kl_k3"] >= 0 for s in trained)
    assert m1["heldout/implicit_margin"] != 0
    again, _ = evaluate(policy, ctx, implicit_beta=0.1)
    assert again["eval/gold"] == m1["eval/gold"] and again["eval/kl"] == m1["eval/kl"]  # same prompts and seed


def test_pi_ref_is_sampled_once_per_eval_config_and_reused_with_the_same_metrics(
    tiny_cfg, tiny_model, tiny_path, tokenizer, monkeypatch
):
    import pytest

    import rlhf.evaluate as E

    prefs = build_preferences(tiny_cfg)
    ctx = make_eval_context(tiny_cfg, prefs, tiny_model, tokenizer, torch.device("cpu"))
    policy = load_causal_lm(tiny_path)  # a copy with pi_ref's weights: every run's step 0
    with monkeypatch.context() as m:  # the long way: sampled, both log-prob passes, both pair passes, no cache
        m.setattr(E, "has_reference_weights", lambda policy, ctx: False)
        full, _ = evaluate(policy, ctx, implicit_beta=0.1)
    assert not ctx.reference_cache.exists()
    first, _ = evaluate(policy, ctx, implicit_beta=0.1)
    assert ctx.reference_cache.exists() and 0 < first["eval/scored_tokens"] < full["eval/scored_tokens"]

    monkeypatch.setattr(E, "sample", lambda *args, **kwargs: pytest.fail("pi_ref was sampled again"))
    other_run = make_eval_context(tiny_cfg, prefs, tiny_model, tokenizer, torch.device("cpu"))
    reused, _ = evaluate(load_causal_lm(tiny_path), other_run, implicit_beta=0.1)
    assert reused["eval/sampled_tokens"] == 0 and first["eval/sampled_tokens"] > 0
    # pi_ref's log-probs of the held-out pairs come from the profile's cache as well: nothing is scored again
    assert other_run.reference_pairs_cache.exists() and reused["eval/scored_tokens"] == 0
    for key, value in full.items():
        if not key.endswith(("seconds", "tokens", "flops")):
            assert reused[key] == pytest.approx(value, abs=1e-5), key

    with torch.no_grad():  # a trained policy is sampled for real (and `sample` now fails)
        next(policy.parameters()).add_(0.01)
    with pytest.raises(pytest.fail.Exception, match="sampled again"):
        evaluate(policy, other_run)


def test_a_reward_models_heldout_scores_are_kept_in_its_folder_and_read_back(
    tiny_cfg, tiny_path, tokenizer, tmp_path, monkeypatch
):
    """The reward-model stage scores the held-out pairs once; every run evaluated against the saved model reads the
    accuracy and margin back instead of scoring them again, unless the pairs would be scored differently."""
    import dataclasses

    import rlhf.evaluate as E
    from rlhf.models import load_scalar_model, save_model

    def cost():
        return dict.fromkeys(("scoring_seconds", "scored_tokens", "flops"), 0)

    cpu, prefs = torch.device("cpu"), build_preferences(tiny_cfg)
    rm = load_scalar_model(tiny_path, tokenizer.pad_token_id)
    stage, spent = make_eval_context(tiny_cfg, prefs, None, tokenizer, cpu), cost()
    computed = E.heldout_pair_metrics(None, stage, rm, None, spent)
    assert spent["scored_tokens"] > 0
    save_model(rm, tokenizer, tmp_path / "rm")
    E.store_rm_pair_metrics(tmp_path / "rm", stage, computed)

    saved = load_scalar_model(str(tmp_path / "rm"), tokenizer.pad_token_id)
    with monkeypatch.context() as m:
        m.setattr(E, "reward_scores", lambda *a, **k: pytest.fail("the reward model scored the pairs again"))
        run, spent = make_eval_context(tiny_cfg, prefs, None, tokenizer, cpu), cost()
        read = E.heldout_pair_metrics(None, run, saved, None, spent)
        assert spent["scored_tokens"] == 0 and spent["flops"] == 0
        for key in ("heldout/rm_accuracy", "heldout/rm_margin"):
            assert read[key] == computed[key], key
        # other batches pad the pairs otherwise (and other arithmetic rounds otherwise): scored again, not read
        batched = dataclasses.replace(tiny_cfg, eval=dataclasses.replace(tiny_cfg.eval, batch_size=3))
        with pytest.raises(pytest.fail.Exception, match="scored the pairs again"):
            E.heldout_pair_metrics(None, make_eval_context(batched, prefs, None, tokenizer, cpu), saved, None)
