"""medsynth: a synthetic-data pipeline for cardiac MR.

Subpackages
-----------
- ``medsynth.data``: readers, dataset layouts → manifests, splits, preprocessing to 2-D slices, inspection.
- ``medsynth.phantom``: the built-in procedural cardiac phantom (cine and LGE, two scanner styles).
- ``medsynth.models``: the generative-model contract, its registry and the families (GMM, PCA, VAE, flow, ...).
- ``medsynth.synthesis``: label-to-image synthesis and scar insertion built on fitted models.
- ``medsynth.evaluation``: offline fidelity metrics, memorisation, scar quantification, downstream U-Net.
- ``medsynth.cli``: the ``medsynth`` command.
"""

__version__ = "0.1.0"
