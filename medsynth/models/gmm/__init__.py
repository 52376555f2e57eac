"""The GMM intensity family: per-tissue Gaussian mixtures with a population of per-subject parameters."""
