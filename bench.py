"""Benchmarks for forge against the built-in and peer implementations.

    python bench.py data       # BPE training and encoding, beside Hugging Face tokenizers when installed
    python bench.py kernels    # Triton kernels against PyTorch (needs a GPU)
    python bench.py train      # tokens/s and MFU per preset on the device at hand
    python bench.py eval       # eval.py's memorisation index: build and query time
    python bench.py sft        # packed SFT tokens/s against pretraining, padding saved, batched generation
    python bench.py serve      # serve.py under load: one request at a time against continuous batching
    python bench.py rl         # rlhf.py's rollouts: shared prefill and KV cache against a naive loop

Figures go into BENCHMARKS.md with the device they were measured on.
"""
import argparse
import sys


# --- data ---

def bench_data(args):
    """BPE training time and encoding speed of data.py, and HF tokenizers' BPE trainer on the same text with the
    same split regex and vocabulary size: training time ratio and bytes per token on held-out documents.
        python bench.py data [--text FILE] [--vocab-size 8192] [--threads 2]
    Without --text the corpus is the standard library (data.py's default); 10% of documents are held out."""
    import os
    import tempfile
    import time

    import data

    parser = argparse.ArgumentParser(prog="bench.py data")
    parser.add_argument("--text", default=None, help="a text file (e.g. tinyshakespeare.txt); default: stdlib")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokens, including the specials")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="encoding threads")
    a = parser.parse_args(args)

    if a.text:
        docs, name = data.split_text(open(a.text, encoding="utf-8").read(), 8000), a.text
    else:
        docs, name = [p.read_text(encoding="utf-8") for p in data.stdlib_files()], "stdlib"
    train = [d for d in docs if not data.is_val(d, 0, 0.1)]
    held = [d for d in docs if data.is_val(d, 0, 0.1)]
    mb = sum(len(d.encode()) for d in train) / 1e6
    held_bytes = sum(len(d.encode()) for d in held)
    print(f"corpus {name}: {len(train)} train docs ({mb:.1f} MB), {len(held)} held out ({held_bytes / 1e6:.2f} MB); "
          f"vocab {a.vocab_size}")

    t0 = time.perf_counter()
    chunks = data.count_chunks(train)
    t1 = time.perf_counter()
    ranks = data.train_bpe(chunks, a.vocab_size - 256 - len(data.SPECIAL_TOKENS))
    t2 = time.perf_counter()
    ours_train = t2 - t0
    print(f"forge BPE train: {ours_train:.2f} s (split+count {t1 - t0:.2f} s, {len(chunks):,} unique chunks; "
          f"merges {t2 - t1:.2f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        data.save_tokenizer(ranks, tmp)
        tok = data.load_tokenizer(tmp)
    for threads in sorted({1, a.threads}):
        t0 = time.perf_counter()
        n_tokens = sum(map(len, tok.encode_batch(train, threads)))
        dt = time.perf_counter() - t0
        print(f"forge encode (tiktoken, {threads} thread{'s' * (threads > 1)}): {mb / dt:.1f} MB/s, "
              f"{n_tokens / dt / 1e6:.2f} M tokens/s")
    sample = "".join(train)[:200_000]
    t0 = time.perf_counter()
    assert data.bpe_encode_ref(sample, ranks) == tok.encode(sample)
    print(f"forge reference encoder (pure Python): {len(sample.encode()) / 1e6 / (time.perf_counter() - t0):.2f} MB/s")
    ours_bpt = held_bytes / sum(len(tok.encode(d)) for d in held)
    print(f"forge bytes/token on held-out text: {ours_bpt:.3f}")

    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        print("tokenizers is not installed: no comparison")
        return
    # Oniguruma spells code points \x{...}; otherwise the pattern is data.SPLIT_PATTERN unchanged
    pattern = data.SPLIT_PATTERN.replace(r"\U0010FFFF", r"\x{10FFFF}").replace(r"\x80", r"\x{80}")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=a.vocab_size, special_tokens=data.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t0 = time.perf_counter()
    hf.train_from_iterator(train, trainer)
    hf_train = time.perf_counter() - t0
    hf_bpt = held_bytes / sum(len(e.ids) for e in hf.encode_batch(held))
    print(f"HF tokenizers BPE train: {hf_train:.2f} s (vocab {hf.get_vocab_size()}); "
          f"forge/HF time ratio {ours_train / hf_train:.2f}")
    print(f"HF tokenizers bytes/token on held-out text: {hf_bpt:.3f} (forge {ours_bpt:.3f})")


# --- kernels ---

def bench_kernels(args):
    """Triton kernels (kernels/) against PyTorch on one CUDA GPU, bf16, timed with triton.testing.do_bench:
      attention  forward and forward+backward TFLOP/s, causal, head dim 64 and 128, T from 1k to 16k, against
                 F.scaled_dot_product_attention pinned to its flash backend
      norm       layer_norm / rms_norm forward and backward GB/s against F.layer_norm / F.rms_norm, eager and
                 torch.compile
      ce         linear cross-entropy forward+backward time and peak memory at GPT-2 sizes (V=50304) against
                 F.cross_entropy on materialised logits
        python bench.py kernels [--only attention norm ce]"""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.py kernels: needs a CUDA GPU (on a CPU, run the kernel tests instead: "
                         "python -m pytest -q tests/test_kernels.py)")
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import attention
    from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
    from kernels.layernorm import layer_norm, rms_norm

    parser = argparse.ArgumentParser(prog="bench.py kernels")
    parser.add_argument("--only", nargs="+", choices=["attention", "norm", "ce"], default=["attention", "norm", "ce"],
                        help="which kernels to benchmark")
    a = parser.parse_args(args)
    device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name()
    print(f"device {name}; torch {torch.__version__}; triton {triton.__version__}; bf16; do_bench median of each")

    def bench(fn, grads=()):
        return triton.testing.do_bench(fn, grad_to_none=list(grads), return_mode="median")  # ms

    if "attention" in a.only:
        print("\n| attention, causal | D | T | B x H | triton TFLOP/s | sdpa-flash TFLOP/s | ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for D in (64, 128):
            for T in (1024, 2048, 4096, 8192, 16384):
                B, H = max(1, 16384 // T), 2048 // D  # 16k tokens of width 2048 at every T
                q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
                do = torch.randn_like(q)
                fwd_flops = 4 * B * H * T * T * D * 0.5  # QK^T and PV, 2*T*T*D each, half of it under the mask
                for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):  # bwd: 2x fwd + recompute
                    tflops = {}
                    for label, attn in (("triton", lambda: attention(q, k, v, causal=True)),
                                        ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            if mode == "fwd":
                                with torch.no_grad():
                                    ms = bench(attn)
                            else:
                                ms = bench(lambda: attn().backward(do), grads=(q, k, v))
                        tflops[label] = flops / ms * 1e-9
                    print(f"| {mode} | {D} | {T} | {B} x {H} | {tflops['triton']:.0f} | {tflops['sdpa']:.0f} | "
                          f"{tflops['triton'] / tflops['sdpa']:.2f} |")
                del q, k, v, do

    if "norm" in a.only:
        peak_gbps = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H200": 4800}  # nominal HBM bandwidth, GB/s
        peak = next((bw for key, bw in peak_gbps.items() if key in name), None)
        print(f"\n| norm | M x N | pass | triton GB/s | torch GB/s | torch.compile GB/s | triton / torch | "
              f"triton / peak ({peak or '?'} GB/s) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        M = 16 * 1024
        for N in (768, 1600, 4096):
            x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)
            eager_ln = lambda x, w, b: F.layer_norm(x, (N,), w, b)
            eager_rms = lambda x, w, b: F.rms_norm(x, (N,), w)
            impls = {
                "layer_norm": {"triton": layer_norm, "torch": eager_ln, "compile": torch.compile(eager_ln)},
                "rms_norm": {"triton": lambda x, w, b: rms_norm(x, w), "torch": eager_rms,
                             "compile": torch.compile(eager_rms)},
            }
            for norm, fns in impls.items():
                # bytes moved: forward reads x, writes y; backward reads x and dy, writes dx (the per-feature
                # vectors and the saved per-row statistics are negligible)
                for mode, nbytes in (("fwd", 2 * x.numel() * x.element_size()),
                                     ("bwd", 3 * x.numel() * x.element_size())):
                    gbps = {}
                    for label, fn in fns.items():
                        if mode == "fwd":
                            with torch.no_grad():
                                ms = bench(lambda: fn(x, w, b))
                        else:
                            y = fn(x, w, b)
                            ms = bench(lambda: y.backward(dy, retain_graph=True), grads=(x, w, b))
                        gbps[label] = nbytes / ms * 1e-6
                    frac = f"{gbps['triton'] / peak:.0%}" if peak else "?"
                    print(f"| {norm} | {M} x {N} | {mode} | {gbps['triton']:.0f} | {gbps['torch']:.0f} | "
                          f"{gbps['compile']:.0f} | {gbps['triton'] / gbps['torch']:.2f} | {frac} |")
            del x, w, b, dy

    if "ce" in a.only:
        N, C, V = 8 * 1024, 768, 50304  # GPT-2 small, 8 sequences of 1024 tokens
        h = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, C, device=device, dtype=dtype) * 0.02).requires_grad_()
        y = torch.randint(0, V, (N,), device=device)
        impls = {
            "triton linear_cross_entropy": linear_cross_entropy,
            "torch, fp32 logits (the *_ref)": linear_cross_entropy_ref,
            "torch, bf16 logits": lambda h, w, y: F.cross_entropy(h @ w.t(), y),
        }
        print(f"\n| linear cross-entropy fwd+bwd, N={N} C={C} V={V} | time ms | peak MiB above inputs |")
        print("| --- | --- | --- |")
        for label, fn in impls.items():
            step = lambda: fn(h, w, y).backward()
            ms = bench(step, grads=(h, w))
            # Peak memory of one step, measured apart from do_bench (which allocates its own cache-flush buffer).
            h.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            h.grad = w.grad = None
            print(f"| {label} | {ms:.2f} | {peak:.0f} |")


# --- train ---

def bench_train(args):
    """Training throughput per preset on the device at hand, eager and torch.compile'd: tokens/s and MFU.

    Each step is train.train_step (the loop's own: forward, backward, clip, AdamW) on random tokens, so
    the data pipeline is not what is measured; bf16 autocast and fused AdamW on CUDA, float32 on CPU.
    A few warm-up steps (compilation happens there), then timed steps; train_step reads the loss back
    every step, which synchronises the device as the training loop does.

        python bench.py train                                   # tiny, mini, small on CPU; gpt2 on CUDA
        python bench.py train --presets gpt2 --batch-size 16 --seq-len 1024 --compile on
    """
    import time

    import torch

    import train
    from model import GPT, config_from_preset

    parser = argparse.ArgumentParser(prog="bench.py train", description=bench_train.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", help="comma-separated model.PRESETS; default tiny,mini,small on CPU, gpt2 on CUDA")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence; default the preset's block_size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both", help="torch.compile the model")
    parser.add_argument("--attn", default="sdpa", help="sdpa, naive or triton")
    parser.add_argument("--kernels", default="torch", help="torch or triton (norms and loss)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when available")
    opts = parser.parse_args(args)
    rt = train.setup_runtime(opts.device)
    gpu = rt.device_type == "cuda"
    presets = (opts.presets or ("gpt2" if gpu else "tiny,mini,small")).split(",")
    modes = {"off": [False], "on": [True], "both": [False, True]}[opts.compile]
    name = torch.cuda.get_device_name(rt.device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {str(rt.dtype).removeprefix('torch.')}")
    print("| preset | params | batch x seq | compile | tokens/s | MFU |")
    print("| --- | ---: | --- | --- | ---: | ---: |")
    for preset in presets:
        for compiled in modes:
            torch.manual_seed(0)
            base = config_from_preset(preset)
            T = opts.seq_len or base.block_size
            vocab = train.padded_vocab_size(base.vocab_size, rt.device_type)
            raw = GPT(config_from_preset(preset, block_size=T, vocab_size=vocab, attn=opts.attn,
                                         kernels=opts.kernels)).to(rt.device)
            model = torch.compile(raw) if compiled else raw
            optimizer = train.build_optimizer(raw, lr=3e-4, weight_decay=0.1, device=rt.device)
            tokens = torch.randint(0, raw.config.vocab_size, (opts.batch_size, T + 1), device=rt.device)
            batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
            for _ in range(opts.warmup):
                train.train_step(model, optimizer, [batch], rt)
            t0 = time.perf_counter()
            for _ in range(opts.steps):
                train.train_step(model, optimizer, [batch], rt)
            tok_s = opts.batch_size * T * opts.steps / (time.perf_counter() - t0)
            mfu = raw.estimate_mfu(tok_s, rt.device, T)
            print(f"| {preset} | {raw.num_params() / 1e6:.2f}M | {opts.batch_size} x {T} | "
                  f"{'on' if compiled else 'off'} | {tok_s:,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} |",
                  flush=True)
            del model, raw, optimizer
            if gpu:
                torch.cuda.empty_cache()


# --- sft ---

def bench_sft(args):
    """SFT throughput against pretraining's, the padding that packing saves, and batched generation.

    1. train.train_step on the same preset and batch: pretraining batches (random tokens, plain causal
       attention) against packed SFT batches of embedded-task conversations (document masks, restarting
       positions) and padded ones; positions per second (padding included, as pretraining counts them).
    2. The share of positions that hold padding, packed and padded.
    3. Greedy answers to held-out prompts: GPT.generate on a list of prompts (one batch, left-padded)
       against one prompt at a time, with the same checkpoint; the answers must agree.

        python bench.py sft                                    # mini on CPU, gpt2 on CUDA
        python bench.py sft --init out/sft --prompts 256       # generation with a fine-tuned checkpoint
    """
    import time

    import torch

    import data
    import sft
    import tasks
    import train
    from model import GPT, config_from_preset

    parser = argparse.ArgumentParser(prog="bench.py sft", description=bench_sft.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help="model.PRESETS name; default mini on CPU, gpt2 on CUDA")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    parser.add_argument("--data-dir", default="data/stdlib", help="tokenizer folder (python data.py makes it)")
    parser.add_argument("--init", default=None, help="checkpoint for the generation part; default newest of "
                        "out/sft, else out/pretrain, else random weights")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--prompts", type=int, default=256, help="held-out prompts to answer")
    parser.add_argument("--new-tokens", type=int, default=24, help="longest answer")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when available")
    opts = parser.parse_args(args)
    rt = train.setup_runtime(opts.device)
    gpu = rt.device_type == "cuda"
    name = torch.cuda.get_device_name(rt.device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {str(rt.dtype).removeprefix('torch.')}")
    tokenizer = sft.with_chat_tokens(data.load_tokenizer(opts.data_dir))

    # --- 1 and 2: training throughput and padding ---
    preset = opts.preset or ("gpt2" if gpu else "mini")
    T, B = config_from_preset(preset).block_size, opts.batch_size
    convs = [ex["messages"] for k in tasks.KINDS for d in (1, 2) for ex in tasks.generate(k, 300, 0, "train", d)]
    examples, _ = sft.build_examples(convs, tokenizer, T, "drop")
    loaders = {"packed": sft.SFTLoader(examples, B, T, True, tokenizer.eot_id, seed=0),
               "padded": sft.SFTLoader(examples, B, T, False, tokenizer.eot_id, seed=0)}
    vocab = train.padded_vocab_size(tokenizer.vocab_size, rt.device_type)
    print(f"\npreset {preset}, batch {B} x {T}, {len(examples):,} task conversations")
    print("| batches | padding | positions/s | real tokens/s | vs pretraining |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base_rate = None
    for kind in ("pretraining", "packed", "padded"):
        torch.manual_seed(0)
        model = GPT(config_from_preset(preset, vocab_size=vocab)).to(rt.device)
        optimizer = train.build_optimizer(model, lr=1e-4, weight_decay=0.0, device=rt.device)
        if kind == "pretraining":
            tokens = torch.randint(0, tokenizer.vocab_size, (B, T + 1))
            batches = [(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())] * (opts.warmup + opts.steps)
            loss_fn, padding = train.lm_loss, 0.0
        else:
            batches = [loaders[kind].next_batch() for _ in range(opts.warmup + opts.steps)]
            loss_fn, padding = sft.sft_loss, loaders[kind].padding_fraction()
        batches = [train.to_device(b, rt) for b in batches]
        for b in batches[:opts.warmup]:
            train.train_step(model, optimizer, [b], rt, loss_fn=loss_fn)
        t0 = time.perf_counter()
        for b in batches[opts.warmup:]:
            train.train_step(model, optimizer, [b], rt, loss_fn=loss_fn)
        dt = time.perf_counter() - t0
        positions = sum(b[0].numel() for b in batches[opts.warmup:])
        rate = positions / dt
        base_rate = base_rate or rate
        print(f"| {kind} | {100 * padding:.1f}% | {rate:,.0f} | {rate * (1 - padding):,.0f} | "
              f"{rate / base_rate:.2f}x |", flush=True)

    # --- 3: batched generation ---
    path = opts.init or next((p for p in ("out/sft", "out/pretrain") if train.list_checkpoints(p)), None)
    if path:
        model, tokenizer, _, _ = sft.load_base(sft.find_init(path))
    else:
        torch.manual_seed(0)
        model = GPT(config_from_preset(preset, vocab_size=vocab))
    model.to(rt.device).eval()
    end = tokenizer.special_ids["<|end|>"]
    held = [ex for k in tasks.KINDS for ex in tasks.generate(k, opts.prompts, 0, "test", 1)]
    held = held[::max(1, len(held) // opts.prompts)][:opts.prompts]
    prompts = [sft.render_prompt(ex["messages"][:-1], tokenizer) for ex in held]
    print(f"\ngreedy answers to {len(prompts)} held-out prompts (lengths {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, at most {opts.new_tokens} new), checkpoint {path or 'random weights'}")
    with rt.autocast():
        model.generate(prompts[:8], 4, temperature=0, stop_tokens=[end])  # warm-up
        t0 = time.perf_counter()
        batched = model.generate(prompts, opts.new_tokens, temperature=0, stop_tokens=[end])
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = [model.generate([p], opts.new_tokens, temperature=0, stop_tokens=[end])[0] for p in prompts]
        t_alone = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(batched, alone))
    new = sum(map(len, batched))
    print("| mode | seconds | new tokens/s | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| one prompt at a time | {t_alone:.2f} | {new / t_alone:,.0f} | 1 |")
    print(f"| one batch of {len(prompts)} | {t_batched:.2f} | {new / t_batched:,.0f} | {t_alone / t_batched:.1f}x |")
    print(f"answers identical in both modes: {same}/{len(prompts)}")


# --- serve ---

def bench_serve(args):
    """serve.py under load: one request at a time (--max-batch 1) against continuous batching (--max-batch 16),
    the same checkpoint, the same clients, one run.

    Each design runs in its own server process on a free port of 127.0.0.1 (as it would for real clients); this
    process is the clients, reading the Server-Sent Events with http.client, one thread per client, every client
    connecting at once. For each design:
      1 client      one streamed answer of --new-tokens greedy tokens (ignore_eos), median of --repeats, beside
                    GPT.generate in this process
      16, 64, ...   --clients concurrent streaming clients, each one answer of --new-tokens / 4 tokens sampled
                    with its own seed: aggregate new tokens/s over the wall time, time to first token (p50,
                    p90), 429s (a refused client waits the Retry-After it was given and asks again, as the
                    official client does, up to 10 times), answers lost, and answers that differ from the same
                    seed's answer alone (there must be none)

        python bench.py serve                           # mini: the newest out/sft checkpoint, else random weights
        python bench.py serve --init /tmp/sft/ckpt_000600.pt --threads 1 --clients 16,64
        python bench.py serve --preset gpt2 --device cuda --max-batch 64
    """
    import http.client
    import json
    import os
    import socket
    import statistics
    import subprocess
    import tempfile
    import threading
    import time
    from dataclasses import asdict

    import torch

    import data
    import sft
    import tasks
    import train
    from model import GPT, config_from_preset

    parser = argparse.ArgumentParser(prog="bench.py serve", description=bench_serve.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", help="checkpoint to serve; default the newest in out/sft, else random --preset")
    parser.add_argument("--preset", default="mini", help="model.PRESETS name for random weights")
    parser.add_argument("--data-dir", default="data/stdlib", help="tokenizer folder for random weights")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens per answer (clipped to the context)")
    parser.add_argument("--repeats", type=int, default=5, help="timed single answers per design (median reported)")
    parser.add_argument("--clients", default="16,64", help="comma-separated numbers of concurrent streaming clients")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched design's serve.py --max-batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the server")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when available")
    opts = parser.parse_args(args)
    crowds = [int(c) for c in opts.clients.split(",")]

    rt = train.setup_runtime(opts.device, None, opts.threads)
    tmp = tempfile.TemporaryDirectory()
    path = opts.init or (train.list_checkpoints("out/sft") or [None])[-1]
    if path is None:  # random weights in a checkpoint of train.py's format, so the server loads them the same way
        tok = data.load_tokenizer(opts.data_dir)
        torch.manual_seed(0)
        model = GPT(config_from_preset(opts.preset, vocab_size=train.padded_vocab_size(tok.vocab_size,
                                                                                      rt.device_type)))
        path = os.path.join(tmp.name, "ckpt_000000.pt")
        torch.save({"step": 0, "model": model.state_dict(), "model_config": asdict(model.config), "stage": "sft",
                    "config": {}, "tokenizer_dir": opts.data_dir, "tokenizer_hash": tok.hash}, path)
    model, tok, _, _ = sft.load_base(sft.find_init(path))
    model.to(rt.device).eval()
    ex = tasks.generate("reverse", 1, 0, "test", 2)[0]
    messages = ex["messages"][:-1]
    prompt = sft.render_prompt(messages, tok)
    n = min(opts.new_tokens, model.config.block_size - len(prompt))
    m = max(1, n // 4)
    print(f"{path}: {model.num_params():,} parameters on {rt.device}, {torch.get_num_threads()} threads; "
          f"prompt {len(prompt)} tokens; {n} greedy tokens alone, {m} sampled tokens per concurrent client")

    # --- in this process: the reference for one answer ---
    def in_process():
        first = []
        t0 = time.perf_counter()
        with rt.autocast():
            model.generate([prompt], n, temperature=0, on_token=lambda ids: first or first.append(time.perf_counter()))
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, first[0] - t0

    in_process()  # warm-up
    local = [in_process() for _ in range(opts.repeats)]
    del model

    # --- through a server ---
    def stream(port, **body):
        """One streamed answer, retrying a 429 after its Retry-After. -> dict: seconds to [DONE] and to the first
        content (both from the first attempt), text, completion tokens, the 429s met."""
        t0, refused = time.perf_counter(), 0
        for _ in range(11):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({"model": "bench", "messages": messages, "stream": True,
                                     "stream_options": {"include_usage": True}, **body}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 429:
                break
            refused += 1
            r.read()
            conn.close()
            time.sleep(float(r.getheader("Retry-After", "1")))
        assert r.status == 200, f"status {r.status}: {r.read()[:200]!r}"
        first, text, tokens = None, "", None
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["delta"]["content"]
        conn.close()
        return {"seconds": time.perf_counter() - t0, "ttft": first - t0, "text": text, "tokens": tokens,
                "refused": refused}

    def measure(max_batch):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "serve.py", path, "--port", str(port), "--threads", str(opts.threads),
               "--no-log-requests", "--model-name", "bench", "--max-batch", str(max_batch)]
        if opts.device:
            cmd += ["--device", opts.device]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            for _ in range(600):  # the server loads the model: at most a minute
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            else:
                raise SystemExit("the server did not start within a minute")
            greedy = dict(max_tokens=n, temperature=0, ignore_eos=True)
            stream(port, **greedy)  # warm-up
            single = [stream(port, **greedy) for _ in range(opts.repeats)]
            assert all(s["tokens"] == n for s in single), f"answers of {[s['tokens'] for s in single]} tokens"
            sampled = dict(max_tokens=m, temperature=1.0, ignore_eos=True)
            crowd = {}
            for k in crowds:
                alone = {s: stream(port, seed=s, **sampled)["text"] for s in range(min(k, 16))}
                got = [None] * k

                def client(s):
                    try:
                        got[s] = stream(port, seed=s, **sampled)
                    except Exception as e:  # counted as lost below
                        print(f"  client {s}: {type(e).__name__}: {e}", file=sys.stderr)

                threads = [threading.Thread(target=client, args=(s,)) for s in range(k)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=600)
                wall = time.perf_counter() - t0
                done = [g for g in got if g is not None]
                crowd[k] = {"wall": wall, "tokens": sum(g["tokens"] for g in done), "lost": k - len(done),
                            "ttft": sorted(g["ttft"] for g in done), "refused": sum(g["refused"] for g in done),
                            "refused_clients": sum(g["refused"] > 0 for g in done),
                            "differ": sum(got[s] is not None and got[s]["text"] != alone[s] for s in alone)}
            return single, crowd
        finally:
            server.terminate()
            server.wait(timeout=30)

    designs = {"one at a time (--max-batch 1)": measure(1),
               f"continuous batching (--max-batch {opts.max_batch})": measure(opts.max_batch)}
    tmp.cleanup()

    t_local, ttft_local = statistics.median(t for t, _ in local), statistics.median(f for _, f in local)
    print(f"\none streamed answer of {n} greedy tokens, median of {opts.repeats}")
    print("| path | new tokens/s | time to first token | vs in-process |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| GPT.generate in this process | {n / t_local:,.0f} | {1000 * ttft_local:.1f} ms | 1 |")
    for name, (single, _) in designs.items():
        t, ttft = statistics.median(s["seconds"] for s in single), statistics.median(s["ttft"] for s in single)
        print(f"| serve.py {name} | {n / t:,.0f} | {1000 * ttft:.1f} ms | {t_local / t:.2f}x |")
    print(f"\nconcurrent streaming clients, {m} sampled tokens each, all connecting at once")
    print("| design | clients | tokens/s in all | vs 1 client | TTFT p50 | TTFT p90 | answered | clients given 429 "
          "(429s) | differ from alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, (single, crowd) in designs.items():
        one = n / statistics.median(s["seconds"] for s in single)
        for k, c in crowd.items():
            ttft = c["ttft"]
            p50, p90 = (ttft[len(ttft) // 2], ttft[int(0.9 * (len(ttft) - 1))]) if ttft else (float("nan"),) * 2
            rate = c["tokens"] / c["wall"]
            print(f"| {name} | {k} | {rate:,.0f} | {rate / one:.2f}x | {p50:.2f} s | {p90:.2f} s | "
                  f"{k - c['lost']}/{k} | {c['refused_clients']}/{k} ({c['refused']}) | "
                  f"{c['differ']}/{min(k, 16)} |")


# --- eval ---

def bench_eval(args):
    """The memorisation index of eval.py: build time over N random tokens and the time of 10,000 span queries
    (half present in the tokens, half random), with every answer checked.
        python bench.py eval [--tokens 10000000] [--spans 10000]"""
    import time

    import numpy as np

    import eval as ev

    parser = argparse.ArgumentParser(prog="bench.py eval", description=bench_eval.__doc__)
    parser.add_argument("--tokens", type=int, default=10_000_000, help="tokens indexed")
    parser.add_argument("--spans", type=int, default=10_000, help="50-token span queries")
    opts = parser.parse_args(args)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4096, opts.tokens).astype(np.uint16)
    print(f"numpy {np.__version__}; {opts.tokens:,} random tokens of a 4096-token vocabulary")
    print("| window n | build | 10k span queries |")
    print("| ---: | ---: | ---: |")
    for n in (32, 50):
        t0 = time.perf_counter()
        index = ev.NgramIndex(tokens, n)
        build = time.perf_counter() - t0
        half = opts.spans // 2
        present = np.stack([tokens[s:s + 50] for s in rng.integers(0, len(tokens) - 50, half)])
        spans = np.concatenate([present, rng.integers(0, 4096, (opts.spans - half, 50))])
        t0 = time.perf_counter()
        counts = index.count(spans)
        query = time.perf_counter() - t0
        assert (counts[:half] >= 1).all() and (counts[half:] == 0).all(), "the index answered wrongly"
        print(f"| {n} | {build:.2f} s | {1000 * query:.0f} ms |", flush=True)


def bench_rl(args):
    """Rollout throughput of rlhf.py: sampled tokens/s of G answers per prompt, three ways, same prompts and seeds.

    1. naive: one answer at a time, no KV cache (every new token reruns the whole sequence), a loop over
       prompts and answers. Timed on the first --naive-prompts prompts only, it is that slow.
    2. batched, separate prefills: the P x G rows in one left-padded batch with the KV cache; each row
       prefills its own copy of the prompt.
    3. batched, shared prefill (rlhf.py's default): GPT.generate(n=G) prefills each prompt once and copies its
       KV cache to the G rows.
    2 and 3 must give the same samples for the same seed; the shared one is checked against the separate one.

        python bench.py rl                              # the newest out/rlhf, out/dpo or out/sft checkpoint
        python bench.py rl --init out/sft --threads 1 --prompts 32 --group-size 8
    """
    import time
    from dataclasses import replace

    import torch

    import rlhf
    import sft
    import tasks
    import train

    parser = argparse.ArgumentParser(prog="bench.py rl", description=bench_rl.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default=None, help="checkpoint; default newest of out/rlhf, out/dpo, out/sft")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per rollout")
    parser.add_argument("--group-size", type=int, default=8, help="answers per prompt G")
    parser.add_argument("--new-tokens", type=int, default=24, help="longest answer")
    parser.add_argument("--naive-prompts", type=int, default=4, help="prompts the naive loop is timed on")
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per way (after one untimed)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    opts = parser.parse_args(args)
    rt = train.setup_runtime(opts.device, None, opts.threads)
    gpu = rt.device_type == "cuda"
    name = torch.cuda.get_device_name(rt.device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    init = opts.init or next((d for d in ("out/rlhf", "out/dpo", "out/sft") if train.list_checkpoints(d)), None)
    if init is None:
        sys.exit("error: no checkpoint in out/rlhf, out/dpo or out/sft; run python sft.py first or give --init")
    model, tokenizer, _, _ = sft.load_base(init)
    model.to(rt.device).eval()
    print(f"device: {name}; torch {torch.__version__}; {init} ({model.num_params():,} parameters)")
    kinds = [k for k in tasks.KINDS if k != "safety"]
    examples = [e for i in range(opts.prompts) for e in tasks.generate(kinds[i % len(kinds)], 1, i, "train", 1)]
    cfg = rlhf.RLConfig(max_new_tokens=opts.new_tokens, temperature=1.0)
    G, end = opts.group_size, tokenizer.special_ids["<|end|>"]

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def naive(exs, seed):
        out = []
        for e in exs:
            prompt = sft.render_prompt(e["messages"][:-1], tokenizer)
            for g in range(G):
                with rt.autocast():
                    out += model.generate([prompt], opts.new_tokens, temperature=1.0, stop_tokens=[end],
                                          seed=seed + g, use_cache=False)
        return out

    ways = {"naive: one answer at a time, no KV cache": lambda seed: naive(examples[:opts.naive_prompts], seed),
            "batched, KV cache, a prefill per answer": lambda seed: rlhf.sample(model, tokenizer, examples, rt, cfg,
                                                                               G, seed, False),
            "batched, KV cache, one shared prefill per prompt": lambda seed: rlhf.sample(model, tokenizer, examples,
                                                                                        rt, cfg, G, seed, True)}
    print(f"\n{len(examples)} prompts x G = {G} answers, up to {opts.new_tokens} new tokens, temperature 1")
    print("| rollout | answers | sampled tokens/s | seconds per 1,000 answers | vs naive |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rates, outs = {}, {}
    for i, (way, run) in enumerate(ways.items()):
        run(0)  # warm up
        sync()
        t0, tokens, answers = time.perf_counter(), 0, 0
        for r in range(opts.repeats):
            out = run(1 + r)
            tokens, answers = tokens + sum(map(len, out)), answers + len(out)
        sync()
        dt = time.perf_counter() - t0
        rates[way] = tokens / dt
        outs[i] = out
        print(f"| {way} | {answers // opts.repeats} | {rates[way]:,.0f} | {1000 * dt / answers:.2f} | "
              f"{rates[way] / rates[next(iter(rates))]:.1f}x |")
    print(f"\nshared prefill / separate prefills: {rates[list(ways)[2]] / rates[list(ways)[1]]:.2f}x; "
          f"same samples: {outs[1] == outs[2]}")


def main(argv=None):
    # no -h here: `bench.py sft -h` is passed on, so each section prints its own options
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("what", choices=["data", "kernels", "train", "sft", "serve", "eval", "rl"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        sys.exit(0 if argv else 2)
    args, rest = parser.parse_known_args(argv)
    {"data": bench_data, "kernels": bench_kernels, "train": bench_train, "sft": bench_sft,
     "serve": bench_serve, "eval": bench_eval, "rl": bench_rl}[args.what](rest)


if __name__ == "__main__":
    main(sys.argv[1:])
