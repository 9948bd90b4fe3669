"""Training psi, rho and the baselines' transforms on cached embeddings (seconds to minutes).

The backbones stay frozen: every transform here learns from pairs of embeddings of the
same training images, (phi_old(x), phi_new(x), y). Each objective is one registered
`TransformObjective` (`OBJECTIVES`): its loss and what it builds.
  - "rqt" (eq. 9), "cl" (eq. 10), "mcl" (eq. 11): psi: new -> old;
  - "mcl" with rho=True (eq. 12-13): psi and rho: new -> new, jointly;
  - "fct": FCT's h: old -> new by l2 regression (no side-information);
  - "bict-forward" (BiCT's second step): h: old -> the backward-compatible new model's
    space, by regression onto its embeddings and its frozen classifier's cross-entropy;
    "bict-forward-cls": the classifier term alone ("fct" towards that model: regression);
  - "fct-mlfct": FCT's h as apple/ml-fct builds it (its MLP, MSE, learning rate, weight
    decay, epochs, batch size; rmlib's optimiser and schedule);
  - "bict": the upgrade-first variant's h': old -> a space classified by a cosine
    classifier of all classes (the classifier is kept: that variant's new backbone trains
    against it);
  - "procrustes", "affine": psi: new -> old in closed form (`rmlib.engine.closed_form`):
    solved in one step, not trained.
A new objective is one loss function (or solver) and one
`register_objective(TransformObjective(...))`.

Explained in the book: book/rqt, book/mcl, book/rho, book/baselines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rmlib import RmlibError
from rmlib.config import default_device
from rmlib.data.sampling import pk_batch_count, pk_batches, pk_batches_vectorised
from rmlib.engine import closed_form
from rmlib.engine.loop import Optimisation, train_epochs
from rmlib.engine.runs import config_key
from rmlib.losses import cl_loss, mcl_loss, mean_distance_loss
from rmlib.models import CosineClassifier, EmbeddingTransform, LinearMap, MlFctTransform
from rmlib.outputs import cached, save_torch
from rmlib.specs import Registry


@dataclass(frozen=True)
class TransformObjective:
    """One way to train the transforms: its loss of a batch (t, old, new, labels) and what
    it builds. `forward`: it learns a forward map h of old embeddings (FCT's and BiCT's),
    else the reverse query transform psi of new ones; `output`: the space the map maps
    into; `takes_tau`: the loss reads the
    temperature (chosen on validation); `classifier`: a cosine classifier of all classes is
    trained with it; `target_classifier`: the loss reads the target model's classifier,
    frozen (given to `fit_transforms`); `rho`: it may train the new embedding rho jointly;
    `build(d_in, d_out, config)`: the map's module (default `EmbeddingTransform`);
    `fixed`: the TransformConfig fields it sets itself (its own recipe), over the settings
    chosen for RM; `solve(module, old, new)`: a closed-form objective's solver, which sets
    the map's weights from the paired embeddings in one step (then it has no `loss`)."""

    name: str
    loss: Callable[[Transforms, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None
    forward: bool = False
    output: str = "old"
    takes_tau: bool = False
    classifier: bool = False
    target_classifier: bool = False
    rho: bool = False
    build: Callable[[int, int, TransformConfig], torch.nn.Module] | None = None
    fixed: Mapping[str, object] = field(default_factory=dict)
    solve: Callable[[torch.nn.Module, np.ndarray, np.ndarray], None] | None = None


OBJECTIVES = Registry("objective", " (or register_objective a new one)")


def register_objective(objective: TransformObjective) -> TransformObjective:
    """Add `objective` to `OBJECTIVES` (a name is registered once)."""
    if (objective.loss is None) == (objective.solve is None):
        raise RmlibError(f"objective {objective.name!r}: give a loss (trained) or a solve "
                         "(closed form), one of the two")
    if objective.output not in ("old", "new"):
        raise RmlibError(f"objective {objective.name!r}: output is 'old' or 'new', not "
                         f"{objective.output!r}")
    return OBJECTIVES.register(objective)


def objective_of(name: str) -> TransformObjective:
    """The registered objective `name`; an unknown one is an error, never a fallback."""
    return OBJECTIVES.spec(name)


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
    num_classes: int = 0  # for a classifier (its own, or the target model's)
    sources: tuple[str, ...] = field(default=())  # what it trains on (part of the cache key)

    def __post_init__(self) -> None:
        spec = objective_of(self.objective)  # an unknown name fails here, at once
        if self.rho and not spec.rho:
            able = [o.name for o in OBJECTIVES.values() if o.rho]
            raise RmlibError(f"rho is trained with {', '.join(able)} (eq. 12-13), not with "
                             f"{self.objective!r}")

    def key(self) -> str:
        return config_key(self)

    @property
    def name(self) -> str:
        return self.objective + ("-rho" if self.rho else "")


@dataclass
class Transforms:
    """The learned map, in the notation of the paper it comes from: psi (new -> old, the
    reverse query transform) or, for a forward objective ("fct", "bict"), h (old -> new
    or upgraded); with the optional rho and classifier."""

    config: TransformConfig
    psi: EmbeddingTransform | None = None
    h: torch.nn.Module | None = None
    rho: EmbeddingTransform | None = None
    classifier: CosineClassifier | None = None
    history: list = field(default_factory=list)

    def _learned(self, name: str) -> EmbeddingTransform:
        module = getattr(self, name)
        if module is None:
            raise RmlibError(f"{self.config.objective!r} transforms learn {self._map_name}, "
                             f"not {name}: use {'forward' if name == 'psi' else 'reverse'}()")
        return module

    @property
    def _map_name(self) -> str:
        return "h" if objective_of(self.config.objective).forward else "psi"

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
        return self._apply(self._learned("psi"), self.new_side(new))

    def reverse_new_side(self, new_side: np.ndarray) -> np.ndarray:
        """psi alone, on embeddings already in the new system's space (rho(phi_new)): a later
        model's query, mapped into this new space by its own psi, goes on to the old space."""
        return self._apply(self._learned("psi"), new_side)

    def forward(self, old: np.ndarray) -> np.ndarray:
        """FCT / BiCT: upgrade old gallery embeddings, h(phi_old)."""
        return self._apply(self._learned("h"), old)

    def loss(self, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch, by the registered objective of the config."""
        return objective_of(self.config.objective).loss(self, old, new, labels)

    def modules(self) -> list[torch.nn.Module]:
        """psi or h, and rho and the classifier where there are."""
        return [m for m in (self.psi, self.h, self.rho, self.classifier) if m is not None]

    def state(self) -> dict:
        """What a cache file holds: the map under its own name ("psi" or "h", with
        "<name>_dims"), rho, the classifier, the config and the training history."""
        name = self._map_name
        learned = getattr(self, name)
        return {"config": json.dumps(asdict(self.config), default=list),
                name: learned.state_dict(),
                f"{name}_dims": [learned.d_in, learned.d_out, learned.hidden],
                "rho": self.rho.state_dict() if self.rho is not None else {},
                "classifier": self.classifier.state_dict() if self.classifier is not None else {},
                "history": self.history}

    @classmethod
    def from_state(cls, state: dict) -> Transforms:
        raw = json.loads(state["config"])
        config = TransformConfig(**{**raw, "sources": tuple(raw["sources"])})
        spec = objective_of(config.objective)
        # h of files written before it had its own name was saved as "psi"
        name = "h" if spec.forward and "h" in state else "psi"
        d_in, d_out, hidden = state[f"{name}_dims"]
        if spec.forward:  # h: old -> old or new
            d_old, d_new = d_in, (d_out if spec.output == "new" else d_in)
        else:  # psi: new -> old
            d_old, d_new = d_out, d_in
        with torch.random.fork_rng():  # loading leaves the global random state alone
            t = build_transforms(replace(config, hidden=hidden), d_old, d_new)
        t.config, t.history = config, state["history"]
        for module, key in ((getattr(t, t._map_name), name), (t.rho, "rho"),
                            (t.classifier, "classifier")):
            if module is not None:
                module.load_state_dict(state[key])
                module.eval()
        return t


def rqt_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
    """eq. 9: psi(phi_new) regressed onto phi_old."""
    return mean_distance_loss(t.psi(n), o)


def cl_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                 ) -> torch.Tensor:
    """eq. 10: psi(phi_new) contrasted against the old space's items."""
    return cl_loss(t.psi(n), o, y, t.config.tau, t.config.mine)


def mcl_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
    """eq. 11, and with rho eq. 12-13: the backward and the new system trained to share
    one metric."""
    new = t.rho(n) if t.rho is not None else n  # rho_new(q), or phi_new(q) without rho
    rev = t.psi(new)  # rho_rev(q) = psi(rho_new(q))
    return mcl_loss(rev, o, new, y, t.config.tau, t.config.mine)


def fct_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                  ) -> torch.Tensor:
    """FCT's h: old -> new by l2 regression (eq-fct in the baselines chapter)."""
    return mean_distance_loss(t.h(o), n)


def bict_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                   ) -> torch.Tensor:
    """BiCT's forward upgrade h': old -> a space that a cosine classifier of all
    classes reads."""
    return F.cross_entropy(t.classifier(t.h(o)), y, label_smoothing=0.1)


def bict_forward_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                           ) -> torch.Tensor:
    """BiCT's forward-compatible step: h(phi_old) regressed onto the backward-compatible
    new model's embedding of the same image, and classified by that model's (frozen)
    classifier (eq-bict-forward in the baselines chapter)."""
    up = t.h(o)
    return mean_distance_loss(up, n) + F.cross_entropy(t.classifier(up), y)


def bict_forward_cls_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor,
                               y: torch.Tensor) -> torch.Tensor:
    """BiCT's forward step with the classifier term alone: h(phi_old) need only fall in
    the right class region of the new model's space, not where that model puts the image."""
    return F.cross_entropy(t.classifier(t.h(o)), y)


def ml_fct_objective(t: Transforms, o: torch.Tensor, n: torch.Tensor, y: torch.Tensor
                     ) -> torch.Tensor:
    """apple/ml-fct's criterion: nn.MSELoss between h(phi_old) and phi_new."""
    return F.mse_loss(t.h(o), n)


register_objective(TransformObjective("rqt", rqt_objective))
register_objective(TransformObjective("cl", cl_objective, takes_tau=True))
register_objective(TransformObjective("mcl", mcl_objective, takes_tau=True, rho=True))
register_objective(TransformObjective("fct", fct_objective, forward=True, output="new"))
register_objective(TransformObjective("bict", bict_objective, forward=True, classifier=True))
register_objective(TransformObjective("bict-forward", bict_forward_objective, forward=True,
                                      output="new", target_classifier=True))
register_objective(TransformObjective("bict-forward-cls", bict_forward_cls_objective,
                                      forward=True, output="new", target_classifier=True))
def _solve_procrustes(module: LinearMap, old: np.ndarray, new: np.ndarray) -> None:
    module.linear.weight.data = torch.as_tensor(closed_form.procrustes(new, old),
                                                dtype=torch.float32)


def _solve_affine(module: LinearMap, old: np.ndarray, new: np.ndarray) -> None:
    weight, bias = closed_form.affine(new, old)
    module.linear.weight.data = torch.as_tensor(weight, dtype=torch.float32)
    module.linear.bias.data = torch.as_tensor(bias, dtype=torch.float32)


# Closed forms have no epochs or width: fixed at 0, so that RM's chosen settings do not
# enter their cache keys
for _name, _solve in (("procrustes", _solve_procrustes), ("affine", _solve_affine)):
    register_objective(TransformObjective(
        _name, None, solve=_solve, fixed={"epochs": 0, "hidden": 0},
        build=lambda d_in, d_out, config, bias=_name == "affine": LinearMap(d_in, d_out, bias)))

# ml-fct's cifar100_transformation.yaml: Adam lr 5e-4, weight decay 2^-15, 80 epochs,
# batches of 1024 (here 128 classes x 8 items), inner width 2048
register_objective(TransformObjective(
    "fct-mlfct", ml_fct_objective, forward=True, output="new",
    build=lambda d_in, d_out, config: MlFctTransform(d_in, d_out, config.hidden),
    fixed={"hidden": 2048, "epochs": 80, "lr": 5e-4, "weight_decay": 2 ** -15,
           "classes_per_batch": 128, "per_class": 8}))


def steps_per_epoch(config: TransformConfig, labels: np.ndarray) -> int:
    """How many P x K batches one epoch of `fit_transforms` takes."""
    return pk_batch_count(labels, config.classes_per_batch, config.per_class)


def build_transforms(config: TransformConfig, d_old: int, d_new: int) -> Transforms:
    """Freshly initialised modules of `config` (seeded) for old/new widths d_old, d_new."""
    spec = objective_of(config.objective)
    torch.manual_seed(config.seed)
    d_in, d_out = d_old if spec.forward else d_new, d_new if spec.output == "new" else d_old
    learned = spec.build(d_in, d_out, config) if spec.build else \
        EmbeddingTransform(d_in, d_out, config.hidden, layers=config.layers)
    rho = (EmbeddingTransform(d_new, d_new, config.hidden, residual=True, layers=config.layers)
           if config.rho else None)
    classifier = (CosineClassifier(d_out, config.num_classes)
                  if spec.classifier or spec.target_classifier else None)
    return Transforms(config, **{"h" if spec.forward else "psi": learned}, rho=rho,
                      classifier=classifier)


def fit_transforms(config: TransformConfig, old: np.ndarray, new: np.ndarray,
                   labels: np.ndarray, progress: bool = True,
                   device: torch.device | None = None,
                   target_classifier: torch.nn.Module | None = None) -> Transforms:
    """Train the transforms of `config` on paired embeddings of the same labelled items
    (on the GPU when there is one); the returned modules live on the CPU.
    `target_classifier`: the target model's classifier, for an objective that reads it
    (kept frozen, and saved with the transforms)."""
    device = device or default_device()
    t = build_transforms(config, np.shape(old)[1], np.shape(new)[1])
    spec = objective_of(config.objective)
    if spec.solve is not None:  # closed form: no epochs, no batches, no device
        start = time.perf_counter()
        spec.solve(getattr(t, t._map_name), np.asarray(old), np.asarray(new))
        t.history.append({"closed_form": config.objective,
                          "seconds": time.perf_counter() - start})
        for module in t.modules():
            module.eval()
        return t
    if objective_of(config.objective).target_classifier:
        if target_classifier is None:
            raise RmlibError(f"objective {config.objective!r} reads the target model's "
                             "classifier: pass target_classifier=")
        if getattr(target_classifier, "scale", t.classifier.scale) != t.classifier.scale:
            raise RmlibError(f"the target classifier's scale {target_classifier.scale} is not "
                             f"{t.classifier.scale}, the one its transforms are rebuilt with")
        t.classifier.load_state_dict(target_classifier.state_dict())
        t.classifier.requires_grad_(False)
    o_all = torch.as_tensor(np.asarray(old, np.float32)).to(device)
    n_all = torch.as_tensor(np.asarray(new, np.float32)).to(device)
    y_all = torch.as_tensor(np.asarray(labels, np.int64))
    y_dev = y_all.to(device)
    modules = [m.to(device).train() for m in t.modules()]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a dozen per tensor (15% of a step here)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=True)
    total = steps_per_epoch(config, labels) * config.epochs
    # a tenth of the steps warm up; OneCycleLR divides by (warm-up steps - 1), which is 0
    # at exactly 10 steps: that one length warms up for two
    warm_up = 0.2 if 0.1 * total == 1 else 0.1
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total,
                                                    pct_start=warm_up)
    opt = Optimisation(optimizer, scheduler,
                       f"{config.name} training diverged; raise tau or lower the learning rate")
    # On a CPU the batches are pk_batches' (the committed results' random streams); on a
    # GPU they are drawn on the device, so that no step waits for the host.
    on_host = device.type == "cpu"
    gen = torch.Generator(device=device).manual_seed(config.seed)
    draw = pk_batches if on_host else pk_batches_vectorised

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        for idx in draw(y_all if on_host else y_dev, config.classes_per_batch,
                        config.per_class, gen):
            if len(idx) >= 2:
                yield idx

    def loss_of(idx: torch.Tensor):
        return t.loss(o_all[idx], n_all[idx], y_dev[idx]), len(idx), {}

    train_epochs(range(config.epochs), batches, loss_of, opt, t.history, f"fit {config.name}",
                 config.epochs, progress)
    for module in modules:
        module.cpu().eval()
    return t


def transform_path(config: TransformConfig, folder: Path) -> Path:
    """Where the transforms of `config` are cached: `<folder>/transform-<name>-<key>/t.pt`."""
    return Path(folder) / f"transform-{config.name}-{config.key()}" / "t.pt"


def cached_transforms(config: TransformConfig, old: np.ndarray, new: np.ndarray,
                      labels: np.ndarray, folder: Path, progress: bool = True,
                      device: torch.device | None = None,
                      target_classifier: torch.nn.Module | None = None) -> Transforms:
    """fit_transforms (on `device`), cached at `transform_path(config, folder)`."""
    return cached(transform_path(config, folder),
                  lambda: fit_transforms(config, old, new, labels, progress, device,
                                         target_classifier),
                  save_transforms,
                  lambda p: Transforms.from_state(torch.load(p, weights_only=True)))


def save_transforms(path: Path | str, t: Transforms) -> Path:
    return save_torch(path, t.state())
