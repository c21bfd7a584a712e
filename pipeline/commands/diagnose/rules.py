"""Read a run's history (metrics.jsonl records) and data summary; state what went wrong in plain words.

Each rule looks at the epoch records and returns a `Finding`: a one-sentence statement, the evidence
(epochs and numbers) and remedies. Thresholds are named constants so tests and readers see them.
When no over- or underfitting rule fires, that is stated as a finding too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

# Overfitting: validation loss over the last epochs (mean of up to OVERFIT_TAIL) is this much above its minimum
# (relative and absolute)...
OVERFIT_TAIL = 3
OVERFIT_RISE_RELATIVE = 0.10
OVERFIT_RISE_ABSOLUTE = 0.02
# ...or the final train-minus-validation accuracy gap is at least this large.
OVERFIT_GAP = 0.10
# Underfitting: final training loss above this fraction of the chance loss ln(num_classes)...
UNDERFIT_LOSS_FRACTION = 0.5
# ...or the training loss fell by less than this fraction over the whole run.
UNDERFIT_FLAT_FRACTION = 0.10
# Learning rate too high: a training-loss spike is a rise of this factor over the previous epoch.
SPIKE_FACTOR = 1.5
SPIKE_MIN_RISE_FRACTION = 0.1  # ...and by at least this fraction of the chance loss: noise near zero is no spike
# ...or a training or validation loss this many times the chance loss: steps so large they threw the weights far off.
BLOWUP_FACTOR = 10.0
# The learning rate suggested then: the run's own divided by this.
LR_CUT = 10.0
# Learning rate too low: loss falls every epoch and still by this fraction per epoch at the end, yet stays high.
SLOW_DECREASE_PER_EPOCH = 0.02
SLOW_LOSS_FRACTION = 0.25
# Gradients: exploding above this norm (or this factor over the run's median); vanishing below this norm.
EXPLODING_NORM = 1e3
EXPLODING_FACTOR = 20.0
VANISHING_NORM = 1e-5
VANISHING_GROUP_RATIO = 1e-3
# Class imbalance: largest/smallest training class count. Unequal treatment: per-class recall spread.
IMBALANCE_RATIO = 3.0
RECALL_SPREAD = 0.30


@dataclass
class Finding:
    """One diagnosis: a kind (machine-readable), a plain sentence, its evidence and what to do."""

    kind: str
    """overfitting, underfitting, lr_too_high, lr_too_low, exploding_gradients, vanishing_gradients,
    class_imbalance (the training classes' counts differ), unequal_classes (balanced counts, yet some classes are
    recognised far worse than others), healthy."""
    summary: str
    evidence: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    epoch: Optional[int] = None
    """The epoch the finding points at (e.g. where validation loss was lowest), if any."""

    def to_dict(self) -> dict:
        return asdict(self)


def _num(value) -> float:
    """A metric value as float; metrics.jsonl stores non-finite floats as strings ('nan', 'inf')."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _series(history: Sequence[dict], key: str) -> list[float]:
    return [_num(r.get(key)) for r in history if key in r]


def _epochs(history: Sequence[dict], key: str) -> list[int]:
    return [int(r.get("epoch", i + 1)) for i, r in enumerate(history) if key in r]


def chance_loss(num_classes: int) -> float:
    """Cross-entropy of a uniform guess: what an untrained classifier scores."""
    return math.log(max(num_classes, 2))


@dataclass(frozen=True)
class Chance:
    """The loss of an untrained model and how to say it (multilabel and regression: `task_chance`); the rules take it
    where they take a number of classes (whose chance is ln(classes))."""

    value: float
    text: str


def _chance(num_classes: "int | Chance") -> Chance:
    if isinstance(num_classes, Chance):
        return num_classes
    value = chance_loss(num_classes)
    return Chance(value, f"ln({num_classes}) = {value:.4f}")


# ---- rules -----------------------------------------------------------------------------------------
def overfitting(history: Sequence[dict]) -> Optional[Finding]:
    val, train = _series(history, "val/loss"), _series(history, "train/loss")
    epochs = _epochs(history, "val/loss")
    if len(val) < 3 or not all(math.isfinite(v) for v in val):
        return None
    best = min(range(len(val)), key=val.__getitem__)
    tail = val[max(best + 1, len(val) - OVERFIT_TAIL):]  # a single noisy last epoch is not a trend
    final = sum(tail) / len(tail) if tail else val[best]
    rise = final - val[best]
    rose = best < len(val) - 2 and rise >= OVERFIT_RISE_ABSOLUTE and rise >= OVERFIT_RISE_RELATIVE * val[best]
    span = f"epoch {epochs[-1]}" if len(tail) == 1 else f"epochs {epochs[-len(tail)]}-{epochs[-1]}"
    train_fell = len(train) == len(val) and train[-1] < train[best]
    gaps = [_num(r["train/accuracy"]) - _num(r["val/accuracy"]) for r in history
            if "train/accuracy" in r and "val/accuracy" in r]
    gap = gaps[-1] if len(gaps) == len(history) else None
    if not ((rose and train_fell) or (gap is not None and gap >= OVERFIT_GAP)):
        return None
    gap_since = None  # first epoch of the final stretch in which the gap stayed >= OVERFIT_GAP
    if gap is not None and gap >= OVERFIT_GAP:
        start = len(gaps) - 1
        while start > 0 and gaps[start - 1] >= OVERFIT_GAP:
            start -= 1
        gap_since = int(history[start].get("epoch", start + 1))
    evidence = []
    if rose and train_fell:
        evidence.append(f"validation loss was lowest at epoch {epochs[best]} ({val[best]:.4f}) and averaged "
                        f"{final:.4f} over {span} (+{100 * rise / val[best]:.0f}%), while training loss "
                        f"fell from {train[best]:.4f} to {train[-1]:.4f}")
    if gap is not None:
        evidence.append(f"final accuracy: train {_num(history[-1]['train/accuracy']):.3f}, "
                        f"validation {_num(history[-1]['val/accuracy']):.3f} (gap {100 * gap:.1f} points)")
    if gap_since is not None:
        evidence.append(f"training accuracy has exceeded validation accuracy by at least {100 * OVERFIT_GAP:.0f} "
                        f"points since epoch {gap_since}")
    # The epoch named: where validation loss turned, else where the accuracy gap opened for good.
    epoch = epochs[best] if rose and train_fell else gap_since
    where = f" from epoch {epoch} on" if epoch is not None else ""
    how = ("it keeps fitting the training data while validation gets worse" if rose and train_fell
           else "it fits the training data far better than the validation data")
    return Finding("overfitting", f"The model overfits{where}: {how}.", evidence,
                   ["stop early at the best epoch (train.early_stopping_patience, monitor val/loss)",
                    "more data or stronger augmentation (data.augment.*)", "dropout (model.dropout)",
                    "weight decay (optim.weight_decay)", "a smaller model (model.channels)"],
                   epoch=epoch)


def underfitting(history: Sequence[dict], num_classes: int) -> Optional[Finding]:
    train = _series(history, "train/loss")
    if len(train) < 2 or not all(math.isfinite(v) for v in train):
        return None
    chance = _chance(num_classes).value
    high = train[-1] > UNDERFIT_LOSS_FRACTION * chance
    drop = (train[0] - train[-1]) / train[0] if train[0] > 0 else 0.0
    flat = drop < UNDERFIT_FLAT_FRACTION and train[-1] > SLOW_LOSS_FRACTION * chance
    if not (high or flat):
        return None
    epochs = _epochs(history, "train/loss")
    evidence = [f"final training loss {train[-1]:.4f} at epoch {epochs[-1]} is {100 * train[-1] / chance:.0f}% of "
                f"the chance level {_chance(num_classes).text}",
                f"training loss changed by {100 * drop:.1f}% from epoch {epochs[0]} ({train[0]:.4f}) to epoch "
                f"{epochs[-1]}"]
    state = "stays high" if high else "hardly moves"
    return Finding("underfitting", f"The model underfits: its training loss {state}.", evidence,
                   ["train longer (train.epochs)", "a larger model (model.channels, model.residual)",
                    "less regularisation (model.dropout, optim.weight_decay, augmentation)",
                    "check the learning rate (optim.lr) and that labels match images"])


def lr_too_high(history: Sequence[dict], num_classes: int, lr: Optional[float] = None) -> Optional[Finding]:
    """Divergence, non-finite losses, spikes, or a loss far above chance (`BLOWUP_FACTOR`): the learning rate.
    With the run's `lr` known, the first remedy names the value to try (`lr / LR_CUT`)."""
    train = _series(history, "train/loss")
    epochs = _epochs(history, "train/loss")
    chance = _chance(num_classes).value
    evidence = []
    nonfinite = [e for e, v in zip(epochs, train) if not math.isfinite(v)]
    nonfinite += [int(r.get("epoch", 0)) for r in history if not math.isfinite(_num(r.get("val/loss", 0.0)))
                  and int(r.get("epoch", 0)) not in nonfinite]
    if nonfinite:
        evidence.append(f"loss is NaN or infinite at epoch(s) {', '.join(map(str, sorted(set(nonfinite))))}")
    steps = [(int(r.get("epoch", 0)), _num(r["nonfinite_step_fraction"])) for r in history
             if "nonfinite_step_fraction" in r and _num(r["nonfinite_step_fraction"]) > 0]
    if steps:
        evidence.append("non-finite gradient steps: " + ", ".join(f"epoch {e}: {100 * f:.1f}%" for e, f in steps))
    blowups = [(int(r.get("epoch", 0)), name, _num(r[key])) for r in history
               for key, name in (("train/loss", "training"), ("val/loss", "validation"))
               if key in r and math.isfinite(_num(r[key])) and _num(r[key]) > BLOWUP_FACTOR * chance]
    if blowups:
        epoch, name, value = max(blowups, key=lambda b: b[2])
        evidence.append(f"{name} loss reached {value:.4g} at epoch {epoch}, {value / chance:.0f} times the chance "
                        f"level {_chance(num_classes).text}: steps too large threw the weights far off")
    spikes = [(epochs[i], train[i - 1], train[i]) for i in range(1, len(train))
              if math.isfinite(train[i]) and math.isfinite(train[i - 1]) and train[i] > SPIKE_FACTOR * train[i - 1]
              and train[i] - train[i - 1] >= SPIKE_MIN_RISE_FRACTION * chance]
    if spikes:
        evidence.append("training loss spikes: " + ", ".join(f"epoch {e}: {a:.4f} -> {b:.4f}" for e, a, b in spikes))
    finite = [v for v in train if math.isfinite(v)]
    diverged = len(finite) >= 2 and finite[-1] > finite[0]
    if diverged:
        evidence.append(f"training loss ended higher ({finite[-1]:.4f}) than it started ({finite[0]:.4f})")
    if not evidence:
        return None
    first = min([*nonfinite, *(e for e, _ in steps), *(e for e, _, _ in spikes), *(e for e, _, _ in blowups)],
                default=None)
    lower = (f"lower the learning rate: try optim.lr={lr / LR_CUT:.3g} (a tenth of {lr:.3g})" if lr
             else "lower optim.lr (e.g. by 3-10x)")
    return Finding("lr_too_high", "The learning rate looks too high: training diverges or is unstable.", evidence,
                   [lower, "add or lengthen warmup (scheduler.warmup_epochs)",
                    "clip gradients (train.max_grad_norm, e.g. 1.0)", "use fp32 or bf16 if fp16 overflows"],
                   epoch=first)


def lr_too_low(history: Sequence[dict], num_classes: int) -> Optional[Finding]:
    train = _series(history, "train/loss")
    if len(train) < 4 or not all(math.isfinite(v) for v in train):
        return None
    monotone = all(b < a for a, b in zip(train, train[1:]))
    tail = train[-3:]
    per_epoch = (tail[0] - tail[-1]) / (len(tail) - 1) / tail[0]
    chance = _chance(num_classes).value
    if not (monotone and per_epoch >= SLOW_DECREASE_PER_EPOCH and train[-1] > SLOW_LOSS_FRACTION * chance):
        return None
    epochs = _epochs(history, "train/loss")
    return Finding("lr_too_low", "The learning rate looks too low: the loss falls steadily but slowly and had "
                                 "not levelled off when training ended.",
                   [f"training loss fell every epoch, from {train[0]:.4f} to {train[-1]:.4f} over {len(train)} "
                    f"epochs", f"over the last epochs it still fell {100 * per_epoch:.1f}% per epoch "
                    f"(to epoch {epochs[-1]})"],
                   ["raise optim.lr (e.g. by 3x)", "train longer (train.epochs)",
                    "try a learning-rate range test"])


def gradients(history: Sequence[dict], num_classes: int) -> list[Finding]:
    norms = _series(history, "grad_norm/global")
    maxima = _series(history, "grad_norm/global_max")
    epochs = _epochs(history, "grad_norm/global")
    if not norms:
        return []
    findings = []
    finite = sorted(v for v in norms if math.isfinite(v))
    median = finite[len(finite) // 2] if finite else math.nan
    peaks = maxima if len(maxima) == len(norms) else norms
    exploding = [(e, m) for e, m in zip(epochs, peaks)
                 if not math.isfinite(m) or m > EXPLODING_NORM or (median > 0 and m > EXPLODING_FACTOR * median)]
    if exploding:
        findings.append(Finding(
            "exploding_gradients", "Gradients explode: their norm jumps far above its usual size.",
            [f"median gradient norm {median:.4g}; " + ", ".join(f"epoch {e}: max {m:.4g}" for e, m in exploding)],
            ["clip gradients (train.max_grad_norm)", "lower optim.lr", "add normalisation layers or warmup"],
            epoch=exploding[0][0]))
    train = _series(history, "train/loss")
    chance = _chance(num_classes).value
    not_converged = bool(train) and math.isfinite(train[-1]) and train[-1] > SLOW_LOSS_FRACTION * chance
    evidence = []
    if finite and norms[-1] < VANISHING_NORM and not_converged:
        evidence.append(f"global gradient norm is {norms[-1]:.3g} at epoch {epochs[-1]} while the training loss "
                        f"is still {train[-1]:.4f}")
    groups = [k for k in history[-1] if k.startswith("grad_norm/") and k not in ("grad_norm/global",
                                                                                    "grad_norm/global_max")]
    if len(groups) >= 2:
        values = {k: _num(history[-1][k]) for k in groups}
        largest = max(values.values())
        small = [k for k, v in values.items() if largest > 0 and v < VANISHING_GROUP_RATIO * largest]
        if small:
            evidence.append("layer groups with gradients below 1/1000 of the largest (" + f"{largest:.3g}): "
                            + ", ".join(f"{k.split('/', 1)[1]} {values[k]:.3g}" for k in small))
    if evidence:
        findings.append(Finding("vanishing_gradients", "Gradients vanish: some layers hardly receive a learning "
                                                       "signal.", evidence,
                                ["use normalisation (BatchNorm) and residual connections (model.residual)",
                                 "ReLU-family activations and a proper initialisation", "raise optim.lr"]))
    return findings


def class_imbalance(class_counts: Optional[dict], per_class: Optional[Sequence[dict]]) -> Optional[Finding]:
    """Unequal training counts (`IMBALANCE_RATIO`) are imbalance, with class weights among the remedies. A wide
    spread of test recall on balanced counts is not: then some classes are simply harder (`unequal_classes`),
    and weighting the loss by counts would change nothing."""
    counted = None
    if class_counts:
        counts = {k: int(v) for k, v in class_counts.items()}
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        ratio = counts[big] / max(counts[small], 1)
        if ratio >= IMBALANCE_RATIO:
            counted = (f"training split: class '{big}' has {counts[big]} images, class '{small}' only "
                       f"{counts[small]} ({ratio:.1f}:1)")
    spread = None
    if per_class:
        recalls = {str(c["class"]): float(c["recall"]) for c in per_class if c.get("support", 1) > 0}
        if recalls:
            best, worst = max(recalls, key=recalls.get), min(recalls, key=recalls.get)
            if recalls[best] - recalls[worst] >= RECALL_SPREAD:
                spread = (f"test recall ranges from {recalls[worst]:.2f} (class '{worst}') to "
                          f"{recalls[best]:.2f} (class '{best}')")
    if counted:
        return Finding("class_imbalance", "Classes are imbalanced: some have far fewer training images.",
                       [e for e in (counted, spread) if e],
                       ["class weights in the loss (optim.class_weights)",
                        "oversample rare classes (imbalance.balanced_sampling) or collect more of them",
                        "report macro-averaged metrics (f1_macro) rather than accuracy"])
    if spread:
        balanced = " although the training classes are balanced" if class_counts else ""
        return Finding("unequal_classes", f"Some classes are recognised far worse than others{balanced}.", [spread],
                       ["look at which classes they are confused with (pipeline evaluate RUN_DIR: the confusion "
                        "matrix)", "more or cleaner images of the weak classes", "a larger model or longer training",
                        "report macro-averaged metrics (f1_macro) rather than accuracy"])
    return None


def healthy(history: Sequence[dict]) -> Finding:
    last = history[-1]
    evidence = [f"after {len(history)} epochs: train loss {_num(last.get('train/loss')):.4f}, "
                f"validation loss {_num(last.get('val/loss')):.4f}"]
    if "train/accuracy" in last and "val/accuracy" in last:
        gap = _num(last["train/accuracy"]) - _num(last["val/accuracy"])
        evidence.append(f"train accuracy {_num(last['train/accuracy']):.3f}, validation accuracy "
                        f"{_num(last['val/accuracy']):.3f} (gap {100 * gap:+.1f} points)")
    val = _series(history, "val/loss")
    if val:
        best = min(range(len(val)), key=val.__getitem__)
        evidence.append(f"validation loss was lowest at epoch {_epochs(history, 'val/loss')[best]} "
                        f"({val[best]:.4f}) and ended at {val[-1]:.4f}")
    return Finding("healthy", "No sign of over- or underfitting: training and validation loss fell together and "
                              "stayed close.", evidence, [])


def diagnose(history: Sequence[dict], num_classes: int, class_counts: Optional[dict] = None,
             per_class: Optional[Sequence[dict]] = None, lr: Optional[float] = None,
             mixed_targets: bool = False) -> list[Finding]:
    """All findings for a run, most serious first; a `healthy` finding when it neither over- nor underfits.
    `lr` (the configured `optim.lr`) lets a too-high learning rate finding name the value to try. With
    `mixed_targets` (MixUp/CutMix), the training loss and accuracy are measured against blended labels, so they
    stay far from the validation ones by design: no underfitting from the training loss, no accuracy gap."""
    if not history:
        raise ValueError("the run has no epoch records in metrics.jsonl; train at least one epoch first")
    findings: list[Finding] = []
    high = lr_too_high(history, num_classes, lr)
    if high:
        findings.append(high)
    findings += gradients(history, num_classes)
    if mixed_targets:
        plain = [{k: v for k, v in r.items() if k != "train/accuracy"} for r in history]
        fit = [f for f in (overfitting(plain),) if f]
    else:
        fit = [f for f in (overfitting(history), underfitting(history, num_classes)) if f]
    findings += fit
    low = lr_too_low(history, num_classes)
    if low and not high:
        findings.append(low)
    imbalance = class_imbalance(class_counts, per_class)
    if imbalance:
        findings.append(imbalance)
    if not fit and not high:
        findings.append(healthy(history))
    return findings
