"""Token-level value models: the published layout (HF class), the vLLM pooling class,
data collection, training and Q# rounds."""
