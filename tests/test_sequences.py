import torch

from rlhf.models import autocast
from rlhf.sequences import (
    SequenceBatch,
    encode_completions,
    response_logprobs,
    sample,
    sequence_scores,
    truncate_after_eos,
)


def test_truncate_after_eos_keeps_first_eos_and_pads_the_rest():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]])
    out, mask, ended = truncate_after_eos(ids, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert out.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def _hand_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """One unpadded sequence, token by token: log softmax(logits / T)[next token]."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0] / temperature
    out = []
    for j, tok in enumerate(response):
        row = logits[len(prompt) + j - 1]
        out.append((row[tok] - torch.logsumexp(row, dim=0)).item())
    return out


def test_response_logprobs_on_padded_batch_match_hand_gather(tiny_model, tokenizer):
    prompts = [[11, 12, 13, 14, 15], [21, 22]]  # different lengths -> left padding
    responses = [[31, 32, 2], [41, 42, 43, 44]]  # different lengths -> right padding
    pad = tokenizer.pad_token_id
    p_len, r_len = 5, 4
    batch = SequenceBatch(
        prompt_ids=torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompts]),
        response_ids=torch.tensor([r + [pad] * (r_len - len(r)) for r in responses]),
        response_mask=torch.tensor([[1] * len(r) + [0] * (r_len - len(r)) for r in responses]),
    )
    for temperature in (1.0, 0.7):
        with torch.no_grad():
            got, entropy = response_logprobs(tiny_model, batch, temperature, with_entropy=True)
        for i in range(2):
            want = _hand_logprobs(tiny_model, prompts[i], responses[i], temperature)
            assert torch.allclose(got[i, : len(want)], torch.tensor(want), atol=1e-5)
            assert (got[i, len(want) :] == 0).all()
        assert (entropy[0, :3] > 0).all() and entropy[0, 3] == 0


def test_encode_completions_splits_like_trl_and_appends_eos(tokenizer):
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    batch = encode_completions(tokenizer, [prompt, prompt + "x"], ["Hello there", "A much longer reply here"])
    assert tokenizer.decode(batch.prompt_ids[0][batch.prompt_mask[0] == 1]) == prompt
    r0 = batch.response_ids[0][batch.response_mask[0] == 1].tolist()
    assert r0[-1] == tokenizer.eos_token_id and tokenizer.decode(r0[:-1]) == "Hello there"
    assert batch.prompt_mask[0, 0] == 0  # the shorter prompt is left-padded


def test_sample_is_seeded_and_scores_are_per_sequence(tiny_model, tokenizer, tiny_path):
    from rlhf.models import load_scalar_model

    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nreview<|im_end|>\n"]
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    a = sample(tiny_model, tokenizer, prompts, 6, 1.0, autocast("fp32", cpu))
    torch.manual_seed(5)
    b = sample(tiny_model, tokenizer, prompts, 6, 1.0, autocast("fp32", cpu))
    assert torch.equal(a.response_ids, b.response_ids) and a.response_ids.shape == (2, 6)
    rm = load_scalar_model(tiny_path, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(rm, a)
        alone = sequence_scores(
            rm, SequenceBatch(a.prompt_ids[1:], a.prompt_mask[1:], a.response_ids[1:], a.response_mask[1:])
        )
    assert scores.shape == (2,) and torch.allclose(scores[1], alone[0], atol=1e-5)


def test_with_eos_terminates_only_cut_responses():
    from rlhf.sequences import with_eos

    eos, pad = 2, 0
    batch = SequenceBatch(
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.long),
        torch.tensor([[5, 2, 0], [5, 6, 7]]),
        torch.tensor([[1, 1, 0], [1, 1, 1]]),
    )
    out = with_eos(batch, eos, pad)
    assert out.response_ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 2]]
    assert out.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert with_eos(out, eos, pad) is out  # already terminated: unchanged


def test_pad_token_differs_from_eos_so_the_reward_head_reads_eos(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_a_tokenizer_that_adds_bos_gets_one_bos_and_trls_ids_everywhere(tiny_path):
    """Llama 3-style: the tokenizer adds BOS to every text and the chat template writes BOS too (SmolLM2's BOS,
    <|im_start|>, also opens its template). Prompts, sampled batches and held-out pairs must carry the ids TRL's
    trainers train on (they tokenise text with the tokenizer's special tokens: trl.data_utils._tokenize), with
    one BOS, not two."""
    from rlhf.models import load_tokenizer
    from rlhf.sequences import tokenize_prompts
    from rlhf.tasks import format_prompt

    plain = load_tokenizer(tiny_path)
    messages = [{"role": "user", "content": "Review a film."}]
    tokenizer = load_tokenizer(tiny_path)
    tokenizer.add_bos_token = True
    bos = tokenizer.bos_token_id
    assert plain("a").input_ids[0] != bos and tokenizer("a").input_ids[0] == bos

    prompt = format_prompt(tokenizer, messages, None)
    ids = tokenize_prompts(tokenizer, [prompt])[0][0].tolist()
    assert ids == tokenizer(prompt).input_ids and ids[0] == bos and ids[1] != bos
    # the same ids as without the tokenizer's BOS, where the template's BOS stays in the text
    assert ids == tokenize_prompts(plain, [format_prompt(plain, messages, None)])[0][0].tolist()
    batch = encode_completions(tokenizer, [prompt], ["Great film."])
    assert (
        batch.prompt_ids[0].tolist() + batch.response_ids[0].tolist()
        == tokenizer(prompt + "Great film." + tokenizer.eos_token).input_ids
    )


def test_a_tokenizer_that_appends_eos_to_every_text_is_refused(tiny_path, tmp_path):
    import pytest

    from rlhf.errors import UserError
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_path)
    tokenizer.add_eos_token = True
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="appends a special token to every text it encodes"):
        load_tokenizer(str(tmp_path))


def test_both_sides_of_a_pair_are_cut_where_the_first_diverges_from_the_prompt(tokenizer):
    """A prompt cut mid-word (imdb's review prefixes): a completion's first token can merge with the prompt's last.
    TRL's DPOTrainer then starts both completions where the first of them diverges from the tokenised prompt."""
    from rlhf.sequences import encode_pairs

    prompt, chosen, rejected = "I loved this mov", "ie, a lot", " and the book"
    alone = tokenizer(prompt).input_ids
    full = {c: tokenizer(prompt + c + tokenizer.eos_token).input_ids for c in (chosen, rejected)}
    assert full[chosen][: len(alone)] != alone and full[rejected][: len(alone)] == alone  # "mov"+"ie" merge
    pair = encode_pairs(tokenizer, [prompt], [chosen], [rejected])
    cut = next(i for i, (a, b) in enumerate(zip(alone, full[chosen])) if a != b)
    for batch, completion in zip(pair, (chosen, rejected)):
        assert batch.prompt_ids[0].tolist() == alone[:cut]
        assert batch.response_ids[0].tolist() == full[completion][cut:]
    # one completion alone keeps its own cut
    assert encode_completions(tokenizer, [prompt], [rejected]).prompt_ids[0].tolist() == alone


def test_sampling_casts_each_linear_weight_once_and_computes_the_same_numbers(tiny_model, tokenizer, monkeypatch):
    import contextlib

    from rlhf import sequences

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    own = dict(tiny_model.named_parameters(remove_duplicate=False))
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nreview<|im_end|>\n"]
    ids = tokenizer(prompts[0], return_tensors="pt").input_ids
    with torch.inference_mode(), torch.autocast("cpu", dtype=bf16):
        plain = tiny_model(input_ids=ids).logits
        with sequences.linear_weights_cast(tiny_model, cpu):
            assert all(m.weight.dtype == bf16 for m in tiny_model.modules() if isinstance(m, torch.nn.Linear))
            assert tiny_model.get_input_embeddings().weight.dtype == torch.float32
            cast = tiny_model(input_ids=ids).logits
    assert torch.equal(plain, cast)  # autocast's own cast, done once
    assert all(p is own[n] for n, p in tiny_model.named_parameters(remove_duplicate=False))  # every weight given back

    def draw(**patch):
        for name, value in patch.items():
            monkeypatch.setattr(sequences, name, value)
        torch.manual_seed(3)
        return sample(tiny_model, tokenizer, prompts, 8, 1.0, torch.autocast("cpu", dtype=bf16)).response_ids

    cast_once = draw()
    assert torch.equal(cast_once, draw(linear_weights_cast=lambda model, device: contextlib.nullcontext()))
