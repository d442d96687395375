"""Tests for data.py (chapter 1, data preparation): sources, cleaning, BPE, shards, loader, bad input.

    python -m pytest -q tests/test_data.py

All data is made by the tests in tmp_path; downloads go to an http.server that the tests start on 127.0.0.1.
"""
import base64
import hashlib
import http.server
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiktoken

import data
from data import DataConfig, DataError, TokenLoader

WORDS = ("the a of river stone light garden quiet music winter bright letter window morning ocean paper "
         "village story mountain forest silver friend little green table walked found said under over").split()
HARD_STRINGS = [
    "", "hello world", "Hello, World! It's 2024... we'll see 1234567 items.",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "日本語のテキスト、中文字符。한국어", "e\u0301 a\u0300 combining ñ",
    "nul \x00 bytes \x01\x02 and \x7f", "tabs\tand\r\nwindows\rlines\n\n\n  spaced   out  ",
    "x" * 5000 + " " + "ab " * 2000, "def f(x):\n    return x ** 2  # comment\n", "'S 'LL 'Re ''' \"\"\"",
    "\u00a0nbsp\u3000ideographic space", "numbers 1 22 333 4444 55555 3.14159 ٣٤٥",
]


def random_docs(n, seed=0, words=80):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


def write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared data folder: 300 documents, vocab 350, shards of 4000 tokens (so several shards)."""
    root = tmp_path_factory.mktemp("prepared")
    write_jsonl(root / "in" / "docs.jsonl", random_docs(300))
    cfg = DataConfig(input=[str(root / "in")], out_dir=str(root / "out"), vocab_size=350, val_fraction=0.1,
                     shard_tokens=4000)
    return cfg, data.prepare(cfg)


@pytest.fixture(scope="module")
def ranks():
    text = " ".join(HARD_STRINGS) + " " + " ".join(random_docs(50))
    return data.train_bpe(data.count_chunks([text] * 3), 400)


# --- tokenizer ---

def naive_bpe(chunk_counts, n_merges):
    """Textbook BPE: recount every pair after every merge; same tie rule (smallest pair of ids) as train_bpe."""
    words = {tuple(c.encode()): f for c, f in chunk_counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    for _ in range(n_merges):
        counts = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                counts[p] += f
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new, merged_words = ranks[merged], {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged_words[tuple(out)] = merged_words.get(tuple(out), 0) + f
        words = merged_words
    return ranks


def test_incremental_bpe_learns_the_same_merges_as_full_recount():
    counts = data.count_chunks(random_docs(30, seed=1) + HARD_STRINGS[:8])
    assert data.train_bpe(counts, 150) == naive_bpe(counts, 150)


def test_bpe_first_merge_is_the_most_frequent_pair():
    ranks = data.train_bpe({"aaab": 10, "cd": 3}, 1)
    assert ranks[b"aa"] == 256 and len(ranks) == 257


def test_split_pattern_chunks_the_same_in_re_and_tiktoken(ranks):
    # each chunk found by Python's re, encoded alone, must give the ids tiktoken gives for the whole string
    enc = tiktoken.Encoding("t", pat_str=data.SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for s in HARD_STRINGS:
        chunks = data.re.findall(data.SPLIT_PATTERN, s)
        assert "".join(chunks) == s
        assert enc.encode_ordinary(s) == [i for c in chunks for i in enc.encode_ordinary(c)], repr(s[:40])


def test_reference_encoder_matches_tiktoken(ranks, tmp_path):
    data.save_tokenizer(ranks, tmp_path)
    tok = data.load_tokenizer(tmp_path)
    for s in HARD_STRINGS + random_docs(5, seed=7):
        assert tok.encode(s) == data.bpe_encode_ref(s, ranks), repr(s[:40])


def test_decode_encode_roundtrips_any_string(ranks, tmp_path):
    data.save_tokenizer(ranks, tmp_path)
    tok = data.load_tokenizer(tmp_path)
    for s in HARD_STRINGS + ["<|endoftext|> is text here", "\ud7ff\U0010ffff"]:
        assert tok.decode(tok.encode(s)) == s, repr(s[:40])
    assert tok.encode("") == []


def test_special_tokens_come_last_and_only_map_when_allowed(ranks, tmp_path):
    data.save_tokenizer(ranks, tmp_path)
    tok = data.load_tokenizer(tmp_path)
    assert list(tok.special_ids) == sorted(data.SPECIAL_TOKENS)
    assert [tok.special_ids[s] for s in data.SPECIAL_TOKENS] == list(range(len(ranks), len(ranks) + 5))
    assert tok.vocab_size == len(ranks) + len(data.SPECIAL_TOKENS) and tok.eot_id == len(ranks)
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    assert tok.encode("a<|endoftext|>", allow_special=True)[-1] == tok.eot_id


def test_tokenizer_files_are_tiktoken_base64_lines_and_json(ranks, tmp_path):
    data.save_tokenizer(ranks, tmp_path)
    lines = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()
    assert len(lines) == len(ranks)
    token, rank = lines[300].split()
    assert ranks[base64.b64decode(token)] == int(rank) == 300
    info = json.loads((tmp_path / "tokenizer.json").read_text())
    assert info["pattern"] == data.SPLIT_PATTERN and list(info["special_tokens"]) == data.SPECIAL_TOKENS


def test_gpt2_tokenizer_offline_is_a_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(data.tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="gpt2.*offline"):
        data.load_tokenizer("gpt2")


def test_gpt2_tokenizer_is_recorded_by_name_in_the_data_folder(monkeypatch, ranks, tmp_path):
    data.save_tokenizer(ranks, tmp_path / "t")
    stand_in = data.load_tokenizer(tmp_path / "t").enc  # tiktoken's gpt2 needs a download: use ours in its place
    monkeypatch.setattr(data.tiktoken, "get_encoding", lambda name: stand_in)
    write_jsonl(tmp_path / "src" / "d.jsonl", random_docs(30))
    meta = data.prepare(DataConfig(input=[str(tmp_path / "src")], out_dir=str(tmp_path / "out"), tokenizer="gpt2"))
    assert meta["tokenizer_hash"] == data.load_tokenizer(tmp_path / "out").hash == "gpt2"
    # and the shards open with that name, as train.py opens them: the header's fixed 16-byte field pads it
    for name in meta["splits"]["train"]["shards"]:
        assert len(data.open_shard(tmp_path / "out" / name, "gpt2")) > 0
    x, y = TokenLoader(tmp_path / "out", "train", 2, 8).next_batch()
    assert x.shape == (2, 8)


# --- cleaning ---

def test_normalize_nfc_line_endings_and_control_chars():
    assert data.normalize("e\u0301\r\nx\ry\x00\x1b\tz\x85") == "\u00e9\nx\ny\tz"


@pytest.mark.parametrize("rule, bad", [
    ("min_words", "too few words here."),
    ("max_words", "w " * 100_001),
    ("mean_word_length", " ".join(["supercalifragilistic"] * 60)),
    ("symbol_ratio", " ".join(["# word"] * 60)),
    ("alpha_words", " ".join(["123 456 789 word"] * 20)),
    ("repeated_lines", "\n".join(["same line again and again"] * 10 + ["x y z"] * 2) + " " + "w " * 60),
    ("non_alnum_ratio", "{}[]()<>;:" * 50 + " word " * 60),
    ("terminal_punct", "\n".join(["a line with no end"] * 20)),
    ("lorem_ipsum", "Lorem ipsum dolor sit amet " * 20),
    ("curly_brace", "function f() { return 1 } " * 20),
])
def test_each_quality_rule_drops_its_case_and_can_be_switched_off(rule, bad):
    good = random_docs(1)[0]
    report = data.CleanReport()
    kept = list(data.clean_documents([(bad, "text", "bad"), (good, "text", "good")],
                                     DataConfig(rules=rule), report))
    assert kept == [good] and report.rules == {rule: 1} and report.examples[rule][0].startswith("bad:")
    assert len(list(data.clean_documents([(bad, "text", "bad")], DataConfig(rules=""), data.CleanReport()))) == 1


def test_default_rules_keep_source_code():
    import json.decoder as module  # any ordinary stdlib module
    code = Path(module.__file__).read_text()
    assert list(data.clean_documents([(code, "code", "decoder.py")], DataConfig(pii=False), data.CleanReport()))
    # the prose rules would drop it: that is why code has its own defaults
    assert not list(data.clean_documents([(code, "code", "decoder.py")], DataConfig(rules="curly_brace"),
                                         data.CleanReport()))


def test_pii_is_redacted_with_placeholders_and_luhn_checked():
    counts = Counter()
    text = ("mail jane.doe+x@example.co.uk or call +1 415-555-0132 / (212) 555-0199, host 192.168.1.20, "
            "card 4111 1111 1111 1111, not a card 4111 1111 1111 1112, version 3.11.7")
    out = data.redact_pii(text, counts)
    assert out == ("mail <EMAIL> or call <PHONE> / <PHONE>, host <IP>, card <CARD>, "
                   "not a card 4111 1111 1111 1112, version 3.11.7")
    assert counts == {"email": 1, "phone": 2, "ip": 1, "card": 1}
    assert data.luhn_ok("79927398713") and not data.luhn_ok("79927398710")
    # a card right after a phone number, two cards in a row, the 4-6-5 layout, a run of small numbers
    counts = Counter()
    out = data.redact_pii("555-123-4567 4111 1111 1111 1111 4111 1111 1111 1112, amex 3782 822463 10005, "
                          "table 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16", counts)
    assert out == "<PHONE> <CARD> 4111 1111 1111 1112, amex <CARD>, table 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16"


def test_exact_and_near_duplicates_are_dropped_and_counted():
    docs = random_docs(20, seed=3, words=200)
    near = docs[0].replace("the", "THE", 1)  # one changed word out of 200
    stream = [(d, "text", f"d{i}") for i, d in enumerate(docs + [docs[1], near])]
    report = data.CleanReport()
    kept = list(data.clean_documents(stream, DataConfig(rules=""), report))
    assert kept == docs
    assert report.steps["exact_dedup"]["docs_in"] - report.steps["exact_dedup"]["docs_out"] == 1
    assert report.steps["near_dedup"]["docs_in"] - report.steps["near_dedup"]["docs_out"] == 1
    assert report.examples["near_duplicate"][0].startswith("d21:")
    # at threshold 1 the near-dedup step is off
    assert len(list(data.clean_documents(stream, DataConfig(rules="", near_dup_threshold=1.0),
                                         data.CleanReport()))) == 21


def test_cleaning_on_two_worker_processes_keeps_and_reports_exactly_what_one_does():
    docs = random_docs(30, seed=5, words=120)
    stream = [(d, "text", f"d{i}") for i, d in enumerate(docs + [docs[2], docs[7].replace("the", "THE", 1), "  ",
                                                             "mail me at ann@example.com " + docs[3], "x"])]
    results = []
    for workers in (1, 2):  # chunks of 4 documents: every worker cleans several, and they come back in order
        report = data.CleanReport()
        kept = list(data.clean_documents(stream, DataConfig(workers=workers), report, chunk=4))
        results.append((kept, report.to_dict()))
    assert results[0] == results[1]
    kept, report = results[0]
    assert report["steps"]["exact_dedup"]["docs_out"] < report["steps"]["exact_dedup"]["docs_in"]
    assert report["steps"]["near_dedup"]["docs_out"] < report["steps"]["near_dedup"]["docs_in"]
    assert report["pii"] and report["examples"]["empty"] and not any("ann@example.com" in t for t in kept)


def test_minhash_estimate_tracks_jaccard():
    nd = data.NearDedup(0.8, num_perm=256)
    a = " ".join(f"w{i}" for i in range(400))
    b = " ".join(f"w{i}" for i in range(100, 500))  # 5-shingles: Jaccard 296/496 = 0.60
    est = np.mean(nd.signature(a) == nd.signature(b))
    assert abs(est - 296 / 496) < 0.1


def shifted_pair(n_shingles, shift, tag):
    """Two documents of distinct words whose 5-shingle sets have Jaccard similarity exactly
    (n_shingles - shift) / (n_shingles + shift): the second is the first moved `shift` words on."""
    words = [f"{tag}w{i}" for i in range(n_shingles + 4 + shift)]
    return " ".join(words[:n_shingles + 4]), " ".join(words[shift:])


@pytest.mark.parametrize("n_shingles, shift, jaccard, least, most", [
    (390, 10, 0.95, 0.99, 1.0),  # clear near duplicates: always caught
    (370, 30, 0.85, 0.90, 1.0),  # just above the threshold 0.8: still caught at least 9 times in 10
    (400, 100, 0.60, 0.0, 0.0),  # well below it: never dropped
])
def test_near_dedup_drops_pairs_above_the_threshold_and_keeps_those_below(n_shingles, shift, jaccard, least, most):
    assert (n_shingles - shift) / (n_shingles + shift) == pytest.approx(jaccard)
    trials, dropped = 200, 0
    for seed in range(trials):  # fresh permutations and fresh words each time: independent trials
        first, second = shifted_pair(n_shingles, shift, tag=seed)
        nd = data.NearDedup(0.8, seed=seed)
        assert not nd.is_duplicate(first)
        dropped += nd.is_duplicate(second)
    assert least <= dropped / trials <= most, f"{dropped}/{trials} pairs at Jaccard {jaccard} dropped"


def test_report_counts_bytes_per_step_and_is_saved(prepared):
    cfg, meta = prepared
    report = json.loads((Path(cfg.out_dir) / "report.json").read_text())
    assert report == meta["report"]
    read = report["steps"]["read"]
    assert read["docs_in"] == 300 and read["bytes_in"] == sum(len(d.encode()) for d in random_docs(300))
    assert report["steps"]["near_dedup"]["docs_out"] == meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"]
    assert "step" in data.CleanReport().table()


# --- sources ---

def test_local_sources_read_txt_md_py_jsonl_and_cut_long_text(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(["para " * 30] * 10))  # 10 paragraphs of 150 chars
    (tmp_path / "b.md").write_text("# title\nsome markdown")
    (tmp_path / "c.py").write_text("print('hi')\n")
    write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    (tmp_path / "e.csv").write_text("ignored")
    cfg = DataConfig(input=[str(tmp_path)], doc_chars=400)
    docs = list(data.iter_documents(cfg, {}, Counter()))
    kinds = Counter(k for _, k, _ in docs)
    assert kinds == {"text": 4 + 1 + 2, "code": 1}  # a.txt: 3 documents of 3 paragraphs, then 1
    assert [t for t, _, o in docs if o.endswith("d.jsonl:2")] == ["two"]


def test_text_with_endoftext_lines_is_cut_there():
    assert data.split_text("story one\n<|endoftext|>\nstory two\n", 10_000) == ["story one", "story two"]


def test_max_bytes_takes_a_slice(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["x" * 100] * 50)
    docs = list(data.iter_documents(DataConfig(input=[str(tmp_path)], max_bytes=1000), {}, Counter()))
    assert len(docs) == 10


def test_stdlib_source_is_the_standard_library_without_site_packages():
    files = data.stdlib_files()
    assert len(files) > 300 and not any("site-packages" in str(f) for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)


def test_stdlib_prepare_records_python_version_and_hash(tmp_path):
    cfg = DataConfig(out_dir=str(tmp_path / "out"), vocab_size=300, max_bytes=200_000)
    meta = data.prepare(cfg)
    assert meta["source"]["python_version"] == data.sys.version.split()[0]
    assert len(meta["source_hash"]) == 16 and meta["source"]["dataset"] == "stdlib"
    assert data.prepare(cfg)["source_hash"] == meta["source_hash"]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves FILES with Range support; FAIL_FIRST requests answer 503; every request is logged."""
    FILES, LOG, FAIL_FIRST = {}, [], [0]

    def do_GET(self):
        self.LOG.append((self.path, self.headers.get("Range")))
        if self.FAIL_FIRST[0] > 0:
            self.FAIL_FIRST[0] -= 1
            self.send_error(503)
            return
        body = self.FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.FILES.clear(), RangeHandler.LOG.clear()
    RangeHandler.FAIL_FIRST[0] = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", RangeHandler
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_sha256_and_caches(server, tmp_path):
    base, handler = server
    body = "\n".join(random_docs(20)).encode()
    handler.FILES["/f.txt"] = body
    dest = data.download(base + "/f.txt", tmp_path / "f.txt", hashlib.sha256(body).hexdigest())
    assert dest.read_bytes() == body
    data.download(base + "/f.txt", tmp_path / "f.txt")  # cached: no second request
    assert len(handler.LOG) == 1
    with pytest.raises(DataError, match="sha256"):
        data.download(base + "/f.txt", tmp_path / "g.txt", "0" * 64)
    assert not (tmp_path / "g.txt").exists() and not (tmp_path / "g.txt.part").exists()


def test_a_cached_download_is_checked_against_its_sha256_again(server, tmp_path):
    base, handler = server
    body = b"the real file\n" * 100
    handler.FILES["/f.txt"] = body
    sha = hashlib.sha256(body).hexdigest()
    data.download(base + "/f.txt", tmp_path / "f.txt", sha)
    (tmp_path / "f.txt").write_bytes(body[:-1] + b"!")  # the cached copy goes bad on disk
    with pytest.raises(DataError, match=r"f\.txt: cached file has sha256 [0-9a-f]{64}, not the expected " + sha):
        data.download(base + "/f.txt", tmp_path / "f.txt", sha)
    assert len(handler.LOG) == 1  # refused from the cache, without asking the server


def test_download_resumes_a_partial_file_with_range(server, tmp_path):
    base, handler = server
    body = bytes(range(256)) * 100
    handler.FILES["/big.bin"] = body
    (tmp_path / "big.bin.part").write_bytes(body[:10_000])
    data.download(base + "/big.bin", tmp_path / "big.bin", hashlib.sha256(body).hexdigest())
    assert (tmp_path / "big.bin").read_bytes() == body and handler.LOG == [("/big.bin", "bytes=10000-")]


def test_download_retries_after_server_errors(server, tmp_path):
    base, handler = server
    handler.FILES["/f.txt"], handler.FAIL_FIRST[0] = b"hello", 2
    assert data.download(base + "/f.txt", tmp_path / "f.txt", backoff=0).read_bytes() == b"hello"
    assert len(handler.LOG) == 3


def test_download_offline_names_url_and_alternatives(tmp_path):
    import socket
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/input.txt"
    with pytest.raises(DataError, match=f"{url}.*--dataset stdlib or --input"):
        data.download(url, tmp_path / "x.txt", retries=2, backoff=0)


def test_prepare_downloads_a_dataset_from_the_url_override(server, tmp_path):
    base, handler = server
    handler.FILES["/stories.txt"] = "\n<|endoftext|>\n".join(random_docs(40)).encode()
    cfg = DataConfig(dataset="tinystories", url=base + "/stories.txt", cache_dir=str(tmp_path / "cache"),
                     out_dir=str(tmp_path / "out"), vocab_size=300)
    meta = data.prepare(cfg)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 40
    assert (tmp_path / "cache" / "tinystories" / "stories.txt").exists()
    # shakespeare's sha256 is known: a different file is refused
    with pytest.raises(DataError, match="sha256"):
        data.prepare(DataConfig(dataset="shakespeare", url=base + "/stories.txt", cache_dir=str(tmp_path / "c2"),
                                out_dir=str(tmp_path / "out2")))


def test_parquet_without_pyarrow_fails_before_downloading(server, tmp_path, monkeypatch):
    base, handler = server
    monkeypatch.setitem(data.sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` raise ImportError
    with pytest.raises(DataError, match="pip install pyarrow"):
        data.prepare(DataConfig(dataset="fineweb-edu", url=base + "/x.parquet", cache_dir=str(tmp_path),
                                out_dir=str(tmp_path / "out")))
    assert handler.LOG == []


# --- shards and meta ---

def test_prepare_accepts_pathlib_paths(tmp_path):
    write_jsonl(tmp_path / "in" / "docs.jsonl", random_docs(20))
    meta = data.prepare(DataConfig(input=[tmp_path / "in"], out_dir=tmp_path / "out", vocab_size=300))
    assert meta["config"]["input"] == [str(tmp_path / "in")]
    assert data.load_meta(tmp_path / "out") == meta


def test_prepare_writes_tokenizer_shards_and_meta(prepared):
    cfg, meta = prepared
    out = Path(cfg.out_dir)
    tok = data.load_tokenizer(out)
    assert meta["vocab_size"] == tok.vocab_size == 350 and meta["tokenizer_hash"] == tok.hash
    assert meta["dtype"] == "uint16" and data.load_meta(out) == meta
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["splits"]["val"]["docs"] > 0
    texts = []
    for split in ("train", "val"):
        info = meta["splits"][split]
        tokens = np.concatenate([data.open_shard(out / n, tok.hash) for n in info["shards"]])
        assert len(tokens) == info["tokens"] and tokens[0] == tok.eot_id
        assert (tokens == tok.eot_id).sum() == info["docs"]
        docs = tok.decode(tokens.tolist()).split("<|endoftext|>")[1:]
        assert sum(len(d.encode()) for d in docs) == info["bytes"]
        texts += docs
    assert sorted(texts) == sorted(random_docs(300))
    assert not list(out.parent.glob("*.partial")) and not list(out.glob("*.tmp"))


def test_shards_do_not_depend_on_the_number_of_workers(tmp_path):
    write_jsonl(tmp_path / "src" / "d.jsonl", random_docs(60))
    shards = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        data.prepare(DataConfig(input=[str(tmp_path / "src")], out_dir=str(out), vocab_size=300, workers=workers))
        shards.append([p.read_bytes() for p in sorted(out.glob("*.bin"))])
    assert shards[0] == shards[1]


def test_split_is_by_document_hash_and_deterministic():
    docs = random_docs(2000, words=20)
    val = [d for d in docs if data.is_val(d, 0, 0.1)]
    assert 150 < len(val) < 250 and val == [d for d in docs if data.is_val(d, 0, 0.1)]
    assert val != [d for d in docs if data.is_val(d, 1, 0.1)]


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert data.token_dtype(65536) == np.uint16 and data.token_dtype(100_277) == np.uint32
    tokens = np.array([0, 70_000, 100_276], dtype=np.uint32)
    data.write_shard(tmp_path / "s.bin", tokens, "h" * 16)
    assert data.open_shard(tmp_path / "s.bin").tolist() == tokens.tolist()


def test_corrupt_or_truncated_shard_is_an_error_naming_the_file(tmp_path):
    data.write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16), "h" * 16)
    raw = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="t.bin: truncated"):
        data.open_shard(tmp_path / "t.bin")
    (tmp_path / "m.bin").write_bytes(b"XXXXXXXX" + raw[8:])
    with pytest.raises(DataError, match="m.bin: not a forge token shard"):
        data.open_shard(tmp_path / "m.bin")
    with pytest.raises(DataError, match="s.bin: shard was made with tokenizer hhhh.*but.*is other"):
        data.open_shard(tmp_path / "s.bin", "other")


def test_tokenizer_not_matching_the_shards_names_both_hashes(prepared, ranks, tmp_path):
    cfg, meta = prepared
    data.save_tokenizer(ranks, tmp_path)
    other = data.load_tokenizer(tmp_path)
    with pytest.raises(DataError, match=f"tokenizer {other.hash} .* {meta['tokenizer_hash']}"):
        data.check_tokenizer(other, cfg.out_dir)
    data.check_tokenizer(data.load_tokenizer(cfg.out_dir), cfg.out_dir)


# --- loader ---

def test_loader_yields_shifted_int64_batches(prepared):
    cfg, meta = prepared
    x, y = TokenLoader(cfg.out_dir, "train", 4, 16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == data.torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()


def test_loader_without_shuffle_reads_in_order_from_the_start(prepared):
    cfg, meta = prepared
    out = Path(cfg.out_dir)
    first = np.asarray(data.open_shard(out / meta["splits"]["val"]["shards"][0]))
    loader = TokenLoader(out, "val", 2, 8, shuffle=False)
    x, y = loader.next_batch()
    assert x.flatten().tolist() == first[:16].tolist() and y[1].tolist() == first[9:17].tolist()


def batches(loader, n):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(n)]


def test_ranks_see_disjoint_windows_and_share_the_state(prepared):
    cfg, _ = prepared
    loaders = [TokenLoader(cfg.out_dir, "train", 3, 16, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = [{tuple(row.tolist()) for x, _ in batches(ld, 5) for row in x} for ld in loaders]
    assert len(seen[0]) == len(seen[1]) == 15 and not seen[0] & seen[1]
    assert loaders[0].state_dict() == loaders[1].state_dict()


def test_loader_is_deterministic_for_a_seed(prepared):
    cfg, _ = prepared
    a, b, c = (batches(TokenLoader(cfg.out_dir, "train", 2, 16, seed=s), 3) for s in (1, 1, 2))
    assert all((x1 == x2).all() for (x1, _), (x2, _) in zip(a, b))
    assert not all((x1 == x3).all() for (x1, _), (x3, _) in zip(a, c))


def test_restored_loader_continues_exactly_across_epochs(prepared):
    cfg, _ = prepared
    loader = TokenLoader(cfg.out_dir, "train", 8, 32, seed=3)
    steps_per_epoch = loader.n_windows // 8
    reference = batches(TokenLoader(cfg.out_dir, "train", 8, 32, seed=3), 2 * steps_per_epoch + 3)
    batches(loader, steps_per_epoch - 1)
    state = json.loads(json.dumps(loader.state_dict()))  # plain Python values, as a checkpoint stores them
    resumed = TokenLoader(cfg.out_dir, "train", 8, 32, seed=3)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(reference[steps_per_epoch - 1:], batches(resumed, steps_per_epoch + 4)):
        assert (x1 == x2).all() and (y1 == y2).all()
    assert resumed.epoch == 2


def test_loader_errors_name_the_problem(prepared, tmp_path):
    cfg, meta = prepared
    with pytest.raises(DataError, match="meta.json: no such file"):
        TokenLoader(tmp_path, "train", 2, 8)
    with pytest.raises(DataError, match="fewer than batch"):
        TokenLoader(cfg.out_dir, "val", 10_000, 64)
    other = TokenLoader(cfg.out_dir, "train", 2, 8, seed=1)
    with pytest.raises(DataError, match="seed 0"):
        other.load_state_dict(TokenLoader(cfg.out_dir, "train", 2, 8, seed=0).state_dict())


# --- bad input and the command line ---

def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "no .* files in this folder"),
    (lambda p: None, "no such file or folder"),
    (lambda p: (p.mkdir(), (p / "e.txt").write_text("")), "no documents left"),
    (lambda p: (p.mkdir(), (p / "b.txt").write_bytes(b"\x89PNG\x00\x00")), r"no documents left.*1 binary"),
    (lambda p: (p.mkdir(), (p / "l.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))), r"1 not_utf8"),
    (lambda p: (p.mkdir(), (p / "j.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')), r"j.jsonl:2: not a JSON"),
    (lambda p: (p.mkdir(), (p / "n.jsonl").write_text('{"text": "ok"}\n{"text": null}\n')), r"n.jsonl:2: not a JSON"),
    (lambda p: (p.mkdir(), (p / "k.jsonl").write_text('{"text": 7}\n')), r"k.jsonl:1: not a JSON"),
    (lambda p: write_jsonl(p / "d.jsonl", ["x"]) and ["--vocab-size", "100"], r"--vocab-size 100 is below 256"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(make, message, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    extra = make(src)
    extra = extra if isinstance(extra, list) else []
    code, err = run_main(["--input", str(src), "--out-dir", str(out), "--rules", ""] + extra, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert data.re.search(message, err), err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unsupported_file_or_unknown_rule_is_an_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="x.csv: not a"):
        data.local_files([tmp_path / "x.csv"])
    with pytest.raises(DataError, match="unknown quality rule.*'nope'"):
        list(data.clean_documents([("x", "text", "o")], DataConfig(rules="min_words,nope"), data.CleanReport()))


def test_a_saved_tokenizer_can_be_reused_for_new_shards(prepared, tmp_path):
    cfg, meta = prepared
    write_jsonl(tmp_path / "src" / "d.jsonl", random_docs(30, seed=9))
    again = data.prepare(DataConfig(input=[str(tmp_path / "src")], out_dir=str(tmp_path / "out"),
                                    tokenizer=cfg.out_dir))
    assert again["tokenizer_hash"] == meta["tokenizer_hash"] and again["vocab_size"] == meta["vocab_size"]


def test_binary_files_are_skipped_and_counted_when_others_remain(tmp_path):
    write_jsonl(tmp_path / "src" / "d.jsonl", random_docs(30))
    (tmp_path / "src" / "x.txt").write_bytes(b"\x00\x01binary")
    meta = data.prepare(DataConfig(input=[str(tmp_path / "src")], out_dir=str(tmp_path / "out"), vocab_size=300))
    assert meta["report"]["skipped_files"] == {"binary": 1}


def test_failed_rerun_keeps_the_previous_complete_folder(prepared, tmp_path):
    cfg, meta = prepared
    with pytest.raises(DataError):
        data.prepare(DataConfig(input=[str(tmp_path / "missing")], out_dir=cfg.out_dir))
    assert data.load_meta(cfg.out_dir) == meta


def test_cli_flags_come_from_the_config_fields(tmp_path, capsys):
    args = data.config_parser().parse_args(["--max-bytes", "5", "--no-pii", "--input", "a", "b", "--vocab-size", "300"])
    cfg = DataConfig(**vars(args))
    assert (cfg.max_bytes, cfg.pii, cfg.input, cfg.vocab_size, cfg.dedup) == (5, False, ["a", "b"], 300, True)
    assert run_main(["--no-such-flag"], capsys)[0] == 2
    assert data.resolve(DataConfig(dataset="shakespeare")).out_dir == "data/shakespeare"
    assert data.resolve(DataConfig(workers=1000)).workers <= data.os.cpu_count()


def test_cli_prepares_a_folder(tmp_path, capsys):
    write_jsonl(tmp_path / "src" / "d.jsonl", random_docs(40))
    data.main(["--input", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out"), "--vocab-size", "300"])
    assert "tokenizer: 300 tokens" in capsys.readouterr().out
    assert data.load_meta(tmp_path / "out")["vocab_size"] == 300


def test_canaries_are_planted_at_their_repeat_counts_and_recorded(tmp_path):
    write_jsonl(tmp_path / "in" / "docs.jsonl", random_docs(60))
    meta = data.prepare(DataConfig(input=[str(tmp_path / "in")], out_dir=str(tmp_path / "out"), vocab_size=300,
                                   val_fraction=0.1, canaries=2, workers=1))
    canaries = meta["canaries"]
    assert [c["repeats"] for c in canaries] == [r for r in data.CANARY_REPEATS for _ in range(2)]
    assert len({c["secret"] for c in canaries}) == len(canaries)
    assert all(len(c["secret"].split()) == data.CANARY_DIGITS for c in canaries)
    tok = data.load_tokenizer(tmp_path / "out")
    texts = {split: tok.decode(np.concatenate([np.asarray(data.open_shard(tmp_path / "out" / name))
                                               for name in meta["splits"][split]["shards"]]).tolist())
             for split in ("train", "val")}
    for c in canaries:  # each exactly `repeats` times in train, never in val (a control canary never at all)
        planted = f"{c['prefix']} {c['secret']}\n"
        assert texts["train"].count(planted) == c["repeats"] and planted not in texts["val"]
    assert meta["splits"]["train"]["docs"] == 60 - meta["splits"]["val"]["docs"] + 2 * sum(data.CANARY_REPEATS)
    with pytest.raises(DataError, match="--canaries -1"):
        data.prepare(DataConfig(input=[str(tmp_path / "in")], out_dir=str(tmp_path / "bad"), canaries=-1))


# --- every core and several nodes: the same output as one worker ---

def test_chunk_counts_on_two_processes_are_one_pass_counts_in_the_same_order(tmp_path):
    docs = random_docs(40, seed=11, words=60) + HARD_STRINGS
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(["val" if i % 5 == 0 else "train", d]) + "\n" for i, d in enumerate(docs)))
    one = data.count_chunks(d for i, d in enumerate(docs) if i % 5)  # the train documents, in one pass
    for workers in (1, 2):  # batches of ~2000 characters: each process counts several, summed in order
        counts = data.count_file_chunks(path, workers, batch_chars=2000)
        assert list(counts.items()) == list(one.items())
    assert data.train_bpe(counts, 200) == data.train_bpe(one, 200)


def test_tokenizer_does_not_depend_on_the_number_of_workers(tmp_path):
    write_jsonl(tmp_path / "src" / "d.jsonl", random_docs(60, seed=4))
    files = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        data.prepare(DataConfig(input=[str(tmp_path / "src")], out_dir=str(out), vocab_size=320, workers=workers))
        files.append([(out / n).read_bytes() for n in ("tokenizer.tiktoken", "tokenizer.json")])
    assert files[0] == files[1]


def test_node_shares_are_contiguous_runs_of_the_files_by_bytes(tmp_path):
    files = []
    for i, size in enumerate([100, 300, 50, 50, 400, 100]):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text("x" * size)
    assert data.node_files(files, 0, 1) == files
    for k in range(2, 8):  # more nodes than files too: a node may get none
        shares = [data.node_files(files, r, k) for r in range(k)]
        assert [f for share in shares for f in share] == files
    assert [len(data.node_files(files, r, 2)) for r in range(2)] == [4, 2]  # f4 starts at byte 500 of 1000


def test_nodes_come_from_torchrun_or_slurm_only_on_the_command_line():
    cfg = DataConfig()
    assert data.node_from_env(cfg, {"RANK": "3", "WORLD_SIZE": "4"}) == DataConfig(node_rank=3, num_nodes=4)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert data.node_from_env(cfg, slurm) == DataConfig(node_rank=2, num_nodes=3)
    assert data.node_from_env(DataConfig(num_nodes=1), {"RANK": "1", "WORLD_SIZE": "2"}).num_nodes == 1
    assert data.node_from_env(cfg, {}) == cfg
    assert (data.resolve(cfg).node_rank, data.resolve(cfg).num_nodes) == (0, 1)  # prepare alone: one node


def two_node_corpus(folder):
    """Four files, the first two node 0's share and the last two node 1's. Node 1 holds an exact copy of one of
    node 0's documents and a near copy (one word of 120 changed) of another: only a global dedup removes them,
    and only one in the global order removes the copies rather than the originals."""
    docs = random_docs(48, seed=21, words=120)
    parts = [docs[:13], docs[13:26], docs[26:37] + [docs[3]], docs[37:] + [docs[7].replace("the", "THE", 1)]]
    files = [write_jsonl(folder / f"p{k}.jsonl", part) for k, part in enumerate(parts)]
    assert data.node_files(files, 0, 2) == files[:2] and data.node_files(files, 1, 2) == files[2:]
    return docs


def run_nodes(argv, num_nodes, folder):
    """Start every node as its own `python data.py` process at once, as K machines would; rank 1 learns its
    rank from torchrun's variables, the others from the flags."""
    procs = []
    for r in range(num_nodes):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        flags = ["--num-nodes", str(num_nodes), "--node-rank", str(r)]
        if r == 1:
            env.update(RANK="1", WORLD_SIZE=str(num_nodes))
            flags = []
        procs.append(subprocess.Popen([sys.executable, "data.py", *argv, *flags], cwd=folder, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=120), p.stdout.read()) for p in procs]


def split_streams(out):
    meta = data.load_meta(out)
    return {s: np.concatenate([data.open_shard(Path(out) / n, meta["tokenizer_hash"]) for n in info["shards"]])
            for s, info in meta["splits"].items()}


def test_two_nodes_keep_and_tokenize_exactly_what_one_worker_does(tmp_path):
    """Identical here means: the same tokenizer files, the same token stream per split (every node's shards
    concatenated in the order meta.json lists them), the same counts and report. The shard files themselves
    are cut differently (each node ends its last shard short), and that is all that differs: TokenLoader reads
    the streams of meta.json's shards, so a run sees the same tokens except for windows at the node seams."""
    docs = two_node_corpus(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), "--vocab-size", "320", "--shard-tokens", "2000", "--workers", "1",
            "--canaries", "1", "--val-fraction", "0.1"]
    one = data.prepare(DataConfig(**vars(data.config_parser().parse_args(argv + ["--out-dir", str(tmp_path / "one")]))))
    results = run_nodes(argv + ["--out-dir", str(tmp_path / "two")], 2, Path(data.__file__).parent)
    assert [code for code, _ in results] == [0, 0], results
    two = data.load_meta(tmp_path / "two")
    assert {n.split("/")[0] for n in two["splits"]["train"]["shards"]} == {"node0", "node1"}  # written where they are
    for name in ("tokenizer.tiktoken", "tokenizer.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    streams = split_streams(tmp_path / "two")
    assert all(np.array_equal(a, streams[s]) for s, a in split_streams(tmp_path / "one").items())
    for key in ("tokenizer_hash", "report", "canaries"):
        assert one[key] == two[key], key
    for s in ("train", "val"):
        assert {**one["splits"][s], "shards": None} == {**two["splits"][s], "shards": None}, s
    # the copies in node 1's share went, the originals in node 0's stayed
    tok = data.load_tokenizer(tmp_path / "two")
    texts = tok.decode(np.concatenate(list(streams.values())).tolist()).split("<|endoftext|>")
    assert docs[3] in texts and docs[7] in texts and docs[7].replace("the", "THE", 1) not in texts
    steps = two["report"]["steps"]
    assert texts.count(docs[3]) == 1 and (steps["exact_dedup"]["docs_out"], steps["near_dedup"]["docs_out"]) == (49, 48)
    # nothing of the phases is left: no .partial folder, no markers, signatures or documents beside the shards
    out = tmp_path / "two"
    left = sorted(p.name for p in out.rglob("*") if p.is_file() and p.suffix != ".bin")
    assert not list(tmp_path.glob("*.partial")) and left == ["meta.json", "report.json", "tokenizer.json",
                                                             "tokenizer.tiktoken"]
    x, y = TokenLoader(tmp_path / "two", "train", 2, 16).next_batch()
    assert x.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_a_node_alone_waits_then_fails_on_one_line_and_a_rerun_is_refused(tmp_path, capsys):
    two_node_corpus(tmp_path / "in")
    argv = ["--input", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"), "--vocab-size", "300",
            "--workers", "1", "--num-nodes", "2"]
    code, err = run_main(argv + ["--node-rank", "1", "--node-timeout", "0.5"], capsys)
    assert code == 2 and err.count("\n") == 1 and "kept.json did not appear within --node-timeout 0.5 s" in err
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "failed_node1.txt").exists()
    code, err = run_main(argv + ["--node-rank", "0"], capsys)
    assert code == 2 and "failed_node1.txt is left from an earlier run; delete" in err


@pytest.mark.parametrize("flags, message", [
    (["--num-nodes", "2", "--node-rank", "2"], "--node-rank 2 --num-nodes 2: give 1 or more nodes"),
    (["--num-nodes", "2", "--node-rank", "0", "--max-bytes", "100"], "--max-bytes 100 cuts the whole input"),
    (["--num-nodes", "2", "--node-rank", "0", "--node-timeout", "0"], "--node-timeout 0.0: give a number"),
])
def test_bad_node_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    write_jsonl(tmp_path / "in" / "d.jsonl", random_docs(5))
    code, err = run_main(["--input", str(tmp_path / "in"), "--out-dir", str(tmp_path / "out")] + flags, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# --- streaming: files larger than memory ---

def test_text_cut_in_pieces_gives_the_documents_of_the_whole_text():
    rng = random.Random(0)
    alphabet = ["a", "b c", " ", "\n", "\n", "\t", "\r\n", "\u2028", "\u00a0", "<|endoftext|>"]
    for _ in range(2000):  # any cut of any text, even inside a run of blank lines or a <|endoftext|> token
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 50)))
        text = text if rng.random() < 0.5 else text.replace("<|endoftext|>", "")
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        doc_chars = rng.randint(1, 20)
        whole = [d.strip("\n") for d in text.split("<|endoftext|>") if d.strip()] if "<|endoftext|>" in text else None
        got = list(data.split_pieces(pieces, doc_chars, "<|endoftext|>" in text))
        assert got == data.split_text(text, doc_chars) and (whole is None or got == whole), (pieces, doc_chars)


def test_large_files_are_read_in_pieces_within_a_memory_budget(tmp_path, monkeypatch):
    import tracemalloc
    monkeypatch.setattr(data, "READ_BLOCK", 1 << 16)
    docs = random_docs(1500, seed=2, words=400)  # ~3.5 MB of text per file; the budget is 1 MB
    (tmp_path / "t.txt").write_text("\n\n".join(docs))
    write_jsonl(tmp_path / "j.jsonl", docs)
    for name, n_docs in [("t.txt", None), ("j.jsonl", len(docs))]:
        size = (tmp_path / name).stat().st_size
        source = {}
        tracemalloc.start()
        n = sum(1 for _ in data.iter_documents(DataConfig(input=[str(tmp_path / name)]), source, Counter()))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1e6 < size / 3, f"{name}: peak {peak / 1e6:.2f} MB reading {size / 1e6:.1f} MB"
        assert n == (n_docs or len(data.split_text((tmp_path / name).read_text(), 8000)))
        assert source["hash"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:16]
