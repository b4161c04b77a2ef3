"""Build the small, valid bundles that fuzz_bundle.py mutates (run once by scripts/fuzz.sh, with torch):

    python fuzz/make_seeds.py OUT_DIR

OUT_DIR/lightgcn (graph retrieval with fold-in), OUT_DIR/deepfm (CTR ranking,
ONNX dense part), OUT_DIR/pipeline (both, with an int8 index). Tiny: a few hundred KB in all.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch

    from rec_engine.bundle import write_pipeline
    from rec_engine_train import pipeline
    from rec_engine_train.loop import TrainConfig

    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    quiet = dict(log=lambda _msg: None)
    graph = pipeline.load_data("synthetic", "graph", synthetic={"n_users": 60, "n_items": 40})
    ctr = pipeline.load_data("synthetic", "ctr", synthetic={"n_users": 60, "n_items": 40})
    lg = pipeline.train("lightgcn", graph, TrainConfig(epochs=1, lr=0.05, seed=0, dim=8, batch_size=4096,
                                                       progress=False), **quiet)
    dfm = pipeline.train("deepfm", ctr, TrainConfig(epochs=1, lr=1e-2, batch_size=256, dim=4, progress=False,
                                                    params={"mlp": [8]}), **quiet)
    pipeline.export(lg, graph, out / "lightgcn")
    pipeline.export(dfm, ctr, out / "deepfm")
    write_pipeline(out / "pipeline", retrieval=out / "lightgcn", ranking=out / "deepfm", n_candidates=10,
                   index="int8")
    (out / ".done").write_text("ok\n")
    for p in sorted(out.iterdir()):
        if p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            print(f"seed bundle {p.name}: {size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/fuzz/seeds"))
