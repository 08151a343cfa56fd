"""A variance prior: how far clean tuned models scatter around the backbone's line, shared with the model scanned.

The calibrated scorer (``ref-outlier``) asks whether one class lies far above the line that fits the model's
per-class costs on the backbone's, and measures "far" by the residual spread of the model's own classes.  With
12-18 classes that spread is a rough estimate (a t on 8-14 degrees of freedom, so Bonferroni over 12 classes asks
t >= 3.4 where a known spread would ask 2.6), and a backdoor widens it itself: the classes its trigger also moves
swell the spread that hides its target (docs/verdicts.md, "A tuned null for the residual spread").

An auditor can know the spread of a *clean* tuned model: tune a few clean prompts on the few-shot images they
hold, with the provider's recipe and seeds of their own, and scan each as the model will be scanned.  Their
residual variances s_j^2 (each on d_j degrees of freedom) are fitted by a scaled inverse chi-square prior
(s0^2, d0) with limma's method of moments (Smyth 2004, "Linear models and empirical Bayes methods for assessing
differential expression in microarray experiments"), and the scorer moderates the model's own leave-one-out
variance with it:

    s~^2 = (d0 s0^2 + d s^2) / (d0 + d),   t~ = e / (s~ sqrt(1 - h))  ~  Student's t on d0 + d df.

A prior belongs to one scan setting: the reference it was fitted against (backbone, template, candidate classes,
pool sizes, scan seed, detector and its config; the pool's images may differ, its kind may not: OOD images, own
images to invert on, own images for both) and the scorer's statistic.  ``PriorBook`` holds one per setting, in a
JSON file (``ci-bench prior`` writes it from the clean models of ``ci-bench run`` stores; ``ci-scan
--variance-prior`` and ``ci-bench report --variance-prior`` read it); a scan whose setting the book does not hold
is an error naming it, never a silent fallback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import attrs
import numpy as np
from scipy import optimize, special

from ci_core.errors import ConfigError, DataError
from ci_core.files import read_json_object, write_json_atomic
from ci_core.json_fields import JsonFields
from ci_core.keys import spec_hash

# Fewer clean models fit the prior's degrees of freedom too loosely: on development three of them let 4 of 102 clean
# models through at alpha 0.05, five or more held 2 of 102 (docs/verdicts.md).
MIN_PRIOR_MODELS = 5
POOL_KINDS = ("ood", "id", "own")  # OOD D and T; own images for D, OOD for T; own images for both
BOOK_KIND, BOOK_VERSION = "variance-prior", 1
HALF_DF_LIMIT = 1e8  # d0 / 2 beyond this is a known variance


def _positive_finite(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value!r}")


def _positive_or_none(instance, attribute, value) -> None:
    if value is not None:
        _positive_finite(instance, attribute, value)


@attrs.frozen(kw_only=True)
class VariancePrior:
    """A scaled inverse chi-square prior of a clean model's residual variance: scale ``variance`` (s0^2) on ``df``
    (d0) degrees of freedom; ``df`` None is a known variance (d0 infinite: the clean models' variances scatter no
    more than their own degrees of freedom explain).  ``models``: how many clean models it was fitted on."""

    variance: float = attrs.field(validator=_positive_finite)
    df: float | None = attrs.field(validator=_positive_or_none)
    models: int = attrs.field(validator=attrs.validators.and_(attrs.validators.instance_of(int),
                                                               attrs.validators.ge(1)))

    def pooled_df(self, df: int) -> float:
        """The degrees of freedom of a variance on ``df`` moderated by this prior (infinite for a known variance)."""
        return math.inf if self.df is None else self.df + df

    def moderate(self, variance: np.ndarray, df: int) -> tuple[np.ndarray, float]:
        """(moderated variances, their degrees of freedom) of residual variances ``variance`` on ``df`` each."""
        variance = np.asarray(variance, dtype=np.float64)
        moderated = (np.full_like(variance, self.variance) if self.df is None
                     else (self.df * self.variance + df * variance) / (self.df + df))
        return moderated, self.pooled_df(df)

    def to_json(self) -> dict:
        return {"variance": self.variance, "df": self.df, "models": self.models}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "VariancePrior":
        fields = JsonFields(data, where, ConfigError)
        try:
            return cls(variance=fields.number("variance"), df=fields.number("df", optional=True),
                       models=fields.integer("models"))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def fit_variance_prior(variances: Sequence[float], df: Sequence[int]) -> VariancePrior:
    """limma's method-of-moments fit of (s0^2, d0) to residual variances ``variances`` on ``df`` degrees of freedom.

    log s^2 of a scaled chi-square has mean log s0^2 + digamma(d/2) - log(d/2) and variance trigamma(d/2) +
    trigamma(d0/2); the sample's excess variance over the trigamma(d/2) term gives d0 (none: d0 = infinity)."""
    s2 = np.asarray(variances, dtype=np.float64)
    d = np.asarray(df, dtype=np.float64)
    if len(s2) < MIN_PRIOR_MODELS:
        raise ConfigError(f"a variance prior needs the scans of at least {MIN_PRIOR_MODELS} clean models, got "
                          f"{len(s2)}")
    if len(d) != len(s2) or np.any(d < 1) or not np.all(np.isfinite(s2)) or np.any(s2 <= 0):
        raise ConfigError("a variance prior is fitted on positive finite residual variances, each with at least one "
                          "degree of freedom")
    e = np.log(s2) - special.digamma(d / 2) + np.log(d / 2)
    excess = float(np.var(e, ddof=1) - np.mean(special.polygamma(1, d / 2)))
    if excess <= float(special.polygamma(1, HALF_DF_LIMIT)):  # no excess a finite d0 could explain
        return VariancePrior(variance=float(math.exp(e.mean())), df=None, models=len(s2))
    half = optimize.brentq(lambda h: special.polygamma(1, h) - excess, 1e-8, HALF_DF_LIMIT)
    return VariancePrior(variance=float(math.exp(e.mean() + special.digamma(half) - math.log(half))), df=2 * half,
                         models=len(s2))


def prior_setting(reference_spec: Mapping[str, Any], pool_kind: str, statistic: Mapping[str, Any]) -> dict:
    """The scan setting a prior belongs to: the reference's spec without its pool's image digest (the images may
    differ, their number not), the pool's kind (POOL_KINDS) and the scorer's statistic (what it compares, whether
    the seen classes have their own intercept)."""
    if pool_kind not in POOL_KINDS:
        raise ValueError(f"pool kind must be one of {', '.join(POOL_KINDS)}, got {pool_kind!r}")
    spec = dict(reference_spec)
    pool = {k: v for k, v in dict(spec.get("pool") or {}).items() if k != "sha256"}
    return {**spec, "pool": pool, "pool_kind": pool_kind, "statistic": dict(statistic)}


def statistic_of(scorer: Any) -> dict:
    """What a prior for ``scorer`` must have been fitted on; a scorer that takes no prior is an error naming it."""
    config = type(scorer.config)
    if not (attrs.has(config) and "variance_prior" in attrs.fields_dict(config)):
        raise ConfigError(f"scorer {scorer.name!r} takes no variance prior")
    return scorer.config.statistic()


def with_prior(scorer: Any, prior: VariancePrior) -> Any:
    """``scorer`` with its residual variance moderated by ``prior``."""
    statistic_of(scorer)  # the same error for a scorer that takes none
    return type(scorer)(attrs.evolve(scorer.config, variance_prior=prior))


def describe_setting(setting: Mapping[str, Any]) -> str:
    """A setting in words, for errors and pages."""
    backbone = setting.get("backbone") or {}
    name = backbone.get("name") if isinstance(backbone, dict) else None
    classes = setting.get("classnames") or []
    pool = setting.get("pool") or {}
    return (f"{len(classes)} classes ({', '.join(map(str, classes[:3]))}{', ...' if len(classes) > 3 else ''}) on "
            f"{name or 'the backbone'}, {setting.get('pool_kind')} pool |D|={pool.get('inversion')} "
            f"|T|={pool.get('holdout')}, seed {setting.get('seed')}, detector {setting.get('detector')}")


@attrs.frozen
class PriorBook:
    """Variance priors by scan setting (``prior_setting``), each with the clean models it was fitted on."""

    entries: Mapping[str, tuple[dict, VariancePrior, tuple[str, ...]]]  # setting hash -> (setting, prior, models)
    source: str = "a variance prior book"

    def lookup(self, setting: Mapping[str, Any]) -> VariancePrior:
        entry = self.entries.get(spec_hash(setting))
        if entry is None:
            held = "; ".join(describe_setting(s) for s, _, _ in self.entries.values()) or "none"
            raise ConfigError(f"{self.source}: holds no variance prior for this scan's setting "
                              f"({describe_setting(setting)}, statistic {dict(setting.get('statistic') or {})}); it "
                              f"holds {len(self.entries)}: {held}. Fit one with ci-bench prior on clean models "
                              "scanned in this setting")
        return entry[1]

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, {"kind": BOOK_KIND, "version": BOOK_VERSION, "priors": [
            {"setting": setting, **prior.to_json(), "model_keys": list(models)}
            for setting, prior, models in self.entries.values()]})

    @classmethod
    def read(cls, path: str | Path) -> "PriorBook":
        data = read_json_object(path, ConfigError, "a variance prior book (ci-bench prior)")
        fields = JsonFields(data, str(path), ConfigError)
        if fields.text("kind") != BOOK_KIND or fields.integer("version") != BOOK_VERSION:
            raise ConfigError(f"{path}: not a variance prior book of version {BOOK_VERSION} (kind "
                              f"{data.get('kind')!r}, version {data.get('version')!r}); write it with ci-bench prior")
        entries = {}
        for i, row in enumerate(fields.rows("priors")):
            where = f"{path}: priors[{i}]"
            item = JsonFields(row, where, ConfigError)
            setting = item.mapping("setting")
            prior = VariancePrior.from_json(row, where)
            keys = item.texts("model_keys", default=[])
            if prior.models != len(keys):
                raise ConfigError(f"{where}: 'models' is {prior.models} but 'model_keys' lists {len(keys)}")
            entries[spec_hash(setting)] = (setting, prior, keys)
        return cls(entries, source=str(path))


def build_book(samples: Mapping[str, tuple[dict, Sequence[tuple[str, float, int]]]]
               ) -> tuple[PriorBook, list[tuple[dict, int]]]:
    """(a book from (setting, [(clean model key, residual variance, its df), ...]) per setting hash, the (setting,
    clean models) left out for having fewer than MIN_PRIOR_MODELS: ``ci-bench prior`` says which)."""
    entries, left_out = {}, []
    for key, (setting, rows) in samples.items():
        if len(rows) < MIN_PRIOR_MODELS:
            left_out.append((setting, len(rows)))
            continue
        prior = fit_variance_prior([v for _, v, _ in rows], [d for _, _, d in rows])
        entries[key] = (setting, prior, tuple(k for k, _, _ in rows))
    if not entries:
        raise DataError(f"no scan setting has the scans of {MIN_PRIOR_MODELS} or more clean models to fit a variance "
                        "prior on")
    return PriorBook(entries), left_out
