"""Tests for eval.py (evaluation and audits): pass@k, multiple choice, the memorisation index, canary exposure,
the report, bad input.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval.py

Uses the session's `pretrained` checkpoint (tests/conftest.py) and, for the canaries, a tiny model trained here
on data with planted secrets. No network.
"""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import data
import eval as ev
import train
from model import GPT, config_from_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- pass@k ---

def test_pass_at_k_matches_the_closed_form_and_brute_force():
    for n, c, k in [(5, 2, 2), (10, 3, 1), (10, 0, 5), (10, 10, 5), (20, 4, 10), (6, 5, 3)]:
        closed = 1 - math.comb(n - c, k) / math.comb(n, k)
        # brute force: the share of k-subsets of the n samples that hold at least one right one
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert ev.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
        assert ev.pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]), abs=1e-12)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share of right samples


# --- multiple choice ---

def test_the_four_normalisations_on_a_hand_computed_example():
    # choice        chars bytes tokens  sum    per char  per byte  per token
    # "ab"              2     2     4    -4.0    -2.0      -2.0      -1.0
    # "abcde"           5     5     2    -5.0    -1.0      -1.0      -2.5
    # "abcdefghij"     10    10     9    -9.0    -0.9      -0.9      -1.0
    # "éééé"            4     8    16    -8.0    -2.0      -1.0      -0.5
    choices = ["ab", "abcde", "abcdefghij", "éééé"]
    picks = ev.mc_predictions([-4.0, -5.0, -9.0, -8.0], choices, [4, 2, 9, 16])
    assert picks == {"acc": 0, "acc_per_char": 2, "acc_per_byte": 2, "acc_per_token": 3}
    # bytes differ from characters only beyond ASCII: "éééé" is -7/4 = -1.75 per char but -7/8 = -0.875 per byte,
    # against "abcde"'s -6/5 = -1.2 for both
    picks = ev.mc_predictions([-6.0, -7.0], ["abcde", "éééé"], [1, 1])
    assert picks == {"acc": 0, "acc_per_char": 0, "acc_per_byte": 1, "acc_per_token": 0}


def test_encode_pair_scores_the_choice_with_its_leading_space(pretrained):
    tok = data.load_tokenizer(pretrained["data_dir"])
    for context in ["def f(x):\n    return", "Question: what is 3 + 4?\nAnswer: "]:
        ids, start = ev.encode_pair(tok, context, " value")
        assert ids[0] == tok.eot_id
        assert tok.decode(ids[1:start]) == context.rstrip()  # trailing space moved to the continuation
        assert tok.decode(ids[start:]) == context[len(context.rstrip()):] + " value"


def test_mc_finds_answers_a_model_was_trained_on_in_one_forward_pass_per_item(pretrained, tmp_path):
    tok = data.load_tokenizer(pretrained["data_dir"])
    items = [{"context": "the capital of westland is", "choices": ["zorbin", "mavel", "quist", "dunmore"], "label": 2},
             {"context": "my favourite colour is", "choices": ["teal", "ochre", "mauve"], "label": 0},
             {"context": "the password is", "choices": ["hunter", "swordfish", "letmein", "dragon"], "label": 1}]
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=tok.vocab_size))
    rows = [ev.encode_pair(tok, it["context"], " " + it["choices"][it["label"]]) for it in items]
    T = max(len(ids) for ids, _ in rows)
    x = torch.tensor([ids + [0] * (T - len(ids)) for ids, _ in rows])
    y = torch.tensor([ids[1:] + [-1] * (T - len(ids)) + [-1] for ids, _ in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):  # the right answers, learned by heart
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    result = ev.multiple_choice(model, tok, items)
    assert len(calls) == len(items)  # the choices of an item are one batch
    assert {result[n] for n in ev.NORMS} == {1.0}
    assert result["chance"] == pytest.approx((0.25 + 1 / 3 + 0.25) / 3)
    # the same items through the file reader, in both formats
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}) + "\n"
                    + json.dumps({"ctx": "c", "endings": ["x", "y", "z"], "label": "2"}) + "\n")
    read = ev.read_mc(path)
    assert read[0] == {"context": "Question: q\nAnswer:", "choices": ["a", "b"], "label": 1}
    assert read[1]["label"] == 2


def test_embedded_mc_set_is_well_formed():
    items = ev.embedded_mc(["add", "reverse", "python", "safety"], 5)
    assert len(items) == 15 and all(len(it["choices"]) == 4 and len(set(it["choices"])) == 4 for it in items)
    assert len({it["label"] for it in items}) > 1  # the right answer is not always first


# --- memorisation index ---

def test_ngram_index_finds_planted_spans_and_nothing_else(monkeypatch):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, 20_000).astype(np.uint16)
    planted = rng.integers(0, 1000, 50).astype(np.uint16)
    for at in (100, 7_000, 15_000):
        tokens[at:at + 50] = planted
    for degenerate in (False, True):
        if degenerate:  # BASE 1: the hash is the sum of the window, so many windows collide; counts must stay exact
            monkeypatch.setattr(ev.NgramIndex, "BASE", np.uint64(1))
        index = ev.NgramIndex(tokens, 8)
        assert index.count(planted[None])[0] == 3
        assert index.count(planted[None, :8])[0] == 3
        near = planted.copy()
        near[-1] = (near[-1] + 1) % 1000  # the same first 8 tokens, one token off at the end
        assert index.count(near[None])[0] == 0
        absent = rng.integers(1000, 2000, (100, 50))  # tokens that never occur
        assert index.count(absent).sum() == 0
        starts = rng.integers(0, len(tokens) - 20, 200)
        spans = np.stack([tokens[s:s + 20] for s in starts])
        brute = [sum(np.array_equal(tokens[i:i + 20], sp) for i in range(len(tokens) - 19)) for sp in spans[:20]]
        assert index.count(spans[:20]).tolist() == brute
        assert (index.count(spans) >= 1).all()


# --- canaries ---

@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    """A tiny model trained on a few stdlib modules with 2 canaries planted at each of 0, 1, 4 and 16 repeats."""
    root = tmp_path_factory.mktemp("canary")
    text = root / "text"
    text.mkdir()
    for name in ["textwrap", "shlex", "fnmatch", "bisect"]:
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name + ".py"), encoding="utf-8") as f:
            (text / (name + ".txt")).write_text(f.read(), encoding="utf-8")
    data_dir = str(root / "data")
    meta = data.prepare(data.DataConfig(input=[str(text)], out_dir=data_dir, vocab_size=512, rules="",
                                        doc_chars=1500, val_fraction=0.1, workers=1, canaries=2))
    out_dir = str(root / "run")
    train.main(train.TrainConfig(preset="tiny", data_dir=data_dir, out_dir=out_dir, batch_size=16, seq_len=64,
                                 max_steps=400, lr=3e-3, warmup_steps=20, eval_every=400, eval_batches=2,
                                 log_every=200, save_every=400, samples=0, device="cpu", threads=1))
    return {"ckpt": train.list_checkpoints(out_dir)[-1], "data_dir": data_dir, "meta": meta, "root": root}


def test_repeated_canary_is_more_exposed_than_an_unplanted_one(canary_run, tmp_path):
    cfg = ev.EvalConfig(tasks=["canary", "memorization"], candidates=300, extraction=16, samples=8,
                        sample_tokens=64, out=str(tmp_path / "eval.json"), device="cpu")
    result = ev.evaluate(cfg, canary_run["ckpt"])
    by = result["canary"]["by_repeats"]
    assert set(by) == {"0", "1", "4", "16"} and all(b["canaries"] == 2 for b in by.values())
    assert by["16"]["exposure"] > by["0"]["exposure"] + 2, by  # bits
    assert by["16"]["exposure_fit"] > by["0"]["exposure_fit"], by
    assert by["0"]["extracted"] == 0
    assert json.loads((tmp_path / "eval.json").read_text())["canary"]["by_repeats"] == by
    assert "train/1" in result["memorization"]["extraction"]


def test_exposure_formula():
    refs = np.arange(1, 100, dtype=float)  # 99 references, perplexities 1..99
    assert ev.exposure(0.5, refs, 10 ** 9)["exposure"] == pytest.approx(math.log2(100))  # ranked first
    assert ev.exposure(50.5, refs, 10 ** 9)["exposure"] == pytest.approx(math.log2(100) - math.log2(51))
    assert ev.exposure(-1e9, refs, 10 ** 9)["exposure_fit"] == pytest.approx(math.log2(10 ** 9))  # capped


# --- a whole evaluation, the table, the report ---

def test_evaluate_writes_eval_json_with_the_sections(pretrained, tmp_path):
    out = tmp_path / "eval.json"
    cfg = ev.EvalConfig(tasks=["lm", "mc", "domain", "pii", "memorization", "answers"], lm_batches=2, mc_items=3,
                        samples=8, sample_tokens=64, extraction=8, out=str(out), device="cpu")
    result = ev.evaluate(cfg, pretrained["out_dir"])
    final_val = [r for r in train.read_metrics(pretrained["out_dir"]) if "val_loss" in r][-1]["val_loss"]
    assert result["lm"]["val_loss"] == pytest.approx(final_val, rel=1e-4)  # train.py's own 2 validation batches
    assert set(result["mc"]["embedded"]) >= set(ev.NORMS)
    assert 0 <= result["domain"]["samples"]["parse"] <= 1 and result["pii"]["samples"] == 8
    assert len(result["answers"]) == len(ev.ANSWER_PROMPTS)
    assert json.loads(out.read_text())["sections"] == cfg.tasks
    assert "lm/val_bpb" in ev.table(result)


def test_report_builds_from_fixture_run_folders(tmp_path):
    runs = tmp_path / "out"
    (runs / "pretrain").mkdir(parents=True)
    (runs / "pretrain" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0, "tokens": 640}) + "\n"
                                                     + json.dumps({"step": 20, "loss": 2.5, "tokens": 1280,
                                                                   "val_loss": 2.7, "val_bpb": 1.1}) + "\n")
    (runs / "pretrain" / "loss.png").write_bytes(b"\x89PNG")
    for stage, before, after in [("sft", 0.0, 0.6), ("dpo", 0.6, 0.7)]:
        (runs / stage).mkdir()
        (runs / stage / "summary.json").write_text(json.dumps(
            {"stage": stage, "base": "x", "seconds": 12.5, "before": {"copy": before}, "after": {"copy": after}}))
        (runs / stage / "eval.json").write_text(json.dumps(
            {"checkpoint": f"{stage}/ckpt.pt", "lm": {"val_loss": 3.5}, "answers": {"Copy this: a b": f"{stage}!"}}))
    path = ev.build_report(str(runs))
    text = open(path).read()
    assert text.index("## pretrain") < text.index("## sft") < text.index("## dpo")
    assert "| val bpb | 1.1000 |" in text and "| copy | 0.0000 | 0.6000 |" in text
    assert "![loss.png](pretrain/loss.png)" in text
    assert "| Copy this: a b | sft! | dpo! |" in text
    r = run_cli("--report", str(runs))
    assert r.returncode == 0 and "report.md" in r.stdout


# --- bad input: one line, exit 2 ---

def test_bad_input_is_one_line_and_exit_2(pretrained, canary_run, tmp_path):
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    half = tmp_path / "half.pt"
    half.write_bytes(open(pretrained["ckpt"], "rb").read()[:5000])
    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                         + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"ctx": "c", "endings": ["a", "b"]}) + "\n")
    cases = [([str(not_ckpt)], "cannot read checkpoint"), ([str(half)], "cannot read checkpoint"),
             ([pretrained["ckpt"], "--mc", str(bad_label)], f"{bad_label}:2"),
             ([pretrained["ckpt"], "--mc", str(missing)], f"{missing}:1: missing field(s) label"),
             ([pretrained["ckpt"], "--data-dir", canary_run["data_dir"]], "tokenizer"),
             ([pretrained["ckpt"], "--tasks", "vibes"], "unknown section")]
    for args, expected in cases:
        r = run_cli(*args, "--out", str(tmp_path / "e.json"))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and expected in r.stderr, (args, r.stderr)
    assert not (tmp_path / "e.json").exists()
