"""rec_engine_train: PyTorch training of the models rec_engine serves, and their export to bundles.

- ``data``: the synthetic generator and loaders of real formats (LightGCN, SASRec, libfm, CSV, MovieLens)
- ``models``: Wide&Deep, DeepFM, xDeepFM (ranking); SASRec (sequential); LightGCN, NGCF, MF (graph / CF)
- ``metrics`` / ``evaluate``: ranking and CTR metrics; evaluation ranks with the core's top-k
- ``export``: bundles (manifest, tables, ONNX) that ``rec_engine`` loads for serving
- ``cli``: ``rec-engine train`` / ``rec-engine evaluate``
"""
