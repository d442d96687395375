"""Tests for train.py: python -m pytest -q tests/test_train.py

The step (overfitting, accumulation, DDP on 2 CPU processes with gloo), the schedules, checkpoints
(atomic saves, exact resume after a stop and after kill -9), a diverging run, bad input, the
command line end to end, Muon (against torch.optim.Muon, Newton-Schulz, the split, exact resume),
and FSDP (2 gloo processes: equivalence, memory per rank, sharded checkpoints resumed on another
number of ranks, conversion to one file and back). Everything runs on the CPU on a tiny dataset
that data.prepare builds from a few standard-library files, with a tiny vocabulary.
"""
import json
import math
import os
import signal
import socket
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import sft  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig, config_from_preset  # noqa: E402

# A run small enough for a test: the tiny preset on 4 x 32 tokens per step.
TINY = dict(preset="tiny", batch_size=4, seq_len=32, eval_batches=2, log_every=1, eval_every=100, save_every=100,
            samples=0, device="cpu", lr=3e-3, warmup_steps=2)


PREPARE = data.prepare  # the real one, also while a test swaps data.prepare out


def make_data(folder, out_dir, vocab_size):
    """A data folder from a few standard-library modules, written as .txt so they are cut into many documents."""
    os.makedirs(folder, exist_ok=True)
    for name in ["textwrap", "shlex", "fnmatch", "bisect", "heapq", "calendar"]:
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name + ".py"), encoding="utf-8") as f:
            text = f.read()
        with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return PREPARE(data.DataConfig(input=[str(folder)], out_dir=out_dir, vocab_size=vocab_size, rules="",
                                        doc_chars=1500, val_fraction=0.15, workers=1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_data(root / "text", str(root / "tiny"), vocab_size=320)
    return str(root / "tiny")


def tiny_cfg(data_dir, out_dir, **overrides):
    return train.TrainConfig(**{**TINY, "data_dir": data_dir, "out_dir": str(out_dir), **overrides})


def tiny_model(seed=0, vocab_size=64, block_size=16):
    torch.manual_seed(seed)
    return GPT(config_from_preset("tiny", vocab_size=vocab_size, block_size=block_size))


def masked_batch(B=4, T=16, vocab_size=64, seed=0):
    """Random tokens whose rows have very different numbers of counted targets (-1 = ignored)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (B, T), generator=g)
    y = torch.randint(0, vocab_size, (B, T), generator=g)
    for row in range(B):
        y[row, : row * T // (B + 1)] = -1  # row 0 counts T targets, the last row about T / (B + 1)
    return x, y


CPU = train.Runtime(device="cpu", device_type="cpu", dtype=torch.float32)


# --- the step ---

def test_train_step_overfits_one_batch():
    model = tiny_model()
    opt = train.build_optimizer(model, lr=1e-2, weight_decay=0.0)
    batch = masked_batch(B=2, T=16)
    losses = [train.train_step(model, opt, [batch], CPU)[0] for _ in range(150)]
    assert losses[0] > 3.5 and losses[-1] < 0.05, (losses[0], losses[-1])


def test_train_step_skips_the_update_on_a_nonfinite_loss():
    model = tiny_model()
    opt = train.build_optimizer(model, lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = train.train_step(model, opt, [masked_batch()], CPU, loss_fn=lambda m, b: train.lm_loss(m, b) * math.inf)
    assert not math.isfinite(loss) and not opt.state  # AdamW never stepped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_accumulating_4x1_equals_one_batch_of_4():
    x, y = masked_batch(B=4, T=16)
    a, b = tiny_model(), tiny_model()
    opt_a = train.build_optimizer(a, lr=1e-2, weight_decay=0.1)
    opt_b = train.build_optimizer(b, lr=1e-2, weight_decay=0.1)
    loss_a, norm_a = train.train_step(a, opt_a, [(x[i:i + 1], y[i:i + 1]) for i in range(4)], CPU)
    loss_b, norm_b = train.train_step(b, opt_b, [(x, y)], CPU)
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    # Adam's first step is about lr * sign(gradient), so float noise on a near-zero gradient can move a weight
    # by a small fraction of lr; a wrong weighting of the micro-batches flips signs and moves weights by ~2 lr.
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-4, msg=name)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, batches, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rt = train.setup_runtime("cpu")
    raw = tiny_model()
    model = DDP(raw)
    opt = train.build_optimizer(raw, lr=1e-2, weight_decay=0.1)
    per_rank = len(batches) // world_size
    mine = batches[rank * per_rank:(rank + 1) * per_rank]  # 2 micro-steps each: no_sync on the first
    losses = [train.train_step(model, opt, mine, rt) for _ in range(2)]
    if rank == 0:
        torch.save({"model": raw.state_dict(), "losses": losses}, out_path)
    torch.distributed.destroy_process_group()
    open(f"{out_path}.done{rank}", "w").close()  # this rank got through all its work


# torch 2.13's gloo backend now and then aborts a process while the interpreter shuts down, after every
# line of the program has run: "terminate called without an active exception", a SIGABRT with no Python
# frame left (seen here in about 1 run of 20, never reproduced outside pytest). Such a run did all its
# steps, so the DDP tests accept that one failure, and only once the work is shown complete; every loss
# and weight is still compared below.
TEARDOWN_ABORT = "SIGABRT"


def test_ddp_on_two_processes_equals_one_process_with_accumulation(tmp_path):
    batches = [masked_batch(B=2, T=16, seed=s) for s in range(4)]
    batches[3] = (batches[3][0], torch.full_like(batches[3][1], -1).index_fill_(1, torch.tensor([0]), 5))  # 2 targets
    out = tmp_path / "ddp.pt"
    try:
        mp.spawn(_ddp_worker, args=(2, _free_port(), batches, str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != TEARDOWN_ABORT or not all(os.path.exists(f"{out}.done{r}") for r in range(2)):
            raise
    ddp = torch.load(out, weights_only=True)

    ref = tiny_model()
    opt = train.build_optimizer(ref, lr=1e-2, weight_decay=0.1)
    ref_losses = [train.train_step(ref, opt, batches, CPU) for _ in range(2)]
    for (loss, norm), (ref_loss, ref_norm) in zip(ddp["losses"], ref_losses):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(ddp["model"][name], p, rtol=0, atol=1e-4, msg=name)  # see the test above


# --- schedule ---

def test_schedules_warm_up_then_follow_their_shapes():
    cfg = train.TrainConfig(lr=1.0, min_lr_frac=0.1, warmup_steps=10, max_steps=100, cooldown_frac=0.2)
    for schedule in ("cosine", "wsd", "constant"):
        lrs = [train.lr_at(s, replace(cfg, schedule=schedule)) for s in range(100)]
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
        assert all(a < b for a, b in zip(lrs[:10], lrs[1:10])), schedule  # warmup rises linearly
    cosine = [train.lr_at(s, cfg) for s in range(10, 100)]
    assert all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] == pytest.approx(0.1, abs=1e-3)
    assert train.lr_at(55, cfg) == pytest.approx(0.55)  # the cosine's midpoint: halfway between lr and min_lr
    wsd = [train.lr_at(s, replace(cfg, schedule="wsd")) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70 and all(a > b for a, b in zip(wsd[80:], wsd[81:])) and wsd[-1] < 0.15
    assert [train.lr_at(s, replace(cfg, schedule="constant")) for s in range(10, 100)] == [1.0] * 90


# --- checkpoints ---

def run_cli(args, cwd=ROOT, prefix=()):
    return subprocess.run([sys.executable, *prefix, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def cli_args(data_dir, out_dir, **overrides):
    args = []
    for key, value in {**TINY, "data_dir": data_dir, "out_dir": str(out_dir), **overrides}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def losses(out_dir):
    return {r["step"]: r["loss"] for r in train.read_metrics(str(out_dir))}


# A run that kills itself with SIGKILL as its 7th step begins: no cleanup code runs, as in a preemption.
KILL_AT_STEP_7 = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train
step, calls = train.train_step, [0]
def killing_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(*args, **kwargs)
train.train_step = killing_step
train.cli(sys.argv[1:])
"""


def steps_logged(out_dir):
    """The raw sequence of logged steps: a duplicated or missing record shows here, not in a dict."""
    return [r["step"] for r in train.read_metrics(str(out_dir))]


def test_resume_continues_bitwise_after_a_stop_and_after_kill_9(data_dir, tmp_path):
    # Dropout draws from torch's generator at every step, so a resume that failed to restore the RNG
    # states would change the losses after step 4, not only one that lost the weights or the data position.
    common = dict(max_steps=8, save_every=4, dropout=0.1)
    straight = run_cli(["train.py", *cli_args(data_dir, tmp_path / "straight", **common)])
    assert straight.returncode == 0, straight.stderr
    reference = losses(tmp_path / "straight")
    assert steps_logged(tmp_path / "straight") == list(range(1, 9)) and len(set(reference.values())) == 8

    stopped = run_cli(["train.py", *cli_args(data_dir, tmp_path / "stopped", **common, stop_at=4)])
    assert stopped.returncode == 0, stopped.stderr
    assert [os.path.basename(p) for p in train.list_checkpoints(str(tmp_path / "stopped"))] == ["ckpt_000004.pt"]

    killed = run_cli([*cli_args(data_dir, tmp_path / "killed", **common)], prefix=["-c", KILL_AT_STEP_7])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert max(losses(tmp_path / "killed")) == 6  # steps 5 and 6 ran after the checkpoint at 4

    for name in ("stopped", "killed"):
        resumed = run_cli(["train.py", *cli_args(data_dir, tmp_path / name, **common, resume="auto")])
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
        assert steps_logged(tmp_path / name) == list(range(1, 9)), name  # killed run's steps 5, 6 not twice
        assert losses(tmp_path / name) == reference, name  # bitwise: the floats compare equal


def test_ctrl_c_stops_with_one_line_and_status_130_and_its_command_continues(data_dir, tmp_path, ctrl_c):
    args = cli_args(data_dir, tmp_path / "run", max_steps=8, save_every=4)
    stopped = ctrl_c("train", 7, *args)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.count("\n") == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "after step 6" in stopped.stderr and "ckpt_000004.pt" in stopped.stderr, stopped.stderr
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]
    resumed = ctrl_c.continues(stopped)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and steps_logged(tmp_path / "run") == list(range(1, 9))


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model()
    opt = train.build_optimizer(model, lr=1e-2, weight_decay=0.1)
    train.train_step(model, opt, [masked_batch()], CPU)
    cfg = train.TrainConfig()
    train.save_checkpoint(str(tmp_path), 1, model, opt, cfg, {"position": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train.train_step(model, opt, [masked_batch(seed=1)], CPU)

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies while writing
    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path), 2, model, opt, cfg, {"position": 2})
    monkeypatch.undo()

    assert [os.path.basename(p) for p in train.list_checkpoints(str(tmp_path))] == ["ckpt_000001.pt"]
    ckpt = train.load_checkpoint(str(tmp_path))  # a folder means its newest checkpoint
    assert ckpt["step"] == 1 and ckpt["loader"] == {"position": 1}
    for name, p in train.model_from_checkpoint(ckpt).state_dict().items():
        assert torch.equal(p, saved[name]), name


def test_checkpoints_keep_the_last_k_and_hold_no_wrapper_prefixes(data_dir, tmp_path):
    train.main(tiny_cfg(data_dir, tmp_path, max_steps=6, save_every=1, keep_last=2))
    assert [os.path.basename(p) for p in train.list_checkpoints(str(tmp_path))] == ["ckpt_000005.pt", "ckpt_000006.pt"]
    ckpt = train.load_checkpoint(str(tmp_path))
    assert not [k for k in ckpt["model"] if k.startswith(("module.", "_orig_mod."))]
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"} and ckpt["config"]["max_steps"] == 6


def test_resume_from_a_checkpoint_path_into_a_new_folder(data_dir, tmp_path):
    train.main(tiny_cfg(data_dir, tmp_path / "a", max_steps=2))
    result = train.main(tiny_cfg(data_dir, tmp_path / "b", max_steps=4, resume=str(tmp_path / "a" / "ckpt_000002.pt")))
    assert result["step"] == 4 and [r["step"] for r in train.read_metrics(str(tmp_path / "b"))] == [3, 4]


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    forward, calls = GPT.forward, [0]

    def poisoned_forward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls[0] += 1
        return logits, loss * float("nan") if calls[0] == 5 else loss
    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    with pytest.raises(SystemExit) as exit_info:
        train.cli(cli_args(data_dir, tmp_path, max_steps=8, save_every=2))
    assert exit_info.value.code == 1  # diverged: 1, unlike bad input (2)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: step 5: loss nan") and "last finite loss" in err and "grad norm" in err
    assert len(err.splitlines()) == 1
    assert [os.path.basename(p) for p in train.list_checkpoints(str(tmp_path))] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    ckpt = train.load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_gradient_with_a_finite_loss_stops_too(data_dir, tmp_path, monkeypatch, capsys):
    forward, calls = GPT.forward, [0]

    def poisoned_backward(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            loss.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite, every gradient is nan
        return logits, loss
    monkeypatch.setattr(GPT, "forward", poisoned_backward)
    with pytest.raises(SystemExit) as exit_info:
        train.cli(cli_args(data_dir, tmp_path, max_steps=6, save_every=2))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: step 3: loss ") and "grad norm nan" in err and "loss nan" not in err, err
    ckpt = train.load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --- bad input ---

def expect_error(args, capsys, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        train.cli(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_help_lists_every_config_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.cli(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--no-compile" in out and "5% of max_steps" in out
    assert all("--" + f.name.replace("_", "-") in out for f in train.fields(train.TrainConfig))


def test_bad_input_is_one_line_and_exit_status_2(data_dir, tmp_path, capsys):
    expect_error(["--no-such-flag"], capsys, "--no-such-flag")
    expect_error(["--schedule", "linear"], capsys, "linear")
    (tmp_path / "file").write_text("not a folder")
    expect_error(cli_args(data_dir, tmp_path / "file"), capsys, "is a file")
    expect_error(cli_args(data_dir, tmp_path / "run", total_batch_tokens=1000), capsys, "1000", "4", "32", "128")


@pytest.mark.parametrize("flag", ["eval_every", "log_every", "save_every", "keep_last"])
def test_step_intervals_and_keep_last_below_1_are_refused(flag, data_dir, tmp_path, capsys):
    for value in (0, -1):
        expect_error(cli_args(data_dir, tmp_path / "run", **{flag: value}), capsys,
                     f"--{flag.replace('_', '-')} {value}", "at least 1")
    assert not train.list_checkpoints(str(tmp_path / "run"))


def test_threads_sets_torchs_cpu_threads_and_none_leaves_the_default():
    before = torch.get_num_threads()
    try:
        train.setup_runtime("cpu", None, threads=1)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        train.setup_runtime("cpu", None, None)
        assert torch.get_num_threads() == before
        with pytest.raises(train.TrainError, match="--threads 0"):
            train.setup_runtime("cpu", None, 0)
    finally:
        torch.set_num_threads(before)


def test_threads_flag_reaches_the_run(data_dir, tmp_path):
    result = run_cli(["train.py", *cli_args(data_dir, tmp_path / "run", max_steps=1, threads=1)])
    assert result.returncode == 0, result.stderr
    assert "1 threads" in result.stdout


def test_the_vocabulary_is_padded_to_64_on_cuda_only():
    assert [train.padded_vocab_size(v, "cuda") for v in (64, 65, 50257)] == [64, 128, 50304]
    assert train.padded_vocab_size(50257, "cpu") == 50257
    cfg = train.TrainConfig(preset="tiny", seq_len=32)
    assert train.build_model_config(cfg, 300, "cuda").vocab_size == 320
    assert train.build_model_config(cfg, 300, "cpu").vocab_size == 300
    # the model knows which ids are tokens, so generation never samples a padding row (issue 18)
    assert [train.build_model_config(cfg, 300, device).n_tokens for device in ("cuda", "cpu")] == [300, 300]


def test_triton_kernels_without_a_gpu_or_interpreter_say_why(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expect_error(cli_args(data_dir, tmp_path / "run", attn="triton"), capsys, "need a CUDA GPU", "TRITON_INTERPRET=1")


def test_resume_refuses_another_model_or_tokenizer(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(tiny_cfg(data_dir, run, max_steps=2))
    expect_error(cli_args(data_dir, run, max_steps=4, resume="auto", n_layer=3), capsys, "n_layer=2", "n_layer=3")
    other = str(tmp_path / "other_data")
    make_data(tmp_path / "text", other, vocab_size=300)  # another BPE: another tokenizer hash
    theirs, ours = data.load_meta(data_dir)["tokenizer_hash"], data.load_meta(other)["tokenizer_hash"]
    assert theirs != ours
    expect_error(cli_args(other, run, max_steps=4, resume="auto"), capsys, theirs, ours)


# --- end to end ---

def test_missing_data_is_prepared_before_training(tmp_path, monkeypatch):
    asked = []

    def small_prepare(cfg):  # the embedded dataset, swapped for the tiny text to keep the test fast
        asked.append(cfg)
        return make_data(tmp_path / "text", cfg.out_dir, vocab_size=300)
    monkeypatch.setattr(data, "prepare", small_prepare)
    result = train.main(tiny_cfg(str(tmp_path / "data" / "stdlib"), tmp_path / "run", max_steps=2))
    assert [(c.dataset, c.out_dir) for c in asked] == [("stdlib", str(tmp_path / "data" / "stdlib"))]
    assert math.isfinite(result["val_loss"])


def test_command_line_trains_evaluates_saves_and_samples(data_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli(["train.py", *cli_args(data_dir, run, max_steps=40, eval_every=20, log_every=10, samples=2,
                                              sample_tokens=16)])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "val bpb" in out and "--- sample 2 ---" in out and "unigram baseline" in out and "tok/s" in out
    records = train.read_metrics(str(run))
    assert all({"step", "loss", "lr", "tokens"} <= set(r) for r in records)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and all(r["val_bpb"] > 0 for r in evals)
    assert evals[-1]["val_loss"] < records[0]["loss"] - 1.0  # it learned
    assert os.path.getsize(run / "loss.png") > 0 and train.list_checkpoints(str(run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == "pretrain" and summary["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert summary["checkpoint"] == train.list_checkpoints(str(run))[-1]
    plotted = run_cli([os.path.join(ROOT, "train.py"), "--plot", str(run), str(run)], cwd=tmp_path)
    assert plotted.returncode == 0 and os.path.getsize(tmp_path / "loss_compare.png") > 0


def exact_bpb(model, batches, tokenizer):
    """The reference: summed nats of every scored target over ln 2, over the UTF-8 bytes those targets decode to
    (what lm-evaluation-harness computes), written out without train.py's helpers."""
    special = set(tokenizer.special_ids.values())
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits, _ = model.eval()(x, y)
            nats += torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1),
                                                      ignore_index=-1, reduction="sum").item()
            text_ids = [t for t in y.flatten().tolist() if t != -1 and t not in special]
            n_bytes += len(tokenizer.enc.decode_bytes(text_ids))
    return nats / math.log(2) / n_bytes


def test_bits_per_byte_counts_the_bytes_of_exactly_the_scored_tokens(data_dir):
    tokenizer = data.load_tokenizer(data_dir)
    loader = data.TokenLoader(data_dir, "val", 4, 32, shuffle=False)
    batches = [loader.next_batch() for _ in range(2)]
    x, y = batches[1]
    y[0, :10] = -1  # ignored targets are neither scored nor counted
    model = tiny_model(vocab_size=tokenizer.vocab_size, block_size=32)
    loss = train.evaluate(model, batches, CPU)
    assert train.bits_per_byte(loss, batches, tokenizer.token_bytes(), CPU) == pytest.approx(
        exact_bpb(model, batches, tokenizer), rel=1e-6)
    # The special token is no text: the boundary adds no bytes, as in meta.json's split counts.
    assert tokenizer.token_bytes()[tokenizer.eot_id] == 0


def test_the_run_reports_the_exact_bpb_of_its_validation_batches(data_dir, tmp_path):
    # Two batches of the val split, whose bytes per token differ from the whole split's: the reported bpb is
    # that of the tokens scored (the split's average would be off by their difference).
    run = tmp_path / "run"
    result = train.main(tiny_cfg(data_dir, run, max_steps=3, eval_batches=2))
    tokenizer = data.load_tokenizer(data_dir)
    loader = data.TokenLoader(data_dir, "val", 4, 32, shuffle=False)
    batches = [loader.next_batch() for _ in range(2)]
    split = data.load_meta(data_dir)["splits"]["val"]
    special = set(tokenizer.special_ids.values())
    scored = sum(len(tokenizer.enc.decode_bytes([t for t in y.flatten().tolist() if t not in special]))
                 for _, y in batches)
    assert scored / sum(b[1].numel() for b in batches) != pytest.approx(split["bytes"] / split["tokens"], rel=1e-3)
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * sum(b[1].numel() for b in batches)
                                              / math.log(2) / scored, rel=1e-9)


def test_torchrun_on_two_cpu_processes_equals_one_process_with_accumulation(data_dir, tmp_path):
    # 512 tokens per step: 4 x 32 x 2 ranks x 2 micro-steps under torchrun, 4 x 32 x 1 x 4 in one process.
    # The loader hands rank r of world W the items r*B.. of each W*B-item slice, so both read the same tokens.
    args = cli_args(data_dir, tmp_path / "ddp", max_steps=3, total_batch_tokens=512)
    result = run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={_free_port()}", "train.py", *args])
    # rank 0 prints "done" only after the last step's all-reduce, which rank 1 must have joined
    finished = result.stdout.count("done: 3 steps") == 1
    teardown_abort = f"({TEARDOWN_ABORT})" in result.stderr and finished
    assert result.returncode == 0 or teardown_abort, result.stdout[-1500:] + "\n--- stderr ---\n" + result.stderr[:4000]
    assert "2 ranks x 2 micro-steps" in result.stdout and finished
    single = train.main(tiny_cfg(data_dir, tmp_path / "single", max_steps=3, total_batch_tokens=512))
    ddp, ref = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert sorted(ddp) == [1, 2, 3] and all(ddp[s] == pytest.approx(ref[s], rel=1e-5) for s in ref)
    assert train.read_metrics(str(tmp_path / "ddp"))[-1]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)


# --- scaling laws ---

def test_compute_optimal_spends_the_budget_at_20_tokens_per_parameter():
    params, tokens = train.compute_optimal(1e18)
    assert tokens / params == pytest.approx(20) and 6 * params * tokens == pytest.approx(1e18)


def test_sweep_fits_a_power_law_and_plots_it(data_dir, tmp_path):
    sizes = [dict(n_layer=1, n_head=2, n_embd=32), dict(n_layer=2, n_head=2, n_embd=64)]
    slope, scale = train.sweep(tiny_cfg(data_dir, tmp_path), 2e9, sizes=sizes)
    assert slope < 0 and scale > 0
    assert os.path.getsize(tmp_path / "sweep" / "scaling.png") > 0


# --- Muon ---

MUON_SHAPES = [(32, 32), (64, 16), (16, 64)]  # square, tall (out > in: its step is scaled by 2), wide


def muon_pair(shape, ns_dtype, nesterov=True, steps=4, seed=0):
    """The same matrix after `steps` steps of train.Muon and of torch.optim.Muon on the same random gradients, with
    torch's lr-adjustment convention "original" (Keller Jordan's sqrt(max(1, out / in)), torch's default)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=g) * 0.1
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = train.Muon([{"params": [ours], "muon": True}], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                     ns_dtype=ns_dtype)
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                           adjust_lr_fn="original")
    for _ in range(steps):
        grad = torch.randn(shape, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    return start, ours.detach(), theirs.detach()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", MUON_SHAPES)
def test_muon_equals_torch_optim_muon_bitwise_in_bfloat16(shape, nesterov):
    # torch.optim.Muon runs Newton-Schulz in bfloat16; ours, given that dtype, does the same operations in the same
    # order (momentum lerp, Nesterov lerp, Frobenius scaling, the addmm's, decay then step), so the floats match.
    _, ours, theirs = muon_pair(shape, torch.bfloat16, nesterov)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@pytest.mark.parametrize("shape", MUON_SHAPES)
def test_muon_in_float32_on_the_cpu_moves_the_weights_as_torchs_bfloat16_does(shape):
    # The CPU path iterates in float32. bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2%), compounded
    # over 5 iterations of 3 matmuls: the steps differ by about 1% (measured 0.9-1.2%); 3% leaves room, while a wrong
    # lr scale (2x on the tall shape), a missing decay or momentum would be off by far more.
    start, ours, theirs = muon_pair(shape, torch.float32)
    assert (ours - theirs).norm() / (theirs - start).norm() < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (96, 32)])
def test_newton_schulz_leaves_the_singular_vectors_and_moves_the_singular_values_near_1(shape, dtype):
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g)
    G = torch.randn(shape, generator=g) + 3 * u @ v  # gradient-like: noise and one direction ~10x stronger
    out = train.newton_schulz(G, dtype=dtype).float()
    s = torch.linalg.svdvals(out)
    # Jordan's quintic does not converge to 1: measured 0.68-1.14 over 20 seeds in both dtypes
    assert 0.65 < s.min() and s.max() < 1.2, (s.min(), s.max())
    # exactly U p(p(...p(S/|G|_F))) V^T: the polynomial acts on each singular value alone
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    x, (a, b, c) = S / G.double().norm(), train.MUON_COEFFICIENTS
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), U @ torch.diag(x) @ Vh, rtol=0, atol=1e-5)


def test_muons_adamw_groups_step_as_torch_optim_adamw():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    ours, theirs = [torch.nn.Parameter(p.clone()) for p in params], [torch.nn.Parameter(p.clone()) for p in params]
    opt = train.Muon([{"params": ours[:1], "muon": False, "weight_decay": 0.1},
                      {"params": ours[1:], "muon": False, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95))
    ref = torch.optim.AdamW([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95))
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # the same formula: equal up to float rounding


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_every_other_parameter_once(tied):
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny", vocab_size=64, block_size=16, tie_embeddings=tied))
    opt = train.build_optimizer(model, lr=3e-3, weight_decay=0.1, optimizer="muon", muon_lr=0.02)
    names = {id(p): name for name, p in model.named_parameters()}
    placed = [(names[id(p)], group["muon"]) for group in opt.param_groups for p in group["params"]]
    assert sorted(n for n, _ in placed) == sorted(names.values())  # each parameter once, none left out
    muon = {n for n, m in placed if m}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert not muon & {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert ("lm_head.weight" in names.values()) == (not tied)  # untied: a tensor of its own, with AdamW
    assert [group["lr"] for group in opt.param_groups] == [0.02, 3e-3, 3e-3]  # Muon's own peak, then AdamW's
    assert train.describe_optimizer(opt).startswith("optimizer: Muon on 8 tensors (")


def test_resume_with_muon_continues_bitwise(data_dir, tmp_path, capsys):
    # In one process, unlike the AdamW test above: main restores every RNG state from the checkpoint anyway.
    common = dict(max_steps=8, save_every=4, dropout=0.1, optimizer="muon")  # dropout: the RNG states matter too
    train.main(tiny_cfg(data_dir, tmp_path / "straight", **common))
    out = capsys.readouterr().out
    assert "optimizer: Muon on 8 tensors" in out and "AdamW on" in out
    reference = losses(tmp_path / "straight")
    assert len(set(reference.values())) == 8 and reference[8] < reference[1] - 0.5  # it trains
    train.main(tiny_cfg(data_dir, tmp_path / "stopped", **common, stop_at=4))
    assert train.load_checkpoint(str(tmp_path / "stopped"))["optimizer"]["state"]  # momentum buffers and moments
    train.main(tiny_cfg(data_dir, tmp_path / "stopped", **common, resume="auto"))
    assert "resumed from" in capsys.readouterr().out
    assert steps_logged(tmp_path / "stopped") == list(range(1, 9)) and losses(tmp_path / "stopped") == reference


def test_muon_refuses_fsdp_in_one_line(data_dir, tmp_path, capsys):
    expect_error(cli_args(data_dir, tmp_path / "run", optimizer="muon", parallel="fsdp"), capsys,
                 "--optimizer muon", "--parallel fsdp")
    expect_error(["--optimizer", "sgd"], capsys, "sgd")


def test_resume_refuses_a_muon_checkpoint_under_adamw(data_dir, tmp_path, capsys):
    train.main(tiny_cfg(data_dir, tmp_path / "run", max_steps=2, optimizer="muon"))
    expect_error(cli_args(data_dir, tmp_path / "run", max_steps=4, resume="auto"), capsys,
                 "--optimizer muon", "--optimizer adamw")


# --- FSDP ---

def held_bytes(tensors):
    """Bytes of memory these tensors hold on this process: of a DTensor its local shard, each storage once."""
    storages = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def adam_moments(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]  # not the step counts


def _fsdp_worker(rank, world_size, port, batches, plain_path, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rt = train.setup_runtime("cpu", parallel="fsdp")
    model = train.shard_model(tiny_model(), rt)
    opt = train.build_optimizer(model, lr=1e-2, weight_decay=0.1)
    per_rank = len(batches) // world_size
    mine = batches[rank * per_rank:(rank + 1) * per_rank]  # 2 micro-steps each: the reduce-scatter only after the 2nd
    synced = []  # before each micro-step's forward: has a reduce-scatter handed this rank its gradient shards yet?

    def watched_loss(m, batch):
        synced.append(any(p.grad is not None for p in m.parameters()))
        return train.lm_loss(m, batch)
    losses = [train.train_step(model, opt, mine, rt, loss_fn=watched_loss) for _ in range(2)]
    held = {"params": held_bytes(model.parameters()), "adam": held_bytes(adam_moments(opt))}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered onto rank 0's CPU
    trained = get_state_dict(model, opt, options=full)
    plain = torch.load(plain_path, weights_only=True)  # a single-file checkpoint, as DDP and one process save it
    train.load_state(plain_path, plain, model, opt)
    loaded = get_state_dict(model, opt, options=full)
    torch.save({"losses": losses, "synced": synced, "held": held, "trained": trained, "loaded": loaded},
               f"{out_path}.{rank}")
    torch.distributed.destroy_process_group()
    open(f"{out_path}.done{rank}", "w").close()


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    """Two FSDP ranks on gloo, each 2 steps of 2 micro-batches (the DDP test's batches), then a single-file checkpoint
    loaded into their shards: (batches, that checkpoint, what each rank reported)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    batches = [masked_batch(B=2, T=16, seed=s) for s in range(4)]
    batches[3] = (batches[3][0], torch.full_like(batches[3][1], -1).index_fill_(1, torch.tensor([0]), 5))  # 2 targets
    other = tiny_model(seed=1)
    opt = train.build_optimizer(other, lr=1e-2, weight_decay=0.1)
    train.train_step(other, opt, batches[:1], CPU)
    plain = {"model": other.state_dict(), "optimizer": opt.state_dict()}
    torch.save(plain, tmp / "plain.pt")
    out = tmp / "rank"
    try:
        mp.spawn(_fsdp_worker, args=(2, _free_port(), batches, str(tmp / "plain.pt"), str(out)), nprocs=2, join=True)
    except mp.ProcessExitedException as e:  # the gloo teardown abort, accepted as in the DDP test
        if e.signal_name != TEARDOWN_ABORT or not all(os.path.exists(f"{out}.done{r}") for r in range(2)):
            raise
    return batches, plain, [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


def test_fsdp_on_two_processes_equals_one_process_with_accumulation(fsdp_ranks):
    batches, _, ranks = fsdp_ranks
    ref = tiny_model()
    opt = train.build_optimizer(ref, lr=1e-2, weight_decay=0.1)
    ref_losses = [train.train_step(ref, opt, batches, CPU) for _ in range(2)]
    for rank in ranks:
        for (loss, norm), (ref_loss, ref_norm) in zip(rank["losses"], ref_losses):
            assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-4)
        assert rank["synced"] == [False, False] * 2  # no gradient travelled before the last micro-step of a step
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(ranks[0]["trained"][0][name], p, rtol=0, atol=1e-4, msg=name)  # see the DDP test


def test_fsdp_each_rank_holds_half_the_parameters_and_optimizer_state(fsdp_ranks):
    _, _, ranks = fsdp_ranks
    model = tiny_model()
    opt = train.build_optimizer(model, lr=1e-2, weight_decay=0.1)
    train.train_step(model, opt, [masked_batch()], CPU)
    whole = {"params": held_bytes(model.parameters()), "adam": held_bytes(adam_moments(opt))}
    assert whole["adam"] == 2 * whole["params"]  # AdamW's two moments, fp32 like the weights
    for key, total in whole.items():
        held = [rank["held"][key] for rank in ranks]
        assert all(0.45 * total < h < 0.55 * total for h in held), (key, held, total)
        assert total <= sum(held) < 1.05 * total, (key, held, total)  # rows split, padded up to equal shards


def test_a_single_file_checkpoint_loads_into_fsdp_shards(fsdp_ranks):
    _, plain, ranks = fsdp_ranks
    model_state, optim_state = ranks[0]["loaded"]  # gathered back from the shards the file was loaded into
    for name, p in plain["model"].items():
        assert torch.equal(model_state[name], p), name
    # optimizer.state_dict() numbers the parameters in param-group order; the gathered state names them
    model = tiny_model()
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in train.build_optimizer(model, lr=0.0, weight_decay=0.0).param_groups for p in g["params"]]
    assert len(plain["optimizer"]["state"]) == len(order) == len(optim_state["state"])
    for i, name in enumerate(order):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optim_state["state"][name][key], plain["optimizer"]["state"][i][key]), (name, key)


def torchrun_two(args, steps):
    """train.py on 2 CPU processes under torchrun; accepts the gloo teardown abort once the run is shown complete."""
    result = run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={_free_port()}", "train.py", *args])
    finished = result.stdout.count(f"done: {steps} steps") == 1
    teardown_abort = f"({TEARDOWN_ABORT})" in result.stderr and finished
    assert result.returncode == 0 or teardown_abort, result.stdout[-1500:] + "\n--- stderr ---\n" + result.stderr[:4000]
    assert finished
    return result


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    """A 2-rank FSDP run: 6 steps of 512 tokens (4 x 32 x 2 ranks x 2 micro-steps), sharded checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("fsdp_run") / "run"
    torchrun_two(cli_args(data_dir, out, max_steps=6, save_every=3, total_batch_tokens=512, parallel="fsdp"), 6)
    return out


def test_fsdp_checkpoint_resumes_on_one_process_and_bitwise_on_two_ranks(fsdp_run, data_dir, tmp_path):
    names = [os.path.basename(p) for p in train.list_checkpoints(str(fsdp_run))]
    assert names == ["ckpt_000003.dcp", "ckpt_000006.dcp"]
    shards = fsdp_run / "ckpt_000003.dcp"
    assert sorted(os.listdir(shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # a file per rank
    reference = losses(fsdp_run)
    # One plain process reads both ranks' shards and continues with 4 micro-steps where the ranks did 2 x 2.
    train.main(tiny_cfg(data_dir, tmp_path / "one", max_steps=6, total_batch_tokens=512, resume=str(shards)))
    one = losses(tmp_path / "one")
    assert sorted(one) == [4, 5, 6] and all(one[s] == pytest.approx(reference[s], rel=1e-5) for s in one)
    assert [os.path.basename(p) for p in train.list_checkpoints(str(tmp_path / "one"))] == ["ckpt_000006.pt"]
    # The same 2 ranks continue exactly as the uninterrupted run did.
    torchrun_two(cli_args(data_dir, tmp_path / "two", max_steps=6, total_batch_tokens=512, parallel="fsdp",
                          resume=str(shards)), 6)
    assert losses(tmp_path / "two") == {s: reference[s] for s in (4, 5, 6)}  # bitwise: the floats compare equal


def plain_copy(path):
    """A plain model and optimizer with checkpoint `path` (a .pt or a .dcp) loaded into them, and its dict."""
    ckpt = train.load_checkpoint(path, sharded_ok=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    optimizer = train.build_optimizer(model, lr=0.0, weight_decay=0.0)
    train.load_state(path, ckpt, model, optimizer)
    return model, optimizer, ckpt


def test_fsdp_checkpoint_converts_to_one_file_and_back(fsdp_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)  # the fixture's run stays as it was for the other tests
    with pytest.raises(train.TrainError, match="--convert"):  # the stages that read one file say what to do
        train.load_checkpoint(str(run))
    converted = run_cli(["train.py", "--convert", str(run / "ckpt_000006.dcp")])
    assert converted.returncode == 0 and str(run / "ckpt_000006.pt") in converted.stdout, converted.stderr
    ckpt = train.load_checkpoint(str(run))  # the run folder's newest is now the file, beside its folder
    assert ckpt["step"] == 6 and ckpt["config"]["parallel"] == "fsdp" and set(ckpt["rng"]) == {"python", "numpy",
                                                                                                "torch", "cuda"}
    sharded, sharded_opt, meta = plain_copy(str(run / "ckpt_000006.dcp"))
    assert ckpt["loader"] == meta["loader"] and ckpt["step"] == meta["step"]
    for name, p in sharded.state_dict().items():
        assert torch.equal(ckpt["model"][name], p), name
    assert ckpt["optimizer"]["param_groups"] == sharded_opt.state_dict()["param_groups"]
    model, _, _, _ = sft.load_base(str(run / "ckpt_000006.pt"))  # the next stage's loader takes it
    for name, p in model.transformer.h.state_dict().items():
        assert torch.equal(p, ckpt["model"][f"transformer.h.{name}"]), name

    back = tmp_path / "back"
    back.mkdir()
    shutil.copy(run / "ckpt_000006.pt", back / "ckpt_000006.pt")
    assert train.convert_checkpoint(str(back / "ckpt_000006.pt")) == str(back / "ckpt_000006.dcp")
    again, again_opt, _ = plain_copy(str(back / "ckpt_000006.dcp"))
    for name, p in again.state_dict().items():
        assert torch.equal(ckpt["model"][name], p), name
    for i, state in ckpt["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(again_opt.state_dict()["state"][i][key], value), (i, key)
    expect_error(["--convert", str(back / "ckpt_000006.pt")], capsys, "ckpt_000006.dcp exists already")


def test_fsdp_without_torchrun_is_one_line_and_exit_status_2(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    expect_error(cli_args(data_dir, tmp_path / "run", parallel="fsdp"), capsys, "--parallel fsdp", "torchrun")
