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
    raise SystemExit("bench.py data: not written yet")


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
