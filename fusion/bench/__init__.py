"""Benchmarks: cost of the model variants, scaling, the data pipeline, predicting at city scale."""
