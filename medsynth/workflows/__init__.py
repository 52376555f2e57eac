"""The operations layer: what the CLI and the Prefect flows both run.

- :mod:`.ops`: the operations on in-memory slice sets (fit, synthesize, scar cases / pairs, translate,
  fidelity) with their provenance, and the one NIfTI + manifest writer of the model commands;
- :mod:`.commands`: the CLI commands over files (a manifest and a saved model in, NIfTI pairs or tables out);
- :mod:`.stages` / :mod:`.evaluate`: pipeline stages as idempotent library functions (nnU-Net style) calling
  the same operations. The Prefect flows in ``pipelines/`` are thin: each task calls one stage here, passing
  paths and small records. Every stage writes its artefacts under ``<work>/<stage>/<key>/`` where ``key``
  hashes the stage's inputs and config; a finished stage leaves ``done.json`` and is skipped when asked again,
  so a rerun after a crash or Ctrl-C resumes where it stopped;
- :mod:`.config`: the run configuration, validated whole when it is read.
"""
