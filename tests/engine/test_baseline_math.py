"""The baselines' and rho's equations as the book typesets them, against direct computations
on tiny examples (book/baselines.ipynb: eq-bct, eq-fct, eq-bict; book/rho.ipynb: eq-rho-*)."""

import math

import pytest
import torch

from rmlib import RmlibError
from rmlib.engine.objectives import InfluenceObjective, Objective, synthesised_classifier
from rmlib.engine.transforms import TransformConfig, build_transforms
from rmlib.losses import bct_influence_loss, mcl_loss, mean_distance_loss, pairwise_distances
from rmlib.models import CosineClassifier, EmbeddingTransform


def classifier(weights, scale=4.0):
    """A cosine classifier whose class weights are `weights` (unit vectors)."""
    c = CosineClassifier(len(weights[0]), len(weights), scale)
    with torch.no_grad():
        c.weight.copy_(torch.tensor(weights))
    return c


def cross_entropy_by_hand(z, y, weights, scale=4.0):
    """eq-bct-ce for unit z and w_c: -log softmax_y of s * (z . w_c)."""
    logits = [scale * sum(a * b for a, b in zip(z, w, strict=True)) for w in weights]
    return -math.log(math.exp(logits[y]) / sum(math.exp(v) for v in logits))


NEW = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]]
LABELS = [0, 0, 0, 2]


def test_bct_influence_is_the_old_classifiers_cross_entropy_on_old_classes():
    old = [[1.0, 0.0], [0.0, 1.0]]
    expected = [cross_entropy_by_hand(z, y, old) for z, y in zip(NEW, LABELS, strict=True)
                if y < 2]
    assert expected[0] == pytest.approx(math.log(1 + math.exp(-4)))  # on its class weight
    assert expected[2] == pytest.approx(math.log(1 + math.exp(4)))  # on the other class's
    got = bct_influence_loss(torch.tensor(NEW), torch.tensor(LABELS), classifier(old), 2)
    assert got.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert got.item() == pytest.approx(1.7358, abs=1e-4)  # the number the chapter prints


def test_bict_influence_counts_every_class():
    upgraded = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
    expected = [cross_entropy_by_hand(z, y, upgraded) for z, y in zip(NEW, LABELS, strict=True)]
    got = bct_influence_loss(torch.tensor(NEW), torch.tensor(LABELS), classifier(upgraded), 3)
    assert got.item() == pytest.approx(sum(expected) / 4, abs=1e-6)


class _Smoothing:
    label_smoothing = 0.1


def test_influence_objective_is_base_plus_weighted_influence_through_a_frozen_classifier():
    torch.manual_seed(0)
    old = CosineClassifier(2, 2)
    objective = InfluenceObjective("bct", old, num_classes=2, source="test", weight=0.5)
    embedding = torch.tensor(NEW, requires_grad=True)
    labels = torch.tensor(LABELS)
    logits = torch.randn(4, 3)  # the new model's own classifier, all three classes
    loss = objective(None, embedding, logits, labels, _Smoothing())
    base = Objective()(None, embedding, logits, labels, _Smoothing())
    influence = bct_influence_loss(embedding, labels, old, 2, label_smoothing=0.1)
    assert loss.item() == pytest.approx(base.item() + 0.5 * influence.item(), abs=1e-6)
    loss.backward()
    assert embedding.grad.abs().sum() > 0  # the new embedding learns from the influence term
    assert all(not p.requires_grad for p in old.parameters())  # W_old stays as it was



def test_bct_synthesises_the_new_classes_weights_from_old_model_class_means():
    """Shen et al. 2020, sec. 3.3: the old classes keep the old classifier's weights; a
    class the old model never saw gets the normalised mean of its items' old embeddings."""
    old = CosineClassifier(2, 2)
    with torch.no_grad():
        old.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 2, 2, 3, 3])
    synthesised = synthesised_classifier(old, embeddings, labels, num_classes=4)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 1.8], [1.4, 1.4]])
    torch.testing.assert_close(synthesised.weight,
                               torch.nn.functional.normalize(expected, dim=1))
    assert synthesised.scale == old.scale and not synthesised.training
    with pytest.raises(RmlibError, match=r"classes \[2\] have no training items"):
        synthesised_classifier(old, embeddings[:1], labels[:1], num_classes=3)


def test_published_bct_is_plain_cross_entropy_over_every_class_and_says_so_in_its_key():
    old = CosineClassifier(2, 4)
    objective = InfluenceObjective("bct", old, num_classes=4, source="run", smoothing=0.0,
                                   variant={"new_classes": "synthesised"})
    embedding, labels = torch.tensor(NEW), torch.tensor([0, 1, 2, 3])
    logits = torch.randn(4, 4)
    expected = Objective()(None, embedding, logits, labels, _Smoothing()) + \
        torch.nn.functional.cross_entropy(old(embedding), labels)  # every class, unsmoothed
    got = objective(None, embedding, logits, labels, _Smoothing())
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert objective.spec == {"name": "bct", "source": "run", "weight": 1.0,
                              "new_classes": "synthesised", "smoothing": 0.0}
    # the variant on the old classes keeps the spec (and cache key) runs were made with
    assert InfluenceObjective("bct", old, 2, source="run").spec == {
        "name": "bct", "source": "run", "weight": 1.0}


def test_bict_forward_regresses_onto_the_target_and_reads_its_frozen_classifier():
    from rmlib.engine.transforms import Transforms, fit_transforms

    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(16)
    target = CosineClassifier(6, 4)
    new = torch.nn.functional.normalize(target.weight.detach()[labels]
                                        + 0.3 * torch.randn(64, 6), dim=1)
    old = torch.randn(64, 5)
    config = TransformConfig(objective="bict-forward", num_classes=4, hidden=16, epochs=3,
                             classes_per_batch=4, per_class=4)
    t = fit_transforms(config, old.numpy(), new.numpy(), labels.numpy(), progress=False,
                       target_classifier=target)
    torch.testing.assert_close(t.classifier.weight, target.weight)  # frozen: as given
    up = t.h(old)
    expected = mean_distance_loss(up, new) + torch.nn.functional.cross_entropy(
        target(up), labels)
    assert t.loss(old, new, labels).item() == pytest.approx(expected.item(), abs=1e-5)
    back = Transforms.from_state(t.state())
    torch.testing.assert_close(back.classifier.weight, target.weight)
    with pytest.raises(RmlibError, match="reads the target model's classifier"):
        fit_transforms(config, old.numpy(), new.numpy(), labels.numpy(), progress=False)


def test_the_ml_fct_recipe_is_its_mlp_its_mse_and_its_own_settings():
    from rmlib.engine.transforms import objective_of
    from rmlib.models import MlFctTransform

    spec = objective_of("fct-mlfct")
    assert spec.fixed["hidden"] == 2048 and spec.fixed["epochs"] == 80
    t = build_transforms(TransformConfig(objective="fct-mlfct", hidden=32), 5, 7)
    assert isinstance(t.h, MlFctTransform) and t.h.mixer[-1].out_features == 7
    old, new = torch.randn(9, 5), torch.randn(9, 7)
    assert t.loss(old, new, torch.zeros(9, dtype=torch.int64)).item() == pytest.approx(
        ((t.h(old) - new) ** 2).mean().item(), rel=1e-5)
    norms = t.h.eval()(old).norm(dim=1)
    assert not torch.allclose(norms, torch.ones(9))  # its output is not normalised

def turn(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


@pytest.mark.parametrize("degrees", [0.0, 45.0, 90.0])
def test_fct_regression_is_the_chord_between_the_upgraded_and_the_new_embedding(degrees):
    new = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    old = new @ turn(-90).T  # the old model's coordinates: the new ones turned back
    chord = 2 * math.sin(math.radians(90 - degrees) / 2)  # between two unit vectors
    got = mean_distance_loss(old @ turn(degrees).T, new).item()
    assert got == pytest.approx(chord, abs=1e-5)


def test_fct_and_bict_training_losses_are_eq_fct_and_eq_bict_upgrade():
    torch.manual_seed(0)
    old, new, y = torch.randn(6, 3), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    fct = build_transforms(TransformConfig(objective="fct"), 3, 4)
    assert fct.loss(old, new, y).item() == pytest.approx(
        (fct.h(old) - new).norm(dim=1).mean().item(), abs=1e-5)
    bict = build_transforms(TransformConfig(objective="bict", num_classes=3), 3, 4)
    expected = torch.nn.functional.cross_entropy(bict.classifier(bict.h(old)), y,
                                                 label_smoothing=0.1)
    assert bict.loss(old, new, y).item() == pytest.approx(expected.item(), abs=1e-6)



def test_a_forward_map_is_h_and_loads_from_files_that_called_it_psi():
    """FCT's map is h, saved as "h"; cache files written when it was saved as "psi" still
    load; asking a forward map for the reverse query is one clear error."""
    from rmlib import RmlibError
    from rmlib.engine.transforms import Transforms

    fct = build_transforms(TransformConfig(objective="fct"), 3, 4)
    assert fct.psi is None and set(fct.state()) >= {"h", "h_dims"}
    legacy = fct.state()
    legacy["psi"], legacy["psi_dims"] = legacy.pop("h"), legacy.pop("h_dims")
    old = torch.randn(5, 3).numpy()
    for state in (fct.state(), legacy):
        torch.testing.assert_close(Transforms.from_state(state).forward(old), fct.forward(old))
    with pytest.raises(RmlibError, match="learn h, not psi: use forward"):
        fct.reverse(torch.randn(5, 4).numpy())


@pytest.mark.parametrize("train", [False, True])
def test_rho_starts_as_the_identity(train):
    rho = EmbeddingTransform(2, 2, hidden=8, residual=True).train(train)
    z = torch.nn.functional.normalize(torch.randn(5, 2, generator=torch.Generator()
                                                  .manual_seed(1)), dim=1)
    torch.testing.assert_close(rho(z), z)


def test_rho_is_the_normalised_residual_sum():
    """eq-rho-residual with the chapter's hand-set f(z) = (z_1, 0)."""
    rho = EmbeddingTransform(2, 2, hidden=2, layers=1, residual=True).eval()
    first, _, _, last = rho.net
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        last.bias.zero_()
    z = torch.tensor([[0.6, 0.8], [0.6, -0.8], [-0.6, 0.8]])
    stretched = z * torch.tensor([2.0, 1.0])
    expected = stretched / stretched.norm(dim=1, keepdim=True)
    torch.testing.assert_close(rho(z), expected, atol=1e-5, rtol=0)
    d = pairwise_distances(rho(z), rho(z))
    assert d[0, 1].item() == pytest.approx(2 * 0.8 / math.hypot(1.2, 0.8), abs=1e-4)
    assert d[0, 2].item() == pytest.approx(2 * 1.2 / math.hypot(1.2, 0.8), abs=1e-4)


def test_rho_systems_and_loss_are_eq_rho_embeddings_and_eq_rho_s():
    """rho_new = rho(phi_new), rho_rev = psi(rho(phi_new)), and the training loss is MCL
    with the similarities of eq. 12-13."""
    torch.manual_seed(0)
    config = TransformConfig(objective="mcl", rho=True, tau=0.5, hidden=8)
    t = build_transforms(config, d_old=3, d_new=4)
    with torch.no_grad():  # move rho away from the identity
        t.rho.net[-1].weight.normal_()
    for module in t.modules():
        module.eval()
    old = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    new = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        rho_new, rho_rev = t.rho(new), t.psi(t.rho(new))
        assert not torch.allclose(rho_new, new, atol=1e-3)
        torch.testing.assert_close(torch.as_tensor(t.new_side(new.numpy())), rho_new)
        torch.testing.assert_close(torch.as_tensor(t.reverse(new.numpy())), rho_rev)
        expected = mcl_loss(rho_rev, old, rho_new, y, tau=0.5, mine=True)
        torch.testing.assert_close(t.loss(old, new, y), expected)
