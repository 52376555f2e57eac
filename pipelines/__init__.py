"""Prefect flows for medsynth, thin over ``medsynth.workflows`` stages.

- ``augment``: manifest → preprocess → split → fit → synthesise → score → augmented dataset + report;
- ``anomaly``: fit on healthy subjects → score scans → AUROC / Dice report;
- ``translate``: fit a family declaring ``translate`` (CycleGAN) on two domains → translate the source
  training slices (labels carried over) → FD and target-U-Net Dice before / after on the test split →
  target-domain dataset + report.
"""
