"""Training psi, rho and the baselines' transforms on cached embeddings (seconds to minutes).

The backbones stay frozen: every transform here learns from pairs of embeddings of the
same training images, (phi_old(x), phi_new(x), y). Objectives:
  - "rqt" (eq. 9), "cl" (eq. 10), "mcl" (eq. 11): psi: new -> old;
  - "mcl" with rho=True (eq. 12-13): psi and rho: new -> new, jointly;
  - "fct": FCT's h: old -> new by l2 regression (no side-information);
  - "bict": BiCT's forward upgrade h': old -> a space classified by a cosine classifier of
    all classes (the classifier is kept: BiCT's new backbone trains against it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rmlib import RmlibError
from rmlib.config import config_key, default_device, runs_root
from rmlib.data.sampling import pk_batches
from rmlib.losses import cl_loss, fct_regression_loss, mcl_loss, rqt_loss
from rmlib.models import CosineClassifier, EmbeddingTransform
from rmlib.outputs import atomic_write
from rmlib.train import optimisation_step

OBJECTIVES = ("rqt", "cl", "mcl", "fct", "bict")
TAU_GRID = (0.05, 0.1, 0.2, 1.0)  # candidates for tau; 1.0 is the paper's value


@dataclass(frozen=True)
class TransformConfig:
    objective: str = "mcl"
    rho: bool = False
    tau: float = 0.1
    hidden: int = 512
    layers: int = 2  # hidden layers of psi / rho
    epochs: int = 20
    classes_per_batch: int = 32  # P x K batches: P classes, K items each
    per_class: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    mine: bool = True
    seed: int = 0
    num_classes: int = 0  # for "bict"
    sources: tuple[str, ...] = field(default=())  # what it trains on (part of the cache key)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise RmlibError(f"unknown objective {self.objective!r}; use one of {OBJECTIVES}")
        if self.rho and self.objective != "mcl":
            raise RmlibError("rho is trained with MCL (eq. 12-13); use objective 'mcl'")

    def key(self) -> str:
        return config_key(self, keyed_only_when_set=("layers",))  # added later

    @property
    def name(self) -> str:
        return self.objective + ("-rho" if self.rho else "")


@dataclass
class Transforms:
    """psi (new -> old; for "fct"/"bict": old -> new), optional rho, optional classifier."""

    config: TransformConfig
    psi: EmbeddingTransform
    rho: EmbeddingTransform | None = None
    classifier: CosineClassifier | None = None
    history: list = field(default_factory=list)

    @torch.no_grad()
    def _apply(self, module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
        module.eval()
        out = [module(torch.as_tensor(x[i:i + 8192]).float()) for i in range(0, len(x), 8192)]
        return torch.cat(out).numpy()

    def new_side(self, new: np.ndarray) -> np.ndarray:
        """The new system's embedding: rho(phi_new) with rho, else phi_new itself."""
        return self._apply(self.rho, new) if self.rho is not None else np.asarray(new, np.float32)

    def reverse(self, new: np.ndarray) -> np.ndarray:
        """The backward-compatible query: psi(rho(phi_new)) (or psi(phi_new) without rho)."""
        return self._apply(self.psi, self.new_side(new))

    def forward(self, old: np.ndarray) -> np.ndarray:
        """FCT / BiCT: upgrade old gallery embeddings, h(phi_old)."""
        return self._apply(self.psi, old)

    def state(self) -> dict:
        return {"config": json.dumps(asdict(self.config), default=list),
                "psi": self.psi.state_dict(),
                "psi_dims": [self.psi.d_in, self.psi.d_out, self.psi.hidden],
                "rho": self.rho.state_dict() if self.rho is not None else {},
                "classifier": self.classifier.state_dict() if self.classifier is not None else {},
                "history": self.history}

    @classmethod
    def from_state(cls, state: dict) -> Transforms:
        raw = json.loads(state["config"])
        config = TransformConfig(**{**raw, "sources": tuple(raw["sources"])})
        d_in, d_out, hidden = state["psi_dims"]
        psi = EmbeddingTransform(d_in, d_out, hidden, layers=config.layers)
        psi.load_state_dict(state["psi"])
        rho = classifier = None
        if state["rho"]:
            d = d_in
            rho = EmbeddingTransform(d, d, hidden, residual=True, layers=config.layers)
            rho.load_state_dict(state["rho"])
        if state["classifier"]:
            classifier = CosineClassifier(d_out, config.num_classes)
            classifier.load_state_dict(state["classifier"])
        return cls(config, psi.eval(), rho.eval() if rho else None, classifier, state["history"])


def _loss(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    c = t.config
    if c.objective == "fct":
        return fct_regression_loss(t.psi(o), n)
    if c.objective == "bict":
        return F.cross_entropy(t.classifier(t.psi(o)), y, label_smoothing=0.1)
    new = t.rho(n) if t.rho is not None else n
    rev = t.psi(new)
    if c.objective == "rqt":
        return rqt_loss(rev, o)
    if c.objective == "cl":
        return cl_loss(rev, o, y, c.tau, c.mine)
    return mcl_loss(rev, o, new, y, c.tau, c.mine)


def steps_per_epoch(config: TransformConfig, labels: np.ndarray) -> int:
    """How many P x K batches `pk_batches` makes of `labels` in one epoch."""
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    groups = sum(math.ceil(int(n) / config.per_class) for n in counts)
    return math.ceil(groups / config.classes_per_batch)


def fit_transforms(config: TransformConfig, old: np.ndarray, new: np.ndarray,
                   labels: np.ndarray, progress: bool = True,
                   device: torch.device | None = None) -> Transforms:
    """Train the transforms of `config` on paired embeddings of the same labelled items
    (on the GPU when there is one); the returned modules live on the CPU."""
    device = device or default_device()
    torch.manual_seed(config.seed)
    o_all = torch.as_tensor(np.asarray(old, np.float32)).to(device)
    n_all = torch.as_tensor(np.asarray(new, np.float32)).to(device)
    y_all = torch.as_tensor(np.asarray(labels, np.int64))  # on the CPU: batches are drawn here
    y_dev = y_all.to(device)
    d_old, d_new = o_all.shape[1], n_all.shape[1]
    if config.objective in ("fct", "bict"):
        out = d_new if config.objective == "fct" else d_old
        psi = EmbeddingTransform(d_old, out, config.hidden, layers=config.layers)
    else:
        psi = EmbeddingTransform(d_new, d_old, config.hidden, layers=config.layers)
    rho = (EmbeddingTransform(d_new, d_new, config.hidden, residual=True, layers=config.layers)
           if config.rho else None)
    classifier = None
    if config.objective == "bict":
        classifier = CosineClassifier(d_old, config.num_classes)
    for module in (psi, rho, classifier):
        if module is not None:
            module.to(device)
    t = Transforms(config, psi, rho, classifier)
    params = [p for m in (psi, rho, classifier) if m is not None for p in m.parameters()]
    # fused: one kernel for all parameters instead of a dozen per tensor (15% of a step here)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=True)
    gen = torch.Generator().manual_seed(config.seed)
    total = steps_per_epoch(config, labels) * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total,
                                                    pct_start=0.1)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"fit {config.name}", disable=not progress, leave=False,
               mininterval=1.0)
    for module in (psi, rho, classifier):
        if module is not None:
            module.train()
    for epoch in range(config.epochs):
        t0, total_loss, seen = time.time(), 0.0, 0
        for idx in pk_batches(y_all, config.classes_per_batch, config.per_class, gen):
            if len(idx) < 2:
                continue
            idx = idx.to(device)
            loss = _loss(t, o_all[idx], n_all[idx], y_dev[idx])
            optimisation_step(loss, optimizer, scheduler, f"{config.name} training diverged; "
                              "raise tau or lower the learning rate")
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            bar.update(1)
        t.history.append({"epoch": epoch + 1, "loss": total_loss / max(seen, 1),
                          "seconds": time.time() - t0})
        bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}")
    bar.close()
    for module in (psi, rho, classifier):
        if module is not None:
            module.cpu().eval()
    return t


def cached_transforms(config: TransformConfig, old: np.ndarray, new: np.ndarray,
                      labels: np.ndarray, dataset: str, profile: str,
                      progress: bool = True) -> Transforms:
    """fit_transforms, cached under runs/<dataset>/<profile>/transform-<name>-<hash>/."""
    path = runs_root() / dataset / profile / f"transform-{config.name}-{config.key()}" / "t.pt"
    if path.exists():
        return Transforms.from_state(torch.load(path, weights_only=True))
    t = fit_transforms(config, old, new, labels, progress)
    save_transforms(t, path)
    return t


def save_transforms(t: Transforms, path: Path | str) -> None:
    atomic_write(path, lambda tmp: torch.save(t.state(), tmp))
