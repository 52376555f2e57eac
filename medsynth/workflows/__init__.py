"""Pipeline stages as idempotent library functions (nnU-Net style) and the validated run configuration.

The Prefect flows in ``pipelines/`` are thin: each task calls one stage here, passing paths and small
records. Every stage writes its artefacts under ``<work>/<stage>/<key>/`` where ``key`` hashes the stage's
inputs and config; a finished stage leaves ``done.json`` and is skipped when asked again, so a rerun after
a crash or Ctrl-C resumes where it stopped.
"""
