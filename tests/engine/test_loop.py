"""The training loop and the transforms' batches as a GPU needs them: batches drawn on the
device, and no read of the device inside an epoch (counted here on the CPU)."""

import numpy as np
import pytest
import torch

from rmlib import RmlibError
from rmlib.data.sampling import pk_batch_count, pk_batches_vectorised
from rmlib.engine import transforms as transforms_module
from rmlib.engine.transforms import TransformConfig, fit_transforms

SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "__index__")


@pytest.mark.parametrize("classes,per_class", [(4, 3), (16, 8), (1, 1)])
def test_vectorised_pk_batches_keep_every_rule_of_pk_batches(classes, per_class):
    labels = torch.as_tensor(np.random.default_rng(0).integers(0, 10, 203))
    gen = torch.Generator().manual_seed(3)
    batches = pk_batches_vectorised(labels, classes, per_class, gen)
    assert len(batches) == pk_batch_count(labels.numpy(), classes, per_class)
    everything = torch.cat(batches)
    assert sorted(everything.tolist()) == list(range(203))  # each item once
    for batch in batches:
        assert len(batch) <= classes * per_class
        assert len(torch.unique(labels[batch])) <= classes
    again = pk_batches_vectorised(labels, classes, per_class, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize("classes,per_class", [(4, 3), (5, 4), (2, 6)])
def test_with_full_groups_every_batch_is_p_groups_of_k(classes, per_class):
    """12 items per class: every group is full, so each class in a batch comes in whole
    groups of K and every anchor has a positive."""
    labels = torch.arange(10).repeat_interleave(12)[torch.randperm(120)]
    batches = pk_batches_vectorised(labels, classes, per_class, torch.Generator().manual_seed(0))
    for batch in batches[:-1]:
        assert len(batch) == classes * per_class
    for batch in batches:
        counts = torch.bincount(labels[batch])
        assert bool(((counts % per_class) == 0).all())


def count_device_reads(monkeypatch) -> dict[str, int]:
    counts = dict.fromkeys(SYNCS, 0)
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def embeddings(n=512, classes=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    old = rng.normal(size=(classes, 8))[labels] + 0.3 * rng.normal(size=(n, 8))
    new = rng.normal(size=(classes, 12))[labels] + 0.3 * rng.normal(size=(n, 12))
    return old.astype("f4"), new.astype("f4"), labels


@pytest.mark.parametrize("objective, rho", [("rqt", False), ("cl", False), ("mcl", True)])
def test_a_transform_fit_reads_the_device_a_few_times_per_epoch_not_per_step(
        objective, rho, monkeypatch):
    """With the batches drawn as on a GPU and the losses' accelerator paths, the loop
    itself reads the device once an epoch (the epoch's sums) and the sampler twice; RQT,
    CL and MCL with rho have no read of their own."""
    old, new, labels = embeddings()
    monkeypatch.setattr(transforms_module, "pk_batches", pk_batches_vectorised)
    accelerator_paths(monkeypatch)
    config = TransformConfig(objective=objective, rho=rho, epochs=3, hidden=32,
                             classes_per_batch=4, per_class=4)
    steps = transforms_module.steps_per_epoch(config, labels) * config.epochs
    counts = count_device_reads(monkeypatch)
    t = fit_transforms(config, old, new, labels, progress=False,
                       device=torch.device("cpu"))
    reads = sum(counts.values())
    assert steps >= 90 and reads <= 6 * config.epochs, (steps, counts)
    assert len(t.history) == 3 and all(np.isfinite(h["loss"]) for h in t.history)


def test_a_diverged_fit_stops_at_the_end_of_its_epoch_with_the_advice():
    old, new, labels = embeddings(n=64, classes=4)
    old[0] = np.inf  # the loss of every epoch that sees item 0 is not finite
    config = TransformConfig(objective="rqt", epochs=2, hidden=8, classes_per_batch=2,
                             per_class=4)
    with pytest.raises(RmlibError, match=r"rqt training diverged.*\(loss (nan|inf)\)"):
        fit_transforms(config, old, new, labels, progress=False, device=torch.device("cpu"))


def accelerator_paths(monkeypatch) -> None:
    """Take the losses' accelerator code paths on the CPU (they read nothing of the device)."""
    from rmlib import losses

    monkeypatch.setattr(losses, "on_host", lambda x: False)


def loss_cases():
    from rmlib import losses

    rng = np.random.default_rng(4)
    labels = torch.as_tensor(np.repeat(np.arange(6), 4)[rng.permutation(24)])
    labels[0] = 9  # a singleton: an anchor without a positive in the new system
    x = {name: torch.as_tensor(rng.normal(size=(24, 8)), dtype=torch.float32,
                               ).requires_grad_() for name in ("rev", "old", "new")}
    classifier = torch.nn.Linear(8, 5)
    return x, {
        "cl": lambda: losses.cl_loss(x["rev"], x["old"], labels, tau=0.5),
        "mcl": lambda: losses.mcl_loss(x["rev"], x["old"], x["new"], labels, tau=0.5),
        "bct": lambda: losses.bct_influence_loss(x["new"], labels, classifier, 5, 0.1),
        "triplet": lambda: losses.batch_hard_triplet_loss(x["new"], labels),
    }


@pytest.mark.parametrize("name", ["cl", "mcl", "bct", "triplet"])
def test_the_losses_accelerator_path_agrees_with_the_cpus_and_reads_nothing(name, monkeypatch):
    x, cases = loss_cases()
    on_cpu = cases[name]()
    grads = torch.autograd.grad(on_cpu, list(x.values()), allow_unused=True)
    accelerator_paths(monkeypatch)
    counts = count_device_reads(monkeypatch)
    getitem = torch.Tensor.__getitem__

    def index(self, key):  # a boolean mask as an index has a shape only the device knows
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
            counts["boolean index"] = counts.get("boolean index", 0) + 1
        return getitem(self, key)
    monkeypatch.setattr(torch.Tensor, "__getitem__", index)
    on_device = cases[name]()
    assert sum(counts.values()) == 0, counts  # no .item(), no boolean index, no branch on data
    torch.testing.assert_close(on_device, on_cpu, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    for a, b in zip(torch.autograd.grad(on_device, list(x.values()), allow_unused=True), grads,
                    strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_accelerator_path_of_an_empty_selection_is_zero_not_nan(monkeypatch):
    from rmlib import losses

    accelerator_paths(monkeypatch)
    emb = torch.randn(4, 8, requires_grad=True)
    labels = torch.arange(4)  # no positives at all, and no old classes below 0
    assert losses.batch_hard_triplet_loss(emb, labels).item() == 0.0
    assert losses.bct_influence_loss(emb, labels, torch.nn.Linear(8, 3), 0).item() == 0.0
    loss = losses.mcl_loss(emb, emb, emb, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def backfill_case():
    from rmlib.evaluation.retrieval import Protocol

    rng = np.random.default_rng(8)
    labels = rng.integers(0, 10, 300)
    old = (rng.normal(size=(10, 8))[labels] + rng.normal(size=(300, 8))).astype("f4")
    new = (rng.normal(size=(10, 12))[labels] + 0.5 * rng.normal(size=(300, 12))).astype("f4")
    return old, new, Protocol.leave_one_out(labels)


def test_the_evaluator_runs_where_it_is_told_and_reads_the_device_once_per_chunk(monkeypatch):
    """Every tensor of a chunk is made on the evaluator's device (here the CPU, named), and
    what comes back to the host is each chunk's largest relevant count and, once, the
    scores."""
    from rmlib.evaluation import backfill

    old, new, protocol = backfill_case()
    default = backfill.simulate_backfill(old, old, new, new, protocol, reference_query=old)
    made_on = set()
    masks = type(protocol).masks

    def recording_masks(self, start, stop, device="cpu"):
        made_on.add(torch.device(device).type)
        return masks(self, start, stop, device)
    monkeypatch.setattr(type(protocol), "masks", recording_masks)
    counts = count_device_reads(monkeypatch)
    placed = backfill.simulate_backfill(old, old, new, new, protocol, reference_query=old,
                                        device=torch.device("cpu"), chunk=50)
    assert made_on == {"cpu"}
    assert counts["__int__"] == 6, counts  # per chunk (6 of 50 queries): its widest query
    assert counts["numpy"] == 1 and counts["tolist"] == 0, counts  # the scores, once
    assert counts["__float__"] <= 6, counts  # preparing 3 systems, on the host, before
    monkeypatch.undo()
    assert placed.mAP == default.mAP and placed.nfr == default.nfr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_evaluator_on_a_gpu_agrees_with_the_cpu():
    from rmlib.evaluation.backfill import simulate_backfill

    old, new, protocol = backfill_case()
    cpu = simulate_backfill(old, old, new, new, protocol, device="cpu")
    gpu = simulate_backfill(old, old, new, new, protocol, device="cuda")
    np.testing.assert_allclose(gpu.mAP, cpu.mAP, atol=1e-6)
    np.testing.assert_allclose(gpu.top1, cpu.top1, atol=1e-6)
