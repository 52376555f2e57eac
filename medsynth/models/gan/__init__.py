"""Label-conditioned GANs: ``pix2pix`` (U-Net + PatchGAN) and ``spade`` (SPADE generator, multi-scale PatchGAN,
optional VAE style encoder)."""
