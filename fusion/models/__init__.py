"""The networks, one paper's idea per file.

- :mod:`fusion.models.vit`: the image branch, a pretrained timm ViT (DINOv2, Oquab et al. 2023)
  for any band count and tile size, frozen or partly trainable;
- :mod:`fusion.models.bilstm`: the BiLSTM series branch over daily tokens
  (:mod:`fusion.models.series_patch` turns hours into day tokens);
- :mod:`fusion.models.trans_blstm`: TRANS-BLSTM (Huang et al. 2020), both variants;
- :mod:`fusion.models.msift`: MsIFT cross-attention decoders (Zhang et al. 2022);
- :mod:`fusion.models.mbt`: MBT bottleneck tokens from an early, mid or late layer
  (Nagrani et al. 2021);
- :mod:`fusion.models.experts`: per-view expert heads pooled as a weighted product of experts;
- :mod:`fusion.models.classifier`: the classifier that puts a variant together.
"""
