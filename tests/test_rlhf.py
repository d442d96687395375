"""Tests for rlhf.py: python -m pytest -q tests/test_rlhf.py

The losses against hand-computed numbers (Bradley-Terry, GAE, whitening, the clipped surrogate's zero gradient
outside the clip range, the clipped value loss, k3, GRPO's group advantages, the KL controller), the reward head
read at the last answer token whatever the padding, the shared prefill equal to separate prefills, the sampled
<|end|> inside the policy-gradient mask, the flawed teacher, and runs from the session's SFT checkpoint
(tests/conftest.py): a reward model above chance on held-out pairs, a short GRPO run that raises the mean reward,
a PPO step, one-line errors.
"""
import copy
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import tiktoken
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import dpo  # noqa: E402
import rlhf  # noqa: E402
import sft  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from model import GPT, config_from_preset  # noqa: E402

RT = train.Runtime("cpu", "cpu", torch.float32)
KINDS = ["copy", "reverse", "sort"]


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


# --- losses ---

def test_bradley_terry_loss_on_hand_made_numbers():
    loss = rlhf.bt_loss(t(2.0, 0.0, -1.0), t(0.0, 0.0, 1.0))
    expected = [math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2))]
    assert torch.allclose(loss, t(*expected))


def test_gae_matches_a_hand_computed_example_with_masks():
    # one row: 2 prompt positions (mask 0), 3 answer tokens, 1 pad
    mask = t(0, 0, 1, 1, 1, 0).unsqueeze(0)
    rewards = t(0, 0, 0.1, 0.2, 1.0, 0).unsqueeze(0)
    values = t(0, 0, 0.5, 0.4, 0.3, 0).unsqueeze(0)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        d2 = 1.0 - 0.3                          # last token: no next value
        d1 = 0.2 + gamma * 0.3 - 0.4
        d0 = 0.1 + gamma * 0.4 - 0.5
        a2 = d2
        a1 = d1 + gamma * lam * a2
        a0 = d0 + gamma * lam * a1
        adv, ret = rlhf.gae(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, t(0, 0, a0, a1, a2, 0).unsqueeze(0))
        assert torch.allclose(ret, (adv + values) * mask)


def test_whitening_gives_mean_zero_std_one_on_the_mask_only():
    x, mask = t(1, 2, 3, 100), t(1, 1, 1, 0)
    w = rlhf.whiten(x, mask)
    assert w[3] == 0 and abs(float(w[:3].mean())) < 1e-9
    assert abs(float((w[:3] ** 2).mean()) - 1) < 1e-6


def test_clipped_surrogate_gradient_is_zero_outside_the_clip_range():
    old = torch.zeros(4, dtype=torch.float64)
    logp = torch.log(t(1.5, 0.5, 1.5, 1.05)).requires_grad_()  # ratios 1.5, 0.5, 1.5, 1.05
    adv = t(1.0, -1.0, -1.0, 1.0)
    loss, clipped = rlhf.clipped_surrogate(logp, old, adv, 0.2)
    loss.sum().backward()
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0: past the clip on the side A pushes toward -> no gradient
    assert logp.grad[0] == 0 and logp.grad[1] == 0
    # ratio 1.5 with A < 0 (moving back is allowed) and 1.05 inside: gradient -A * ratio
    assert torch.allclose(logp.grad[2:], t(1.5, -1.05))
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]  # token 2: the unclipped branch wins, it has a gradient
    assert torch.allclose(loss, t(-1.2, 0.8, 1.5, -1.05))


def test_the_clip_fraction_counts_only_the_tokens_where_the_clipped_branch_wins():
    # past the range on the side A pushes toward (counted) or on the other side (not: the unclipped term wins)
    logp = torch.log(t(1.5, 0.5, 1.5, 0.5, 1.05, 0.95))
    adv = t(1.0, -1.0, -1.0, 1.0, 1.0, -1.0)
    assert rlhf.clipped_surrogate(logp, torch.zeros(6, dtype=torch.float64), adv, 0.2)[1].tolist() == [1, 1, 0, 0, 0, 0]
    # in general: counted exactly where the token's gradient is zero (TRL's pg_clipfrac)
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(200, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    adv = torch.randn(200, generator=g, dtype=torch.float64)
    loss, clipped = rlhf.clipped_surrogate(logp, torch.zeros(200, dtype=torch.float64), adv, 0.2)
    loss.sum().backward()
    assert 0 < clipped.sum() < 200 and torch.equal(clipped.bool(), logp.grad == 0)


def test_clipped_surrogate_at_ratio_one_is_the_policy_gradient():
    logp = torch.log(t(0.3, 0.6)).requires_grad_()
    adv = t(2.0, -1.0)
    rlhf.clipped_surrogate(logp, logp.detach(), adv, 0.2)[0].sum().backward()
    assert torch.allclose(logp.grad, -adv)  # d/dlogp of -A * exp(logp - old) at logp = old


def test_clipped_value_loss_takes_the_larger_error():
    v_old, ret = t(0.0, 0.0), t(1.0, 1.0)
    loss = rlhf.clipped_value_loss(t(0.5, 2.0), v_old, ret, 0.2)
    # row 0: (0.5-1)^2 = 0.25 vs clipped 0.2 -> (0.2-1)^2 = 0.64; row 1: (2-1)^2 = 1 vs (0.2-1)^2 = 0.64
    assert torch.allclose(loss, t(0.32, 0.5))


def test_k3_is_zero_at_the_reference_and_never_negative():
    logp = torch.randn(1000, dtype=torch.float64)
    assert torch.equal(rlhf.k3(logp, logp), torch.zeros_like(logp))
    assert (rlhf.k3(logp, torch.randn(1000, dtype=torch.float64)) >= 0).all()
    assert torch.allclose(rlhf.k3(t(0.0), t(math.log(2))), t(2 - math.log(2) - 1))


def test_group_advantages_zero_for_a_uniform_group_and_sum_zero_per_group():
    scores = t(1, 0, 0, 1, 1, 1, 1, 1).view(2, 4)
    adv = rlhf.group_advantages(scores, 1e-4)
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(adv[0], t(0.5, -0.5, -0.5, 0.5) / (0.5 + 1e-4))
    assert abs(float(adv.sum(dim=1)[0])) < 1e-9


def test_group_advantage_scales_match_trls_scale_rewards_and_the_population_default():
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G, eps = 8, 1e-4
    centred = scores - scores.mean(dim=1, keepdim=True)
    pop = (centred ** 2).sum(dim=1, keepdim=True).div(G).sqrt()             # forge: divided by G
    sample = (centred ** 2).sum(dim=1, keepdim=True).div(G - 1).sqrt()      # TRL "group", DeepSeekMath: G - 1
    flat = scores.flatten()
    batch = ((flat - flat.mean()) ** 2).sum().div(flat.numel() - 1).sqrt()  # TRL "batch": std of every reward
    torch.testing.assert_close(rlhf.group_advantages(scores, eps), centred / (pop + eps))
    torch.testing.assert_close(rlhf.group_advantages(scores, eps, "group_sample"), centred / (sample + eps))
    torch.testing.assert_close(rlhf.group_advantages(scores, eps, "batch"), centred / (batch + eps))
    torch.testing.assert_close(rlhf.group_advantages(scores, eps, "none"), centred)
    ratio = rlhf.group_advantages(scores, 0.0) / rlhf.group_advantages(scores, 0.0, "group_sample")
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(G / (G - 1))))


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    assert rlhf.adapt_kl(0.1, 2.0, 1.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped at +0.2
    assert rlhf.adapt_kl(0.1, 0.9, 1.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert rlhf.adapt_kl(0.1, 1.0, 1.0, 100, 1000) == pytest.approx(0.1)


# --- models and rollouts ---

def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(config_from_preset("tiny", vocab_size=64, block_size=32)).eval()


def test_reward_head_reads_the_last_answer_token_whatever_the_padding():
    rm = rlhf.scalar_head(tiny(), std=0.5)
    rows = [[1, 2, 3, 4, 5], [6, 7, 8]]
    ids, lengths = rlhf.pad_right(rows, 0)
    scores = rlhf.last_token_scores(rm, ids, lengths)
    alone = [rlhf.last_token_scores(rm, torch.tensor([r]), torch.tensor([len(r)])) for r in rows]
    more_pad = torch.cat([ids, torch.full((2, 7), 63)], dim=1)
    assert torch.allclose(scores, torch.cat(alone), atol=1e-6)
    assert torch.allclose(rlhf.last_token_scores(rm, more_pad, lengths), scores, atol=1e-6)
    assert rm(ids)[0].shape == (2, 5, 1)


def test_the_kl_estimate_is_zero_when_the_policy_equals_the_reference():
    model = tiny()
    x = torch.randint(1, 64, (3, 10))
    y = torch.where(torch.arange(10) >= 6, torch.randint(1, 64, (3, 10)), torch.full((3, 10), -1))
    logp, _ = rlhf.token_stats(model, x, y, RT, 2)
    ref, _ = rlhf.token_stats(copy.deepcopy(model), x, y, RT, 3)
    assert torch.equal((rlhf.k3(logp, ref) * (y != -1)).sum(), torch.zeros(()))
    # and not because the log-probs are trivial: they are the model's, and another model is measurably apart
    mask = y != -1
    assert (logp[mask] < 0).all() and (logp[~mask] == 0).all()
    other, _ = rlhf.token_stats(tiny(1), x, y, RT, 3)
    assert float((rlhf.k3(logp, other) * mask).sum()) > 0.01


def test_log_probs_ratios_and_k3_use_the_sampling_temperature():
    model = tiny()
    x = torch.randint(1, 64, (3, 10))
    y = torch.where(torch.arange(10) >= 6, torch.randint(1, 64, (3, 10)), torch.full((3, 10), -1))
    mask = (y != -1).float()
    logp, ent = rlhf.token_stats(model, x, y, RT, 2, temperature=0.5)
    with torch.no_grad():
        tempered = torch.log_softmax(model(x)[0] / 0.5, dim=-1)
    assert torch.allclose(logp, tempered.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, atol=1e-6)
    assert torch.allclose(ent, -(tempered.exp() * tempered).sum(-1) * mask, atol=1e-5)
    # the losses read the same distribution: at the rollout's own policy the ratio is 1 (nothing clipped), k3 is 0
    adv = torch.randn(3, 1).expand(3, 10) * mask
    cfg = rlhf.derive(rlhf.RLConfig(temperature=0.5, kl_coef=1.0))
    stats = []
    with torch.no_grad():
        loss = rlhf.grpo_loss_fn(cfg, stats)(model, (x, y, logp, logp, adv))
    assert loss.item() == pytest.approx(float(-(adv * mask).sum()), abs=1e-4) and stats[0][0] == 0
    module = rlhf.ActorCritic(model, rlhf.scalar_head(copy.deepcopy(model)))  # value 0 everywhere: no value loss
    stats, zero = [], torch.zeros(3, 10)
    with torch.no_grad():
        loss = rlhf.ppo_loss_fn(replace(cfg, algo="ppo"), stats)(module, (x, y, logp, zero, adv, zero))
    assert loss.item() == pytest.approx(float(-(adv * mask).sum()), abs=1e-4) and stats[0][0] == 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_types_match_trls_aggregation_over_micro_batches(loss_type):
    model = tiny()
    x = torch.randint(1, 64, (4, 10))
    start = torch.tensor([[2], [5], [7], [8]])                 # answers of 8, 5, 3 and 2 tokens
    y = torch.where(torch.arange(10) >= start, torch.randint(1, 64, (4, 10)), torch.full((4, 10), -1))
    mask = (y != -1).float()
    cfg = rlhf.derive(rlhf.RLConfig(kl_coef=0.5, loss_type=loss_type, max_new_tokens=12))
    logp, _ = rlhf.token_stats(model, x, y, RT, 4)
    ref = (logp - 0.3 * torch.rand(4, 10, generator=torch.Generator().manual_seed(1))) * mask
    adv = torch.randn(4, 1, generator=torch.Generator().manual_seed(2)).expand(4, 10) * mask
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    micro = [tuple(v[i:i + 2] for v in (x, y, logp, ref, adv)) for i in (0, 2)]
    loss, _ = train.train_step(model, optimizer, micro, RT, 1.0, rlhf.grpo_loss_fn(cfg, []), rlhf.grpo_count(cfg))
    # TRL GRPOTrainer: at the rollout's policy the ratio is 1, so per_token_loss = -A + beta * k3, then
    per_token = (-adv + 0.5 * rlhf.k3(logp, ref)) * mask
    trl = {"grpo": (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),
           "dapo": per_token.sum() / mask.sum(),
           "dr_grpo": per_token.sum() / (per_token.size(0) * 12)}[loss_type]
    assert loss == pytest.approx(float(trl), abs=1e-5)


def test_shared_prefill_gives_the_same_samples_as_separate_prefills(sft_checkpoint):
    model, tokenizer, _, _ = sft.load_base(sft_checkpoint["ckpt"])
    examples = tasks.generate("reverse", 3, 0, "train", 1) + tasks.generate("copy", 2, 0, "train", 2)
    cfg = rlhf.RLConfig(max_new_tokens=10, temperature=1.0)
    shared = rlhf.sample(model.eval(), tokenizer, examples, RT, cfg, 4, 7, True)
    separate = rlhf.sample(model, tokenizer, examples, RT, cfg, 4, 7, False)
    assert shared == separate and len(shared) == 20
    assert len({tuple(a) for a in shared[:4]}) > 1  # the copies of one prompt sample apart


def test_rollout_batch_keeps_the_sampled_end_token_inside_the_mask():
    ro = rlhf.Rollout([None] * 2, [[1, 2, 3], [4, 5]], [[7, 8, 9], [10]], ["", ""], [1.0, 0.0], [1.0, 0.0])
    x, y, last = rlhf.rollout_batch(ro, 0)
    assert y[0].tolist() == [-1, -1, 7, 8, 9]          # 9 is the sampled stop token: trained
    assert y[1].tolist() == [-1, 10, -1, -1, -1]
    assert last.tolist() == [4, 1] and x[0, 4] == 8


def test_ppo_rewards_are_the_score_on_the_last_token_minus_beta_times_the_log_ratio():
    old, ref = t(0, -1.0, -2.0, -0.5, 0).unsqueeze(0), t(0, -1.5, -1.0, -0.5, 0).unsqueeze(0)
    mask = t(0, 1, 1, 1, 0).unsqueeze(0)
    r = rlhf.ppo_rewards(old, ref, mask, t(2.0), torch.tensor([3]), 0.1)
    assert torch.allclose(r, t(0, -0.1 * 0.5, -0.1 * -1.0, 2.0, 0).unsqueeze(0))


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_one_rl_step_raises_the_rewarded_answer_and_lowers_the_other(algo):
    # one prompt, two answers (the second ends with the stop token 63), reward 1 and 0: one step on a tiny model
    policy = tiny(3)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value = rlhf.scalar_head(copy.deepcopy(policy)) if algo == "ppo" else None
    module = rlhf.ActorCritic(policy, value) if value is not None else policy
    cfg = rlhf.derive(rlhf.RLConfig(algo=algo, group_size=2, epochs=1, minibatches=1, lr=1e-3))
    ro = rlhf.Rollout([None] * 2, [[1, 2, 3, 4]] * 2, [[5, 6, 7], [8, 9, 63]], ["", ""], [1.0, 0.0], [1.0, 0.0])
    x, y, _ = rlhf.rollout_batch(ro, 0)

    def answer_logps():
        return rlhf.token_stats(policy, x, y, RT, 8)[0].sum(dim=1)

    before = answer_logps()
    optimizer = train.build_optimizer(module, cfg.lr, 0.0)
    rlhf.rl_step(cfg, ro, policy, reference, value, module, optimizer, RT, 0, 63)
    after = answer_logps()
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3, (before, after)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_with_equal_scores_the_kl_term_alone_pulls_the_policy_toward_the_reference(algo):
    # the reference is another model and every answer scores 0: the only signal is the KL term (ppo: -beta log-ratio
    # in the rewards; grpo: beta k3 in the loss), so one step lowers the answers' log-ratio to the reference
    policy, reference = tiny(3), tiny(4).requires_grad_(False)
    value = rlhf.scalar_head(copy.deepcopy(policy)) if algo == "ppo" else None
    module = rlhf.ActorCritic(policy, value) if value is not None else policy
    cfg = rlhf.derive(rlhf.RLConfig(algo=algo, group_size=2, epochs=1, minibatches=1, lr=1e-4, kl_coef=1.0))
    ro = rlhf.Rollout([None] * 2, [[1, 2, 3, 4]] * 2, [[5, 6, 7, 8, 63], [9, 10, 11, 63]], ["", ""], [0.0, 0.0],
                      [0.0, 0.0])
    x, y, _ = rlhf.rollout_batch(ro, 0)
    ref = rlhf.token_stats(reference, x, y, RT, 8)[0]

    def kl():
        return float(rlhf.k3(rlhf.token_stats(policy, x, y, RT, 8)[0], ref).sum())

    before = kl()
    rlhf.rl_step(cfg, ro, policy, reference, value, module, train.build_optimizer(module, cfg.lr, 0.0), RT, 0, 63)
    assert kl() < before - 1e-3, (before, kl())


def test_the_flawed_teacher_drops_the_carry_into_the_hundreds_only():
    ex = tasks.generate("add", 400, 0, "train", 2)
    carry = [e for e in ex if int(tasks.unspaced(e["answer"])) >= 100]
    plain = [e for e in ex if int(tasks.unspaced(e["answer"])) < 100]
    assert carry and plain
    assert all(tasks.flawed_answer(e, 1.0, random.Random(0)) == e["answer"] for e in plain)
    wrong = [tasks.flawed_answer(e, 1.0, random.Random(0)) for e in carry]
    assert all(w == tasks.spaced(int(tasks.unspaced(e["answer"])) - 100) for w, e in zip(wrong, carry))
    assert all(not tasks.score("add", e["prompt"], w) for w, e in zip(wrong, carry))
    assert all(tasks.flawed_answer(e, 0.0, random.Random(0)) == e["answer"] for e in carry)


def test_the_flawed_sorting_teacher_writes_a_repeated_letter_once_at_the_error_rate():
    ex = tasks.generate("sort", 2000, 0, "train", 3)
    repeats = [e for e in ex if len(set(tasks.unspaced(e["answer"]))) < len(tasks.unspaced(e["answer"]))]
    distinct = [e for e in ex if e not in repeats]
    assert 0.45 < len(repeats) / len(ex) < 0.7  # 7 letters of 26: 59% hold a repeat
    assert all(tasks.flawed_answer(e, 1.0, random.Random(0)) == e["answer"] for e in distinct)
    for e in repeats[:50]:
        w = tasks.flawed_answer(e, 1.0, random.Random(0))
        assert w.split() == sorted(set(e["answer"].split())) and not tasks.score("sort", e["prompt"], w)
    rng = random.Random(1)
    share = sum(tasks.flawed_answer(e, 0.6, rng) != e["answer"] for e in repeats) / len(repeats)
    assert 0.55 < share < 0.65
    with pytest.raises(tasks.TaskError, match="no flawed teacher for kind 'copy'"):
        tasks.teacher_mistake("copy", ex[0]["prompt"].replace("Sort the letters", "Copy this"))


# --- runs from the session's SFT checkpoint ---

def test_the_default_init_is_the_checkpoint_dpo_names_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/sft")
    os.makedirs("out/dpo/best")
    for path in ("out/sft/ckpt_000100.pt", "out/dpo/ckpt_000060.pt", "out/dpo/best/ckpt_000020.pt"):
        open(path, "w").close()
    assert rlhf.find_init(None) == os.path.join("out/dpo/best", "ckpt_000020.pt")  # a DPO run under way: its best
    with open("out/dpo/summary.json", "w") as f:
        json.dump({"stage": "dpo", "checkpoint": "out/dpo/best/ckpt_000020.pt", "best": {"step": 20}}, f)
    assert rlhf.find_init(None) == "out/dpo/best/ckpt_000020.pt"  # a finished one: the checkpoint it names
    assert rlhf.find_init("out/sft") == "out/sft/ckpt_000100.pt"   # a given path wins
    for path in ("out/dpo/summary.json", "out/dpo/ckpt_000060.pt", "out/dpo/best/ckpt_000020.pt"):
        os.remove(path)
    assert rlhf.find_init(None) == os.path.join("out/sft", "ckpt_000100.pt")  # no DPO: the newest SFT checkpoint


def cfg_for(sft_checkpoint, tmp_path, **kw):
    base = dict(init=sft_checkpoint["ckpt"], kinds=KINDS, difficulties=[1], device="cpu", eval_examples=20,
                pass_k=4, pass_examples=8, max_new_tokens=12, log_every=100, out_dir=str(tmp_path / "run"))
    return rlhf.derive(rlhf.RLConfig(**{**base, **kw}))


def test_reward_model_ranks_held_out_pairs_above_chance_and_saves_a_checkpoint(sft_checkpoint, tmp_path):
    # A preference the tiny model can learn and carry to new prompts: the right answer over a refusal of a harmless
    # request. (On its own on-policy pairs, right vs wrong answers that differ in a letter, the tiny reward model
    # lands at 0.49-0.58 held out depending on float noise: it memorises its few hundred pairs.)
    import json
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for kind in ("copy", "reverse", "sort"):
            for ex in tasks.generate(kind, 80, 0, "train", 1):
                f.write(json.dumps({"prompt": ex["prompt"], "chosen": ex["answer"], "rejected": tasks.REFUSAL}) + "\n")
    cfg = cfg_for(sft_checkpoint, tmp_path, train_reward_model=True, pairs=str(pairs), max_steps=60, eval_every=60,
                  val_fraction=0.3)
    s = rlhf.train_reward_model(cfg, RT)
    assert s["held_out"]["accuracy"] > 0.9, s["held_out"]
    assert s["stage"] == "reward_model" and os.path.exists(s["checkpoint"])
    pytest.reward_model = s["checkpoint"]  # for the PPO test below
    ckpt = train.load_checkpoint(s["checkpoint"])
    assert ckpt["stage"] == "reward_model" and ckpt["model"]["lm_head.weight"].shape[0] == 1


def test_a_short_grpo_run_raises_the_mean_reward(sft_checkpoint, tmp_path):
    # an easy setting: one kind, a small pool of prompts seen again and again, a high learning rate
    cfg = cfg_for(sft_checkpoint, tmp_path, algo="grpo", kinds=["sort"], pool_size=8, max_steps=16,
                  prompts_per_step=8, lr=1e-3, eval_every=16)
    s = rlhf.run_rl(cfg, RT)
    records = train.read_metrics(cfg.out_dir)
    first = sum(r["reward"] for r in records[:4]) / 4
    last = sum(r["reward"] for r in records[-4:]) / 4
    assert last > first, [r["reward"] for r in records]
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert records[-1]["kl"] > 1e-3  # the updates moved the policy away from the reference, and k3 sees it
    assert all(0 <= r["zero_std_frac"] <= 1 for r in records)
    assert s["stage"] == "rlhf" and os.path.exists(s["checkpoint"]) and os.path.exists(s["plot"])
    assert set(s["pass_after"]) == {"pass@1", "pass@4"}
    model, _, _, _ = sft.load_base(s["checkpoint"])  # a checkpoint the next stage can load
    assert model.num_params() > 0


def test_ppo_on_the_reward_model_logs_every_metric_and_best_of_n(sft_checkpoint, tmp_path):
    path = getattr(pytest, "reward_model", None)
    if path is None:
        pytest.skip("needs the reward model of the test above")
    cfg = cfg_for(sft_checkpoint, tmp_path, algo="ppo", reward="model", reward_model=path, max_steps=3,
                  prompts_per_step=8, eval_every=3, kl_target=1.0, best_of_n=4)
    s = rlhf.run_rl(cfg, RT)
    rec = train.read_metrics(cfg.out_dir)[-1]
    for k in ("reward", "true_acc", "kl", "entropy", "clip_frac", "value_loss", "explained_var", "answer_len"):
        assert math.isfinite(rec[k]), k
    assert s["best_of_n"]["n"] == 4 and 0 <= s["best_of_n"]["accuracy"] <= s["best_of_n"]["oracle"]
    assert rec["kl_coef"] != 0.05  # the controller moved beta


class Stop(Exception):
    """Raised by a patched step: the run ends early."""


@pytest.mark.parametrize("mode", ["rl", "reward_model", "flawed_teacher", "compare"])
def test_a_fresh_run_of_every_mode_first_clears_an_earlier_summary_and_eval(sft_checkpoint, tmp_path, monkeypatch,
                                                                            mode):
    # pipeline.sh takes a folder with summary.json for complete and keeps its eval.json: a rerun stopped before its
    # end must leave neither of the earlier run's behind
    out = tmp_path / "run"
    out.mkdir()
    for name in ("summary.json", "eval.json"):
        (out / name).write_text("{}")

    def stop(*args, **kwargs):
        raise Stop

    cfg = cfg_for(sft_checkpoint, tmp_path, max_steps=2, pass_k=0, eval_examples=4)
    with pytest.raises(Stop):
        if mode == "rl":
            monkeypatch.setattr(rlhf, "rl_step", stop)
            rlhf.run_rl(cfg, RT)
        elif mode == "reward_model":
            pairs = tmp_path / "pairs.jsonl"
            tasks.write_jsonl(str(pairs), ({"prompt": e["prompt"], "chosen": e["answer"], "rejected": tasks.REFUSAL}
                                           for e in tasks.generate("copy", 40, 0, "train", 1)))
            monkeypatch.setattr(train, "train_step", stop)
            rlhf.train_reward_model(replace(cfg, train_reward_model=True, pairs=str(pairs)), RT)
        elif mode == "flawed_teacher":
            monkeypatch.setattr(sft, "main", stop)
            rlhf.flawed_teacher(replace(cfg, flawed_teacher=True), RT)
        else:
            monkeypatch.setattr(rlhf, "train_reward_model", stop)
            rlhf.compare(replace(cfg, compare=True), RT)
    assert not (out / "summary.json").exists() and not (out / "eval.json").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "rlhf.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_bad_input_is_one_line_and_exit_2(sft_checkpoint, tmp_path):
    r = run_cli("--init", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "python sft.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("--init", sft_checkpoint["ckpt"], "--algo", "grpo", "--group-size", "1")
    assert r.returncode == 2 and "--group-size 1" in r.stderr
    r = run_cli("--init", sft_checkpoint["ckpt"], "--reward", "model", "--reward-model", sft_checkpoint["ckpt"],
                "--kinds", *KINDS, "--difficulties", "1", "--out-dir", str(tmp_path / "o2"), "--device", "cpu")
    assert r.returncode == 2 and "not a reward model" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o2" / "summary.json")
    r = run_cli("--init", sft_checkpoint["ckpt"], "--kinds", *KINDS, "--difficulties", "1", "--max-new-tokens",
                "100000", "--out-dir", str(tmp_path / "o3"), "--device", "cpu")
    assert r.returncode == 2 and "does not fit the context" in r.stderr, r.stderr


def test_an_exploding_kl_stops_with_exit_1_and_names_the_metric(sft_checkpoint, tmp_path):
    cfg = cfg_for(sft_checkpoint, tmp_path, max_steps=6, prompts_per_step=8, lr=0.05, kl_max=1e-3, eval_every=50,
                  save_every=1)
    with pytest.raises(train.Diverged, match="KL to the reference"):
        rlhf.run_rl(cfg, RT)
    assert os.path.exists(os.path.join(cfg.out_dir, "rlhf.png"))  # the curves up to the stop are kept
    assert not os.path.exists(os.path.join(cfg.out_dir, "summary.json"))
    # --compare scores such an arm at its last good checkpoint instead of losing the whole comparison
    stopped = rlhf.run_or_stopped(replace(cfg, out_dir=str(tmp_path / "again")), RT)
    last = train.list_checkpoints(str(tmp_path / "again"))[-1]
    assert stopped["checkpoint"] == last and "KL to the reference" in stopped["stopped"]
    assert 0 <= stopped["greedy_after"] <= 1 and stopped["compute"]["answers"] > 0


def test_ctrl_c_stops_with_one_line_and_status_130_and_its_command_continues(sft_checkpoint, tmp_path, ctrl_c):
    cfg = cfg_for(sft_checkpoint, tmp_path, algo="grpo", max_steps=4, save_every=2, eval_every=100,
                  prompts_per_step=4, group_size=4, pass_k=0, log_every=1)
    stopped = ctrl_c("rlhf", 3, cfg)  # GRPO takes one optimizer step per RL step
    assert stopped.returncode == 130 and stopped.stderr.count("\n") == 1, stopped.stderr
    assert "after step 2" in stopped.stderr and "ckpt_000002.pt" in stopped.stderr, stopped.stderr
    resumed = ctrl_c.continues(stopped)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_resumed_run_repeats_the_uninterrupted_one_exactly(sft_checkpoint, tmp_path, algo):
    import shutil
    cfg = cfg_for(sft_checkpoint, tmp_path, algo=algo, max_steps=4, save_every=2, eval_every=2, prompts_per_step=4,
                  group_size=4, pass_k=0, lr=3e-4, kl_target=1.0 if algo == "ppo" else None)
    whole = rlhf.run_rl(cfg, RT)
    cut = str(tmp_path / "cut")
    shutil.copytree(cfg.out_dir, cut)
    for name in ("ckpt_000004.pt", "summary.json"):  # as if the run had stopped after step 2
        os.remove(os.path.join(cut, name))
    resumed = rlhf.run_rl(replace(cfg, out_dir=cut, resume="auto"), RT)
    a, b = train.load_checkpoint(whole["checkpoint"]), train.load_checkpoint(resumed["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if algo == "ppo":
        assert all(torch.equal(a["value_model"][k], b["value_model"][k]) for k in a["value_model"])
        assert a["kl_coef"] == b["kl_coef"] != 0.05
    timing = ("seconds", "sample_seconds")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(train.read_metrics(cut)) == strip(train.read_metrics(cfg.out_dir))
    assert resumed["greedy_before"] == whole["greedy_before"] and resumed["greedy_after"] == whole["greedy_after"]
    assert resumed["compute"] == whole["compute"]
    with pytest.raises(rlhf.RLError, match="cannot resume"):
        rlhf.run_rl(replace(cfg, out_dir=cut, resume="auto", algo="ppo" if algo == "grpo" else "grpo"), RT)


def test_the_probe_keeps_the_sets_where_sampling_beats_greedy_most_whatever_the_seed(sft_checkpoint, tmp_path):
    cfg = cfg_for(sft_checkpoint, tmp_path, difficulties=None, max_sets=1, probe_min=0.0, probe_max=1.0,
                  probe_prompts=8, group_size=4)
    model, tokenizer, _, _ = sft.load_base(cfg.init)
    model.eval()
    sets, pool, probe = rlhf.choose_sets(model, tokenizer, cfg, {"difficulties": [1]}, RT)
    gaps = {key: p["pass@k"] - p["greedy"] for key, p in probe.items() if "pass@k" in p}
    assert len(gaps) == len(KINDS) and len(sets) == 1
    (chosen,) = sets
    assert gaps[chosen] == max(gaps.values())
    assert all(e["kind"] == chosen[0] for e in pool)
    again, _, probe_again = rlhf.choose_sets(model, tokenizer, replace(cfg, seed=5), {"difficulties": [1]}, RT)
    assert list(again) == [chosen] and probe_again == probe  # the seed moves the training prompts, not the sets


def test_the_flawed_teacher_experiment_writes_its_table_of_three_rows(pretrained, tmp_path):
    # plumbing only, a few steps: SFT on the teacher, GRPO, the same time of more SFT, and the sub-population table
    cfg = rlhf.RLConfig(init=pretrained["ckpt"], flawed_teacher=True, teacher_steps=3, max_steps=2, device="cpu",
                        eval_examples=8, pass_k=2, pass_examples=4, prompts_per_step=4, group_size=2,
                        max_new_tokens=16, log_every=100, out_dir=str(tmp_path / "ft"))
    s = rlhf.main(cfg)
    assert s == json.load(open(tmp_path / "ft" / "summary.json"))
    assert s["experiment"] == "flawed_teacher" and s["kind"] == "sort" and s["test_problems"] == 32
    assert 0.25 < s["teacher_wrong_share"] < 0.45  # 59% of sort/3 problems repeat a letter, 60% of those wrong
    assert [r["method"].split()[0] for r in s["rows"]] == ["SFT", "+", "+"] and "GRPO" in s["rows"][2]["method"]
    for r in s["rows"]:
        assert all(0 <= r[k] <= 1 for k in ("all", "weak spot", "elsewhere"))
    teacher = [json.loads(line) for line in open(tmp_path / "ft" / "flawed_teacher.jsonl")]
    assert len(teacher) == 4000 and all(len(c["messages"]) == 2 for c in teacher[:10])


def test_rollouts_and_on_policy_pairs_of_a_padded_model_never_sample_padding():
    enc = tiktoken.Encoding(name="bytes", pat_str=data.SPLIT_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(data.SPECIAL_TOKENS)})
    tok = data.Tokenizer(enc, "bytes")  # 261 ids, which a GPU run pads to 320 rows
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=320, n_tokens=tok.vocab_size, block_size=64)).eval()
    bias = torch.zeros(320)
    bias[tok.vocab_size:] = 30.0  # a padding id would win every step without the mask
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    rt, examples = RT, tasks.generate("copy", 2, 0, "train", 1)
    for shared in (True, False):
        cfg = rlhf.RLConfig(max_new_tokens=8, temperature=1.0, shared_prefill=shared)
        ro = rlhf.rollout(model, tok, examples, rt, cfg, 3, seed=0)  # decodes every answer
        assert len(ro.answers) == 6 and max(max(a) for a in ro.answers) < tok.vocab_size
    answers = dpo.sample_answers(model, tok, [e["messages"][:-1] for e in examples], rt, 2, 1.0, 8, seed=0)
    assert [len(a) for a in answers] == [2, 2]
