"""Reproducible experiments on real data sets, one command each (``python -m rec_engine_train.experiments.<name>``)."""
