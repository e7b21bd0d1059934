"""NNI experiments: the trial HMC runs inside an NNI experiment, shared caches, and reading results back."""
