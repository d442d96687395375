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
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import tiktoken
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


def byte_tokenizer():
    """256 byte tokens and forge's five special tokens: 261 ids, which a GPU run pads to 320 rows."""
    enc = tiktoken.Encoding(name="bytes", pat_str=data.SPLIT_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(data.SPECIAL_TOKENS)})
    return data.Tokenizer(enc, "bytes")


def test_samples_answers_and_greedy_checks_never_take_a_padding_id():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=320, n_tokens=tok.vocab_size, block_size=32)).eval()
    bias = torch.zeros(320)
    bias[tok.vocab_size:] = 30.0  # a padding id would win every step without the mask
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    samples = ev.unprompted_samples(model, tok, 3, 12, temperature=1.0, seed=0)
    assert sum(map(len, samples)) > 0 and max(t for s in samples for t in s) < tok.vocab_size
    answers = ev.answers(model, tok, ["hi", "say yo"], 8) + ev.answers(model, tok, ["hi"], 8, temperature=1.0, seed=0)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # the memorisation check asks whether greedy decoding gives the continuation: padding is never what it gives
    greedy_ids = model.generate([[tok.eot_id, 104, 105]], 4, temperature=0)[0]
    assert ev.loglikelihoods(model, [([tok.eot_id, 104, 105, *greedy_ids], 3)])[2] == [True]


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
    final = [r for r in train.read_metrics(pretrained["out_dir"]) if "val_loss" in r][-1]
    assert result["lm"]["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)  # train.py's own 2 val batches
    assert result["lm"]["val_bpb"] == pytest.approx(final["val_bpb"], rel=1e-4)    # the same bytes, the same bpb
    assert set(result["mc"]["embedded"]) >= set(ev.NORMS)
    assert 0 <= result["domain"]["samples"]["parse"] <= 1 and result["pii"]["samples"] == 8
    assert len(result["answers"]) == len(ev.ANSWER_PROMPTS)
    assert json.loads(out.read_text())["sections"] == cfg.tasks
    assert "lm/val_bpb" in ev.table(result)


def test_report_shows_each_stage_gain_curves_answers_and_audits(tmp_path):
    runs = tmp_path / "out"

    def stage(name, summary=None, result=None, metrics=None, png=None):
        (runs / name).mkdir(parents=True)
        for file, obj in (("summary.json", summary), ("eval.json", result)):
            if obj is not None:
                (runs / name / file).write_text(json.dumps(obj))
        if metrics:
            (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
        if png:
            (runs / name / png).write_bytes(b"\x89PNG")

    def result(name, val_loss, answer, **sections):
        return {"checkpoint": str(runs / name / "ckpt.pt"), "stage": name, "lm": {"val_loss": val_loss},
                "pii": {"samples": 8, "share_with_pii": val_loss / 10, "hits": {"ip": 1},
                        "verbatim_in_source": {"ip": 0}},
                "answers": {"Copy this: a b": answer}, **sections}

    stage("pretrain", {"stage": "pretrain", "steps": 20, "tokens": 1280, "val_loss": 2.7, "val_bpb": 1.1,
                       "unigram": 5.5, "data_dir": "data/x"},
          result("pretrain", 3.0, "pre"), [{"step": 20, "loss": 2.5, "lr": 0.01, "tokens": 1280}], png="loss.png")
    stage("sft", {"stage": "sft", "base": str(runs / "pretrain" / "ckpt.pt"), "seconds": 12.5, "steps": 40,
                  "before_by_difficulty": {"copy/1": 0.0, "copy/2": 0.0},
                  "after_by_difficulty": {"copy/1": 0.6, "copy/2": 0.4},
                  "text_loss_before": 3.1, "text_loss_after": 3.3,
                  "heldout": {"before": {"weak": {"sort": 0.0}, "elsewhere": {"copy": 0.0, "sort": 0.0},
                                         "weak_mean": 0.0, "elsewhere_mean": 0.0},
                              "after": {"weak": {"sort": 0.2}, "elsewhere": {"copy": 1.0, "sort": 0.9},
                                        "weak_mean": 0.2, "elsewhere_mean": 0.95}}},
          result("sft", 3.5, "sft!", accuracy={"mean": 0.5}, safety={"1": {"harmful": 4, "benign": 2,
                                                                         "refusal_rate": 0.75,
                                                                         "over_refusal_rate": 0.5}},
                 canary={"candidates": 1000, "max_exposure": 9.97,
                         "by_repeats": {"10": {"canaries": 2, "exposure": 8.5, "exposure_fit": 12.0, "extracted": 1}}}),
          [{"step": s, "loss": 3.0 - s / 100, "lr": 0.002} for s in (10, 20, 30, 40)])
    stage("dpo", {"stage": "dpo", "base": str(runs / "sft" / "ckpt.pt"), "seconds": 2.0,
                  "best": {"step": 0, "acc": 0.5},
                  "before_by_difficulty": {"copy/1": 0.6, "copy/2": 0.4},
                  "after_by_difficulty": {"copy/1": 0.5, "copy/2": 0.4},
                  "heldout": {"before": {"weak": {"sort": 0.2}, "elsewhere": {"copy": 1.0, "sort": 0.9},
                                         "weak_mean": 0.2, "elsewhere_mean": 0.95},
                              "after": {"weak": {"sort": 0.8}, "elsewhere": {"copy": 1.0, "sort": 0.85},
                                        "weak_mean": 0.8, "elsewhere_mean": 0.925}}},
          result("dpo", 3.6, "dpo!", safety={"1": {"harmful": 4, "benign": 2, "refusal_rate": 1.0,
                                                   "over_refusal_rate": 0.5}}))
    stage("rlhf", {"stage": "rlhf", "base": str(runs / "dpo" / "ckpt.pt"), "seconds": 3.0, "greedy_before": 0.25,
                   "greedy_after": 0.375, "pass_before": {"pass@1": 0.2}, "pass_after": {"pass@1": 0.3}},
          png="rlhf.png")  # no eval.json: the stage is still reported
    stage("rm", {"stage": "reward_model", "held_out_before": {"accuracy": 0.5}, "held_out": {"accuracy": 0.75}})

    path = ev.build_report(str(runs), str(tmp_path / "elsewhere" / "report.md"))
    text = open(path).read()
    main, appendix = text.split("## Appendix: every figure")
    assert main.index("## pretrain") < main.index("## sft") < main.index("## dpo") < main.index("## rlhf") \
        < main.index("## reward_model")
    # the overview: where each stage started (paths under the run root shown relative to it), its seconds, and the
    # before -> after figures its summary.json holds
    assert "| pretrain | random weights, on data/x | — | val loss 5.500 → 2.700 (from the unigram baseline); " \
           "1.100 bits/byte |" in main
    assert "| sft | pretrain/ckpt.pt | 12.5 | held-out accuracy 0.000 → 0.500; text loss 3.100 → 3.300 |" in main
    assert "| dpo | sft/ckpt.pt | 2.000 | held-out accuracy 0.500 → 0.450 (last step); best checkpoint: step 0, " \
           "0.500 (the start: no step beat it) |" in main
    assert "| rlhf | dpo/ckpt.pt | 3.000 | held-out accuracy 0.250 → 0.375; pass@1 0.200 → 0.300 |" in main
    assert "| reward_model | — | — | held-out pair accuracy 0.500 → 0.750 |" in main
    assert "| copy | 0.000 | 0.600 | 0.000 | 0.400 |" in main  # kinds as rows, before/after per difficulty
    # the teacher's weak spots: each chat stage that reports them, before -> after, in the main part
    assert main.index("## The teacher's weak spots") < main.index("## pretrain") and "designed experiment" in main
    assert "|  | sft | dpo |" in main and "| **weak spots, mean** | 0.000 → 0.200 | 0.200 → 0.800 |" in main
    assert "| **elsewhere, mean** | 0.000 → 0.950 | 0.950 → 0.925 |" in main
    assert "| sort, weak spot | 0.000 → 0.200 | 0.200 → 0.800 |" in main and "| copy, elsewhere | 0.000 → 1.000 | " \
        "1.000 → 1.000 |" in main
    assert "| highest logged learning rate (metrics.jsonl) | 0.002 |" in main
    # every image link is relative to the report and names a file that exists; sft drew no PNG, so the report
    # drew its curves from metrics.jsonl
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", main)
    assert [os.path.basename(x) for x in links] == ["loss.png", "curves_sft.png", "rlhf.png"]
    assert all(not os.path.isabs(x) and (tmp_path / "elsewhere" / x).exists() for x in links), links
    # the evaluation side by side: a column per stage with an eval.json (rlhf has none)
    assert "|  | pretrain | sft | dpo |" in main and "| val loss, nats/token | 3.000 | 3.500 | 3.600 |" in main
    assert "| task accuracy, greedy, mean of kind/difficulty | — | 0.500 | — |" in main
    assert "| Copy this: a b | pre | sft! | dpo! |" in main
    # the audits: from the last stage that ran each, with the other stages where they differ
    assert "| 10 | 2 | 8.500 | 12.0 | 1 | same |" in main  # canaries, only sft ran it
    assert "(other stages: pretrain 0.300, sft 0.350)" in main  # personal data
    assert "| 1 | 4 | 2 | 1.000 | 0.500 | refused: sft 0.750 |" in main  # safety, from dpo
    assert "| lm/val_loss | 3.000 | 3.500 | 3.600 |" in appendix and "| text_loss_after | 3.300 |" in appendix
    r = run_cli("--report", str(runs))
    assert r.returncode == 0 and "report.md" in r.stdout and (runs / "report.md").exists()


def test_report_of_a_pretraining_run_under_way_reads_its_metrics(tmp_path):
    run = tmp_path / "pretrain"  # the report of one run folder, before train.py wrote its summary.json
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0, "tokens": 640}) + "\n"
                                       + json.dumps({"step": 20, "loss": 2.5, "tokens": 1280, "val_loss": 2.7,
                                                     "val_bpb": 1.1}) + "\n" + '{"step": 3')  # a line being written
    text = open(ev.build_report(str(run))).read()
    assert "| pretrain | — | — | val loss 2.700; 1.100 bits/byte |" in text
    assert "![curves_pretrain.png](curves_pretrain.png)" in text and (run / "curves_pretrain.png").exists()


# --- bad input: one line, exit 2 ---

def test_json_flag_writes_the_document_alone_on_stdout(pretrained, tmp_path):
    r = run_cli(pretrained["ckpt"], "--tasks", "lm", "--lm-batches", "1", "--json", "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lm"]["val_bpb"] > 0  # the whole of stdout parses (`| python -m json.tool`)
    assert "lm:" in r.stderr                          # the progress lines went to stderr


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
