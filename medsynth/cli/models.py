"""``medsynth fit`` / ``sample`` / ``scar`` / ``translate`` and ``medsynth evaluate scar`` / ``translation``:
thin wrappers over :mod:`medsynth.workflows.commands` (the operations the flows run), generic over the family
registry."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def run_fit(args: argparse.Namespace) -> int:
    from medsynth.config import read_yaml, validate
    from medsynth.models.registry import get_family
    from medsynth.workflows.commands import fit_family

    family_cls = get_family(args.family)
    raw = read_yaml(args.config) if args.config else {}
    source = args.config or f"{args.family} config"
    preprocess = None
    if isinstance(raw, dict) and "preprocess" in raw:  # optional section next to the family's own keys
        raw = dict(raw)
        preprocess = raw.pop("preprocess")
    config = validate(family_cls.Config, raw, source=source)
    out = fit_family(
        args.family,
        args.manifest,
        args.out,
        config=config.model_dump(),
        data_root=args.data_root,
        seed=args.seed,
        preprocess=preprocess,
    )
    print(out)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from medsynth.errors import ConfigError
    from medsynth.workflows.commands import sample_dataset, sample_styled_dataset

    if args.reference is not None:
        if args.labels is None:
            raise ConfigError("--reference: give the label maps to render with --labels")
        out = sample_styled_dataset(
            args.model, args.reference, args.out, args.n, args.seed, labels_manifest=args.labels,
            data_root=args.data_root,
        )  # fmt: skip
    else:
        out = sample_dataset(
            args.model, args.out, args.n, args.seed, labels_manifest=args.labels, data_root=args.data_root,
            scar_fraction=args.scar_fraction,
        )  # fmt: skip
    print(out)
    return 0


def run_scar(args: argparse.Namespace) -> int:
    from medsynth.workflows.commands import scar_dataset

    print(scar_dataset(args.model, args.manifest, args.out, seed=args.seed, data_root=args.data_root))
    return 0


def run_translate(args: argparse.Namespace) -> int:
    from medsynth.workflows.commands import translate_dataset

    out = translate_dataset(
        args.model,
        args.manifest,
        args.out,
        seed=args.seed,
        data_root=args.data_root,
        direction=args.direction,
        split=args.split,
    )
    print(out)
    return 0


def run_evaluate_translation(args: argparse.Namespace) -> int:
    from medsynth.config import load_config
    from medsynth.evaluation.translation import TranslationEvalConfig
    from medsynth.workflows.commands import run_translation_evaluation

    cfg = load_config(TranslationEvalConfig, args.config) if args.config else TranslationEvalConfig()
    print(run_translation_evaluation(args.model, args.manifest, args.out, args.data_root, cfg, seed=args.seed))
    return 0


def run_evaluate_scar(args: argparse.Namespace) -> int:
    from medsynth.workflows.commands import run_scar_evaluation

    out = run_scar_evaluation(
        args.manifest,
        args.out,
        model_dir=args.model,
        data_root=args.data_root,
        seed=args.seed,
        test_fraction=args.test_fraction,
    )
    print(out)
    return 0


def _seed_and_root(parser, seed_help: str = "seed (default 0)", root_help: str = "data root of the manifest") -> None:
    """The ``--seed`` and ``--data-root`` options every model command takes."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--data-root", dest="data_root", default=None, help=root_help)


def register(commands, evaluate) -> None:
    from medsynth.models.registry import available_families

    f = commands.add_parser(
        "fit",
        help="fit a generative model family on a manifest",
        description="Fit FAMILY on the manifest's train split (all rows when none is marked train).",
    )
    f.add_argument("family", help=f"generative family ({', '.join(available_families())})")
    f.add_argument("--manifest", required=True, help="manifest CSV")
    f.add_argument("--out", required=True, help="model directory to write")
    f.add_argument("--config", default=None, help="YAML with the family's config keys (+ optional 'preprocess')")
    _seed_and_root(f, seed_help="fit seed (default 0)")
    f.set_defaults(func=run_fit)

    s = commands.add_parser(
        "sample",
        help="sample synthetic image-label pairs from a fitted model",
        description="Write N synthetic NIfTI image-label pairs and a manifest with provenance.",
    )
    s.add_argument("--model", required=True, help="fitted model directory")
    s.add_argument("--labels", default=None, help="manifest whose label maps condition the samples")
    s.add_argument("--n", type=int, required=True, help="number of slices")
    s.add_argument(
        "--scar-fraction", type=float, default=0.0, metavar="P",
        help="label-conditioned families: share P of the scar-free label maps that get a label-level scar "
        "(drawn from the scar shapes of --labels) before rendering: new scar cases (default 0)",
    )  # fmt: skip
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument(
        "--reference", default=None, metavar="PATH",
        help="image file (NIfTI, PNG or slice-set .npz) whose appearance (scanner / contrast) the samples take; "
        "needs --labels and a model that can 'style' (spade with its style encoder)",
    )  # fmt: skip
    _seed_and_root(s, seed_help="sampling seed (default 0)", root_help="data root of the labels manifest")
    s.set_defaults(func=run_sample)

    c = commands.add_parser(
        "scar",
        help="insert synthetic scar into LGE slices and make scar-free counterparts",
        description="Write scar / scar-free pairs of the manifest's LGE slices using the model's scar model.",
    )
    c.add_argument("--model", required=True, help="fitted model directory that can insert scar (e.g. gmm)")
    c.add_argument("--manifest", required=True, help="manifest of LGE image-label pairs")
    c.add_argument("--out", required=True, help="output directory")
    _seed_and_root(c)
    c.set_defaults(func=run_scar)

    t = commands.add_parser(
        "translate",
        help="translate slices to the other domain with a fitted translation model (e.g. cyclegan)",
        description="Write the manifest's from-domain slices translated to the to-domain, with their labels.",
    )
    t.add_argument("--model", required=True, help="fitted model directory whose family can translate")
    t.add_argument("--manifest", required=True, help="manifest of slices to translate")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--direction", choices=["forward", "backward"], default="forward", help="source->target or back")
    t.add_argument("--split", default=None, help="translate only this split's rows (e.g. test)")
    _seed_and_root(t)
    t.set_defaults(func=run_translate)

    e = evaluate.add_parser(
        "scar",
        help="scar quantification and detection: n-SD, FWHM and a scoring model's scar maps",
        description="Write scar_metrics.csv: pixel Dice in the given myocardium, slice and case AUROC per method.",
    )
    e.add_argument("--manifest", required=True, help="manifest of LGE slices with scar labels")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument(
        "--model", default=None, help="fitted model that can score scar (default: fit one on the train split)"
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the patient split and the fit (default 0)")
    e.add_argument("--test-fraction", dest="test_fraction", type=float, default=0.5, help="held-out patients")
    e.add_argument("--data-root", dest="data_root", default=None, help="data root of the manifest")
    e.set_defaults(func=run_evaluate_scar)

    v = evaluate.add_parser(
        "translation",
        help="translation model: FD to the target domain and target-U-Net Dice, before vs after translation",
        description="Write DIR/translation_metrics.csv and DIR/report.md from a manifest holding both domains "
        "with a patient-level train/test split.",
    )
    v.add_argument("--model", required=True, help="fitted model directory whose family can translate")
    v.add_argument("--manifest", required=True, help="manifest with both domains and a train/test split")
    v.add_argument("--out", required=True, help="output directory (replaced atomically)")
    v.add_argument("--config", default=None, help="YAML with TranslationEvalConfig keys")
    _seed_and_root(v)
    v.set_defaults(func=run_evaluate_translation)
