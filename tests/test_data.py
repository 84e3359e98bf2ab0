"Data pipeline: corpus loading, leak-free splits, tokenizers, packing, loaders and the unigram baseline."
import math

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from vishwamai.data import (EOT, IGNORE_INDEX, BPETokenizer, ByteTokenizer, PackedBlocks, batch_indices, encode_documents,
                            eval_block_indices, get_batch, line_overlap, load_corpus, load_tokenizer, prepare_data,
                            split_documents, stdlib_files, token_dtype, tokenize_documents, unigram_baseline)

SAMPLES = ["", "x", "déjà vu ✓ 🚀", "a\r\nb\tc   d\n\n", "    def f(self):\n        return {'k': [1, 2]}\n",
           f"literal {EOT} inside text"]


@pytest.fixture(scope="module")
def stdlib_docs():
    return load_corpus("stdlib", max_files=60)


@pytest.fixture(scope="module")
def small_bpe(stdlib_docs):
    return BPETokenizer.train(stdlib_docs["text"], vocab_size=600, max_train_bytes=300_000)


def write_docs(folder, n):
    "n small documents, each with a marker string found in no other document."
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(f"document number {i} says unique-marker-{i:03d}-end.\n" * 3)


# --- packing ----------------------------------------------------------------------------------------------------

def test_blocks_are_shifted_next_token_pairs():
    ids = torch.randint(0, 50, (1000,), dtype=torch.int32)
    T = 16
    blocks = PackedBlocks(ids, T)
    assert len(blocks) == (len(ids) - 1) // T
    xs, ys = zip(*(blocks[i] for i in range(len(blocks))))
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.shape == y.shape == (T,) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, ids[i * T:i * T + T].long())
        assert torch.equal(y, ids[i * T + 1:i * T + T + 1].long())  # labels = inputs shifted by one
    # every token after the first is a label exactly once, in order
    assert torch.equal(torch.cat(ys), ids[1:1 + len(blocks) * T].long())


def test_pad_last_masks_only_padding():
    ids = torch.arange(40, dtype=torch.int32)  # 39 labels: 2 full blocks of 16, 7 left
    blocks = PackedBlocks(ids, 16, pad_last=True, pad_id=99)
    assert len(blocks) == 3 and len(PackedBlocks(ids, 16)) == 2
    x, y = blocks[2]
    assert x.shape == y.shape == (16,)
    assert torch.equal(x[:7], ids[32:39].long()) and (x[7:] == 99).all()
    assert torch.equal(y[:7], ids[33:40].long()) and (y[7:] == IGNORE_INDEX).all()
    with pytest.raises(IndexError):
        blocks[3]


def test_packing_bad_input():
    with pytest.raises(ValueError, match="cannot fill one block"):
        PackedBlocks(torch.arange(10), 16)
    with pytest.raises(ValueError, match="seq_len"):
        PackedBlocks(torch.arange(10), 0)
    with pytest.raises(ValueError, match="1-D"):
        PackedBlocks(torch.zeros(4, 4, dtype=torch.long), 2)


def test_stream_ends_every_document_with_eot():
    tok = ByteTokenizer()
    ids = encode_documents(tok, ["ab", "c"])
    assert ids.tolist() == [97, 98, tok.eot_id, 99, tok.eot_id]


# --- splits -----------------------------------------------------------------------------------------------------

def test_split_is_by_document_and_seeded(stdlib_docs):
    train, val = split_documents(stdlib_docs, val_fraction=0.2, seed=3)
    assert len(train) + len(val) == len(stdlib_docs) and len(val) == round(0.2 * len(stdlib_docs))
    assert not set(val["text"]) & set(train["text"])
    assert list(split_documents(stdlib_docs, 0.2, seed=3)[1]["text"]) == list(val["text"])
    assert list(split_documents(stdlib_docs, 0.2, seed=4)[1]["text"]) != list(val["text"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(stdlib_docs, 0.0)
    with pytest.raises(ValueError, match="at least 1 document"):
        split_documents(stdlib_docs.select([]), 0.5)


def test_no_validation_document_reaches_training_blocks(tmp_path):
    write_docs(tmp_path, 20)
    data = prepare_data(str(tmp_path), seq_len=32, tokenizer="byte", val_fraction=0.25, seed=0,
                        cache_dir=str(tmp_path / "cache"))
    train_text = data.tokenizer.decode(data.train_ids)
    val_text = data.tokenizer.decode(data.val_ids)
    val_markers = {f"unique-marker-{i:03d}-end" for i in range(20) if f"unique-marker-{i:03d}-end" in val_text}
    assert len(val_markers) == 5
    assert not any(m in train_text for m in val_markers)
    assert sum(m in train_text for m in (f"unique-marker-{i:03d}-end" for i in range(20))) == 15


def test_repeated_and_blank_documents_are_dropped(tmp_path):
    (tmp_path / "a.txt").write_text("same text\n")
    (tmp_path / "b.txt").write_text("same text\n")
    (tmp_path / "c.txt").write_text("other text\n")
    (tmp_path / "d.txt").write_text("   \n")
    ds = load_corpus(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert sorted(ds["text"]) == ["other text\n", "same text\n"]


def test_stdlib_files_exclude_tests_and_are_sorted():
    files = stdlib_files()
    assert len(files) > 100 and files == stdlib_files()
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts)
    assert len(stdlib_files(max_files=7)) == 7


# --- tokenizers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", SAMPLES)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert all(0 <= i < 256 for i in tok.encode(text))


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text


def test_bpe_round_trips_real_documents_and_compresses(small_bpe, stdlib_docs):
    docs = list(stdlib_docs["text"][:10])
    encoded = small_bpe.encode_batch(docs)
    assert [small_bpe.decode(ids) for ids in encoded] == docs
    assert sum(map(len, encoded)) < 0.6 * sum(len(d.encode()) for d in docs)  # fewer tokens than bytes
    assert small_bpe.vocab_size == 600 and max(max(ids) for ids in encoded) < 600


def test_eot_is_one_id_and_decodes_to_its_marker(small_bpe):
    for tok in (ByteTokenizer(), small_bpe):
        assert tok.decode([*tok.encode("a"), tok.eot_id, *tok.encode("b")]) == f"a{EOT}b"


def test_tokenizer_save_and_load(tmp_path, small_bpe):
    small_bpe.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path)  # a checkpoint folder
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(SAMPLES[4]) == small_bpe.encode(SAMPLES[4]) and loaded.eot_id == small_bpe.eot_id
    ByteTokenizer().save(tmp_path / "bytes.json")
    assert isinstance(load_tokenizer(tmp_path / "bytes.json"), ByteTokenizer)


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid tokenizer JSON"):
        load_tokenizer(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"vocab": 3}')
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "other.json")
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="outside"):
        ByteTokenizer().decode([300])


# --- corpus errors ----------------------------------------------------------------------------------------------

def test_empty_or_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(tmp_path / "blank.txt"), cache_dir=str(tmp_path / "cache"))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="holds no text files"):
        load_corpus(str(empty_dir))


def test_hub_dataset_text_column(monkeypatch):
    "The Hub branch without a network: `datasets.load_dataset` returns an in-memory dataset."
    import datasets
    fake = datasets.Dataset.from_dict({"story": ["once upon a time", "the end"], "id": [1, 2]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(ValueError, match=r"no text column 'text'.*story"):
        load_corpus("someone/stories")
    ds = load_corpus("someone/stories", text_column="story")
    assert ds.column_names == ["text"] and list(ds["text"]) == ["once upon a time", "the end"]


def test_unreachable_hub_dataset_names_the_source(monkeypatch):
    import datasets

    def offline(*a, **k): raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="someone/stories"):
        load_corpus("someone/stories")


# --- batches ----------------------------------------------------------------------------------------------------

def test_two_replicas_draw_one_process_batch_and_cover_every_block_once():
    n, B = 40, 4
    seen = []
    for step in range(n // (2 * B)):
        shares = [batch_indices(step, n, B, seed=1, num_replicas=2, rank=r) for r in range(2)]
        assert torch.equal(torch.cat(shares), batch_indices(step, n, 2 * B, seed=1))
        seen += torch.cat(shares).tolist()
    assert sorted(seen) == list(range(n))


def test_uneven_blocks_drop_without_duplicates():
    n, B = 41, 4  # 41 blocks over 2 replicas of 4: 5 steps, one block left over
    seen = torch.cat([batch_indices(s, n, B, num_replicas=2, rank=r) for s in range(5) for r in range(2)]).tolist()
    assert len(seen) == len(set(seen)) == 40
    assert not torch.equal(batch_indices(5, n, B), batch_indices(0, n, B))  # step 5 is in a new epoch


def test_training_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        return torch.cat([batch_indices(s, 30, 5, seed) for s in range(6 * epoch, 6 * epoch + 6)]).tolist()

    assert order(0, 2) == order(0, 2)
    assert order(0, 2) != order(0, 3) and order(0, 2) != order(1, 2)
    assert sorted(order(0, 2)) == list(range(30))


def test_get_batch_stacks_inputs_and_shifted_labels():
    blocks = PackedBlocks(torch.arange(8 * 10 + 1), 8)
    x, y = get_batch(blocks, torch.tensor([3, 0]))
    assert x.shape == y.shape == (2, 8) and x[0, 0] == 24 and x[1, 0] == 0
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_batch_indices_bad_input():
    with pytest.raises(ValueError, match="cannot fill"):
        batch_indices(0, 10, 11)
    with pytest.raises(ValueError, match="rank"):
        batch_indices(0, 10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(0, 10, 0)


# --- unigram baseline -------------------------------------------------------------------------------------------

def test_unigram_baseline_on_real_tokens(stdlib_docs, small_bpe):
    train, val = split_documents(stdlib_docs, 0.2, seed=0)
    train_ids, val_ids = encode_documents(small_bpe, train["text"]), encode_documents(small_bpe, val["text"])
    h = unigram_baseline(train_ids, val_ids, small_bpe.vocab_size)
    assert math.isfinite(h) and 0 < h < math.log(small_bpe.vocab_size)


def test_unigram_baseline_math():
    assert unigram_baseline(torch.tensor([0, 1, 2, 3]), torch.tensor([2]), 4) == pytest.approx(math.log(4))
    assert unigram_baseline(torch.tensor([0, 0, 0]), torch.tensor([0, 1]), 2) == pytest.approx(
        -(math.log(4 / 5) + math.log(1 / 5)) / 2)
    with pytest.raises(ValueError, match="outside"):
        unigram_baseline(torch.tensor([4]), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="empty"):
        unigram_baseline(torch.tensor([], dtype=torch.long), torch.tensor([0]), 4)


# --- families, one-file corpora, unreadable files --------------------------------------------------------------

def write_family_corpus(folder):
    "A `codecs/` family of near-copies (one shared template) beside top-level files whose lines occur nowhere else."
    template = [f"    0x{i:02x}: 'shared table row {i}'," for i in range(40)]
    (folder / "codecs").mkdir(parents=True)
    for k in range(12):
        (folder / "codecs" / f"cp{k}.py").write_text("\n".join(template + [f"# codec {k}"]) + "\n")
    for k in range(24):
        (folder / f"module{k}.py").write_text("".join(f"line {j} of module {k}\n" for j in range(10)))


def test_families_stay_on_one_side_and_overlap_drops(tmp_path):
    write_family_corpus(tmp_path)
    docs = load_corpus(str(tmp_path))
    assert "codecs/cp0.py" in docs["path"] and "module0.py" in docs["path"]
    by_doc_overlap = []
    for seed in range(6):
        train, val = split_documents(docs, 0.2, seed)
        assert len(train) + len(val) == len(docs) and 0 < len(val) <= round(0.2 * len(docs))
        fam = lambda d: {p.split("/")[0] for p in d["path"]}
        assert not fam(train) & fam(val)  # no family on both sides
        assert line_overlap(train["text"], val["text"]) == 0  # families share lines only among themselves
        old_train, old_val = split_documents(docs.rename_column("path", "file"), 0.2, seed)  # one family per document
        by_doc_overlap.append(line_overlap(old_train["text"], old_val["text"]))
    assert max(by_doc_overlap) > 0.5  # split file by file, codec siblings leak their template


def test_split_without_paths_is_a_document_shuffle(stdlib_docs):
    "Documents without paths (a Hub dataset) are each their own family: exactly round(n * val_fraction) validate."
    docs = stdlib_docs.remove_columns("path")
    train, val = split_documents(docs, 0.2, seed=3)
    assert len(val) == round(0.2 * len(docs)) and len(train) == len(docs) - len(val)


def test_stdlib_families_do_not_straddle(stdlib_docs):
    train, val = split_documents(stdlib_docs, 0.2, seed=0)
    assert not {p.split("/")[0] for p in train["path"]} & {p.split("/")[0] for p in val["path"]}


def test_one_file_splits_by_position_at_a_line(tmp_path):
    text = "".join(f"line {i}: {'x' * (i % 13)}\n" for i in range(301))
    assert text[round(0.9 * len(text)) - 1] != "\n"  # the 90% point falls inside a line
    (tmp_path / "notes.txt").write_text(text)
    data = prepare_data(str(tmp_path / "notes.txt"), seq_len=16, tokenizer="byte", val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    eot = EOT
    train_text, val_text = data.tokenizer.decode(data.train_ids), data.tokenizer.decode(data.val_ids)
    assert train_text.endswith(eot) and val_text.endswith(eot)
    head, tail = train_text[:-len(eot)], val_text[:-len(eot)]
    assert head + tail == text and head.endswith("\n") and tail.startswith("line ")  # the end, cut between lines
    assert 0.1 * len(text) - 25 <= len(tail) <= 0.1 * len(text)  # the last 10%, less at most one line
    assert data.info["documents"] == (1, 1)
    (tmp_path / "short.txt").write_text("a single line\n")  # nothing after the last line break
    with pytest.raises(ValueError, match="too short to split"):
        prepare_data(str(tmp_path / "short.txt"), seq_len=4, tokenizer="byte")


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.* is not UTF-8 text \(byte 0xe9.*convert it"):
        load_corpus(str(tmp_path))
    with pytest.raises(ValueError, match=r"latin\.txt"):
        list(load_corpus(str(tmp_path), streaming=True))


# --- evaluation sample ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_blocks,n", [(1, 1), (7, 3), (100, 16), (1131, 256), (257, 256), (256, 256), (10, 50)])
def test_eval_block_indices_cover_the_whole_range(n_blocks, n):
    idx = eval_block_indices(n_blocks, n).tolist()
    assert len(idx) == min(n, n_blocks) and idx == sorted(set(idx))  # in order, none twice
    assert idx[0] == 0 and idx[-1] == n_blocks - 1  # from the first block to the last
    if len(idx) > 1:
        assert max(b - a for a, b in zip(idx, idx[1:])) <= math.ceil((n_blocks - 1) / (len(idx) - 1))  # evenly
    assert eval_block_indices(n_blocks, n).tolist() == idx


def test_eval_block_indices_bad_input():
    for args in ((0, 4), (4, 0), (4.0, 2)):
        with pytest.raises(ValueError, match="positive integer"):
            eval_block_indices(*args)


# --- encoding at scale ------------------------------------------------------------------------------------------

def naive_stream(tok, texts):
    return torch.cat([torch.tensor(ids + [tok.eot_id], dtype=torch.int32) for ids in tok.encode_batch(list(texts))])


def test_encoding_is_compact_and_exact(stdlib_docs, small_bpe):
    docs = stdlib_docs.select(range(12))
    expected = naive_stream(small_bpe, docs["text"])
    for stream in (encode_documents(small_bpe, docs), encode_documents(small_bpe, list(docs["text"]), batch_size=5)):
        assert stream.dtype == torch.int32 and torch.equal(stream, expected)
    column = tokenize_documents(small_bpe, docs)
    assert str(column.features["ids"].feature.dtype) == "uint16"
    assert column["n_bytes"] == [len(t.encode("utf-8")) for t in docs["text"]]
    assert token_dtype(2 ** 16) == "uint16" and token_dtype(2 ** 16 + 1) == "uint32"
    with pytest.raises(ValueError, match="no documents"):
        encode_documents(small_bpe, [])


def test_wide_vocabularies_use_four_bytes():
    class WideTokenizer(ByteTokenizer):
        vocab_size, eot_id = 70_000, 69_999
    from datasets import Dataset
    column = tokenize_documents(WideTokenizer(), Dataset.from_dict({"text": ["ab"]}))
    assert str(column.features["ids"].feature.dtype) == "uint32" and column["ids"] == [[97, 98, 69_999]]


def test_num_proc_gives_the_same_stream(stdlib_docs, small_bpe):
    docs = stdlib_docs.select(range(8))
    assert torch.equal(encode_documents(small_bpe, docs, batch_size=2, num_proc=2), naive_stream(small_bpe, docs["text"]))


def test_token_cache_is_reused_and_keyed_by_tokenizer_and_text(tmp_path, monkeypatch, small_bpe):
    texts, cache = ["first document\n", "second document\n"], tmp_path / "tokens"
    stream = encode_documents(small_bpe, texts, cache_dir=cache)
    assert len(list(cache.glob("tokens-*.arrow"))) == 1

    def no_encoding(*a, **k): raise AssertionError("encoded again instead of reading the cache")
    monkeypatch.setattr(small_bpe, "encode_batch", no_encoding)
    assert torch.equal(encode_documents(small_bpe, texts, cache_dir=cache), stream)  # read back, not encoded
    monkeypatch.undo()
    encode_documents(small_bpe, ["first document\n", "second document!\n"], cache_dir=cache)  # one text changed
    encode_documents(ByteTokenizer(), texts, cache_dir=cache)  # another tokenizer
    assert len(list(cache.glob("tokens-*.arrow"))) == 3


def test_prepare_data_caches_its_streams(tmp_path):
    write_docs(tmp_path, 10)
    cache = tmp_path / "cache"
    first = prepare_data(str(tmp_path), seq_len=16, tokenizer="byte", val_fraction=0.2, cache_dir=str(cache))
    again = prepare_data(str(tmp_path), seq_len=16, tokenizer="byte", val_fraction=0.2, cache_dir=str(cache))
    assert len(list((cache / "vishwamai_tokens").glob("tokens-*.arrow"))) == 2  # training and validation
    assert torch.equal(first.train_ids, again.train_ids) and first.info == again.info


# --- streaming --------------------------------------------------------------------------------------------------

def test_streaming_local_folder_matches_its_families(tmp_path):
    from datasets import IterableDataset
    write_family_corpus(tmp_path / "corpus")
    stream = load_corpus(str(tmp_path / "corpus"), streaming=True)
    assert isinstance(stream, IterableDataset)
    assert sorted(r["text"] for r in stream) == sorted(load_corpus(str(tmp_path / "corpus"))["text"])
    train, val = split_documents(stream, 0.3, seed=1)
    train_paths, val_paths = [r["path"] for r in train], [r["path"] for r in val]
    assert sorted(train_paths + val_paths) == sorted(r["path"] for r in stream) and val_paths
    assert not {p.split("/")[0] for p in train_paths} & {p.split("/")[0] for p in val_paths}
    assert [r["path"] for r in split_documents(stream, 0.3, seed=1)[1]] == val_paths  # the same on every pass


def test_streaming_hub_dataset(tmp_path, monkeypatch):
    "The Hub branch with `streaming=True`, served offline by the `text` builder streaming a local file."
    import datasets
    real_load = datasets.load_dataset
    (tmp_path / "stories.txt").write_text("".join(f"story {i}: once upon a time, number {i}.\n" for i in range(300)))

    def hub(name, config=None, split="train", cache_dir=None, streaming=False):
        assert streaming
        return real_load("text", data_files=str(tmp_path / "stories.txt"), split=split, streaming=True)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    stream = load_corpus("someone/stories", streaming=True, max_docs=200)
    assert isinstance(stream, datasets.IterableDataset) and len(list(stream)) == 200
    data = prepare_data("someone/stories", streaming=True, max_docs=200, seq_len=16, tokenizer="bpe", vocab_size=300,
                        val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    n_train, n_val = data.info["documents"]
    assert n_train + n_val == 200 and 10 < n_val < 70  # each story goes to validation with probability 0.2
    train_text, val_text = data.tokenizer.decode(data.train_ids), data.tokenizer.decode(data.val_ids)
    assert not set(train_text.split(EOT)) - {""} & set(val_text.split(EOT))  # no story on both sides
    assert not (tmp_path / "cache").exists()  # a stream is not cached
