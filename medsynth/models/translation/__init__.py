"""Image-to-image translation families (capability ``translate``): CycleGAN."""
