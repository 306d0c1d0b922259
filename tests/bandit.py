"""The seed's eq. (5) on an autoregressive bandit, run through the project's own code.

One prompt; responses of up to 3 tokens over {a, b, EOS} (EOS may end them early): 15 sequences. The policy is a
table of next-token logits per response prefix, presented as a causal LM (`BanditLM`, a transformers model whose
"hidden state" is the one-hot prefix and whose LM head is the table), with a tokenizer, so the real `sample`,
`response_logprobs`, `TokenValueModel`, PPO iteration (ppo/train.py) and DPO trainer (dpo/trainer.py, TRL's
DPOTrainer) run on it unchanged. With a known sequence reward r(y), the KL-regularised optimum

    pi*(y) = pi_ref(y) exp(r(y) / beta) / Z                                                      (5)

is computed exactly over every sequence, and each method's policy is compared with it in total variation.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

import rloo
from dpo.trainer import build_trainer
from ppo.train import Learner, TokenValueModel, make_optimizer, ppo_iteration
from rlhf.config import Config, PPOConfig
from rlhf.online import reward_function
from rlhf.sequences import SequenceBatch, pad_sequences, response_logprobs

VOCAB = ["<pad>", "<eos>", "q", "a", "b"]
PAD, EOS, PROMPT, A, B = range(len(VOCAB))
MAX_TOKENS = 3
# Response prefixes as a binary tree over {a, b}: root 0, children of s at 2s+1 (a) and 2s+2 (b); prefixes of 0-2
# tokens are states 0-6. OUTSIDE is every position that predicts no response token (padding, after EOS or the cap):
# its hidden state is zero, so its next-token distribution is uniform and has no parameter (the EOS TRL appends to a
# response cut at the cap has the same probability under pi_theta and pi_ref).
N_PREFIXES, OUTSIDE = 7, 7
SEQUENCES = [p + (EOS,) for n in range(MAX_TOKENS) for p in itertools.product((A, B), repeat=n)] + list(
    itertools.product((A, B), repeat=MAX_TOKENS)
)

# pi_ref(next token | prefix) over (a, b, EOS): not uniform, and shorter and longer answers both likely
PI_REF_NEXT = {
    0: (0.45, 0.35, 0.20),
    1: (0.35, 0.35, 0.30),
    2: (0.35, 0.35, 0.30),
    3: (0.3, 0.3, 0.4),
    4: (0.3, 0.3, 0.4),
    5: (0.3, 0.3, 0.4),
    6: (0.3, 0.3, 0.4),
}
BETA = 1.0


def reward(y: tuple[int, ...]) -> float:
    """r(y): b is good, a is bad, ending on a after two tokens is good, running into the cap is bad. It depends on
    every token, the last ones included, so misplacing the score or mis-weighting long responses shows."""
    tokens = [t for t in y if t != EOS]
    return (
        tokens.count(B)
        - 0.6 * tokens.count(A)
        + (0.5 if len(tokens) >= 2 and tokens[-1] == A else 0.0)
        - (0.3 if EOS not in y else 0.0)
    )


REWARD = torch.tensor([reward(y) for y in SEQUENCES], dtype=torch.float64)


def prefix_states(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] token ids -> [B, L] prefix state after each position: 0 at the prompt token, then down the tree while
    the tokens are a or b, OUTSIDE elsewhere."""
    states, s = torch.empty_like(input_ids), torch.full_like(input_ids[:, 0], OUTSIDE)
    for j in range(input_ids.shape[1]):
        t = input_ids[:, j]
        grows = (s < N_PREFIXES // 2) & ((t == A) | (t == B))  # an inner node, extended by a response token
        s = torch.where(t == PROMPT, 0, torch.where(grows, 2 * s + 1 + (t == B).long(), OUTSIDE))
        states[:, j] = s
    return states


class BanditConfig(PretrainedConfig):
    model_type = "bandit"

    def __init__(self, **kwargs):
        kwargs = {"pad_token_id": PAD, "eos_token_id": EOS, **kwargs}
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size = len(VOCAB), N_PREFIXES
        self.auto_map = {}  # no remote code: read by TRL and transformers when they load a class not their own


class PrefixEncoder(nn.Module):
    """The backbone: the one-hot prefix state at every position, as a last hidden state."""

    def forward(self, input_ids: torch.Tensor, **_: object) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=F.one_hot(prefix_states(input_ids), N_PREFIXES + 1)[..., :-1].float())


class BanditLM(PreTrainedModel):
    """A tabular autoregressive policy as a causal LM: logits = lm_head(one-hot prefix), the head's weight being the
    table of next-token logits, initialised to log pi_ref. Runs `response_logprobs` (logits_to_keep), TRL's fused
    log-prob head (backbone + get_output_embeddings) and `sample` (the `generate` below)."""

    config_class = BanditConfig
    base_model_prefix = "backbone"

    def __init__(self, config: BanditConfig):
        super().__init__(config)
        self.backbone = PrefixEncoder()
        self.generation_config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS)  # what TRL reads and sets
        self.lm_head = nn.Linear(N_PREFIXES, len(VOCAB), bias=False)
        with torch.no_grad():
            table = torch.full((N_PREFIXES, len(VOCAB)), -1e4)  # pad and prompt tokens: never sampled
            for s, probs in PI_REF_NEXT.items():
                table[s, [A, B, EOS]] = torch.tensor(probs).log()
            self.lm_head.weight.copy_(table.T)
        self.post_init()  # what from_pretrained expects of a model class (TRL loads pi_ref this way)

    def _init_weights(self, module: nn.Module) -> None:  # the table is set in __init__
        pass

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: object) -> CausalLMOutput:
        hidden = self.backbone(input_ids).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden[:, -logits_to_keep:]))

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, generation_config: GenerationConfig | None = None, **kwargs: object
    ) -> torch.Tensor:
        """Ancestral sampling, as transformers' `generate` does it with these arguments (pad after EOS). They come as
        keywords (`sample`) or in a GenerationConfig (TRL's RLOOTrainer, whose EOS is a list of ids)."""
        g = {**(generation_config.to_dict() if generation_config is not None else {}), **kwargs}
        assert g["do_sample"] and not g["top_k"] and g["top_p"] == 1.0, "pure ancestral sampling only"
        eos = g["eos_token_id"] if isinstance(g["eos_token_id"], list) else [g["eos_token_id"]]
        assert eos == [EOS], eos
        ids, done = input_ids, torch.zeros_like(input_ids[:, 0], dtype=torch.bool)
        for _ in range(g["max_new_tokens"]):
            probs = torch.softmax(self(ids, logits_to_keep=1).logits[:, -1] / g["temperature"], dim=-1)
            token = torch.where(done, g["pad_token_id"], torch.multinomial(probs, 1).squeeze(1))
            done |= token == EOS
            ids = torch.cat([ids, token[:, None]], dim=1)
        return ids


# TRL's RLOOTrainer loads its own pi_ref from the policy's folder, by the config's model type
AutoConfig.register(BanditConfig.model_type, BanditConfig)
AutoModelForCausalLM.register(BanditConfig, BanditLM)


class BanditScalarModel(PreTrainedModel):
    """A scalar model in the layout `TokenValueModel` reads (backbone + `score` head): a table of V per prefix."""

    config_class = BanditConfig
    base_model_prefix = "backbone"

    def __init__(self, config: BanditConfig):
        super().__init__(config)
        self.backbone = PrefixEncoder()
        self.score = nn.Linear(N_PREFIXES, 1, bias=False)
        nn.init.zeros_(self.score.weight)

    def _init_weights(self, module: nn.Module) -> None:
        pass


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB (words split on spaces): the prompt is "q", a response " a b"."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def all_sequences() -> SequenceBatch:
    """Every response, EOS included where it has one, after the prompt."""
    return pad_sequences([[PROMPT]] * len(SEQUENCES), [list(y) for y in SEQUENCES], PAD)


@torch.no_grad()
def distribution(model: nn.Module) -> torch.Tensor:
    """pi(y) of every sequence, exactly: exp of the summed `response_logprobs`."""
    return response_logprobs(model, all_sequences())[0].sum(dim=1).double().exp()


PI_REF = distribution(BanditLM(BanditConfig()))


def optimum(beta: float = BETA) -> torch.Tensor:
    """Eq. (5): pi_ref exp(r / beta) / Z, over every sequence."""
    return torch.softmax(PI_REF.log() + REWARD / beta, dim=0)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance between two distributions over the sequences."""
    return 0.5 * (p - q).abs().sum().item()


def sequence_code(y: tuple[int, ...]) -> int:
    """A response's token ids read as a base-|V| number (padding, id 0, adds nothing)."""
    return sum(t * len(VOCAB) ** j for j, t in enumerate(y))


def batch_codes(batch: SequenceBatch) -> torch.Tensor:
    """`sequence_code` of every response of a batch, [B]."""
    ids = F.pad(batch.response_ids * batch.response_mask, (0, MAX_TOKENS - batch.response_ids.shape[1]))
    return (ids * len(VOCAB) ** torch.arange(MAX_TOKENS)).sum(dim=1)


_REWARD_BY_CODE = torch.zeros(len(VOCAB) ** MAX_TOKENS)
_REWARD_BY_CODE[[sequence_code(y) for y in SEQUENCES]] = REWARD.float()


def sequence_reward(batch: SequenceBatch) -> torch.Tensor:
    """r(x, y) of each response of a batch, [B]: in place of the reward model's score."""
    return _REWARD_BY_CODE[batch_codes(batch)]


# PPO's settings on the bandit: large batches (sampling noise ~ sqrt(p(1 - p) / 512) per response), a learning rate a
# table of logits can take; V's table starts at 0 and must reach returns of order 1: a heavier value loss, unclipped
PPO = PPOConfig(
    iterations=60,
    rollout_batch_size=512,
    mini_batch_size=256,
    ppo_epochs=2,
    learning_rate=0.02,
    max_new_tokens=MAX_TOKENS,
    vf_coef=0.5,
    cliprange_value=10.0,
)


def ppo(beta: float = BETA, seed: int = 0, pc: PPOConfig = PPO) -> torch.Tensor:
    """PPO from pi_ref with the KL-penalised reward of eq. (2), r in place of r_phi: `pc.iterations` real iterations
    (`ppo.train.ppo_iteration`, with its optimizer and learning-rate schedule). Returns the final pi(y)."""
    torch.manual_seed(seed)
    config = BanditConfig()
    policy, value_model = BanditLM(config), TokenValueModel(BanditScalarModel(config))
    ref = BanditLM(config).requires_grad_(False)
    accelerator = Accelerator(cpu=True)
    optimizer, scheduler = make_optimizer(policy, value_model, pc, Config().weight_decay)  # every profile's
    policy, value_model, optimizer = accelerator.prepare(policy, value_model, optimizer)
    learner = Learner(
        policy,
        value_model,
        ref,
        sequence_reward,
        tokenizer(),
        accelerator,
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        amp=contextlib.nullcontext,
    )
    for iteration in range(1, pc.iterations + 1):
        ppo_iteration(learner, ["q"] * pc.rollout_batch_size, beta, pc, pc.mini_batch_size, f"bandit {iteration}")
        scheduler.step()
    return distribution(accelerator.unwrap_model(policy))


def preference_pairs(n_pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(winner, loser) sequence indices of about `n_pairs` pairs of distinct responses drawn from pi_ref, labelled by
    Bradley-Terry on r, P(y1 > y2) = sigmoid(r1 - r2), with stratified labels: of the c pairs of y1 and y2, y1 wins
    round(c sigmoid(r1 - r2)). The minimiser of eq. (6) on these pairs is then pi* up to that rounding (TV ~0.005
    for 6000 pairs), where independently drawn labels would leave it ~0.015 away (the Bradley-Terry MLE's sampling
    error, measured for 40000 pairs): the test is of the implementation, not of label noise."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(PI_REF, 2 * n_pairs, replacement=True, generator=g).view(-1, 2)
    drawn = drawn[drawn[:, 0] != drawn[:, 1]].sort(dim=1).values
    winners, losers = [], []
    for (i, j), count in zip(*torch.unique(drawn, dim=0, return_counts=True)):
        wins = round(count.item() * torch.sigmoid(REWARD[i] - REWARD[j]).item())
        winners += [i] * wins + [j] * (count.item() - wins)
        losers += [j] * wins + [i] * (count.item() - wins)
    order = torch.randperm(len(winners), generator=g)
    return torch.tensor(winners)[order], torch.tensor(losers)[order]


def text(y: tuple[int, ...]) -> str:
    """A response as text: " a b" (TRL appends the EOS)."""
    return "".join(f" {VOCAB[t]}" for t in y if t != EOS)


# DPO's settings on the bandit: Adam needs ~500 small steps to settle at the minimiser (an exact replica of the loss
# with these pairs: TV to pi* 0.005-0.008 over three seeds; 128-pair batches 0.010-0.015, 4 epochs 0.012-0.04)
DPO = {
    "dpo.learning_rate": 0.03,
    "dpo.batch_size": 64,
    "budget.epochs": 10,
    "dpo.lr_scheduler": "linear",
    "dpo.checkpoint_every": None,
    "model.precision": "fp32",
    "eval.batch_size": 4096,
}


def dpo(output_dir: Path, beta: float = BETA, n_pairs: int = 4000, seed: int = 0) -> torch.Tensor:
    """DPO (eq. 6) from pi_ref through the project's TRL path (`dpo.trainer.build_trainer`: TRL's DPOTrainer, pi_ref's
    log-probs precomputed by `response_logprobs`) on `preference_pairs`. Returns the final pi(y)."""
    torch.manual_seed(seed)
    winners, losers = preference_pairs(n_pairs, seed)
    pairs = Dataset.from_dict(
        {
            "prompt": ["q"] * len(winners),
            "chosen": [text(SEQUENCES[i]) for i in winners],
            "rejected": [text(SEQUENCES[i]) for i in losers],
        }
    )
    policy, ref = BanditLM(BanditConfig()), BanditLM(BanditConfig()).requires_grad_(False).eval()
    cfg = Config().with_values({"beta": beta, **DPO})
    build_trainer(cfg, policy, ref, tokenizer(), pairs, seed, output_dir, callbacks=[]).train()
    return distribution(policy)


# RLOO's settings on the bandit: 64 prompts x 2 completions a step, one REINFORCE pass each. Small batches do: at pi*,
# r(y) - beta log pi*(y)/pi_ref(y) = beta log Z for every y, so every leave-one-out advantage, and the gradient, is
# exactly 0 there whatever was sampled (measured: TV 0.0002 after 150 steps; 60 steps of 512 completions: 0.020)
RLOO = {
    "rloo.iterations": 150,
    "rloo.rollout_batch_size": 128,
    "rloo.num_generations": 2,
    "rloo.learning_rate": 0.05,
    "rloo.lr_scheduler": "linear",
    "rloo.max_new_tokens": MAX_TOKENS,
    "model.precision": "fp32",
}


def rloo_run(output_dir: Path, beta: float = BETA, seed: int = 0, settings: dict = RLOO) -> torch.Tensor:
    """RLOO from pi_ref through the project's TRL path (`rloo.build_trainer`: TRL's RLOOTrainer, eq. 2's KL on the
    sequence's reward), r in place of r_phi through `rlhf.online.reward_function`. Returns the final pi(y)."""
    torch.manual_seed(seed)
    BanditLM(BanditConfig()).save_pretrained(output_dir / "pi_ref")  # where TRL loads its pi_ref from
    policy = BanditLM.from_pretrained(output_dir / "pi_ref")
    cfg = Config().with_values({"beta": beta, **settings})
    prompts = Dataset.from_dict({"prompt": ["q"] * (cfg.rloo.rollout_batch_size // cfg.rloo.num_generations)})
    tok = tokenizer()
    rloo.build_trainer(
        cfg,
        policy,
        tok,
        prompts,
        reward_function(sequence_reward, tok, add_special_tokens=True),
        seed,
        output_dir / "rloo",
        callbacks=[],
    ).train()
    return distribution(policy)
