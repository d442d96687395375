"""Benchmarks for forge against the built-in and peer implementations.

    python bench.py data       # BPE training and encoding, beside Hugging Face tokenizers when installed
    python bench.py kernels    # Triton kernels against PyTorch (needs a GPU)
    python bench.py train      # tokens/s and MFU per preset on the device at hand

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
    raise SystemExit("bench.py kernels: not written yet")


# --- train ---

def bench_train(args):
    raise SystemExit("bench.py train: not written yet")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data", "kernels", "train"])
    args, rest = parser.parse_known_args(argv)
    {"data": bench_data, "kernels": bench_kernels, "train": bench_train}[args.what](rest)


if __name__ == "__main__":
    main(sys.argv[1:])
