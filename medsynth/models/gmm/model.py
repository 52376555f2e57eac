"""GMM intensity family: per-tissue Gaussian mixtures over normalised intensities with a population of
per-subject parameters, label-conditioned synthesis, a scar model for LGE and a scar-posterior score.

Model, per group (contrast, and vendor when ``per_vendor`` and the manifest names one):

- every subject ``s`` and tissue class ``c`` has a location/scale ``(m_sc, log sd_sc)`` (pooled over the
  subject's slices); their *population* is a multivariate Gaussian over the classes every subject has
  (background, blood pool, myocardium, ...), so sampling draws per-image parameters with the fitted
  correlations (e.g. bright blood goes with bright myocardium) instead of one global mean;
- classes only some subjects have (scar, MVO) are parameterised relative to remote myocardium and blood pool,
  ``t = (m_c - m_myo) / (m_lv - m_myo)`` and ``r = log(sd_c / sd_myo)``, each a fitted Gaussian;
- classes no training subject has borrow a donor class (RV ↔ LV blood, scar → blood, MVO → myocardium);
- within a subject, each class's standardised intensities ``(x - m_sc) / sd_sc`` follow a 1-D Gaussian mixture
  (``n_components``) with a fitted spatial correlation (smooth share and length), used by
  :class:`~medsynth.synthesis.labels_to_image.LabelsToImage`.

Tissue statistics come from pixels at least ``interior_erosion`` px inside their region, so partial-volume
pixels at tissue borders do not bias the means (the renderer's blur re-creates partial volume); on the
phantom this recovers the ground-truth scar / remote-myocardium ratio within ~6 % instead of ~25 % low.

Background (everything outside the heart labels), ``surroundings``:

- ``"partition"``: every training slice gets a surroundings partition (:mod:`medsynth.synthesis.partition`:
  outside the body, then body classes by brightness — lung, muscle / liver, fat, bright vessels — found by
  clustering intensity and position); each class is fitted like a tissue (population of per-subject
  location/scale, standardised mixture, two-scale texture), and a bank of training partitions (uint8) is
  kept in the model state. A label map to render gets a bank partition whose heart matches its heart,
  moved by a small random affine and made consistent with its heart labels, so images get a body outline
  and organ-sized regions from label maps alone (deformed real maps or shape-model maps).
- ``"field"``: one random field with a two-scale spatial correlation (organ-sized patches plus fine texture,
  fitted on the real surroundings) mapped through the fitted background mixture.

Where a real image exists, ``context`` (and scar insertion, :mod:`medsynth.synthesis.scar`) keeps the real
surroundings instead.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from sklearn.mixture import GaussianMixture

from medsynth.config import StrictModel
from medsynth.data.slices import SliceSet
from medsynth.errors import CapabilityError, LabelError, MedsynthError
from medsynth.labels import BACKGROUND, CANONICAL, LV, MVO, MYO, MYOCARDIAL_WALL, N_CLASSES, RV, SCAR
from medsynth.models.base import AnomalyScores, ContextSampler, GenerativeModel, Sampler, Samples, ScarInserter, Scorer
from medsynth.models.latent.common import check_slices
from medsynth.synthesis.degrade import DegradeConfig, RandomDegrade, apply_degrade
from medsynth.synthesis.labels_to_image import LabelsToImage, gmm_logpdf, quantile_table, tissue_wasserstein
from medsynth.synthesis.partition import attach_partition, bank_indices, extend_labels, match_bank, partition_slices
from medsynth.synthesis.scar import ScarModel, robust_stats, wall_coordinates
from medsynth.utils.seeding import rng as make_rng

log = logging.getLogger(__name__)

# How each class of a group is parameterised.
MODE_CORE, MODE_RELATIVE, MODE_ABSOLUTE, MODE_DONOR = 0, 1, 2, 3
DONORS: dict[int, tuple[int, ...]] = {
    BACKGROUND: (MYO,),
    LV: (RV, MYO),
    RV: (LV, MYO),
    MYO: (LV, RV),
    SCAR: (LV, RV, MYO),
    MVO: (MYO,),
}
_MIN_SD = 1e-3


class GMMConfig(StrictModel):
    """Configuration of the ``gmm`` family."""

    n_components: int = Field(3, ge=1)  # mixture components per tissue class (standardised intensities)
    per_vendor: bool = True  # one group per (contrast, vendor) when the manifest names vendors
    min_pixels: int = Field(20, ge=1)  # a subject "has" a class with at least this many pixels
    interior_erosion: int = Field(1, ge=0)  # px: tissue statistics from pixels this far inside their region
    max_pixels_per_class: int = Field(40000, ge=1)  # pixels per class and group used by EM (subsampled)
    shrinkage: float = Field(0.2, ge=0, le=1)  # population covariance shrinkage towards its diagonal
    population_scale: float = Field(1.0, ge=0)  # multiplies the population spread when sampling (0 = mean)
    sample_group: str | None = None  # e.g. "lge" / "lge/siemens"; None = draw groups by training frequency
    texture: Literal["correlated", "white"] = "correlated"  # "white": faster, no spatially correlated texture
    # Everything outside the heart labels: "partition" renders unsupervised surroundings classes (outside the
    # body, lung, body wall, liver, vessels; :mod:`medsynth.synthesis.partition`) each with fitted statistics;
    # "field" one random field for the whole background (the earlier behaviour).
    surroundings: Literal["partition", "field"] = "partition"
    surroundings_classes: int = Field(5, ge=2)  # outside the body + 4 body classes (5 measured better than 7)
    partition_bank: int = Field(256, ge=1)  # training partitions kept in the model (uint8), attached to new maps
    partition_match: int = Field(5, ge=1)  # a new map gets one of the bank partitions whose hearts match best
    degrade: DegradeConfig = DegradeConfig()
    score_prior_strength: float = Field(2.0, ge=0)  # pseudo-count of the Beta prior on the per-slice scar fraction


class GMMModel(GenerativeModel, Sampler, ContextSampler, Scorer, ScarInserter):
    """Label-conditioned tissue-intensity model (see module docstring)."""

    family: ClassVar[str] = "gmm"
    Config: ClassVar[type[StrictModel]] = GMMConfig
    conditional: ClassVar[bool] = True

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"n_components": 2, "max_pixels_per_class": 2000}

    def __init__(self, config: StrictModel | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.groups: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.scar_model: ScarModel | None = None
        self.score_params: dict[str, float] = {}
        self._renderer: LabelsToImage | None = None
        #: Synthesis threads (results do not depend on it); a runtime setting, not part of the model.
        self.threads = max(1, min(4, os.cpu_count() or 1))

    # ---- fitting -------------------------------------------------------------------------------------
    def group_key(self, modality: str, vendor: str) -> str:
        vendor = str(vendor or "").strip().lower()
        modality = str(modality or "other").strip().lower() or "other"
        return f"{modality}/{vendor}" if self.config.per_vendor and vendor and vendor != "unknown" else modality

    def fit(self, train: SliceSet, val: SliceSet | None = None, seed: int = 0) -> dict[str, Any]:
        check_slices(train, self.family)  # empty or non-finite input: the same error as every family
        rng = make_rng(seed)
        pairs = zip(train.meta["modality"], train.meta["vendor"], strict=True)
        keys = np.array([self.group_key(m, v) for m, v in pairs])
        self.groups = sorted(str(k) for k in set(keys))
        fit_labels = train.labels
        bank: dict[str, np.ndarray] = {}
        if self.config.surroundings == "partition":
            # every training slice gets its surroundings classes; the fit then treats them as tissues
            parts = partition_slices(train.images, train.labels, self.config.surroundings_classes, seed)
            fit_labels = extend_labels(train.labels, parts)
            keep = bank_indices(len(train), self.config.partition_bank)
            gid = np.array([self.groups.index(str(k)) for k in keys])
            bank = {"partition_bank": parts[keep], "partition_group": gid[keep].astype(np.int64)}
        n_classes = N_CLASSES + (self.config.surroundings_classes if bank else 0)
        per_group = [
            self._fit_group(train.subset(keys == g), fit_labels[keys == g], n_classes, rng, seed) for g in self.groups
        ]
        self.arrays = {k: np.stack([p[k] for p in per_group]) for k in per_group[0]}
        self.arrays.update(bank)
        self._fit_scar(train, keys)
        self._renderer = None
        self.fitted = True
        report: dict[str, Any] = {
            "groups": {g: int(self.arrays["n_subjects"][i]) for i, g in enumerate(self.groups)},
            "class_means": self.class_means(),
        }
        if self.scar_model is not None:
            report["scar_model"] = self.scar_model.summary()
        if val is not None and len(val):
            report["val_wasserstein"] = tissue_wasserstein(
                val.images, val.labels, self.sample(len(val), val.labels, seed=seed).images, val.labels
            )
        return report

    def _fit_group(
        self, part: SliceSet, lab: np.ndarray, n_classes: int, rng: np.random.Generator, seed: int
    ) -> dict[str, np.ndarray]:
        """Parameters of one group from its slices ``part`` and their (possibly extended) labels ``lab``
        (N, H, W) with codes < ``n_classes`` (canonical classes, then surroundings classes)."""
        c_, m_ = n_classes, self.config.n_components
        x = part.images[:, 0].astype(np.float64)
        subjects = part.meta["subject_id"].astype(str).to_numpy()
        subj_ids = sorted(set(subjects))
        n_s = len(subj_ids)
        stats = np.full((n_s, c_, 2), np.nan)  # mean, log sd per subject and class
        zmap = np.zeros_like(x)
        interior = _interior_masks(lab, self.config.interior_erosion)
        if c_ > N_CLASSES:
            # surroundings classes come from a smoothed clustering, so their borders are a few px uncertain:
            # one more px of erosion keeps neighbouring tissue out of their statistics (speckle when rendered)
            deeper = _interior_masks(lab, self.config.interior_erosion + 1)
            interior = np.where(lab >= N_CLASSES, deeper, interior)
        use = np.zeros(lab.shape, dtype=bool)  # pixels the tissue statistics are estimated from
        for si, s in enumerate(subj_ids):
            sel = subjects == s
            xs, ls, inner = x[sel], lab[sel], interior[sel]
            u = np.zeros(ls.shape, dtype=bool)
            for c in range(c_):
                full = ls == c
                if full.sum() < self.config.min_pixels:
                    continue
                core = full & inner
                # a few PV-free pixels estimate the mean better than many blurred ones (thin scar)
                mask = core if core.sum() >= max(5, self.config.min_pixels // 4) else full
                u |= mask
                v = xs[mask]
                mu, sd = float(v.mean()), max(float(v.std()), _MIN_SD)
                stats[si, c] = (mu, np.log(sd))
            use[sel] = u
            mu_map = np.nan_to_num(stats[si, :, 0])[ls]
            sd_map = np.exp(np.nan_to_num(stats[si, :, 1]))[ls]
            zmap[sel] = (xs - mu_map) / sd_map
        present = np.isfinite(stats[:, :, 0])
        mode = np.full(c_, MODE_DONOR, dtype=np.int32)
        mode[present.all(axis=0)] = MODE_CORE
        can_rel = mode[MYO] == MODE_CORE and mode[LV] == MODE_CORE
        for c in range(c_):
            if mode[c] != MODE_CORE and present[:, c].any():
                # surroundings classes have no tie to the blood–myocardium contrast: absolute statistics
                mode[c] = MODE_RELATIVE if can_rel and c < N_CLASSES else MODE_ABSOLUTE
        donor = np.arange(c_, dtype=np.int32)
        for c in np.flatnonzero(mode == MODE_DONOR):
            options = [d for d in _donors(int(c), c_) if mode[d] != MODE_DONOR]
            if not options:
                options = [d for d in range(c_) if mode[d] != MODE_DONOR]
            donor[c] = options[0] if options else c
        # Population of core parameters: vector (mean_c, log sd_c) over all classes, core entries used.
        vec = stats.reshape(n_s, 2 * c_)
        core = np.repeat(mode == MODE_CORE, 2)
        pop_mean = np.zeros(2 * c_)
        pop_cov = np.zeros((2 * c_, 2 * c_))
        if core.any():
            v = vec[:, core]
            pop_mean[core] = v.mean(axis=0)
            if n_s >= 2:
                cov = np.cov(v, rowvar=False).reshape(v.shape[1], v.shape[1])
                lam = self.config.shrinkage
                cov = (1 - lam) * cov + lam * np.diag(np.diag(cov))
            else:
                cov = np.zeros((v.shape[1], v.shape[1]))
            pop_cov[np.ix_(core, core)] = cov + 1e-8 * np.eye(v.shape[1])
        rel = np.zeros((c_, 4))
        absolute = np.zeros((c_, 4))
        for c in range(c_):
            have = present[:, c]
            if not have.any():
                continue
            m, ls = stats[have, c, 0], stats[have, c, 1]
            absolute[c] = (m.mean(), m.std(), ls.mean(), ls.std())
            if can_rel:
                contrast = stats[have, LV, 0] - stats[have, MYO, 0]
                ok = np.abs(contrast) > 1e-3
                if ok.any():
                    t = (m[ok] - stats[have, MYO, 0][ok]) / contrast[ok]
                    r = ls[ok] - stats[have, MYO, 1][ok]
                    rel[c] = (t.mean(), t.std(), r.mean(), r.std())
        # Standardised within-subject mixture per class, and its spatial correlation.
        w = np.zeros((c_, m_))
        mu = np.zeros((c_, m_))
        sd = np.ones((c_, m_))
        w[:, 0] = 1.0
        smooth = np.zeros(c_)
        length = np.ones(c_)
        long_frac = np.zeros(c_)
        long_len = np.full(c_, 12.0)
        for c in np.flatnonzero(mode != MODE_DONOR):
            z = zmap[(lab == c) & use]
            if z.size > self.config.max_pixels_per_class:
                z = rng.choice(z, self.config.max_pixels_per_class, replace=False)
            k = min(m_, max(1, z.size // 50), max(1, np.unique(z[:5000]).size))  # constant classes (air): 1
            gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed, max_iter=200)
            gm.fit(z[:, None])
            order = np.argsort(gm.means_[:, 0])
            w[c, :k] = gm.weights_[order]
            mu[c, :k] = gm.means_[order, 0]
            sd[c, :k] = np.sqrt(gm.covariances_[order, 0, 0])
            smooth[c], length[c], long_frac[c], long_len[c] = _spatial_correlation(zmap, (lab == c) & use)
        for c in np.flatnonzero(mode == MODE_DONOR):
            d = donor[c]
            w[c], mu[c], sd[c], smooth[c], length[c] = w[d], mu[d], sd[d], smooth[d], length[d]
            long_frac[c], long_len[c] = long_frac[d], long_len[d]
        return {
            "mode": mode,
            "donor": donor,
            "pop_mean": pop_mean,
            "pop_cov": pop_cov,
            "rel": rel,
            "abs": absolute,
            "gmm_w": w,
            "gmm_mu": mu,
            "gmm_sd": sd,
            "smooth_frac": smooth,
            "length": length,
            "long_frac": long_frac,
            "long_length": long_len,
            "n_subjects": np.array(n_s, dtype=np.int64),
            "n_slices": np.array(len(part), dtype=np.int64),
        }

    def _fit_scar(self, train: SliceSet, keys: np.ndarray) -> None:
        """Scar shape/intensity model and score parameters from LGE training slices with scar labels."""
        self.scar_model = None
        self.score_params = {}
        lge = np.array([k.split("/")[0] == "lge" for k in keys])
        has_scar = np.isin(train.labels, (SCAR, MVO)).any(axis=(1, 2))
        source = lge & has_scar if (lge & has_scar).any() else has_scar
        if not source.any():
            return
        try:
            self.scar_model = ScarModel.fit(train.images[source, 0], train.labels[source])
        except ValueError as err:
            log.warning("gmm: no scar model fitted: %s", err)
            self.scar_model = None
            return
        pool = lge if lge.any() else np.ones(len(train), bool)
        wall = np.isin(train.labels[pool], MYOCARDIAL_WALL)
        infarct = np.isin(train.labels[pool], (SCAR, MVO))
        inten = self.scar_model.intensities
        t = inten[np.isfinite(inten[:, 0]), 0]
        r = inten[np.isfinite(inten[:, 1]), 1]
        # Robust location / spread: a few slices with weak blood–remote contrast give extreme t.
        t_mu, t_sd = robust_stats(t) if t.size > 1 else (float(t.mean()), 0.1)
        self.score_params = {
            "t_scar_mean": t_mu,
            "t_scar_sd": t_sd,
            "r_scar_mean": float(np.median(r)) if r.size else 0.0,
            "scar_fraction": float(infarct.sum() / max(wall.sum(), 1)),
        }

    def class_means(self) -> dict[str, dict[str, float]]:
        """Mean over subjects of the per-subject class means (normalised intensity), per group; surroundings
        classes of a partition model as ``surroundings_<k>`` (k = 1 outside the body … K brightest)."""
        out: dict[str, dict[str, float]] = {}
        names = dict(CANONICAL)
        names.update({c: f"surroundings_{c - N_CLASSES + 1}" for c in range(N_CLASSES, self.n_render_classes)})
        for gi, g in enumerate(self.groups):
            mode = self.arrays["mode"][gi]
            row = {}
            for c, name in names.items():
                if mode[c] == MODE_CORE:
                    row[name] = float(self.arrays["pop_mean"][gi, 2 * c])
                elif mode[c] in (MODE_RELATIVE, MODE_ABSOLUTE):
                    row[name] = float(self.arrays["abs"][gi, c, 0])
            out[g] = row
        return out

    # ---- sampling ------------------------------------------------------------------------------------
    @property
    def renderer(self) -> LabelsToImage:
        if self._renderer is None:
            a = self.arrays
            tables = np.array(
                [
                    [
                        quantile_table(a["gmm_w"][g, c], a["gmm_mu"][g, c], a["gmm_sd"][g, c])
                        for c in range(self.n_render_classes)
                    ]
                    for g in range(len(self.groups))
                ]
            )
            self._renderer = LabelsToImage(
                tables,
                a["smooth_frac"],
                a["length"],
                a["long_frac"],
                a["long_length"],
                correlated=self.config.texture == "correlated",
            )
        return self._renderer

    @property
    def n_render_classes(self) -> int:
        """Classes the renderer knows: the canonical ones, plus the surroundings classes of a partition model."""
        return int(self.arrays["mode"].shape[1])

    @property
    def uses_partition(self) -> bool:
        return "partition_bank" in self.arrays

    def sample_tissue_params(
        self, n: int, rng: np.random.Generator, group: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-image ``(group index (n,), mean (n, C), sd (n, C))`` drawn from the fitted populations."""
        self._require_fitted()
        a = self.arrays
        group = group if group is not None else self.config.sample_group
        if group is not None:
            if group not in self.groups:
                raise MedsynthError(f"gmm: sample_group {group!r} not fitted; fitted groups: {self.groups}")
            gidx = np.full(n, self.groups.index(group))
        else:
            weight = a["n_subjects"].astype(float)
            gidx = rng.choice(len(self.groups), size=n, p=weight / weight.sum())
        scale = self.config.population_scale
        c_ = self.n_render_classes
        mean = np.zeros((n, c_))
        logsd = np.zeros((n, c_))
        for g in range(len(self.groups)):
            rows = np.flatnonzero(gidx == g)
            if rows.size == 0:
                continue
            mode = a["mode"][g]
            core = np.repeat(mode == MODE_CORE, 2)
            vec = np.zeros((rows.size, 2 * c_))
            if core.any():
                cov = a["pop_cov"][g][np.ix_(core, core)] * scale**2
                vec[:, core] = rng.multivariate_normal(a["pop_mean"][g][core], cov, size=rows.size, method="eigh")
            m, ls = vec[:, 0::2], vec[:, 1::2]
            for c in range(c_):
                if mode[c] == MODE_RELATIVE:
                    tm, ts, rm, rs = a["rel"][g, c]
                    t = tm + scale * ts * rng.standard_normal(rows.size)
                    m[:, c] = m[:, MYO] + t * (m[:, LV] - m[:, MYO])
                    ls[:, c] = ls[:, MYO] + rm + scale * rs * rng.standard_normal(rows.size)
                elif mode[c] == MODE_ABSOLUTE:
                    mm, ms, lm, lsd = a["abs"][g, c]
                    m[:, c] = mm + scale * ms * rng.standard_normal(rows.size)
                    ls[:, c] = lm + scale * lsd * rng.standard_normal(rows.size)
            for c in np.flatnonzero(mode == MODE_DONOR):
                d = a["donor"][g, c]
                m[:, c], ls[:, c] = m[:, d], ls[:, d]
            mean[rows], logsd[rows] = m, ls
        return gidx.astype(np.intp), mean, np.maximum(np.exp(logsd), _MIN_SD)

    def sample(self, n: int, labels: np.ndarray | None = None, seed: int = 0) -> Samples:
        """Images (n, 1, H, W) for canonical ``labels`` (n, H, W), tissue groups drawn as ``sample_group`` says."""
        return self._render(n, labels, seed, None)

    def sample_in_context(self, labels: np.ndarray, context: np.ndarray, seed: int = 0) -> Samples:
        """As :meth:`sample`, but the surroundings (label 0) of ``context`` (n, 1, H, W), real images aligned
        with ``labels``, are kept and only the heart is synthesised, blended over a partial-volume-wide border."""
        return self._render(len(labels) if labels is not None else 0, labels, seed, context)

    def _render(self, n: int, labels: np.ndarray | None, seed: int, context: np.ndarray | None) -> Samples:
        self._require_fitted()
        if labels is None:
            raise LabelError(f"{self.family}: a conditional family needs label maps (labels=(n, H, W))")
        labels = np.asarray(labels)
        if labels.ndim != 3 or labels.shape[0] != n:
            raise LabelError(f"{self.family}: labels must be (n={n}, H, W), got {labels.shape}")
        # a private uint8 copy: the returned labels must not alias the caller's array
        labels = labels.astype(np.uint8, copy=True)
        rng = make_rng(seed)
        gidx, mean, sd = self.sample_tissue_params(n, rng)
        degrade = RandomDegrade(self.config.degrade)

        def post(images: np.ndarray, chunk_rng: np.random.Generator) -> np.ndarray:
            return apply_degrade(images, degrade.sample_params(images.shape[0], chunk_rng))

        render_labels = labels
        if self.uses_partition:
            render_labels = extend_labels(labels, self.attach_partitions(labels, gidx, rng))
        images = self.renderer.render(render_labels, gidx, mean, sd, rng, threads=self.threads, post=post)
        if context is not None:
            images = keep_surroundings(images, labels, context)
        return Samples(images[:, None].astype(np.float32, copy=False), labels)

    def attach_partitions(self, labels: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Surroundings partitions (n, H, W) uint8 for canonical ``labels`` (n, H, W): each from a bank slice of
        its image's group (``groups`` (n,) indices), see :func:`~medsynth.synthesis.partition.attach_partition`."""
        bank, bank_group = self.arrays["partition_bank"], self.arrays["partition_group"]
        out = np.zeros(labels.shape, dtype=np.uint8)
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            # a bank slice whose heart matches this heart (one of the best few), from the same group
            index = match_bank(
                labels[rows], bank, rng, top=self.config.partition_match, candidates=np.flatnonzero(bank_group == g)
            )
            out[rows] = attach_partition(labels[rows], bank, rng, index=index, exclude=self._bright_classes(g))
        return out

    def _bright_classes(self, g: int) -> tuple[int, ...]:
        """Partition codes of group ``g`` whose mean is nearer the LV blood pool than the myocardium: kept out
        of the place a bank slice's own heart occupied, so a new heart is not flanked by unlabelled
        blood-bright tissue that a segmenter would have to call background."""
        a = self.arrays

        def mean(c: int) -> float:
            return float(a["pop_mean"][g, 2 * c] if a["mode"][g, c] == MODE_CORE else a["abs"][g, c, 0])

        cut = 0.5 * (mean(LV) + mean(MYO))
        return tuple(c - N_CLASSES + 1 for c in range(N_CLASSES, self.n_render_classes) if mean(c) > cut)

    def supports(self, capability: str) -> bool:
        # scoring and scar insertion need the scar model, fitted only where training slices carry scar labels
        if capability in ("score", "scar") and self.fitted and self.scar_model is None:
            return False
        return super().supports(capability)

    def insert_scar(self, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Samples:
        """Scar drawn from the fitted scar model (territory, extent, transmurality, contrast) inserted into the
        healthy myocardium of each (1, H, W) image / (H, W) label; slices without myocardium pass unchanged."""
        from medsynth.synthesis.scar import insert_scar

        self._require_fitted()
        if self.scar_model is None:
            raise CapabilityError(self.family, "scar", "this model has no scar model (fit on LGE with scar labels)")
        if images.ndim != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"images/labels: expected (n, 1, H, W) and (n, H, W), got {images.shape}, {labels.shape}")
        rng = make_rng(seed)
        pairs = [
            insert_scar(img, lab, self.scar_model.sample_params(rng))
            for img, lab in zip(images[:, 0], labels, strict=True)
        ]
        return Samples(np.stack([p[0] for p in pairs])[:, None].astype(np.float32), np.stack([p[1] for p in pairs]))

    # ---- scar posterior score ------------------------------------------------------------------------
    def score(self, slices: SliceSet) -> AnomalyScores:
        """Per-pixel scar posterior inside the given LV wall (MYO ∪ SCAR ∪ MVO of ``slices.labels``).

        Two components per slice: healthy myocardium from the darkest of six wall sectors (robust remote ROI)
        and scar placed at the fitted contrast ``t`` between remote and blood pool; the mixing weight is
        re-estimated per slice by EM under a Beta prior centred on the training scar fraction. Slice score =
        expected scar fraction of the wall. Dark MVO is not bright and scores as healthy.
        """
        self._require_fitted()
        if not self.score_params:
            raise CapabilityError(self.family, "score", "this model has no scar model (fit on LGE with scar labels)")
        n = len(slices)
        maps = np.zeros(slices.labels.shape, dtype=np.float32)
        scores = np.zeros(n)
        for i in range(n):
            post = self.scar_posterior(slices.images[i, 0], slices.labels[i])
            if post is not None:
                maps[i] = post
                wall = np.isin(slices.labels[i], MYOCARDIAL_WALL)
                scores[i] = float(post[wall].mean())
        # the maps are posterior probabilities: calibrated, a pixel is scar above 0.5
        return AnomalyScores(scores, maps, pixel_threshold=0.5)

    def scar_posterior(self, image: np.ndarray, label: np.ndarray, n_iter: int = 20) -> np.ndarray | None:
        """(H, W) scar posterior inside the wall (0 elsewhere); ``None`` without wall."""
        p = self.score_params
        remote, blood = remote_and_blood(image, label)
        if remote is None:
            return None
        mu_h, sd_h = remote
        wall = np.isin(label, MYOCARDIAL_WALL)
        x = image[wall].astype(np.float64)
        mu_b = blood if blood is not None else mu_h + 4 * sd_h
        mu_s = mu_h + p["t_scar_mean"] * (mu_b - mu_h)
        sd_s = np.hypot(sd_h * np.exp(p["r_scar_mean"]), p["t_scar_sd"] * abs(mu_b - mu_h))
        lh = gmm_logpdf(x, np.ones(1), np.array([mu_h]), np.array([sd_h]))
        ls = gmm_logpdf(x, np.ones(1), np.array([mu_s]), np.array([sd_s]))
        # Scar is brighter than remote myocardium: only pixels above the remote mean can be scar (keeps the
        # wide scar component from claiming dark pixels).
        ls = np.where(x > mu_h, ls, -np.inf)
        prior = min(max(p["scar_fraction"], 1e-3), 0.5)
        a = self.config.score_prior_strength
        pi = prior
        for _ in range(n_iter):
            logit = np.log(pi) + ls - np.log1p(-pi) - lh
            post = 1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))
            pi = float(np.clip((post.sum() + a * prior) / (post.size + a), 1e-4, 0.95))
        out = np.zeros(label.shape, dtype=np.float32)
        out[wall] = post
        return out

    # ---- state ---------------------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = dict(self.arrays)
        if self.scar_model is not None:
            arrays["scar_shapes"] = self.scar_model.shapes
            arrays["scar_intensities"] = self.scar_model.intensities
        meta = {"groups": list(self.groups), "score_params": dict(self.score_params)}
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        arrays = dict(arrays)
        shapes, inten = arrays.pop("scar_shapes", None), arrays.pop("scar_intensities", None)
        self.scar_model = ScarModel(shapes, inten) if shapes is not None and inten is not None else None
        self.arrays = arrays
        self.groups = list(meta.get("groups", []))
        self.score_params = {k: float(v) for k, v in (meta.get("score_params") or {}).items()}
        self._renderer = None
        self.fitted = True


def _donors(c: int, n_classes: int) -> tuple[int, ...]:
    """Classes whose mixture a class no training subject has borrows, in order of preference."""
    if c < N_CLASSES:
        return DONORS[c]
    # surroundings classes: the neighbouring classes in intensity order first
    others = [d for d in range(N_CLASSES, n_classes) if d != c]
    return (*sorted(others, key=lambda d: (abs(d - c), d)), MYO)


def keep_surroundings(images: np.ndarray, labels: np.ndarray, context: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """Synthetic heart over real surroundings: (n, H, W) images, labels; context (n, 1, H, W).

    The blend weight is the heart mask smoothed by ``sigma`` px, so the border has the partial-volume width
    of the rendered tissue instead of a cut-out edge."""
    context = np.asarray(context, dtype=np.float32)
    if context.shape != (images.shape[0], 1, *images.shape[1:]):
        raise ValueError(f"context: expected {(images.shape[0], 1, *images.shape[1:])}, got {context.shape}")
    heart = ndimage.gaussian_filter((labels != BACKGROUND).astype(np.float32), sigma=(0, sigma, sigma))
    return heart * images + (1.0 - heart) * context[:, 0]


def remote_and_blood(image: np.ndarray, label: np.ndarray) -> tuple[tuple[float, float] | None, float | None]:
    """Remote-myocardium ``(median, robust SD)`` from the darkest of six 60° wall sectors (≥ 10 px), and the
    blood-pool median; ``(None, None)`` without a wall. Shared by the GMM score and the n-SD baseline."""
    theta, _, wall = wall_coordinates(label)
    if wall.sum() < 10:
        return None, None
    sector = np.floor((theta[wall] + np.pi) / (np.pi / 3)).astype(int).clip(0, 5)
    x = image[wall]
    best = None
    for s in range(6):
        v = x[sector == s]
        if v.size >= 10:
            med = float(np.median(v))
            if best is None or med < best[0]:
                best = (med, v)
    if best is None:
        best = (float(np.median(x)), x)
    blood = image[label == LV]
    return robust_stats(best[1]), (float(np.median(blood)) if blood.size else None)


def _interior_masks(labels: np.ndarray, erosion: int) -> np.ndarray:
    """(N, H, W) bool: pixels at least ``erosion`` px (4-connected, in-plane) inside their own label region."""
    if erosion <= 0:
        return np.ones(labels.shape, dtype=bool)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    out = np.zeros(labels.shape, dtype=bool)
    for c in np.unique(labels):
        region = labels == c
        out |= ndimage.binary_erosion(region, structure, iterations=erosion, border_value=1) & region
    return out


def _lag_correlation(z: np.ndarray, mask: np.ndarray, d: int) -> tuple[float, int]:
    """Correlation of standardised ``z`` between pixels ``d`` px apart (rows and columns), both on ``mask``."""
    num, den, count = 0.0, 0.0, 0
    if d >= min(z.shape[1:]):
        return 0.0, 0
    for a, b, ma, mb in (
        (z[:, :, :-d], z[:, :, d:], mask[:, :, :-d], mask[:, :, d:]),
        (z[:, :-d, :], z[:, d:, :], mask[:, :-d, :], mask[:, d:, :]),
    ):
        both = ma & mb
        num += float((a[both] * b[both]).sum())
        den += float(0.5 * (a[both] ** 2 + b[both] ** 2).sum())
        count += int(both.sum())
    return (num / den if den > 0 else 0.0), count


def _gauss_fit(r_a: float, r_b: float, d_a: float, d_b: float, max_len: float) -> tuple[float, float]:
    """``(share, L)`` of ``rho(d) = share · exp(-d² / (4 L²))`` through two lags."""
    r_a, r_b = float(np.clip(r_a, 1e-4, 0.99)), float(np.clip(r_b, 1e-5, 0.99))
    length = max_len if r_b >= r_a else float(np.sqrt((d_b**2 - d_a**2) / (4.0 * np.log(r_a / r_b))))
    length = float(np.clip(length, 0.5, max_len))
    return float(np.clip(r_a * np.exp(d_a**2 / (4 * length**2)), 0.0, 0.98)), length


def _spatial_correlation(z: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, float]:
    """Two-scale fit of within-class correlation of standardised intensities ``z`` (N, H, W) on ``mask``:
    ``rho(d) = b · exp(-d²/(4 L_l²)) + a · exp(-d²/(4 L_s²))``: a long-range part (organs, fat and lung in
    the surroundings) from lags 6 and 12, where enough pixel pairs exist, and a short-range part (texture)
    from lags 1 and 3 after removing the long part. Returns ``(a, L_s, b, L_l)`` (shares and px)."""
    r6, n6 = _lag_correlation(z, mask, 6)
    r12, n12 = _lag_correlation(z, mask, 12)
    b, long_len = (0.0, 12.0)
    if min(n6, n12) >= 2000 and r6 > 0.05 and r12 > 0.02:
        b, long_len = _gauss_fit(r6, r12, 6.0, 12.0, 40.0)
        b = min(b, 0.9)

    def longpart(d: float) -> float:
        return b * float(np.exp(-(d**2) / (4 * long_len**2)))

    r1 = _lag_correlation(z, mask, 1)[0] - longpart(1)
    r3 = _lag_correlation(z, mask, 3)[0] - longpart(3)
    a, short_len = _gauss_fit(r1, r3, 1.0, 3.0, 20.0)
    a = min(a, 0.98 - b)
    return max(a, 0.0), short_len, b, long_len
