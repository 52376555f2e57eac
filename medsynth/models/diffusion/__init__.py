"""Diffusion families (``ddpm``, ``ddpm_uncond``, ``ddpm_joint``), the corrected DDIM scheduler and the anatomical
plausibility check of generated label maps."""
