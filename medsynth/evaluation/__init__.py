"""Evaluation of synthetic data: offline feature extractors, fidelity / diversity / memorisation metrics,
the downstream segmentation protocol and reports.

Submodules (import what you need; heavy dependencies load lazily):

- :mod:`.features`: ``random_cnn``, ``train_domain_encoder``, ``load_extractor``, ``FeatureExtractor``;
- :mod:`.fidelity`: ``compute_fidelity``, ``frechet_distance``, ``kid``, ``prdc``, ``pairwise_ms_ssim``;
- :mod:`.memorisation`: ``check_memorisation``;
- :mod:`.segmentation`: ``run_segmentation_protocol``, ``per_seed_table``, ``summarise``;
- :mod:`.report`: CSV, figures and Markdown reports.
"""
