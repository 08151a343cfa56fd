"""Can a prompt-tuned model read its trigger at all?  Probes on the image features its encoder hands the prompt learner.

    python benchmarks/trigger_visibility.py MODEL_DIR [MODEL_DIR ...] [--dataset tiny-colorshapes] [--data-root DIR]
        [--images 600] [--seed 0] [--against clean|noise-mode] [--threads 2] [--json rows.json]

A CoCoOp model sees an image only through its frozen image encoder's feature vector: the meta-net turns that
vector into the context.  A backdoor can only be implanted if the triggered images' features differ from the
clean ones in a way a small network can pick up.  For every MODEL_DIR (a folder holding ``bundle/`` and
``trigger.safetensors``, as ``ci-bench attack --out`` and the run store's ``models/`` write them) this takes
``--images`` test images of the dataset, applies the model's saved trigger, and reports:

- SSIM between the reference images (clean, or WaNet's noise mode with ``--against noise-mode``) and triggered ones;
- the mean cosine between each image's reference and triggered features;
- the direction consistency of the feature shift (mean cosine of each image's shift with the mean shift):
  near 1 when the trigger moves every image the same way, which a linear meta-net reads easily;
- the held-out AUROC of a logistic-regression probe and of a one-hidden-layer MLP probe told to separate
  triggered from clean features (trained on one half of the images, scored on the other half).  0.5 means the
  features carry nothing of the trigger that these probes can find.

``--against noise-mode`` compares with WaNet's noise-mode images instead of clean ones (the same warp plus a
random jitter of the grid, which WaNet trains on the true label); it needs warp triggers.

The images come from the dataset's test split of the ``--seed`` draw; the probes are seeded too, so a run
repeats exactly.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import click
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

from ci_attacks.wanet import WarpTrigger, noise_mode_jitter
from ci_core.learning.protocol import MODEL_BUNDLE as BUNDLE
from ci_core.learning.protocol import MODEL_TRIGGER as TRIGGER
from ci_core.cli.common import data_root_option, echo_table, report_errors
from ci_core.errors import ConfigError
from ci_core.files import write_json_atomic
from ci_core.ssim import ssim
from ci_core.models.bundle import load_bundle
from ci_core.plugins import load_trigger, open_dataset
from ci_core.runtime import StderrProgress

@attrs.frozen
class Visibility:
    model: str
    ssim: float
    feature_cosine: float
    shift_consistency: float
    linear_auroc: float
    mlp_auroc: float


def features(model, images: torch.Tensor, batch_size: int = 200) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.image_features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def probe_auroc(reference: np.ndarray, triggered: np.ndarray, probe) -> float:
    """Held-out AUROC of ``probe`` trained to tell triggered (1) from reference (0) on the first half of the images."""
    half = len(reference) // 2
    x_train = np.concatenate([reference[:half], triggered[:half]])
    y_train = np.r_[np.zeros(half), np.ones(half)]
    x_test = np.concatenate([reference[half:], triggered[half:]])
    y_test = np.r_[np.zeros(len(reference) - half), np.ones(len(reference) - half)]
    # Unit-norm features have tiny coordinates; scaling them keeps both probes' default regularisation sensible.
    probe.fit(10 * x_train, y_train)
    scores = probe.predict_proba(10 * x_test)[:, 1]
    return float(roc_auc_score(y_test, scores))


def load_model_dir(model_dir: Path):
    """(model, trigger) of a folder holding ``bundle/`` and ``trigger.safetensors``."""
    for needed in (model_dir / BUNDLE, model_dir / TRIGGER):
        if not needed.exists():
            raise ConfigError(f"{model_dir}: expected {needed.name} in it (the folder `ci-bench attack --out` writes)")
    model, _ = load_bundle(model_dir / BUNDLE)
    return model, load_trigger(model_dir / TRIGGER)


def reference_images(trigger, images: torch.Tensor, against: str, generator: torch.Generator) -> torch.Tensor:
    """What the triggered images are compared with: the clean images, or WaNet's noise mode of them."""
    if against == "clean":
        return images
    if not isinstance(trigger, WarpTrigger):
        raise ConfigError(f"--against noise-mode needs a warp trigger (WaNet's), got a {trigger.kind!r} trigger")
    batch, _, height, width = images.shape
    return trigger.apply(images, jitter=noise_mode_jitter(batch, height, width, generator))


def visibility(model_dir: Path, model, trigger, images: torch.Tensor, against: str, seed: int) -> Visibility:
    triggered = trigger.apply(images).clamp(0, 1)
    reference = reference_images(trigger, images, against, torch.Generator().manual_seed(seed))
    reference_f, triggered_f = features(model, reference), features(model, triggered)
    shift = triggered_f - reference_f
    consistency = torch.nn.functional.cosine_similarity(shift, shift.mean(0, keepdim=True), dim=-1)
    reference_np, triggered_np = reference_f.double().numpy(), triggered_f.double().numpy()
    return Visibility(
        model=str(model_dir),
        ssim=float(ssim(reference, triggered).mean()),
        feature_cosine=float((reference_f * triggered_f).sum(-1).mean()),
        shift_consistency=float(consistency.mean()),
        linear_auroc=probe_auroc(reference_np, triggered_np, LogisticRegression(C=100, max_iter=5000)),
        mlp_auroc=probe_auroc(reference_np, triggered_np,
                              MLPClassifier(hidden_layer_sizes=(256,), max_iter=3000, random_state=seed)),
    )


@click.command()
@click.argument("model_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", default="tiny-colorshapes", show_default=True, help="Dataset whose test images are triggered.")
@data_root_option
@click.option("--images", "n_images", default=600, show_default=True, type=click.IntRange(min=20))
@click.option("--seed", default=0, show_default=True)
@click.option("--against", type=click.Choice(["clean", "noise-mode"]), default="clean", show_default=True,
              help="Probe triggered images against clean ones, or against WaNet's noise-mode ones (warp triggers).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@report_errors
def main(model_dirs, dataset, data_root, n_images, seed, against, threads, json_path):
    torch.set_num_threads(threads)
    progress = StderrProgress()
    data = open_dataset(dataset, data_root)
    rows, images_of = [], {}
    for model_dir in model_dirs:
        model, trigger = load_model_dir(model_dir)
        size = model.backbone.image_size
        if size not in images_of:
            test = data.load("test", image_size=size, seed=seed)
            pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(seed))[:n_images]
            images_of[size] = test.images[pick]
        progress(f"{model_dir}: probing on {len(images_of[size])} {dataset} test images")
        rows.append(visibility(model_dir, model, trigger, images_of[size], against, seed))
    echo_table([{**attrs.asdict(r), "model": Path(r.model).name} for r in rows],
               [("model", "model"), ("ssim", "SSIM"), ("feature_cosine", "feature cos"),
                ("shift_consistency", "shift consistency"), ("linear_auroc", "linear AUROC"),
                ("mlp_auroc", "MLP AUROC")])
    if json_path is not None:
        write_json_atomic(json_path, [attrs.asdict(r) for r in rows])


if __name__ == "__main__":
    main()
