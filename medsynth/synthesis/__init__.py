"""Label-to-image synthesis, scar shape model and image degradations (bias, blur, noise, resolution)."""
