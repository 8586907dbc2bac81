"""The data layer: the user's files to model-ready batches, for training and for prediction.

Files (:mod:`manifest`, :mod:`series`, :mod:`tiles`, :mod:`mosaic`, :mod:`urfc`) → samples
(:mod:`samples`: one reader, a ``raise`` or ``flag`` policy) → datasets (:mod:`datasets`,
:mod:`prediction`) → datamodules (:mod:`datamodule` for training and evaluation,
:mod:`prediction` for new places), with :mod:`splits`, :mod:`cache`, :mod:`tokens` (frozen ViT
tokens cached per tile) and :mod:`contract` (what a trained model expects of its inputs). It
imports nothing from the models, the task or the command line.
"""
