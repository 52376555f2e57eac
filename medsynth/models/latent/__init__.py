"""Latent-variable families: PCA / probabilistic PCA, the statistical shape model, AE / DAE / VAE / cVAE."""
