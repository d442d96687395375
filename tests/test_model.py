"""Tests for model.py: python -m pytest -q tests/test_model.py

GPT-2 compatibility against Hugging Face transformers (when installed), the KV cache against full
forwards for every architecture switch, packed documents against each document alone, batched
generation against one prompt at a time, growing the vocabulary, the two attention paths against
each other, sampling filters on hand-made distributions, parameter counts, and that a tiny model can learn.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model import PEAK_BF16_FLOPS, GPT, DecodeBatch, GPTConfig, KVCache, draw, PRESETS, config_from_preset, filter_logits, peak_flops
from model import sample_next

# Small configs that together touch every switch: positions, norms, MLPs, GQA/MQA, QK-norm, soft-capping.
VARIANTS = {
    "gpt2": dict(),
    "rope-rms-swiglu": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "rope-ln-relu2-untied": dict(pos="rope", mlp="relu2", tie_embeddings=False),
    "gqa": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
    "mqa": dict(n_kv_head=1, qk_norm=True, logit_softcap=15.0),
}


def small_config(**overrides):
    base = dict(vocab_size=67, block_size=24, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **overrides})


def random_model(config, seed=0):
    """A model whose norms and biases are random too, so a test cannot pass on all-ones/all-zeros weights."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# --- GPT-2 compatibility ---

@pytest.mark.parametrize("sizes", [
    dict(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4),
    dict(vocab_size=101, n_positions=23, n_embd=36, n_layer=3, n_head=3),  # odd sizes, head dim 12
])
def test_logits_match_huggingface_gpt2(tmp_path, sizes):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path)

    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.n_layer == sizes["n_layer"] and model.config.block_size == sizes["n_positions"]
    idx = torch.randint(0, sizes["vocab_size"], (2, sizes["n_positions"]))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def tiny_hf_gpt2(tmp_path, **fields):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **{**dict(vocab_size=61, n_positions=16, n_embd=64, n_layer=2, n_head=4), **fields}))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("fields", [dict(n_inner=64), dict(tie_word_embeddings=False), dict(layer_norm_epsilon=1e-2),
                                    dict(reorder_and_upcast_attn=True)])
def test_from_pretrained_honours_the_gpt2_fields_that_change_the_logits(tmp_path, fields):
    hf = tiny_hf_gpt2(tmp_path, **fields)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fields, name", [
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"), (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(activation_function="relu"), "activation"),
])
def test_from_pretrained_refuses_gpt2_fields_forge_cannot_compute_by_name(tmp_path, fields, name):
    tiny_hf_gpt2(tmp_path, **fields)
    with pytest.raises(ValueError, match=name):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_rejects_a_directory_that_is_not_gpt2(tmp_path):
    pytest.importorskip("transformers")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint.*llama"):
        GPT.from_pretrained(str(llama))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint.*None"):
        GPT.from_pretrained(str(empty))


def test_from_pretrained_without_transformers_says_what_to_install(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install -r requirements-dev.txt"):
        GPT.from_pretrained(str(tmp_path))


# --- KV cache and generation ---

@pytest.mark.parametrize("attn", ["sdpa", "naive"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_prefill_and_decode_match_full_forward(variant, attn):
    config = small_config(attn=attn, **VARIANTS[variant])
    model = random_model(config)
    idx = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(config.n_layer, 2, config.n_kv_head, config.block_size, config.n_embd // config.n_head,
                        idx.device, torch.float32)
        pieces = [model(idx[:, :8], kv_cache=cache)[0]]            # prefill
        pieces.append(model(idx[:, 8:11], kv_cache=cache)[0])      # a chunk after a cache: offset causal mask
        for t in range(11, 20):                                    # one token at a time
            pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    cached = torch.cat(pieces, dim=1)
    assert cache.pos == 20
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_is_identical_with_and_without_cache(variant):
    config = small_config(**VARIANTS[variant])
    model = random_model(config)
    prompt = torch.randint(0, config.vocab_size, (2, 5))
    # 30 new tokens run past block_size=24, so the full-window recompute is exercised too.
    with_cache = model.generate(prompt, 30, temperature=0)
    without = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 35)
    assert torch.equal(with_cache, without)


def test_sampling_is_reproducible_with_a_seed_and_stops_on_stop_tokens():
    model = random_model(small_config())
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 15, temperature=1.0, top_k=10, seed=123)
    b = model.generate(prompt, 15, temperature=1.0, top_k=10, seed=123)
    assert torch.equal(a, b)
    stop = a[0, 4].item()  # a token that this seed produces at step 4 (or earlier)
    c = model.generate(prompt, 15, temperature=1.0, top_k=10, seed=123, stop_tokens=[stop])
    first = (a[0, 1:] == stop).nonzero()[0].item() + 1
    assert c.shape[1] == first + 1 and c[0, -1].item() == stop


def test_stop_tokens_pad_each_finished_row_while_the_others_go_on():
    model = random_model(small_config())
    prompt = torch.tensor([[1, 2], [3, 4], [5, 6]])
    free = model.generate(prompt, 12, temperature=0)  # greedy: each row's tokens are fixed
    stop = free[0, 4].item()  # row 0's third new token
    stopped = model.generate(prompt, 12, temperature=0, stop_tokens=[stop])
    ends = []
    for row in range(3):
        new, free_new = stopped[row, 2:], free[row, 2:]
        hits = (free_new == stop).nonzero()
        end = hits[0].item() + 1 if len(hits) else len(free_new)  # tokens up to and including the stop
        assert torch.equal(new[:end], free_new[:end]), row
        assert (new[end:] == stop).all(), f"row {row} is not padded with its stop token after it stopped"
        ends.append(end if len(hits) else None)
    # it ran until every row stopped, or to the end when some row never did
    assert stopped.shape[1] == 2 + (12 if None in ends else max(ends))


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]]).repeat(2, 1)
    edge = draw(probs, torch.tensor([[0.0], [1.0 - 1e-7]]))
    assert edge.tolist() == [[1], [4]]  # the first and the last token of non-zero probability
    u = torch.rand(200_000, 1, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draw(probs[:1].expand(len(u), -1), u).view(-1), minlength=6) / len(u)
    torch.testing.assert_close(counts, probs[0], atol=5e-3, rtol=0)  # ~4 standard errors at this many draws
    unnormalised = draw(torch.tensor([[2.0, 0.0, 6.0]]).expand(len(u), -1), u).view(-1)
    assert abs((unnormalised == 2).float().mean().item() - 0.75) < 5e-3 and not (unnormalised == 1).any()


def test_a_temperature_near_zero_is_greedy_not_nan():
    model = random_model(small_config())
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, temperature=1e-40, seed=0), greedy)  # logits / 1e-40 overflow
    batch = DecodeBatch(model, 1)
    seq = batch.add([1, 2, 3], temperature=1e-40, seed=0)[0]
    for _ in range(5):
        batch.step()
    assert seq.tokens == greedy[0, 3:].tolist()


def test_generate_with_a_tiny_top_p_is_greedy():
    model = random_model(small_config())
    prompt = torch.tensor([[1, 2], [3, 4]])
    greedy = model.generate(prompt, 10, temperature=0)
    for top_p in (0.0, 1e-6):  # only the most likely token is left to sample
        assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_p=top_p, seed=0), greedy), top_p
    nucleus = model.generate(prompt, 10, temperature=1.0, top_p=0.9, seed=0)
    assert torch.equal(nucleus, model.generate(prompt, 10, temperature=1.0, top_p=0.9, seed=0))


def test_generate_restores_training_mode():
    model = GPT(small_config(dropout=0.1)).train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    assert model.training


# --- packing: document masks and per-token positions ---

PACKING_VARIANTS = ["gpt2", "rope-rms-swiglu", "gqa"]  # learned positions, RoPE, RoPE with GQA


def packed(rows):
    """Rows of documents (1-D tensors) back to back, each row the same total length: idx, doc, pos (B, T)."""
    idx = torch.stack([torch.cat(docs) for docs in rows])
    doc = torch.stack([torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)]) for docs in rows])
    pos = torch.stack([torch.cat([torch.arange(len(d)) for d in docs]) for docs in rows])
    return idx, doc, pos


@pytest.mark.parametrize("attn", ["sdpa", "naive"])
@pytest.mark.parametrize("variant", PACKING_VARIANTS)
def test_packed_documents_each_compute_what_they_would_alone(variant, attn):
    model = random_model(small_config(attn=attn, **VARIANTS[variant]))
    torch.manual_seed(1)
    docs = [torch.randint(0, 67, (n,)) for n in (5, 9, 7)]
    rows = [docs, docs[::-1]]  # the same three documents packed in two orders
    with torch.no_grad():
        idx, doc, pos = packed(rows)
        logits, _ = model(idx, doc=doc, pos=pos)
        for r, row in enumerate(rows):
            start = 0
            for d in row:
                alone, _ = model(d[None])
                torch.testing.assert_close(logits[r, start:start + len(d)], alone[0], atol=1e-5, rtol=1e-5)
                start += len(d)
        # a different middle document (tokens 5..13 of row 0) changes nothing in its neighbours
        idx2, doc2, pos2 = packed([[docs[0], torch.randint(0, 67, (9,)), docs[2]]])
        other, _ = model(idx2, doc=doc2, pos=pos2)
    torch.testing.assert_close(other[0, :5], logits[0, :5], atol=1e-6, rtol=0)
    torch.testing.assert_close(other[0, 14:], logits[0, 14:], atol=1e-6, rtol=0)
    assert not torch.allclose(other[0, 5:14], logits[0, 5:14])


@pytest.mark.parametrize("variant", ["gpt2", "gqa"])
def test_without_doc_attention_takes_the_plain_causal_path(variant, monkeypatch):
    model = random_model(small_config(**VARIANTS[variant]))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    idx = torch.randint(0, 67, (2, 12))
    with torch.no_grad():
        plain, _ = model(idx)
        with_pos, _ = model(idx, pos=torch.arange(12).expand(2, 12))
        one_doc, _ = model(idx, doc=torch.zeros(2, 12, dtype=torch.long))
    n = model.config.n_layer
    assert len(calls) == 3 * n
    assert all(mask is None and causal for mask, causal in calls[:2 * n]), "doc=None must use is_causal, no mask"
    assert all(mask is not None and mask.shape == (2, 1, 12, 12) and not causal for mask, causal in calls[2 * n:])
    assert torch.equal(with_pos, plain)  # explicit default positions are the same numbers
    torch.testing.assert_close(one_doc, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "naive"])
@pytest.mark.parametrize("variant", PACKING_VARIANTS)
def test_kv_cache_with_doc_and_pos_matches_full_forward(variant, attn):
    config = small_config(attn=attn, **VARIANTS[variant])
    model = random_model(config)
    idx = torch.randint(0, 67, (2, 20))
    # row 0: three packed documents; row 1: 4 tokens of left padding (id 0), then a document from position 0
    doc = torch.tensor([[0] * 6 + [1] * 8 + [2] * 6, [0] * 4 + [1] * 16])
    pos = torch.stack([torch.cat([torch.arange(6), torch.arange(8), torch.arange(6)]),
                       torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(16)])])
    with torch.no_grad():
        full, _ = model(idx, doc=doc, pos=pos)
        cache = KVCache(config.n_layer, 2, config.n_kv_head, config.block_size, config.n_embd // config.n_head,
                        idx.device, torch.float32)
        pieces = [model(idx[:, :8], kv_cache=cache, pos=pos[:, :8], doc=doc[:, :8])[0]]  # prefill across a border
        pieces.append(model(idx[:, 8:11], kv_cache=cache, pos=pos[:, 8:11], doc=doc[:, 8:11])[0])
        for t in range(11, 20):
            pieces.append(model(idx[:, t:t + 1], kv_cache=cache, pos=pos[:, t:t + 1], doc=doc[:, t:t + 1])[0])
        unpadded, _ = model(idx[1:, 4:])
    assert cache.pos == 20 and torch.equal(cache.doc[:, :20], doc)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[1, 4:], unpadded[0], atol=1e-5, rtol=1e-5)  # padding is invisible


@pytest.mark.parametrize("attn", ["sdpa", "naive"])
def test_every_token_its_own_document_gives_no_nan_and_sees_only_itself(attn):
    model = random_model(small_config(attn=attn, pos="rope"))
    idx = torch.randint(0, 67, (1, 10))
    with torch.no_grad():
        logits, _ = model(idx, doc=torch.arange(10)[None], pos=torch.zeros(1, 10, dtype=torch.long))
        alone, _ = model(idx.view(10, 1))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[0], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_triton_attention_with_doc_runs_sdpa():
    """The kernel knows only the causal mask, so document masks go through SDPA (no Triton needed)."""
    sdpa_model = random_model(small_config(pos="rope"))
    triton_model = GPT(small_config(pos="rope", attn="triton")).eval()
    triton_model.load_state_dict(sdpa_model.state_dict())
    idx, doc, pos = packed([[torch.randint(0, 67, (n,)) for n in (4, 8)]])
    with torch.no_grad():
        assert torch.equal(triton_model(idx, doc=doc, pos=pos)[0], sdpa_model(idx, doc=doc, pos=pos)[0])


def test_gradient_checkpointing_keeps_the_document_mask():
    idx, doc, pos = packed([[torch.randint(0, 67, (n,)) for n in (6, 10)]])
    results = []
    for flag in (False, True):
        model = random_model(small_config(pos="rope"), seed=3).train()
        model.grad_checkpointing = flag
        logits, loss = model(idx, idx, doc=doc, pos=pos)
        loss.backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# --- batched generation ---

@pytest.mark.parametrize("attn", ["sdpa", "naive"])
@pytest.mark.parametrize("variant", PACKING_VARIANTS)
def test_batched_greedy_generation_equals_each_prompt_alone(variant, attn):
    config = small_config(attn=attn, **VARIANTS[variant])
    model = random_model(config)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 67, (n,)).tolist() for n in (3, 7, 1, 5)]
    n_new = config.block_size - 7  # a list is clipped so that the longest prompt plus the new tokens fit

    def alone(stop_tokens=None):
        return [model.generate(torch.tensor([p]), n_new, temperature=0, stop_tokens=stop_tokens)[0, len(p):].tolist()
                for p in prompts]

    free = alone()
    assert model.generate(prompts, 30, temperature=0) == free
    assert model.generate(prompts, 30, temperature=0, use_cache=False) == free
    # each row stops on the first stop token it produces, at different steps, and the others go on
    stop = [free[0][2], free[1][6]]
    expected = alone(stop)
    assert len({len(e) for e in expected}) > 1, expected
    assert any(len(e) < n_new and e[-1] in stop for e in expected)
    assert model.generate(prompts, 30, temperature=0, stop_tokens=stop) == expected


def test_batched_sampling_is_reproducible_with_a_seed_and_checks_its_prompts():
    model = random_model(small_config())
    prompts = [[1, 2, 3], [4], [5, 6]]
    a = model.generate(prompts, 8, temperature=1.0, top_k=10, seed=7)
    assert a == model.generate(prompts, 8, temperature=1.0, top_k=10, seed=7)
    assert [len(row) for row in a] == [8, 8, 8] and all(type(t) is int for row in a for t in row)
    with pytest.raises(ValueError, match="prompt 1 of 2 is empty"):
        model.generate([[1], []], 4)
    with pytest.raises(ValueError, match="longest prompt has 25 tokens, more than block_size=24"):
        model.generate([[1] * 25], 4)


def test_on_token_streams_each_rows_tokens_until_it_stops():
    model = random_model(small_config())
    prompts = [[1, 2, 3], [4], [5, 6]]
    free = model.generate(prompts, 6, temperature=0)
    stop = [free[1][1]]
    seen = []
    out = model.generate(prompts, 6, temperature=0, stop_tokens=stop, on_token=seen.append)
    assert all(len(step) == 3 for step in seen)
    for row in range(3):  # the streamed tokens of a row, None once it stopped, are exactly what it returns
        assert [step[row] for step in seen if step[row] is not None] == out[row]
    assert seen[-1][1] is None or out[1][-1] in stop


# --- vocabulary ---

@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_keeps_old_tokens_and_starts_new_rows_near_the_mean(tied):
    model = random_model(small_config(tie_embeddings=tied))
    idx = torch.randint(0, 67, (2, 10))
    with torch.no_grad():
        before, _ = model(idx)
    old_wte, old_head = model.transformer.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()
    model.resize_vocab(70)
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert model.config.vocab_size == 70 and wte.shape == head.shape == (70, 32)
    assert (head is wte) == tied
    torch.testing.assert_close(wte[:67], old_wte, atol=0, rtol=0)
    for new, old in ((wte[67:], old_wte), (head[67:], old_head)):
        # near the mean (a tenth of the rows' spread) and distinct: equal rows would get equal logits forever
        assert ((new - old.mean(0)).abs() <= 0.5 * old.std(0)).all()
        assert torch.pdist(new).min() > 0.01 * old.std(0).norm()
    with torch.no_grad():
        after, _ = model(idx)
    torch.testing.assert_close(after[..., :67], before, atol=1e-6, rtol=1e-6)
    # a new token's logit starts near the average of the old ones: h . mean(W) = mean(h . W), plus the noise's share
    gap = (after[..., 67:] - before.mean(-1, keepdim=True)).abs()
    assert (gap < 0.5 * before.std(-1, keepdim=True)).all()
    _, loss = model(torch.tensor([[68, 69, 1]]), torch.tensor([[69, 1, 68]]))  # new tokens are ordinary and trainable
    loss.backward()
    assert wte.grad[67:].abs().sum() > 0
    assert model.num_params() == expected_param_count(model.config)
    with pytest.raises(ValueError, match=r"resize_vocab\(60\) would drop tokens"):
        model.resize_vocab(60)
    model.resize_vocab(70)  # already that size: the same tensors stay
    assert model.transformer.wte.weight is wte


# --- attention paths ---

@pytest.mark.parametrize("variant", ["gpt2", "gqa", "mqa"])
def test_sdpa_and_naive_attention_agree_forward_and_backward(variant):
    idx = torch.randint(0, 67, (3, 24))
    targets = torch.randint(0, 67, (3, 24))
    grads = {}
    for attn in ("sdpa", "naive"):
        model = random_model(small_config(attn=attn, **VARIANTS[variant]), seed=1).train()
        logits, loss = model(idx, targets)
        loss.backward()
        grads[attn] = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["sdpa"][0], grads["naive"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["sdpa"][1], grads["naive"][1], atol=1e-6, rtol=1e-6)
    for name, g in grads["sdpa"][2].items():
        torch.testing.assert_close(g, grads["naive"][2][name], atol=1e-5, rtol=1e-4, msg=name)


# --- sampling filters ---

def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 alone is below 0.6; adding 0.3 crosses it, so the 0.3 token stays and the rest go.
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False, False]]
    # exactly reaching the threshold: 0.5 + 0.3 = 0.8, so nothing after the second token is needed
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]


def test_top_p_keeps_vocabulary_order_when_logits_are_unsorted():
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.6))
    assert kept.tolist() == [[False, True, False, True]]


def test_at_least_one_token_always_survives():
    logits = torch.tensor([[0.0, 10.0, -3.0], [2.0, 2.0, 2.0]])
    for kwargs in (dict(top_p=1e-9), dict(top_k=1), dict(top_k=1, top_p=1e-9)):
        kept = torch.isfinite(filter_logits(logits, **kwargs))
        assert (kept.sum(dim=-1) >= 1).all(), kwargs
    assert torch.isfinite(filter_logits(logits, top_p=1e-9))[0].tolist() == [False, True, False]


def test_top_p_zero_keeps_only_the_most_likely_token_and_samples_it():
    logits = torch.tensor([[0.0, 10.0, -3.0], [2.0, 1.0, 3.0]])
    assert torch.isfinite(filter_logits(logits, top_p=0.0)).tolist() == [[False, True, False], [False, False, True]]
    assert sample_next(logits, temperature=1.0, top_p=0.0).flatten().tolist() == [1, 2]


def test_top_p_one_and_top_k_none_leave_the_distribution_unchanged():
    logits = torch.randn(4, 50)
    assert torch.equal(filter_logits(logits, top_k=None, top_p=1.0), logits)
    assert torch.equal(filter_logits(logits, top_k=50, top_p=None), logits)


# --- loss, learning, sizes ---

def test_ignored_targets_do_not_count_and_sum_equals_mean_times_count():
    model = random_model(small_config())
    idx = torch.randint(0, 67, (2, 10))
    targets = torch.randint(0, 67, (2, 10))
    targets[0, :4] = -1
    targets[1, 7:] = -1
    logits, mean_loss = model(idx, targets)
    _, sum_loss = model(idx, targets, reduction="sum")
    keep = targets != -1
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(mean_loss, expected)
    torch.testing.assert_close(sum_loss, mean_loss * keep.sum())


def test_a_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=64, block_size=16))
    idx = torch.randint(0, 64, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(idx, targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > math.log(64) - 0.5   # starts near uniform over the vocabulary
    assert loss.item() < 0.1


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = GPT(small_config())
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    untied = GPT(small_config(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def expected_param_count(c):
    """Closed form, written independently of the module tree."""
    d, h = c.n_embd // c.n_head, c.n_embd
    norm = h * (2 if c.norm == "layernorm" and c.bias else 1)
    hidden = c.mlp_hidden or (64 * math.ceil(8 * h / 3 / 64) if c.mlp == "swiglu" else 4 * h)
    b = 1 if c.bias else 0
    attn = h * (c.n_head + 2 * c.n_kv_head) * d + b * (c.n_head + 2 * c.n_kv_head) * d + h * h + b * h
    fc_out = 2 * hidden if c.mlp == "swiglu" else hidden
    mlp = h * fc_out + b * fc_out + hidden * h + b * h
    qk = 2 * d if c.qk_norm else 0
    per_layer = 2 * norm + attn + mlp + qk
    embeddings = c.vocab_size * h * (1 if c.tie_embeddings else 2) + (c.block_size * h if c.pos == "learned" else 0)
    return c.n_layer * per_layer + norm + embeddings


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_num_params_matches_the_closed_form(variant):
    config = small_config(**VARIANTS[variant])
    assert GPT(config).num_params() == expected_param_count(config)


def test_gpt2_preset_has_124m_parameters():
    config = config_from_preset("gpt2")
    assert expected_param_count(config) == 124_439_808  # the well-known count of OpenAI's 124M checkpoint
    assert set(PRESETS) >= {"tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_tiny_preset_has_a_few_hundred_thousand_parameters():
    assert 100_000 < GPT(config_from_preset("tiny")).num_params() < 1_000_000


@pytest.mark.parametrize("variant", list(VARIANTS))  # includes untied embeddings (lm_head is its own matmul)
def test_flops_per_token_matches_torch_flop_counter(variant):
    """flops_per_token against PyTorch's own count of the matmuls in one forward and backward.

    attn="naive" makes the attention two explicit matmuls over the full T x T square, as the formula counts
    it. FlopCounterMode counts matmuls only, while the formula's 6N also charges the biases and norm gains
    (vectors: no matmul) 6 FLOPs each, so those are taken out before comparing.
    """
    from torch.utils.flop_counter import FlopCounterMode
    config = small_config(attn="naive", **VARIANTS[variant])
    model = random_model(config).train()
    B, T = 2, 24
    idx = torch.randint(0, config.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert counter.get_total_flops() / (B * T) == model.flops_per_token(T) - 6 * vectors


@pytest.mark.parametrize("name, count", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_presets_have_the_parameter_counts_of_openais_checkpoints(name, count):
    with torch.device("meta"):  # no memory: only the shapes are built
        model = GPT(config_from_preset(name))
    assert model.num_params() == count


@pytest.mark.parametrize("name, millions", [("tiny", 0.28), ("mini", 1.35), ("small", 13.9)])
def test_small_presets_have_the_sizes_the_readme_gives(name, millions):
    with torch.device("meta"):
        n = GPT(config_from_preset(name)).num_params()
    assert n == expected_param_count(config_from_preset(name))
    assert round(n / 1e6, 2 if millions < 10 else 1) == millions


def test_flops_per_token_is_6n_plus_the_attention_term():
    model = GPT(small_config())
    n_matmul = model.num_params() - model.transformer.wpe.weight.numel()
    assert model.flops_per_token(0) == 6 * n_matmul
    assert model.flops_per_token(24) - model.flops_per_token(8) == 12 * 2 * 32 * 16


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10", None), ("NVIDIA L4X", None),
])
def test_peak_flops_matches_whole_names(name, flops):
    """Names as torch.cuda.get_device_name gives them; "L4" must not be read inside "L40S"."""
    assert peak_flops(name) == flops


def test_no_peak_flops_entry_shadows_another():
    for key, flops in PEAK_BF16_FLOPS:
        assert peak_flops(f"NVIDIA {key}") == flops, key


def test_mfu_is_none_where_the_peak_is_unknown():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some Future Accelerator") is None
    assert GPT(small_config()).estimate_mfu(1e6, "cpu") is None


def test_gradient_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 67, (2, 16))
    grads = []
    for flag in (False, True):
        model = random_model(small_config(pos="rope"), seed=3).train()
        model.grad_checkpointing = flag
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("field, value", [("pos", "alibi"), ("norm", "batchnorm"), ("mlp", "moe"), ("attn", "flash")])
def test_bad_config_values_name_the_field_and_the_choices(field, value):
    with pytest.raises(ValueError, match=f"{field}='{value}'.*choose one of"):
        small_config(**{field: value})


def test_bad_shapes_and_presets_are_rejected_with_the_numbers():
    with pytest.raises(ValueError, match="n_head=4 is not a multiple of n_kv_head=3"):
        small_config(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        config_from_preset("huge")
    model = GPT(small_config())
    with pytest.raises(ValueError, match="longer than block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_from_pretrained_with_an_unreachable_hub_name_says_so():
    pytest.importorskip("transformers")  # conftest.py sets HF_HUB_OFFLINE: the hub is out of reach
    with pytest.raises(OSError, match="could not load GPT-2 weights 'no-such-model-xyz'"):
        GPT.from_pretrained("no-such-model-xyz")


@pytest.mark.parametrize("variant", ["gpt2", "gqa"])
def test_triton_kernels_give_the_torch_path_loss_and_gradients(variant):
    """attn="triton" and kernels="triton" (norms and fused loss) against sdpa + torch on the same weights.

    On the CPU this runs through Triton's interpreter (conftest.py sets TRITON_INTERPRET), so it is tiny.
    """
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(vocab_size=67, block_size=16, n_layer=2, n_head=4, n_embd=64, **VARIANTS[variant])  # head dim 16
    torch_model = random_model(GPTConfig(**base), seed=5).to(device).train()
    triton_model = GPT(GPTConfig(**base, attn="triton", kernels="triton")).to(device).train()
    triton_model.load_state_dict(torch_model.state_dict())
    idx = torch.randint(0, 67, (2, 16), device=device)
    targets = torch.randint(0, 67, (2, 16), device=device)
    targets[0, :3] = -1
    results = []
    for model in (torch_model, triton_model):
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert logits is None  # the fused loss never built them
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_generate_n_shares_one_prefill_and_equals_repeating_each_prompt():
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=64, block_size=32)).eval()
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    shared = model.generate(prompts, 8, temperature=1.0, stop_tokens=[3], seed=5, n=4)
    each = model.generate([p for p in prompts for _ in range(4)], 8, temperature=1.0, stop_tokens=[3], seed=5)
    assert shared == each and len(shared) == 12
    assert len({tuple(r) for r in shared[:4]}) > 1  # the copies sample apart at T = 1
    tensor = model.generate(torch.tensor([[1, 2, 3]]), 6, temperature=1.0, seed=2, n=3)
    assert torch.equal(tensor, model.generate(torch.tensor([[1, 2, 3]] * 3), 6, temperature=1.0, seed=2))



# --- continuous batching: a per-row cache, sequences joining and leaving ---

@pytest.mark.parametrize("attn", ["sdpa", "naive"])
@pytest.mark.parametrize("variant", PACKING_VARIANTS)
def test_per_row_cache_decodes_rows_of_different_lengths_like_full_forwards(variant, attn):
    config = small_config(attn=attn, **VARIANTS[variant])
    model = random_model(config).eval()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 67, (n,)) for n in (9, 4, 13)]
    cache = KVCache(config.n_layer, 3, config.n_kv_head, config.block_size, config.n_embd // config.n_head,
                    "cpu", torch.float32, per_row=True)
    with torch.no_grad():
        for row, s in enumerate(seqs):  # each prompt prefilled alone into its own row, all but its last 3 tokens
            model(s[None, :-3], kv_cache=cache.rows(row, row + 1))
        assert cache.lens.tolist() == [6, 1, 10]
        steps = [model(torch.stack([s[t - 3] for s in seqs])[:, None], kv_cache=cache)[0] for t in range(3)]
        chunk = model(torch.randint(0, 67, (3, 2)), kv_cache=cache)[0]  # two tokens per row at once: T > 1
        for row, s in enumerate(seqs):
            full, _ = model(s[None])
            torch.testing.assert_close(torch.cat([step[row] for step in steps]), full[0, -3:], atol=1e-5, rtol=1e-5)
        assert cache.lens.tolist() == [11, 6, 15] and chunk.shape == (3, 2, 67)
        with pytest.raises(ValueError, match="no room"):
            model(torch.zeros(3, 10, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("variant", PACKING_VARIANTS)
def test_decode_batch_greedy_equals_each_prompt_alone_while_others_join_and_leave(variant):
    config = small_config(**VARIANTS[variant])
    model = random_model(config).eval()
    torch.manual_seed(2)
    prompts = [torch.randint(0, 67, (n,)).tolist() for n in (3, 7, 1, 5, 2)]
    n_new = 10
    alone = [model.generate([p], n_new, temperature=0)[0] for p in prompts]
    batch = DecodeBatch(model, max_rows=3)
    joins = {0: [0, 1], 2: [2], 5: [3], 9: [4]}  # step -> prompts that arrive then (more than 3 never fit at once)
    running, got, cancelled = {}, {}, None
    for step in range(40):
        for i, seq in list(running.items()):
            if len(seq.tokens) == n_new or (i == 1 and step == 4):  # prompt 1 is cancelled mid-way
                got[i] = seq.tokens
                batch.remove(seq)
                del running[i]
        for i in joins.get(step, []):
            running[i] = batch.add(prompts[i], temperature=0)[0]
        assert [s.row for s in batch.seqs] == list(range(len(batch))) and len(batch) <= 3
        batch.step()
    assert sorted(got) == [0, 1, 2, 3, 4] and not running
    for i in (0, 2, 3, 4):
        assert got[i] == alone[i], i
    assert got[1] == alone[1][:len(got[1])] and len(got[1]) < n_new  # what it had before it left


def test_decode_batch_seeded_samples_do_not_depend_on_the_batch():
    model = random_model(small_config()).eval()
    alone = DecodeBatch(model, 4)
    a = alone.add([1, 2, 3], temperature=1.0, top_k=20, seed=11)[0]
    b = alone.add([4, 5], temperature=0.8, top_p=0.9, seed=12)[0]
    crowded = DecodeBatch(model, 6)
    crowded.add([9, 9, 9, 9], temperature=1.0)  # unseeded neighbours draw from the global generator
    a2, a3 = crowded.add([1, 2, 3], n=2, temperature=1.0, top_k=20, seed=11)  # one prefill; seeds 11 and 12
    crowded.add([7], temperature=0)
    for _ in range(12):
        alone.step()
        crowded.step()
    assert a2.tokens == a.tokens
    assert a3.tokens != a2.tokens  # its own generator (seed 12), not a copy
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as serve.py runs on a GPU: bf16 keys into the cache
        low = DecodeBatch(model, 2)
        low.add([1, 2, 3], temperature=0)
        low.step()
    assert [len(s.tokens) for s in low.seqs] == [2]
    with pytest.raises(ValueError, match="2 of 6 rows are free"):
        crowded.add([1], n=3)
    with pytest.raises(ValueError, match="empty"):
        crowded.add([])


# --- a padded vocabulary ---

def padded_model(n_tokens=50, vocab_size=64):
    """A tiny model with rows above n_tokens that are padding (train.py pads the vocabulary to a multiple of 64 on
    a GPU), and an output layer biased so that a padding id would win every step: greedy or sampled."""
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=vocab_size, n_tokens=n_tokens, block_size=32)).eval()
    bias = torch.zeros(vocab_size)
    bias[n_tokens:] = 30.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model


def test_generation_never_samples_a_padding_id():
    model = padded_model()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits[0, -1].argmax() >= 50  # without the mask a padding id would be the next token
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    outs = [model.generate(prompt, 12, temperature=0)[:, 3:], model.generate(prompt, 12, seed=0)[:, 3:],
            model.generate(prompt, 12, temperature=1.5, top_k=60, top_p=0.99, seed=1, use_cache=False)[:, 3:],
            model.generate(prompt, 12, seed=2, n=3)[:, 3:]]
    rows = [row for out in outs for row in out.tolist()]
    rows += model.generate([[1, 2, 3], [7]], 12, temperature=0) + model.generate([[1, 2, 3], [7]], 12, seed=3, n=2)
    assert len(rows) == 18 and all(len(row) == 12 for row in rows)
    assert max(max(row) for row in rows) < 50


def test_n_tokens_defaults_to_the_vocabulary_and_cannot_exceed_it():
    assert GPTConfig(vocab_size=67).n_tokens == 67
    with pytest.raises(ValueError, match="n_tokens=70 is more than vocab_size=67"):
        GPTConfig(vocab_size=67, n_tokens=70)


def test_resize_vocab_turns_padding_rows_into_tokens_first_and_is_seeded():
    model = random_model(small_config(vocab_size=72, n_tokens=67))
    old = model.transformer.wte.weight.detach().clone()
    model.resize_vocab(70)  # the chat tokens of a padded base land in its padding rows: no new rows
    w = model.transformer.wte.weight
    assert (model.config.n_tokens, model.config.vocab_size, tuple(w.shape)) == (70, 72, (72, 32))
    assert torch.equal(w[:67], old[:67]) and torch.equal(w[70:], old[70:])  # the tokens and the rest of the padding
    # the new rows are made from the 67 tokens' rows alone, never from padding
    assert ((w[67:70] - old[:67].mean(0)).abs() <= 0.5 * old[:67].std(0)).all()
    again = random_model(small_config(vocab_size=72, n_tokens=67))
    again.resize_vocab(70)
    assert torch.equal(again.transformer.wte.weight, w)  # the same base always grows the same rows
    model.resize_vocab(75)  # more tokens than rows: the rows grow too
    assert (model.config.n_tokens, model.config.vocab_size) == (75, 75) and model.lm_head.weight.shape == (75, 32)
    assert torch.equal(model.transformer.wte.weight[:70], w[:70])
    with pytest.raises(ValueError, match=r"resize_vocab\(60\) would drop tokens"):
        model.resize_vocab(60)
