"""Shared pytest setup for forge's tests: `python -m pytest -q tests`.

Triton kernels run on CPU tensors only through Triton's interpreter, and Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports `kernels/`. With a GPU present the kernels compile for it instead.

Tests never use the network; HF_HUB_OFFLINE makes transformers fail at once instead of retrying
a hub it cannot reach (huggingface_hub reads it when first imported, hence here).
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- one small pretrained checkpoint, made once per test session, for every post-training test ---

import sys  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A `tiny` GPT pretrained for a few hundred steps on a few standard-library modules (BPE of 512 tokens):
    {"ckpt": path of its checkpoint, "data_dir": its data folder, "out_dir": its run folder}. Made by the real
    data.prepare and train.main, as a user's `python data.py && python train.py` would, only smaller."""
    import data
    import train
    root = tmp_path_factory.mktemp("pretrained")
    text = root / "text"
    text.mkdir()
    for name in ["textwrap", "shlex", "fnmatch", "bisect", "heapq", "calendar", "string", "glob", "colorsys"]:
        with open(os.path.join(sysconfig.get_paths()["stdlib"], name + ".py"), encoding="utf-8") as f:
            (text / (name + ".txt")).write_text(f.read(), encoding="utf-8")
    data_dir = str(root / "data")
    data.prepare(data.DataConfig(input=[str(text)], out_dir=data_dir, vocab_size=512, rules="", doc_chars=1500,
                                 val_fraction=0.1, workers=1))
    out_dir = str(root / "run")
    train.main(train.TrainConfig(preset="tiny", data_dir=data_dir, out_dir=out_dir, batch_size=16, seq_len=64,
                                 max_steps=300, lr=3e-3, warmup_steps=20, eval_every=300, eval_batches=2,
                                 log_every=100, save_every=300, samples=0, device="cpu"))
    return {"ckpt": train.list_checkpoints(out_dir)[-1], "data_dir": data_dir, "out_dir": out_dir}


@pytest.fixture(scope="session")
def sft_checkpoint(pretrained, tmp_path_factory):
    """The session's pretrained checkpoint fine-tuned by sft.main on three easy task kinds (copy, reverse, sort at
    difficulty 1): {"ckpt", "summary" (sft.py's summary.json), "out_dir"}, for the stages after SFT."""
    import sft
    out_dir = str(tmp_path_factory.mktemp("sft") / "run")
    summary = sft.main(sft.SFTConfig(init=pretrained["ckpt"], out_dir=out_dir, kinds=["copy", "reverse", "sort"],
                                     difficulties=[1], examples_per_task=400, eval_difficulties=[1], eval_examples=40,
                                     batch_size=8, max_steps=200, lr=3e-3, eval_every=200, save_every=200,
                                     log_every=100, device="cpu", max_new_tokens=16,
                                     replay=0.0))  # all 8 rows conversations: the later stages need answers
    return {"ckpt": summary["checkpoint"], "summary": summary, "out_dir": out_dir}


# --- Ctrl-C in a training stage ---

# The stage's command line with a real SIGINT (what Ctrl-C sends) raised as its n-th optimizer step begins.
INTERRUPT_AT_STEP = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train, {module}
step, calls = train.train_step, [0]
def interrupting_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGINT)
    return step(*args, **kwargs)
train.train_step = interrupting_step
{module}.cli(sys.argv[1:])
"""


@pytest.fixture
def ctrl_c():
    """ctrl_c(module, n, *args or config) -> the finished `python module.py args` that got Ctrl-C during its n-th
    step; ctrl_c.continues(result) -> the run of the command its one line says continues it."""
    import shlex
    import subprocess

    def flags(cfg):  # a stage's config dataclass as its command line: the fields that differ from the defaults
        import dataclasses
        args = []
        for f in dataclasses.fields(cfg):
            value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value == default:
                continue
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                args += [flag, *map(str, value)]
            else:
                args += [flag, str(value)]
        return args

    def run(module, n, *args):
        if len(args) == 1 and not isinstance(args[0], str):
            args = flags(args[0])
        return subprocess.run([sys.executable, "-c", INTERRUPT_AT_STEP.format(module=module, n=n), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def continues(result):
        command = shlex.split(result.stderr.split("continue with: ", 1)[1])
        assert command[0] == "python" and "--resume" in command, command
        return subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run.continues = continues
    return run
