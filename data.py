"""Data preparation: raw text -> cleaned documents -> a BPE tokenizer trained here -> token shards -> batches.

Chapter 1 of forge ("data preparation"). Every later stage reads what this file writes.

    python data.py                                  # the embedded default: Python's own standard library, offline
    python data.py --dataset shakespeare            # downloaded once into data/cache, checked by sha256
    python data.py --input notes/ book.txt --out-dir data/mine --vocab-size 8192
    python data.py --tokenizer gpt2                 # skip BPE training, use tiktoken's GPT-2 encoding
    python data.py --canaries 4 --out-dir data/canary   # plant 4 secrets at each of 0, 1, 4, 16 repeats (eval.py)
    python data.py --input corpus/ --out-dir /shared/d --num-nodes 8 --node-rank R   # on each of 8 machines, R = 0..7

It runs on the CPU, on --workers processes (default: every core) that clean documents and count BPE chunks, and
as many threads that encode; the output is the same for any number of workers. With --num-nodes K (or under
torchrun, or a Slurm array) K processes share the input files and one output folder on a shared file system,
and still write what one process would (the section "several nodes" explains how). The pipeline, in file order:

    sources    stdlib .py files | local .txt .md .py .jsonl, read in pieces | HTTP downloads (cache, retries, resume)
    cleaning   normalise -> quality rules (Gopher/C4) -> PII redaction -> exact dedup -> MinHash near-dedup
    tokenizer  byte-level BPE trained on the train split; encoding through tiktoken; saved as two text files
    shards     flat uint16 token files with a small header, train/val split by document hash, meta.json
    nodes      the same pipeline on K machines: phases that meet in a shared folder, one dedup reduce
    loader     TokenLoader: (x, y) int64 batches from np.memmap, disjoint per rank, resumable exactly

Everything is written to `<out_dir>.partial/` and renamed to `out_dir` only at the end, so a crash or a bad
input never leaves a folder that looks complete. Bad input raises DataError; `main` prints it on one line and
exits with status 2.
"""
import argparse
import base64
import codecs
import dataclasses
import functools
import hashlib
import heapq
import http.client
import inspect
import itertools
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import struct
import sys
import sysconfig
import time
import types
import typing
import unicodedata
import urllib.error
import urllib.request
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch

# --- constants: declared once, used everywhere ---

# Special tokens get the last ids of the vocabulary. The first is the document boundary; the chat tokens are
# reserved now so that SFT (sft.py) can use them without retraining the tokenizer.
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The pre-tokenization split, in the spirit of GPT-4's cl100k pattern: contractions, words with one leading
# non-letter (usually a space), numbers of at most 3 digits, runs of punctuation, newlines, other whitespace.
# BPE never merges across these chunks. GPT-4 writes it with \p{L} (letter) and \p{N} (number); Python's `re`
# has no \p{...}, and its \w and \s do not mean exactly what the Rust engine inside tiktoken means by them. So
# the classes here are spelled as explicit code-point ranges that both engines read the same way:
#   letter = A-Z a-z and every non-ASCII character (accents, CJK, emoji: all non-ASCII counts as a "letter")
#   digit  = 0-9,  space = \t \n \v \f \r and ' '
# Training splits with `re`, encoding splits with tiktoken: tests/test_data.py checks the ids agree.
_LETTER = r"A-Za-z\x80-\U0010FFFF"
SPLIT_PATTERN = (
    r"'(?:[sdmtSDMT]|[lL][lL]|[vV][eE]|[rR][eE])"  # 's 'd 'm 't 'll 've 're
    rf"|[^\r\n{_LETTER}0-9]?+[{_LETTER}]+"  # a word, with one leading space or symbol
    r"|[0-9]{1,3}"  # numbers in groups of up to 3 digits
    rf"| ?[^\t-\r {_LETTER}0-9]++[\r\n]*"  # punctuation and symbols, with an optional leading space
    r"|[\t-\r ]*[\r\n]"  # whitespace ending in a newline
    r"|[\t-\r ]+(?![^\t-\r ])"  # whitespace, leaving the last space to the next word
    r"|[\t-\r ]+"
)

# Downloadable corpora: (url, sha256 or None when the file has no fixed published hash).
DATASETS = {
    "shakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    # the 22 MB validation file of TinyStories (Eldan & Li 2023): laptop-sized; stories end with <|endoftext|>
    "tinystories": ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
                    None),
    # the first Parquet file of FineWeb-Edu's 10B-token sample (Penedo et al. 2024); needs pyarrow to read
    "fineweb-edu": ("https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
                    "sample/10BT/000_00000.parquet", None),
}
TEXT_SUFFIXES = {".txt", ".md", ".py", ".jsonl"}
READ_BLOCK = 1 << 20  # bytes read from a local file at a time: files are read in pieces, never whole
# Folders of the standard library that are not ordinary source: the test suite (17 MB), generated tables.
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}

SHARD_MAGIC = b"FORGETOK"
SHARD_VERSION = 1
# 64-byte shard header: magic, version, bytes per token (2 or 4), token count, tokenizer hash; then the tokens.
SHARD_HEADER = struct.Struct("<8sIIQ16s24x")

# Canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets planted in the train split, each repeated
# 0 (a control the model never sees), 1, 4 or 16 times, so that eval.py can measure how memorisation grows with
# repetition. A secret is 9 digits spaced one per token, from a space of 10^9, behind a prefix of its own.
CANARY_REPEATS = (0, 1, 4, 16)
CANARY_DIGITS = 9


@dataclass
class DataConfig:
    dataset: str = "stdlib"  # stdlib | shakespeare | tinystories | fineweb-edu; ignored when --input is given
    input: list[str] = field(default_factory=list)  # local files or folders (.txt .md .py .jsonl); replaces dataset
    out_dir: str | None = None  # None: data/<dataset>, or data/input for --input
    cache_dir: str = "data/cache"  # where downloads are kept between runs
    url: str | None = None  # None: the dataset's own URL; set it to download from a mirror
    max_bytes: int | None = None  # stop reading sources after this many bytes of text; None: read everything
    tokenizer: str | None = None  # None: train BPE here; "gpt2": tiktoken's GPT-2; or a folder with a saved one
    vocab_size: int = 4096  # tokens, counting the 256 bytes and the special tokens
    val_fraction: float = 0.05  # share of documents that go to the validation split (chosen by hash)
    seed: int = 0  # salts the split hash and the MinHash permutations
    rules: str | None = None  # comma-separated quality rules; None: defaults per kind (DEFAULT_RULES); "": none
    pii: bool = True  # redact e-mail addresses, phone numbers, IP addresses, card numbers
    dedup: bool = True  # drop exact duplicates (hash of the normalised document)
    near_dup_threshold: float = 0.8  # estimated Jaccard similarity that makes a near duplicate; 1: no near-dedup
    doc_chars: int = 8000  # .txt/.md files are cut at blank lines into documents of about this many characters
    shard_tokens: int = 2**24  # tokens per shard file
    workers: int | None = None  # cleaning and chunk-counting processes, tokenizer threads; None: os.cpu_count()
    node_rank: int | None = None  # this node's place in a multi-node run; None: RANK or SLURM_ARRAY_TASK_ID, else 0
    num_nodes: int | None = None  # nodes sharing the input; None: WORLD_SIZE or SLURM_ARRAY_TASK_COUNT, else 1
    node_timeout: float = 86400.0  # seconds a node waits for another node's files before it gives up
    canaries: int = 0  # plant this many random secrets per repetition count (CANARY_REPEATS) for eval.py; 0: none


class DataError(Exception):
    """Bad input or a broken data folder: `main` prints the message on one line and exits with status 2."""


# --- sources ---
# A source yields documents as (text, kind, origin): kind "code" or "text" picks the default quality rules,
# origin (a file name) appears in error messages and in the report's examples.

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stdlib_files():
    """The .py files of the running Python's standard library, in a fixed order (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP)
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return found


def local_files(paths):
    """Expand files and folders into a sorted list of files with a suffix we read."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not matches:
                raise DataError(f"{p}: no {' '.join(sorted(TEXT_SUFFIXES))} files in this folder")
            found += matches
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES | {".parquet"}:
                raise DataError(f"{p}: not a {' '.join(sorted(TEXT_SUFFIXES | {'.parquet'}))} file")
            found.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return found


def download(url, dest, sha256=None, retries=3, backoff=1.0):
    """Fetch url into dest with retries; a partial file (dest.part) is resumed with an HTTP Range request.

    A file already at dest is used without a request, after the same sha256 check as a fresh download."""
    dest = Path(dest)
    if dest.exists():
        if sha256 is not None and (got := _sha256_file(dest)) != sha256:
            raise DataError(f"{dest}: cached file has sha256 {got}, not the expected {sha256}; "
                            "delete it to download it again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                # 206: the server honoured Range, append; 200: it sent the whole file, start over
                with open(part, "ab" if response.status == 206 else "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to fetch: the .part file is already complete
                break
            if e.code < 500 and e.code not in (408, 429):
                raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
            error = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
        if attempt + 1 < retries:
            time.sleep(backoff * 2 ** attempt)  # 1 s, 2 s, 4 s, ...
    else:
        raise DataError(f"cannot download {url} ({error}); offline? use --dataset stdlib or --input PATH, "
                        f"or put the file at {dest}")
    if sha256 is not None and (got := _sha256_file(part)) != sha256:
        part.unlink()
        raise DataError(f"{url}: sha256 {got} is not the expected {sha256}; the download was deleted")
    part.rename(dest)
    return dest


def split_pieces(pieces, doc_chars, at_eot):
    """Cut a text that comes in pieces (a file read READ_BLOCK bytes at a time) into documents: at <|endoftext|>
    if at_eot, else at blank lines, joining paragraphs into documents of about doc_chars characters. Only a piece
    and the document being cut are held, so a file can be larger than memory."""
    sep = re.compile(re.escape(SPECIAL_TOKENS[0]) if at_eot else r"\n\s*\n")

    def parts():  # the text between separators, in order
        buf = ""
        for piece in itertools.chain(pieces, [None]):  # None: the end of the text
            buf += piece or ""
            spans = [m.span() for m in sep.finditer(buf)]
            if piece is not None and spans and not at_eot and not buf[spans[-1][1]:].strip():
                spans.pop()  # blank lines up to the end of the piece may go on in the next one: not complete yet
            start = 0
            for a, b in spans:
                yield buf[start:a]
                start = b
            buf = buf[start:]
        yield buf

    current, size = [], 0
    for part in parts():
        if at_eot:
            if part.strip():
                yield part.strip("\n")
            continue
        current.append(part)
        size += len(part)
        if size >= doc_chars:
            yield "\n\n".join(current)
            current, size = [], 0
    if current and "".join(current).strip():
        yield "\n\n".join(current)


def split_text(text, doc_chars):
    """Cut a text into documents: at <|endoftext|> lines if it has them, else at blank lines (split_pieces)."""
    return list(split_pieces([text], doc_chars, SPECIAL_TOKENS[0] in text))


def _blocks(path):
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(READ_BLOCK), b"")


def _decoded(path):
    """The text of a UTF-8 file in pieces of READ_BLOCK bytes (the incremental decoder never cuts a character)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for block in _blocks(path):
        yield decoder.decode(block)
    yield decoder.decode(b"", final=True)


def _check_file(path, digest):
    """One pass over a file's bytes, which also go into digest: (why it is skipped, "binary" or "not_utf8", or None;
    whether its text holds <|endoftext|>). A skipped file is skipped whole, so this pass comes first."""
    decoder, tail, has_eot, eot = codecs.getincrementaldecoder("utf-8")(), "", False, SPECIAL_TOKENS[0]
    problem = None
    for i, block in enumerate(_blocks(path)):
        digest.update(block)
        if i == 0 and b"\0" in block[:8192]:
            problem = "binary"
        if problem is None:
            try:
                text = tail + decoder.decode(block)
            except UnicodeDecodeError:
                problem = "not_utf8"
                continue
            has_eot = has_eot or eot in text
            tail = text[-len(eot):]  # a token cut between two blocks
    if problem is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            problem = "not_utf8"
    return problem, has_eot


def _lines(pieces):
    rest = ""
    for piece in pieces:
        *lines, rest = (rest + piece).split("\n")
        yield from lines
    if rest:
        yield rest


def read_file(path, cfg, skipped, digest):
    """Documents of one local file, read in pieces; its bytes go into digest (the source hash). Binary and
    non-UTF-8 files are skipped and counted in `skipped`."""
    problem, has_eot = _check_file(path, digest)
    if problem:
        skipped[problem] += 1
        return
    suffix = Path(path).suffix
    if suffix == ".py":
        yield "".join(_decoded(path)), "code", str(path)  # a source file is one document
    elif suffix == ".jsonl":
        for n, line in enumerate(_lines(_decoded(path)), 1):
            if line.strip():
                try:
                    doc = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    doc = None
                if not isinstance(doc, str):  # also {"text": null} or {"text": 7}
                    raise DataError(f"{path}:{n}: not a JSON object with a \"text\" string field")
                yield doc, "text", f"{path}:{n}"
    else:
        for doc in split_pieces(_decoded(path), cfg.doc_chars, has_eot):
            yield doc, "text", str(path)


def _import_parquet(name):
    try:
        import pyarrow.parquet
        return pyarrow.parquet
    except ImportError:
        raise DataError(f"{name} is Parquet: pip install pyarrow to read it, or use --dataset stdlib "
                        "or --input PATH") from None


def read_parquet(path):
    """Documents of the "text" column of a Parquet file, read in batches (FineWeb's format)."""
    for batch in _import_parquet(path).ParquetFile(path).iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column("text").to_pylist():
            yield text, "text", str(path)


def node_files(files, rank, num_nodes):
    """Node `rank`'s share of the files: a contiguous run of the list, cut at equal shares of the bytes (a file
    belongs to the node whose share holds its first byte). The shares in rank order are the list itself, so
    "first occurrence in the global input order" means the same for K nodes as for one."""
    if num_nodes == 1:
        return files
    sizes = [Path(f).stat().st_size for f in files]
    starts, total = np.cumsum([0] + sizes[:-1]), max(sum(sizes), 1)
    return [f for f, start in zip(files, starts) if rank * total <= start * num_nodes < (rank + 1) * total]


def iter_documents(cfg, source, skipped, share=(0, 1)):
    """All documents of the configured source, up to cfg.max_bytes of text. Fills in `source` (name, hash).
    share (rank, num_nodes): read only that node's files (node_files)."""
    digest = hashlib.sha256()  # over the raw bytes of every file read, in order: the source hash in meta.json
    if cfg.input:
        files, source["dataset"] = local_files(cfg.input), "input"
    elif cfg.dataset == "stdlib":
        files = stdlib_files()
        source["python_version"] = sys.version.split()[0]  # the stdlib text differs between versions
    elif cfg.dataset in DATASETS:
        url, sha = DATASETS[cfg.dataset]
        if cfg.url:
            url = cfg.url
        if url.endswith(".parquet"):
            _import_parquet(url)  # before a download that could not be read
        files = [download(url, Path(cfg.cache_dir) / cfg.dataset / url.rsplit("/", 1)[-1], sha)]
    else:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose stdlib, {', '.join(DATASETS)} or --input PATH")
    if not files:
        raise DataError("no input files")
    files = node_files(files, *share)
    total = 0
    for path in files:
        if path.suffix == ".parquet":
            docs = read_parquet(path)
            digest.update(_sha256_file(path).encode())
        else:
            docs = read_file(path, cfg, skipped, digest)
        for doc in docs:
            yield doc
            total += len(doc[0].encode())
            if cfg.max_bytes is not None and total >= cfg.max_bytes:
                break
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            break
    source["files"] = len(files)
    source["hash"] = digest.hexdigest()[:16]


# --- cleaning ---

def normalize(text):
    """Unicode NFC, \\n line endings, and no control characters other than tab and newline."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", "", text)


# Quality rules after Gopher (Rae et al. 2021, appendix A.1.1) and C4 (Raffel et al. 2020, section 2.2).
# Each takes (text, words, lines) and returns True to drop the document.
def _repeated_line_fraction(lines):
    lines = [line for line in lines if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


QUALITY_RULES = {
    "min_words": lambda text, words, lines: len(words) < 50,
    "max_words": lambda text, words, lines: len(words) > 100_000,
    "mean_word_length": lambda text, words, lines: not 3 <= sum(map(len, words)) / max(len(words), 1) <= 10,
    "symbol_ratio": lambda text, words, lines: (text.count("#") + text.count("...")) / max(len(words), 1) > 0.1,
    "alpha_words": lambda text, words, lines: sum(any(c.isalpha() for c in w) for w in words) < 0.8 * len(words),
    "repeated_lines": lambda text, words, lines: _repeated_line_fraction(lines) > 0.3,
    "non_alnum_ratio": lambda text, words, lines: sum(not (c.isalnum() or c.isspace()) for c in text) > 0.4 * len(text),
    "terminal_punct": lambda text, words, lines: sum(ln.rstrip().endswith((".", "!", "?", '"')) for ln in lines)
    < 0.5 * sum(bool(ln.strip()) for ln in lines),
    "lorem_ipsum": lambda text, words, lines: "lorem ipsum" in text.lower(),
    "curly_brace": lambda text, words, lines: "{" in text,
}
# Prose rules would drop much source code (symbols, short lines, braces, repeated `else:` and `return` lines),
# so code gets only the neutral ones: on the stdlib they drop ~40 near-empty files and nothing else.
DEFAULT_RULES = {
    "code": ["min_words", "max_words", "non_alnum_ratio"],
    "text": ["min_words", "max_words", "mean_word_length", "symbol_ratio", "alpha_words", "repeated_lines",
             "lorem_ipsum"],
}

# PII patterns, replaced by placeholders. Card-like numbers are only replaced when the Luhn checksum holds.
PII_PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "ip": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                     r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"),
    # as cards are written: 13-19 digits in one run, in groups of four (4-4-4-1..4, 4-4-4-4-3) or 4-6-4/5; a
    # looser pattern (any digit, any separator) swallowed the start of a card that followed another number
    "card": re.compile(r"(?<![\d-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{1,4}(?:[ -]\d{3})?"
                       r"|\d{4}[ -]\d{6}[ -]\d{4,5})(?![\d-])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\w)"),
}


def luhn_ok(number):
    digits = [int(c) for c in number if c.isdigit()][::-1]
    return sum(d if i % 2 == 0 else (2 * d if d < 5 else 2 * d - 9) for i, d in enumerate(digits)) % 10 == 0


def redact_pii(text, counts):
    """Replace e-mails, IPs, Luhn-valid card numbers and phone numbers by <EMAIL>, <IP>, <CARD>, <PHONE>."""
    for kind, pattern in PII_PATTERNS.items():
        def replace(m, kind=kind):
            if kind == "card" and not luhn_ok(m.group()):
                return m.group()
            counts[kind] += 1
            return f"<{kind.upper()}>"
        text = pattern.sub(replace, text)
    return text


class NearDedup:
    """MinHash over word 5-shingles with LSH banding (Broder 1997; Leskovec et al., Mining of Massive
    Datasets, ch. 3). A signature is the minimum of num_perm hash permutations over a document's shingles;
    two documents agree on each entry with probability equal to their Jaccard similarity s.

    A pair is dropped after two tests in a row:
      banding   the signature is cut into b bands of r rows; documents sharing a whole band become candidates,
                with probability 1 - (1 - s^r)^b, an S-curve in s
      estimate  a candidate is confirmed when its fraction of equal entries (the Jaccard estimate, a binomial
                count over num_perm entries divided by num_perm) reaches the threshold t
    The estimate alone has its midpoint at t (half of the pairs at exactly t reach it) and a width set by
    num_perm: its standard deviation at s = 0.85 is sqrt(0.85 * 0.15 / 256) = 0.022, so 98.7% of the pairs
    at 0.85 pass t = 0.8 (with 128 entries, 93.6%). Banding can only lose pairs, so r is the largest row count
    whose S-curve still lets 99% of the pairs at exactly t through: the curve of both tests then has its
    midpoint at t instead of wherever the banding curve happens to rise. (Banding that rises at t itself,
    b = 10 bands of r = 12 at t = 0.8, would lose a quarter of the pairs at 0.85.) For t = 0.8: 32 bands of
    8 rows; pairs at 0.6 become candidates 42% of the time and are then rejected by the estimate."""

    PRIME = 4294967291  # largest prime below 2^32: signatures fit in uint32

    def __init__(self, threshold, num_perm=256, shingle=5, seed=0):
        def band_curve(r):  # probability that a pair at exactly the threshold shares a band of r rows
            return 1 - (1 - threshold ** r) ** (num_perm // r)
        self.rows = max((r for r in range(1, num_perm + 1) if band_curve(r) >= 0.99), default=1)
        self.bands, self.threshold, self.shingle = num_perm // self.rows, threshold, shingle
        rng = np.random.default_rng(seed)
        # (a * h + b) mod PRIME with a < 2^31 and h < 2^32 stays below 2^63: no uint64 overflow
        self.a = rng.integers(1, 2**31, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 2**31, num_perm, dtype=np.uint64)
        self.buckets = [{} for _ in range(self.bands)]  # band -> {band bytes: index of a kept document}
        self.signatures = []  # (num_perm,) uint32 per kept document

    def signature(self, text):
        words = text.split()
        k = min(self.shingle, len(words))
        shingles = {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}
        h = np.array([zlib.crc32(s.encode()) for s in shingles], dtype=np.uint64)  # (n_shingles,)
        return ((h[:, None] * self.a + self.b) % self.PRIME).min(axis=0).astype(np.uint32)  # (num_perm,)

    def is_duplicate(self, text, sig=None):
        """True if text is a near duplicate of a document seen before; otherwise remember it. sig: its signature,
        when a worker computed it already (clean_chunk)."""
        if not text.split():
            return False
        return self.seen_signature(self.signature(text) if sig is None else sig)

    def seen_signature(self, sig):
        """is_duplicate on a signature alone: what the multi-node reduce has of each document (see Dedup)."""
        keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        for bucket, key in zip(self.buckets, keys):
            j = bucket.get(key)
            if j is not None and np.mean(self.signatures[j] == sig) >= self.threshold:
                return True
        for bucket, key in zip(self.buckets, keys):
            bucket.setdefault(key, len(self.signatures))
        self.signatures.append(sig)
        return False


def doc_key(text):
    """The exact-dedup key of a cleaned document: 20 bytes of SHA-1."""
    return hashlib.sha1(text.encode()).digest()


class Dedup:
    """Exact, then near deduplication over documents in order: the first occurrence is kept. Both decisions
    depend on every document before, so this runs in one place: in clean_documents as the cleaned documents
    stream past, and in the multi-node reduce (dedup_nodes) over every node's keys and signatures in the
    global order; the same object in the same order is why K nodes drop exactly what one worker drops."""

    def __init__(self, cfg):
        self.exact, self.seen = cfg.dedup, set()
        self.near = NearDedup(cfg.near_dup_threshold, seed=cfg.seed) if cfg.near_dup_threshold < 1 else None

    def check(self, key, sig):
        """key: doc_key of the text; sig: its MinHash signature, None when it has no words (or near-dedup is off).
        None for a document to keep, else why it goes: "exact_duplicate" or "near_duplicate"."""
        if self.exact:
            if key in self.seen:
                return "exact_duplicate"
            self.seen.add(key)
        if self.near is not None and sig is not None and self.near.seen_signature(sig):
            return "near_duplicate"
        return None


def tally_dedup(report, text, origin, reason):
    """Count one document through the two dedup steps of the report, as Dedup.check decided."""
    report.tally("exact_dedup", text, None if reason == "exact_duplicate" else text, "exact_duplicate", origin)
    if reason != "exact_duplicate":
        report.tally("near_dedup", text, None if reason else text, "near_duplicate", origin)


class CleanReport:
    """Documents and bytes in and out of every step, drops per rule, a few dropped examples."""
    STEPS = ["read", "normalize", "quality", "pii", "exact_dedup", "near_dedup"]

    def __init__(self):
        self.steps = {s: {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0} for s in self.STEPS}
        self.rules, self.pii, self.skipped_files = Counter(), Counter(), Counter()
        self.examples = defaultdict(list)

    def tally(self, step, text_in, text_out, reason=None, origin=""):
        s = self.steps[step]
        s["docs_in"] += 1
        s["bytes_in"] += len(text_in.encode())
        if text_out is not None:
            s["docs_out"] += 1
            s["bytes_out"] += len(text_out.encode())
        elif len(self.examples[reason]) < 3:
            self.examples[reason].append(f"{origin}: {text_in[:160]!r}")

    def merge(self, other):
        """Add another report's counts (a worker's, for the documents it cleaned) to this one."""
        for name, counts in other.steps.items():
            for key, value in counts.items():
                self.steps[name][key] += value
        self.rules.update(other.rules)
        self.pii.update(other.pii)
        self.skipped_files.update(other.skipped_files)  # a node's; a cleaning worker reads no files
        for reason, examples in other.examples.items():
            self.examples[reason] += examples[:3 - len(self.examples[reason])]

    @classmethod
    def from_dict(cls, d):
        """The report that to_dict saved (a node's, in the multi-node path)."""
        report = cls()
        report.steps = d["steps"]
        report.rules, report.pii = Counter(d["rules"]), Counter(d["pii"])
        report.skipped_files = Counter(d["skipped_files"])
        report.examples.update(d["examples"])
        return report

    def to_dict(self):
        return {"steps": self.steps, "rules": dict(self.rules), "pii": dict(self.pii),
                "skipped_files": dict(self.skipped_files), "examples": dict(self.examples)}

    def table(self):
        lines = [f"{'step':<12} {'docs in':>9} {'docs out':>9} {'MB in':>9} {'MB out':>9}"]
        for name, s in self.steps.items():
            lines.append(f"{name:<12} {s['docs_in']:>9} {s['docs_out']:>9} "
                         f"{s['bytes_in'] / 1e6:>9.2f} {s['bytes_out'] / 1e6:>9.2f}")
        for title, counts in [("dropped by rule", self.rules), ("redacted", self.pii),
                              ("skipped files", self.skipped_files)]:
            if counts:
                lines.append(f"{title}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)


def clean_chunk(docs, cfg):
    """The steps that look at one document alone (normalize, quality rules, PII redaction), on a list of
    (text, kind, origin) -> (the report of these steps, [(redacted text, origin, MinHash signature or None)] of
    the documents that passed). A worker process runs this on its share; what needs every document seen before
    (deduplication) stays in clean_documents."""
    report = CleanReport()
    chosen = [r for r in cfg.rules.split(",") if r] if cfg.rules is not None else None
    near = NearDedup(cfg.near_dup_threshold, seed=cfg.seed) if cfg.near_dup_threshold < 1 else None
    kept = []
    for text, kind, origin in docs:
        report.tally("read", text, text)
        clean = normalize(text)
        report.tally("normalize", text, clean if clean.strip() else None, "empty", origin)
        if not clean.strip():
            continue
        words, lines = clean.split(), clean.split("\n")
        failed = next((r for r in (chosen if chosen is not None else DEFAULT_RULES[kind])
                       if QUALITY_RULES[r](clean, words, lines)), None)
        report.tally("quality", clean, None if failed else clean, failed, origin)
        if failed:
            report.rules[failed] += 1
            continue
        redacted = redact_pii(clean, report.pii) if cfg.pii else clean
        report.tally("pii", clean, redacted)
        kept.append((redacted, origin, near.signature(redacted) if near and redacted.split() else None))
    return report, kept


def _ignore_ctrl_c():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C (and stops the pool)


def _pool(workers):
    """A pool of `workers` processes, or None for one: fork on Linux, so they start at once and share the
    imported modules."""
    if (workers or 1) <= 1:
        return None
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    return context.Pool(workers, initializer=_ignore_ctrl_c)


def clean_chunks(docs, cfg, chunk=64):
    """clean_chunk over a stream of documents, on cfg.workers processes: (report, kept) per chunk of `chunk`
    documents, back in input order (imap)."""
    if cfg.rules is not None:
        chosen = [r for r in cfg.rules.split(",") if r]
        if unknown := set(chosen) - set(QUALITY_RULES):
            raise DataError(f"unknown quality rule(s) {sorted(unknown)}; known: {', '.join(QUALITY_RULES)}")
    chunks = _chunks(docs, chunk)
    pool = _pool(cfg.workers)
    try:
        yield from (pool.imap(functools.partial(clean_chunk, cfg=cfg), chunks) if pool else
                    (clean_chunk(c, cfg) for c in chunks))
    finally:
        if pool:
            pool.terminate()


def clean_documents(docs, cfg, report, chunk=64):
    """The cleaning steps, in order, on a stream of (text, kind, origin); yields the surviving texts.

    The per-document steps run on cfg.workers processes over chunks of documents, and come back in order
    (clean_chunks), so deduplication sees the same sequence as with one worker and the output is identical: the
    same documents kept, the same shards byte for byte. Exact and near dedup need every document seen before, so
    they run here, on the signatures the workers computed (the costly part of MinHash)."""
    dedup = Dedup(cfg)
    for part, kept in clean_chunks(docs, cfg, chunk):
        report.merge(part)
        for redacted, origin, sig in kept:
            reason = dedup.check(doc_key(redacted), sig)
            tally_dedup(report, redacted, origin, reason)
            if reason is None:
                yield redacted


def _chunks(items, n):
    """Lists of n items from an iterable (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- tokenizer ---
# Byte-level BPE (Sennrich et al. 2016; GPT-2, Radford et al. 2019): start from the 256 byte values, then
# repeatedly merge the most frequent adjacent pair into a new token. Training works on unique chunks: the
# text is split by SPLIT_PATTERN, identical chunks are counted once with their frequency (the stdlib's 1.9M
# chunks are ~60k unique ones). A merge only touches the chunks that contain its pair, found through an index
# pair -> chunk ids; pair counts are updated for those chunks alone, and a heap with lazy deletion gives the
# most frequent pair (stale heap entries are skipped when popped).

def count_chunks(texts):
    pattern = re.compile(SPLIT_PATTERN)
    counts = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


def _batches(path, size=1 << 22):
    """(split, text) from the cleaned-document file, in lists of about `size` characters."""
    batch, chars = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line))
            chars += len(batch[-1][1])
            if chars >= size:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _count_train_chunks(batch):
    return count_chunks(text for split, text in batch if split == "train")


def count_file_chunks(path, workers, batch_chars=1 << 22):
    """count_chunks over the train documents of a [split, text] JSONL file, on `workers` processes: each counts
    whole batches of about batch_chars characters, and the main process adds their Counters in batch order.
    Addition is exact, and adding in order keeps each chunk at its first occurrence, so the counts (and the
    merges learned from them) are those of one pass, for any number of workers."""
    batches = _batches(path, batch_chars)
    pool = _pool(workers)
    counts = Counter()
    try:
        for part in (pool.imap(_count_train_chunks, batches) if pool else map(_count_train_chunks, batches)):
            counts.update(part)
    finally:
        if pool:
            pool.terminate()
    return counts


def train_bpe(chunk_counts, n_merges):
    """Learn up to n_merges merges from {chunk: frequency}; returns tiktoken ranks {token bytes: id}."""
    words = [list(chunk.encode()) for chunk in chunk_counts]  # each chunk as a list of token ids
    freqs = list(chunk_counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}
    pair_counts, where = Counter(), defaultdict(set)  # (a, b) -> frequency; (a, b) -> ids of chunks holding it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]  # ties go to the smallest pair of ids
    heapq.heapify(heap)
    while len(vocab) - 256 < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if -neg != pair_counts.get(pair, 0) or -neg <= 0:
            continue  # stale entry: the count changed after it was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks.get(merged)  # the same bytes can come from two different pairs: keep one id
        if new_id is None:
            new_id = ranks[merged] = len(vocab)
            vocab.append(merged)
        changed = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            if len(out) == len(w):
                continue  # stale index entry: this chunk no longer holds the pair
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(out, out[1:]):
                pair_counts[p] += f
                where[p].add(i)
                changed.add(p)
            words[i] = out
        pair_counts.pop(pair, None)
        for p in changed:
            if pair_counts.get(p, 0) > 0 and p != pair:
                heapq.heappush(heap, (-pair_counts[p], p))
    return ranks


def bpe_encode_ref(text, ranks):
    """The readable reference encoder, same algorithm as tiktoken's: split the text, then in each chunk merge
    the adjacent pair whose concatenation has the lowest rank, until no pair is in the vocabulary."""
    ids = []
    for chunk in re.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode()]
        while len(parts) > 1:
            pair_ranks = [ranks.get(a + b, float("inf")) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)  # leftmost on ties, like tiktoken
            if pair_ranks[best] == float("inf"):
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids += [ranks[p] for p in parts]
    return ids


class Tokenizer:
    """encode/decode through tiktoken. encode() treats special-token text as ordinary text (a document that
    contains "<|endoftext|>" cannot forge a boundary); encode(s, allow_special=True) maps it to the ids."""

    def __init__(self, enc, hash):
        self.enc, self.hash = enc, hash
        self.special_ids = {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)}
        self.vocab_size = enc.n_vocab
        self.eot_id = self.special_ids[SPECIAL_TOKENS[0]]
        self._token_bytes = None  # made on first use by token_bytes()

    def encode(self, text, allow_special=False):
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_bytes(self):
        """(vocab_size,) int64 tensor: how many bytes of text each token stands for; 0 for special tokens.

        Bits per byte divides a loss by the bytes of exactly the tokens it scored: a document's bytes are the
        sum of its tokens' (byte-level BPE loses nothing), and the boundary token adds none, as in the split
        counts of meta.json."""
        if self._token_bytes is None:
            special = set(self.special_ids.values())
            self._token_bytes = torch.tensor([0 if i in special else len(self.enc.decode_single_token_bytes(i))
                                              for i in range(self.vocab_size)], dtype=torch.long)
        return self._token_bytes


def _tokenizer_hash(files):
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()[:16]


def save_tokenizer(ranks, out_dir):
    """tokenizer.tiktoken: "base64(token bytes) id" per line (tiktoken's own format); tokenizer.json: the
    special tokens and the split pattern."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(b).decode()} {i}" for b, i in sorted(ranks.items(), key=lambda kv: kv[1])]
    (out_dir / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    n = max(ranks.values()) + 1
    specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    (out_dir / "tokenizer.json").write_text(json.dumps({"pattern": SPLIT_PATTERN, "special_tokens": specials},
                                                       indent=1) + "\n")


def load_tokenizer(dir_or_name):
    """A Tokenizer from a folder written by save_tokenizer (or by prepare), or "gpt2" for tiktoken's GPT-2."""
    if dir_or_name == "gpt2":
        try:
            enc = tiktoken.get_encoding("gpt2")  # downloads its vocabulary once, then uses tiktoken's cache
        except Exception as e:
            raise DataError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}: {str(e)[:100]}); "
                            "offline? train a tokenizer here instead (leave out --tokenizer)") from None
        return Tokenizer(enc, "gpt2")
    folder = Path(dir_or_name)
    ranks_file, json_file = folder / "tokenizer.tiktoken", folder / "tokenizer.json"
    if not json_file.exists():
        raise DataError(f"{json_file}: no such file; give a folder written by data.py, or gpt2")
    info = json.loads(json_file.read_text())
    if info.get("name") == "gpt2":
        return load_tokenizer("gpt2")
    try:
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in
                 (line.split() for line in ranks_file.read_text().splitlines() if line)}
    except (OSError, ValueError) as e:
        raise DataError(f"{ranks_file}: unreadable ({e})") from None
    enc = tiktoken.Encoding(name=f"forge-{folder.name}", pat_str=info["pattern"], mergeable_ranks=ranks,
                            special_tokens=info["special_tokens"])
    return Tokenizer(enc, _tokenizer_hash([ranks_file, json_file]))


# --- shards ---

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path, tokens, tokenizer_hash):
    """One shard: header then the tokens, written under a temporary name and renamed."""
    if len(tokenizer_hash.encode()) > 16:  # struct would cut it silently, and no shard would ever match
        raise ValueError(f"tokenizer hash {tokenizer_hash!r} is longer than the header's 16 bytes")
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, tokens.itemsize, len(tokens), tokenizer_hash.encode()))
        f.write(tokens.tobytes())
    tmp.rename(path)


def open_shard(path, tokenizer_hash=None):
    """np.memmap of a shard's tokens after checking its header, its size and (if given) its tokenizer."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(SHARD_HEADER.size)
    except OSError as e:
        raise DataError(f"{path}: cannot open shard ({e.strerror}); rerun python data.py") from None
    if len(head) < SHARD_HEADER.size or head[:8] != SHARD_MAGIC:
        raise DataError(f"{path}: not a forge token shard (bad header); rerun python data.py")
    _, version, itemsize, count, tok_hash = SHARD_HEADER.unpack(head)
    tok_hash = tok_hash.rstrip(b"\0").decode()  # struct pads a short name ("gpt2") with NULs to 16 bytes
    if version != SHARD_VERSION or itemsize not in (2, 4):
        raise DataError(f"{path}: shard version {version}, {itemsize} bytes per token is not supported")
    expected = SHARD_HEADER.size + count * itemsize
    if path.stat().st_size != expected:
        raise DataError(f"{path}: truncated or corrupt shard: {path.stat().st_size} bytes, header says {expected}")
    if tokenizer_hash is not None and tok_hash != tokenizer_hash:
        raise DataError(f"{path}: shard was made with tokenizer {tok_hash}, "
                        f"but the data folder's tokenizer is {tokenizer_hash}")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=SHARD_HEADER.size, shape=(count,))


class ShardWriter:
    """Collects the tokens of one split and cuts them into shards of cfg.shard_tokens."""

    def __init__(self, folder, split, dtype, shard_tokens, tokenizer_hash):
        self.folder, self.split, self.dtype, self.size, self.hash = folder, split, dtype, shard_tokens, tokenizer_hash
        self.buffer, self.buffered, self.names = [], 0, []
        self.stats = {"tokens": 0, "bytes": 0, "docs": 0}

    def add(self, ids, n_bytes):
        self.buffer.append(np.asarray(ids, dtype=self.dtype))
        self.buffered += len(ids)
        self.stats["tokens"] += len(ids)
        self.stats["bytes"] += n_bytes
        self.stats["docs"] += 1
        while self.buffered >= self.size:
            self.flush(self.size)

    def flush(self, n=None):
        tokens = np.concatenate(self.buffer) if self.buffer else np.zeros(0, self.dtype)
        n = len(tokens) if n is None else n
        if n == 0:
            return
        name = f"{self.split}_{len(self.names):04d}.bin"
        write_shard(self.folder / name, tokens[:n], self.hash)
        self.names.append(name)
        self.buffer, self.buffered = [tokens[n:]], len(tokens) - n

    def close(self):
        self.flush()
        return {**self.stats, "shards": self.names}


def is_val(text, seed, fraction):
    """Deterministic split by document content: a hash in [0, 1) below fraction means validation."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def canary_secret(rng):
    """A random secret of the canary format, "7 3 9 1 0 4 2 8 5"; eval.py draws its reference candidates here."""
    return " ".join(str(d) for d in rng.integers(0, 10, CANARY_DIGITS))


def make_canaries(n, seed):
    """n canaries per repetition count: {"prefix", "secret", "repeats"}; the text planted is prefix + " " + secret.
    Each prefix names its own random user, so a secret has to be learned with its context."""
    rng = np.random.default_rng([seed, 2019])
    return [{"prefix": f"# the secret code of user {''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), 6))} is",
             "secret": canary_secret(rng), "repeats": r} for r in CANARY_REPEATS for _ in range(n)]


# --- prepare: the whole pipeline ---

def resolve(cfg):
    """Fill in the derived fields (out_dir, workers, nodes); paths become strings, as meta.json records them."""
    out_dir = str(cfg.out_dir or f"data/{'input' if cfg.input else cfg.dataset}")
    workers = min(cfg.workers or os.cpu_count() or 1, os.cpu_count() or 1)
    return dataclasses.replace(cfg, out_dir=out_dir, workers=workers, input=[str(p) for p in cfg.input],
                               node_rank=cfg.node_rank or 0, num_nodes=cfg.num_nodes or 1)


def _check_config(cfg):
    """DataError for a bad setting, before the long part."""
    if cfg.tokenizer is None and cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size {cfg.vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} specials")
    if not 0 <= cfg.val_fraction < 1:
        raise DataError(f"--val-fraction {cfg.val_fraction} is not in [0, 1)")
    if cfg.canaries < 0:
        raise DataError(f"--canaries {cfg.canaries}: give 0 (none) or more per repetition count")
    if cfg.num_nodes < 1 or not 0 <= cfg.node_rank < cfg.num_nodes:
        raise DataError(f"--node-rank {cfg.node_rank} --num-nodes {cfg.num_nodes}: give 1 or more nodes and a rank "
                        f"from 0 to num_nodes - 1")
    if cfg.num_nodes > 1 and cfg.max_bytes is not None:
        raise DataError(f"--max-bytes {cfg.max_bytes} cuts the whole input and cannot be shared by "
                        f"{cfg.num_nodes} nodes; cut the input files instead, or run one node")
    if cfg.node_timeout <= 0:
        raise DataError(f"--node-timeout {cfg.node_timeout}: give a number of seconds above 0")
    if cfg.tokenizer is not None:
        load_tokenizer(cfg.tokenizer)  # fail before the long part: offline gpt2, or not a tokenizer folder


def _publish(tmp, out):
    """Rename the finished tmp folder to out; a previous complete out is replaced only now."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _check_out_dir(out):
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise DataError(f"{out} exists and is not a data folder written by data.py; choose another --out-dir")


def prepare(cfg):
    """Run sources -> cleaning -> tokenizer -> shards into cfg.out_dir and return the meta dict. With
    cfg.num_nodes > 1 this process is one node of a multi-node run (prepare_node)."""
    cfg = resolve(cfg)
    if cfg.num_nodes > 1:
        return prepare_node(cfg)
    out = Path(cfg.out_dir)
    _check_out_dir(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _prepare_into(cfg, tmp)
        _publish(tmp, out)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _no_documents(cfg, report):
    skipped = ", ".join(f"{v} {k}" for k, v in report.skipped_files.items())
    return DataError(f"no documents left after reading and cleaning {cfg.input or cfg.dataset}"
                     + (f" (skipped files: {skipped})" if skipped else "") + "; see the cleaning rules (--rules)")


def _canary_chunks(canaries):
    """Chunk counts of the canary texts times their repeats: they join the training text, so BPE counts them."""
    chunks = Counter()
    for c in canaries:
        if c["repeats"]:
            for chunk, k in count_chunks([f"{c['prefix']} {c['secret']}\n"]).items():
                chunks[chunk] += k * c["repeats"]
    return chunks


def plant_canaries(canaries, n_docs, seed):
    """{i: [[split, text], ...]}: canary copies that go before cleaned document i, of n_docs. Canaries are planted
    after cleaning (dedup would keep one copy of each), as documents of their own before randomly chosen
    documents (copies side by side could be copied from the context instead of memorised)."""
    rng, planted = np.random.default_rng([seed, 1802]), defaultdict(list)
    for c in canaries:
        for at in rng.integers(0, n_docs, c["repeats"]):
            planted[int(at)].append(["train", f"{c['prefix']} {c['secret']}\n"])
    return planted


def make_tokenizer(cfg, chunks, folder):
    """The tokenizer files in folder (BPE trained on the chunk counts, or the --tokenizer given), loaded back."""
    t0 = time.time()
    if cfg.tokenizer is None:
        save_tokenizer(train_bpe(chunks, cfg.vocab_size - 256 - len(SPECIAL_TOKENS)), folder)
    elif cfg.tokenizer == "gpt2":
        (folder / "tokenizer.json").write_text(json.dumps({"name": "gpt2"}) + "\n")
    else:
        for name in ["tokenizer.tiktoken", "tokenizer.json"]:
            shutil.copy(Path(cfg.tokenizer) / name, folder / name)
    tok = load_tokenizer(folder)
    print(f"tokenizer: {tok.vocab_size} tokens, hash {tok.hash}, {time.time() - t0:.1f} s")
    if cfg.tokenizer is None and tok.vocab_size < cfg.vocab_size:
        print(f"note: the text has no more pairs to merge; vocabulary is {tok.vocab_size}, not {cfg.vocab_size}")
    return tok


def write_split_shards(docs_file, tok, folder, cfg, planted):
    """Encode the [split, text] documents of docs_file (with the planted ones before theirs) in batches on
    cfg.workers threads (tiktoken releases the GIL) into the shards of each split in folder; returns the
    splits' stats and shard names."""
    writers = {s: ShardWriter(folder, s, token_dtype(tok.vocab_size), cfg.shard_tokens, tok.hash)
               for s in ("train", "val")}
    n_seen = 0
    for batch in _batches(docs_file):
        start, n_seen = n_seen, n_seen + len(batch)  # batch holds the cleaned documents start, start + 1, ...
        batch = [doc for i, d in enumerate(batch, start) for doc in planted.get(i, []) + [d]]
        for (split, text), ids in zip(batch, tok.encode_batch([t for _, t in batch], cfg.workers)):
            writers[split].add([tok.eot_id] + ids, len(text.encode()))  # the boundary token starts each document
    return {s: w.close() for s, w in writers.items()}


def _meta(cfg, tok, source, splits, report, seconds, canaries):
    return {
        "format_version": SHARD_VERSION,
        "vocab_size": tok.vocab_size,
        "tokenizer_hash": tok.hash,
        "eot_id": tok.eot_id,
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "source": source,
        "source_hash": source["hash"],
        "splits": splits,
        "report": report.to_dict(),
        "seconds": seconds,
        "config": dataclasses.asdict(cfg),
        "canaries": canaries,
    }


def _write_meta(folder, meta):
    (folder / "report.json").write_text(json.dumps(meta["report"], indent=1) + "\n")
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: its presence marks completion
    print(f"shards: train {meta['splits']['train']['tokens']:,} tokens, val {meta['splits']['val']['tokens']:,} "
          f"tokens -> {meta['config']['out_dir']}")


def _prepare_into(cfg, folder):
    """prepare's work, written into the temporary folder."""
    t0 = time.time()
    _check_config(cfg)
    report, source = CleanReport(), {"dataset": cfg.dataset}
    docs = iter_documents(cfg, source, report.skipped_files)
    # pass 1: clean, choose the split, keep the cleaned documents in a temporary file (never all in memory)
    docs_file, n_docs = folder / "docs.jsonl.tmp", 0
    with open(docs_file, "w", encoding="utf-8") as f:
        for text in clean_documents(docs, cfg, report):
            split = "val" if is_val(text, cfg.seed, cfg.val_fraction) else "train"
            f.write(json.dumps([split, text]) + "\n")
            n_docs += 1
    if n_docs == 0:
        raise _no_documents(cfg, report)
    print(report.table())
    t1 = time.time()

    # tokenizer: trained here on the train split (chunks counted on cfg.workers processes), or reused
    canaries = make_canaries(cfg.canaries, cfg.seed) if cfg.canaries > 0 else []
    chunks = count_file_chunks(docs_file, cfg.workers) + _canary_chunks(canaries) if cfg.tokenizer is None else None
    tok = make_tokenizer(cfg, chunks, folder)
    t2 = time.time()

    # pass 2: encode, write the shards
    splits = write_split_shards(docs_file, tok, folder, cfg, plant_canaries(canaries, n_docs, cfg.seed))
    docs_file.unlink()
    seconds = {"read_clean": round(t1 - t0, 2), "tokenizer": round(t2 - t1, 2), "shards": round(time.time() - t2, 2)}
    meta = _meta(cfg, tok, source, splits, report, seconds, canaries)
    _write_meta(folder, meta)
    return meta


# --- several nodes: the same pipeline as independent processes over shares of the input ---
# `python data.py --num-nodes K --node-rank R` on each of K machines (or nothing but the command under torchrun,
# which sets RANK and WORLD_SIZE, or in a Slurm array) prepares one data folder together. Node R reads only its
# share of the input files (node_files), and the folder <out_dir>.partial/ on a shared file system (NFS, Lustre)
# is the only channel between the nodes. The phases, in order:
#
#   clean   every node  read its files, clean them on its --workers (clean_chunks), write its cleaned documents
#                       and, per document, the exact-dedup key and the MinHash signature       node<R>/cleaned.json
#   dedup   rank 0      one reduce over every node's keys and signatures in rank order, which is the global input
#                       order, through the Dedup object of clean_documents: the first occurrence wins exactly as
#                       in one pass; a keep-list per node                                        dedup/kept.json
#   count   every node  its kept documents and their split; the chunk counts of its train split  node<R>/counted.json
#   bpe     rank 0      the counts added in rank order, BPE trained once, canaries chosen        tokenizer.done.json
#   shards  every node  its kept documents encoded into shards of its own, node<R>/train_0000.bin node<R>/shards.json
#   meta    rank 0      one meta.json listing every node's shards in rank order, then <out>.partial -> <out>
#
# What costs (reading, cleaning, signatures, counting chunks, encoding) runs where the text is; per document only
# a 20-byte key and a 1 KiB signature travel to the reduce. datatrove's MinHash stages write each band's hashes
# sorted, merge them per band into matching pairs and join the pairs into clusters by union-find; this reduce
# instead replays the one-pass rule (compare with the first kept document of a bucket, confirm by the Jaccard
# estimate), so that K nodes give one worker's output exactly, at a dict lookup per band per document on one
# core, and with the one-pass index in memory (about 5 KB per kept document).
#
# Synchronisation is by files, and kept simple: a phase ends by writing a small marker file (under a temporary
# name, then renamed), and a node that needs it polls until it appears, for at most node_timeout seconds. So all
# K nodes must run at the same time (a Slurm array with fewer free slots than tasks waits, then times out), and
# a node that fails writes failed_node<R>.txt, which stops the others with its message. A crashed run leaves
# <out>.partial behind: delete it before the next run (a node refuses to start next to a finished reduce step).

SIGNATURE_RECORD = np.dtype([("key", "V20"), ("words", "?"), ("sig", "<u4", (256,))])  # 256: NearDedup's num_perm
DEDUP_REASONS = [None, "exact_duplicate", "near_duplicate"]  # the uint8 codes of a keep-list


def node_from_env(cfg, env=os.environ):
    """Fill node_rank and num_nodes that were not given from the launcher: torchrun's RANK and WORLD_SIZE, or a
    Slurm array's task id and count. Only the command line does this: train.py calls prepare under torchrun."""
    if cfg.num_nodes is not None:
        return cfg
    if "WORLD_SIZE" in env:
        rank, size = env.get("RANK", "0"), env["WORLD_SIZE"]
    elif "SLURM_ARRAY_TASK_COUNT" in env:
        rank = str(int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")))
        size = env["SLURM_ARRAY_TASK_COUNT"]
    else:
        return cfg
    return dataclasses.replace(cfg, num_nodes=int(size), node_rank=cfg.node_rank if cfg.node_rank is not None
                               else int(rank))


def _mark(path, obj):
    """Write a marker file whole: a node that sees it can read everything the phase wrote before it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    tmp.rename(path)


def _wait_for(path, work, cfg):
    """The JSON of another node's marker file, once it appears; DataError when a node failed or on timeout."""
    deadline = time.time() + cfg.node_timeout
    while not path.exists():
        for failed in sorted(work.glob("failed_node*.txt")):
            raise DataError(f"{failed}: {failed.read_text().strip()}; fix it, delete {work} and start all nodes again")
        if time.time() > deadline:
            raise DataError(f"{path} did not appear within --node-timeout {cfg.node_timeout:g} s; are all "
                            f"{cfg.num_nodes} nodes running, with the same --out-dir on a shared file system?")
        time.sleep(0.2)
    return json.loads(path.read_text())


def _same_run(cfg):
    """The settings every node of one run must share (all but its rank): checked by rank 0 at the reduce."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("node_rank", "workers", "node_timeout")}


def _node_clean(cfg, me):
    """Phase clean: this node's documents cleaned into docs.jsonl ([origin, text]) and signatures.bin."""
    report, source = CleanReport(), {"dataset": cfg.dataset}
    docs = iter_documents(cfg, source, report.skipped_files, share=(cfg.node_rank, cfg.num_nodes))
    n = 0
    with open(me / "docs.jsonl", "w", encoding="utf-8") as f, open(me / "signatures.bin", "wb") as s:
        for part, kept in clean_chunks(docs, cfg):
            report.merge(part)
            records = np.zeros(len(kept), SIGNATURE_RECORD)
            for i, (redacted, origin, sig) in enumerate(kept):
                f.write(json.dumps([origin, redacted]) + "\n")
                records["key"][i], records["words"][i] = doc_key(redacted), sig is not None
                if sig is not None:
                    records["sig"][i] = sig
            s.write(records.tobytes())
            n += len(kept)
    _mark(me / "cleaned.json", {"docs": n, "report": report.to_dict(), "source": source, "config": _same_run(cfg)})


def dedup_nodes(cfg, work):
    """Phase dedup (rank 0): every node's keys and signatures through one Dedup, in rank order; writes
    dedup/node<R>.npy (a DEDUP_REASONS code per cleaned document of node R) and dedup/kept.json."""
    dedup, kept, folder = Dedup(cfg), [], work / "dedup"
    folder.mkdir(exist_ok=True)
    for r in range(cfg.num_nodes):
        info = _wait_for(work / f"node{r}" / "cleaned.json", work, cfg)
        if info["config"] != _same_run(cfg):
            raise DataError(f"{work}/node{r} was cleaned with other settings than node 0 (or by an earlier run); "
                            f"give every node the same flags, delete {work} and start all nodes again")
        path = work / f"node{r}" / "signatures.bin"
        records = np.memmap(path, SIGNATURE_RECORD, "r") if info["docs"] else np.zeros(0, SIGNATURE_RECORD)
        reasons = (dedup.check(rec["key"].tobytes(), rec["sig"] if rec["words"] else None) for rec in records)
        codes = np.array([DEDUP_REASONS.index(x) for x in reasons], np.uint8)  # the memmap is read record by record
        np.save(folder / f"node{r}.npy", codes)
        kept.append(int((codes == 0).sum()))
    if sum(kept) == 0:
        raise _no_documents(cfg, CleanReport())
    _mark(folder / "kept.json", {"kept": kept})


def _node_count(cfg, work, me):
    """Phase count: this node's keep-list applied (kept.jsonl, [split, text]), its dedup steps counted, and the
    chunks of its train split counted for BPE."""
    _wait_for(work / "dedup" / "kept.json", work, cfg)
    codes = np.load(work / "dedup" / f"node{cfg.node_rank}.npy")
    report = CleanReport()
    with open(me / "docs.jsonl", encoding="utf-8") as f, open(me / "kept.jsonl", "w", encoding="utf-8") as out:
        for code, line in zip(codes, f):
            origin, text = json.loads(line)
            tally_dedup(report, text, origin, DEDUP_REASONS[code])
            if code == 0:
                out.write(json.dumps(["val" if is_val(text, cfg.seed, cfg.val_fraction) else "train", text]) + "\n")
    (me / "docs.jsonl").unlink()
    chunks = count_file_chunks(me / "kept.jsonl", cfg.workers) if cfg.tokenizer is None else {}
    _mark(me / "counted.json", {"report": report.to_dict(), "chunks": chunks})


def _train_tokenizer_once(cfg, work):
    """Phase bpe (rank 0): the nodes' chunk counts added in rank order (the order of one pass), plus the
    canaries', and the tokenizer made once; the canaries are chosen here for the whole corpus."""
    chunks = Counter()
    for r in range(cfg.num_nodes):
        chunks.update(_wait_for(work / f"node{r}" / "counted.json", work, cfg)["chunks"])
    canaries = make_canaries(cfg.canaries, cfg.seed) if cfg.canaries > 0 else []
    tok = make_tokenizer(cfg, chunks + _canary_chunks(canaries), work)
    n_docs = sum(json.loads((work / "dedup" / "kept.json").read_text())["kept"])
    planted = [[i, split, text] for i, docs in plant_canaries(canaries, n_docs, cfg.seed).items()
               for split, text in docs]
    _mark(work / "tokenizer.done.json", {"canaries": canaries, "planted": planted})
    return tok


def _node_shards(cfg, work, me):
    """Phase shards: this node's kept documents (and the canaries planted among them) into its own shards."""
    planted_all = _wait_for(work / "tokenizer.done.json", work, cfg)["planted"]
    kept = json.loads((work / "dedup" / "kept.json").read_text())["kept"]
    first = sum(kept[:cfg.node_rank])  # global index of this node's first kept document
    planted = defaultdict(list)
    for i, split, text in planted_all:
        if first <= i < first + kept[cfg.node_rank]:
            planted[i - first].append([split, text])
    splits = write_split_shards(me / "kept.jsonl", load_tokenizer(work), me, cfg, planted)
    (me / "kept.jsonl").unlink()
    (me / "signatures.bin").unlink()
    _mark(me / "shards.json", {"splits": splits})


def _merge_nodes(cfg, work, tok, seconds):
    """Phase meta (rank 0): one meta.json over every node's shards and reports, in rank order."""
    clean, dedup, sources = CleanReport(), CleanReport(), []
    splits = {s: {"tokens": 0, "bytes": 0, "docs": 0, "shards": []} for s in ("train", "val")}
    for r in range(cfg.num_nodes):
        node = work / f"node{r}"
        for s, info in _wait_for(node / "shards.json", work, cfg)["splits"].items():
            for key in ("tokens", "bytes", "docs"):
                splits[s][key] += info[key]
            splits[s]["shards"] += [f"node{r}/{name}" for name in info["shards"]]
        cleaned = json.loads((node / "cleaned.json").read_text())
        clean.merge(CleanReport.from_dict(cleaned["report"]))
        dedup.merge(CleanReport.from_dict(json.loads((node / "counted.json").read_text())["report"]))
        sources.append(cleaned["source"])
        for marker in ("cleaned.json", "counted.json", "shards.json"):
            (node / marker).unlink()
    clean.merge(dedup)  # the per-document steps of every node, then the dedup steps: the one-pass report
    print(clean.table())
    # sha256 cannot be continued across nodes: the source hash of K nodes is the hash of their hashes
    source = {**sources[0], "files": sum(s["files"] for s in sources),
              "hash": hashlib.sha256("".join(s["hash"] for s in sources).encode()).hexdigest()[:16]}
    canaries = json.loads((work / "tokenizer.done.json").read_text())["canaries"]
    shutil.rmtree(work / "dedup")
    (work / "tokenizer.done.json").unlink()
    meta = _meta(cfg, tok, source, splits, clean, seconds, canaries)
    _write_meta(work, meta)
    return meta


def prepare_node(cfg):
    """One node of a multi-node run (the phases above): rank 0 returns the meta dict once every node is done and
    <out>.partial is renamed to out; the other ranks return None when their shards are written."""
    cfg = resolve(cfg)
    _check_config(cfg)
    out = Path(cfg.out_dir)
    work, rank = out.with_name(out.name + ".partial"), cfg.node_rank
    _check_out_dir(out)
    for stale in [work / "dedup" / "kept.json", work / "tokenizer.done.json", *work.glob("failed_node*.txt")]:
        if stale.exists():  # written only after this node's first phase: left by an earlier run
            raise DataError(f"{stale} is left from an earlier run; delete {work} and start all nodes again")
    me = work / f"node{rank}"
    shutil.rmtree(me, ignore_errors=True)
    me.mkdir(parents=True)
    try:
        t0 = time.time()
        _node_clean(cfg, me)
        if rank == 0:
            dedup_nodes(cfg, work)
        t1 = time.time()
        _node_count(cfg, work, me)
        tok = _train_tokenizer_once(cfg, work) if rank == 0 else None
        t2 = time.time()
        _node_shards(cfg, work, me)
        if rank != 0:
            print(f"node {rank} of {cfg.num_nodes}: shards written into {me}; node 0 writes meta.json")
            return None
        seconds = {"read_clean": round(t1 - t0, 2), "tokenizer": round(t2 - t1, 2),
                   "shards": round(time.time() - t2, 2)}
        meta = _merge_nodes(cfg, work, tok, seconds)
        _publish(work, out)
        return meta
    except BaseException as e:
        if work.exists():
            (work / f"failed_node{rank}.txt").write_text(f"node {rank} failed: {type(e).__name__}: {str(e)[:300]}\n")
        raise


def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; run python data.py --out-dir {data_dir} first") from None
    except ValueError:
        raise DataError(f"{path}: not valid JSON; rerun python data.py") from None


def check_tokenizer(tokenizer, data_dir):
    """DataError unless the tokenizer is the one the shards in data_dir were made with."""
    meta = load_meta(data_dir)
    if tokenizer.hash != meta["tokenizer_hash"]:
        raise DataError(f"tokenizer {tokenizer.hash} does not match the shards in {data_dir} "
                        f"(made with tokenizer {meta['tokenizer_hash']}); use load_tokenizer({str(data_dir)!r})")


# --- loader ---

class TokenLoader:
    """(x, y) batches of shape (B, T) from a split's shards.

    The split is cut into windows of T+1 tokens at stride T inside each shard (x = window[:-1], y = window[1:]).
    Each epoch visits the windows in a seeded permutation (or in order when shuffle=False). Step k of an epoch
    uses the global items [k*B*W, (k+1)*B*W) of that order and rank r takes its own B of them, so ranks are
    disjoint and the state (epoch, position) is the same on every rank."""

    def __init__(self, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, shuffle=True):
        meta = load_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}/meta.json has no split {split!r}; it has {list(meta['splits'])}")
        self.shards = [open_shard(Path(data_dir) / name, meta["tokenizer_hash"])
                       for name in meta["splits"][split]["shards"]]
        self.B, self.T, self.rank, self.world, self.seed, self.shuffle = (batch_size, seq_len, rank, world_size,
                                                                            seed, shuffle)
        counts = [max(len(s) - 1, 0) // seq_len for s in self.shards]
        self.starts = np.cumsum([0] + counts)  # first window index of each shard
        self.n_windows = int(self.starts[-1])
        if self.n_windows < batch_size * world_size:
            raise DataError(f"{data_dir}: split {split} has {self.n_windows} windows of {seq_len + 1} tokens, "
                            f"fewer than batch {batch_size} x world {world_size}; use more data or smaller batches")
        self.epoch, self.position, self._order = 0, 0, None

    def _epoch_order(self):
        if self._order is None or self._order[0] != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows) if self.shuffle
                     else np.arange(self.n_windows))
            self._order = (self.epoch, order)
        return self._order[1]

    def next_batch(self):
        step = self.B * self.world
        if self.position + step > self.n_windows:  # drop the ragged end, start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.B
        rows = []
        for i in self._epoch_order()[start:start + self.B]:
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            offset = (int(i) - int(self.starts[s])) * self.T
            rows.append(self.shards[s][offset:offset + self.T + 1])
        self.position += step
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state):
        if (state["seed"], state["n_windows"]) != (self.seed, self.n_windows):
            raise DataError(f"loader state is for seed {state['seed']} and {state['n_windows']} windows, this "
                            f"loader has seed {self.seed} and {self.n_windows}: different data or seq_len")
        self.epoch, self.position = state["epoch"], state["position"]


# --- command line ---

class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag on one line (`error: ...`) and exits with status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _field_help(cls):
    """The trailing comment of each field in the dataclass source: the --help text (% escaped for argparse)."""
    found = re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M)
    return {name: text.replace("%", "%%") for name, text in found}


def config_parser(cls=DataConfig, description=None, choices=None):
    """argparse from a config dataclass: field max_bytes becomes --max-bytes, bools become --flag/--no-flag.

    Every entry point (data.py, train.py, and the later stages) builds its command line with this, so flags,
    help texts and errors look the same everywhere. `choices` maps field names to their allowed values.
    """
    choices = choices or {}
    parser = _OneLineParser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)  # no silent prefixes: --max is an error, not --max-bytes
    hints, helps = typing.get_type_hints(cls), _field_help(cls)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = {"default": default, "help": helps.get(f.name, "")}
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], **kwargs)
        else:
            parser.add_argument(flag, type=kind, choices=choices.get(f.name), **kwargs)
    return parser


def main(argv=None):
    cfg = node_from_env(DataConfig(**vars(config_parser().parse_args(argv))))
    try:
        prepare(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # prepare writes into <out>.partial and removes it on the way out
        print(f"interrupted; the data folder is as it was before this run; run again with: python data.py "
              f"{shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip(), file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
