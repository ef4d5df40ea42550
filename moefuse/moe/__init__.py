"""Building and compressing mixtures of experts: homogeneous and heterogeneous MoE builders,
routers, the model classes transformers lacks, and expert alignment/compression."""
