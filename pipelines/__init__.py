"""Prefect flows for medsynth, thin over ``medsynth.workflows`` stages.

- ``augment``: manifest → preprocess → split → fit → synthesise → score → augmented dataset + report;
- ``anomaly``: fit on healthy subjects → score scans → AUROC / Dice report;
- ``translate`` (planned with CycleGAN/CUT): same shape — prepare, fit a family declaring ``translate``,
  translate the test split, score, write.
"""
