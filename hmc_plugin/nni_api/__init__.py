"""The NNI face: ``HMCCompressor`` (NNI 3.0's compressor contract) and its ``config_list`` schema."""
