import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rmlib.data import ImageSet
from rmlib.data.augment import random_crop_flip, random_erase
from rmlib.engine.backbones import BackboneConfig, train_backbone
from rmlib.models import FastResNet, RetrievalModel, resnet18_cifar


def tiny_images(n=64, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    base = rng.integers(0, 256, size=(classes, 3, 32, 32))
    images = np.clip(base[labels] + rng.normal(0, 30, size=(n, 3, 32, 32)), 0, 255)
    return ImageSet(images.astype(np.uint8), labels.astype(np.int64))


def tiny_config(**kw):
    base = dict(dataset="unit", profile="test", role="new", num_classes=4, widths=(8, 8, 16),
                dim=16, epochs=2, batch_size=16, lr=0.05)
    return BackboneConfig(**{**base, **kw})


def test_model_shapes_and_normalised_embeddings():
    model = RetrievalModel(FastResNet((8, 16, 16)), num_classes=10, dim=128).eval()
    z, logits = model(torch.randn(5, 3, 32, 32))
    assert z.shape == (5, 128) and logits.shape == (5, 10)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert logits.abs().max() <= model.classifier.scale + 1e-4
    assert resnet18_cifar()(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_crop_flip_geometry():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = random_crop_flip(x, padding=0, generator=gen)
    for i in range(2):  # without padding, each image is itself or its mirror
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    padded = random_crop_flip(x.to(torch.uint8), padding=2, generator=gen)
    assert padded.shape == x.shape and padded.dtype == torch.uint8
    erased = random_erase(torch.zeros(8, 3, 16, 8), gen, p=1.0)
    assert (erased != 0).any(dim=(1, 2, 3)).all()


def test_same_seed_same_losses(tmp_path):
    data = tiny_images()
    runs = tmp_path / "a"
    a = train_backbone(tiny_config(epochs=1), data, runs=runs, progress=False)
    runs = tmp_path / "b"
    b = train_backbone(tiny_config(epochs=1), data, runs=runs, progress=False)
    assert a.history[0]["loss"] == b.history[0]["loss"]
    runs = tmp_path / "c"
    c = train_backbone(tiny_config(epochs=1, seed=5), data, runs=runs, progress=False)
    assert c.history[0]["loss"] != a.history[0]["loss"]


def test_resumed_run_equals_uninterrupted(tmp_path):
    data = tiny_images()
    runs = tmp_path / "whole"
    whole = train_backbone(tiny_config(), data, runs=runs, progress=False)
    runs = tmp_path / "pieces"
    first = train_backbone(tiny_config(), data, runs=runs, progress=False, stop_after_epochs=1)
    assert (first.run_dir / "checkpoint.pt").exists() and not (first.run_dir / "model.pt").exists()
    resumed = train_backbone(tiny_config(), data, runs=runs, progress=False)
    assert not resumed.reused and len(resumed.history) == 2
    for (name, p), q in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    # the finished run is a plain state dict that loads with weights_only=True
    state = torch.load(resumed.run_dir / "model.pt", weights_only=True)
    assert set(state) == set(whole.model.state_dict())


def test_progressive_resizing_resumes_across_the_size_change(tmp_path, monkeypatch):
    """Low-resolution epochs first, then full size; an interruption at the switch resumes
    to the same weights; the setting enters the cache key."""
    from rmlib.engine.backbones import downscale

    data = tiny_images()
    small = downscale(torch.from_numpy(data.images), 24)
    assert small.shape == (64, 3, 24, 24) and small.dtype == torch.uint8
    cfg = tiny_config(epochs=3, low_res_epochs=2)
    assert cfg.key() != tiny_config(epochs=3).key()
    import rmlib.engine.backbones

    sizes = []
    real_crop = rmlib.engine.backbones.random_crop_flip

    def recording_crop(images, padding, gen, flip=None):
        sizes.append(images.shape[-1])
        return real_crop(images, padding, gen, flip)

    monkeypatch.setattr(rmlib.engine.backbones, "random_crop_flip", recording_crop)
    runs = tmp_path / "whole"
    whole = train_backbone(cfg, data, runs=runs, progress=False)
    steps = len(sizes) // 3
    assert sizes == [24] * (2 * steps) + [32] * steps
    runs = tmp_path / "pieces"
    train_backbone(cfg, data, runs=runs, progress=False, stop_after_epochs=2)
    resumed = train_backbone(cfg, data, runs=runs, progress=False)
    assert len(resumed.history) == 3
    for (name, p), q in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_cache_reused_only_when_config_matches(tmp_path):
    data, runs = tiny_images(), tmp_path / "runs"
    first = train_backbone(tiny_config(epochs=1), data, runs=runs, progress=False)
    again = train_backbone(tiny_config(epochs=1), data, runs=runs, progress=False)
    assert again.reused and again.run_dir == first.run_dir
    changed = train_backbone(tiny_config(epochs=1, lr=0.01), data, runs=runs, progress=False)
    assert not changed.reused and changed.run_dir != first.run_dir
    assert json.loads((changed.run_dir / "config.json").read_text())["lr"] == 0.01


def test_labels_beyond_the_classifier_are_an_error(tmp_path):
    from rmlib import RmlibError

    runs = tmp_path
    with pytest.raises(RmlibError, match="filter the training set"):
        train_backbone(tiny_config(num_classes=2), tiny_images(), runs=runs, progress=False)


def test_train_command_without_data_is_a_clear_error(tmp_path):
    env = {"RMLIB_DATA": str(tmp_path), "RMLIB_DOWNLOAD": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "rmlib", "train", "cifar100", "new",
                           "--profile", "smoke"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "CIFAR-100 is not at" in done.stderr and "Traceback" not in done.stderr


def test_smoke_profile_trains_both_on_real_data(smoke_config, tmp_path):
    from rmlib.methods.reproduce import train_backbones

    result = train_backbones("cifar100", smoke_config, progress=False)
    out = smoke_config.paths.results / "cifar100" / "smoke" / "backbones.json"
    saved = json.loads(out.read_text())
    for role in ("old", "new"):
        assert 0 < saved[role]["mAP"] < 1 and saved[role]["test_images"] == 1000
        assert saved[role]["history"][0]["epoch"] == 1
    assert saved["old"]["train_images"] == 1000 and saved["new"]["train_images"] == 2000
    assert result["provenance"]["profile"] == "smoke"
    assert result["provenance"]["git_commit"]


# --- fast-training options (rmlib.engine.fast_training), each on its own ------------------

def test_whitening_stem_whitens_the_training_patches(tmp_path):
    from rmlib.engine.backbones import normalise
    from rmlib.engine.fast_training import patch_whitening

    data = tiny_images(n=200)
    x = normalise(torch.from_numpy(data.images), (0.5,) * 3, (0.25,) * 3)
    w = patch_whitening(x, kernel=3, filters=24)
    assert w.shape == (24, 3, 3, 3)
    torch.testing.assert_close(w[12:], -w[:12])
    out = torch.nn.functional.conv2d(x, w[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(out)  # the top 12 directions of the patches, each of unit variance
    torch.testing.assert_close(cov, torch.eye(12), atol=2e-2, rtol=0)
    cfg = tiny_config(epochs=1, whiten=True)
    trained = train_backbone(cfg, data, runs=tmp_path, progress=False)
    stem = trained.model.backbone.stem[0]
    assert not stem.weight.requires_grad  # fixed: the optimiser never moved it
    expected = patch_whitening(normalise(torch.from_numpy(data.images), cfg.mean, cfg.std), 3, 24)
    torch.testing.assert_close(stem.weight.detach(), expected)


def test_dirac_init_starts_each_conv_as_the_identity_on_its_inputs():
    from rmlib.engine.fast_training import dirac_init

    net = FastResNet((8, 16, 16))
    dirac_init(net)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not torch.equal(convs[0].weight[:3, :, 1, 1], torch.eye(3))  # the stem is left
    for conv in convs[1:]:
        n = min(conv.in_channels, conv.out_channels)
        x = torch.randn(2, conv.in_channels, 6, 6)
        torch.testing.assert_close(torch.nn.functional.conv2d(x, conv.weight[:n], padding=1),
                                   x[:, :n])


def test_bn_biases_get_their_own_learning_rate():
    from rmlib.engine.fast_training import parameter_groups

    model = RetrievalModel(FastResNet((8, 16, 16)), num_classes=4, dim=16)
    groups = parameter_groups(model, lr=0.1, weight_decay=5e-4, bn_bias_lr=64.0)
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    fast = [g for g in groups if g.get("lr") == pytest.approx(6.4)]
    assert len(fast) == 1 and {id(p) for p in fast[0]["params"]} == bn_biases
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0 for g in groups if g["params"][0].ndim <= 1)


def test_weight_average_is_what_is_kept_and_resumes(tmp_path):
    data = tiny_images()
    cfg = tiny_config(epochs=2, ema=0.9, bn_momentum=0.4)
    whole = train_backbone(cfg, data, runs=tmp_path / "whole", progress=False)
    plain = train_backbone(tiny_config(epochs=2, bn_momentum=0.4), data,
                           runs=tmp_path / "plain", progress=False)
    bns = [m for m in whole.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.4 for m in bns)
    # the average does not change training: the same steps, the same losses
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in plain.history]
    weights = [(p, q) for p, q in zip(whole.model.state_dict().values(),
                                       plain.model.state_dict().values(), strict=True)
               if p.is_floating_point()]
    assert any(not torch.equal(p, q) for p, q in weights)  # the average, not the last step
    train_backbone(cfg, data, runs=tmp_path / "pieces", progress=False, stop_after_epochs=1)
    resumed = train_backbone(cfg, data, runs=tmp_path / "pieces", progress=False)
    for (name, p), q in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_alternating_flips_mirror_each_image_every_other_epoch():
    from rmlib.engine.fast_training import alternating_flips

    first, second, third = (alternating_flips(1000, seed=3, epoch=e) for e in range(3))
    assert 400 < int(first.sum()) < 600
    assert torch.equal(second, ~first) and torch.equal(third, first)
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = random_crop_flip(x, 0, gen, flip=torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])


def test_test_time_views_and_multi_crop_extraction(tmp_path):
    from rmlib.engine.embed import extract_embeddings, test_time_views

    batch = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    assert [len(test_time_views(batch, v)) for v in ("none", "flip", "flip+shift")] == [1, 2, 6]
    shifted = test_time_views(batch, "flip+shift")[2]
    assert torch.equal(shifted[..., 1:, 1:], batch[..., :-1, :-1])  # one pixel down-right
    trained = train_backbone(tiny_config(epochs=1), tiny_images(), runs=tmp_path,
                             progress=False)
    images = tiny_images(n=8, seed=1).images
    by_views = {v: extract_embeddings(trained, images, views=v)
                for v in ("none", "flip", "flip+shift")}
    for emb in by_views.values():
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert not np.allclose(by_views["flip"], by_views["flip+shift"])


def test_recipe_options_are_checked_when_made(tmp_path):
    from rmlib import RmlibError
    from rmlib.methods.recipes import CifarRecipe

    with pytest.raises(RmlibError, match="flip='mirror'"):
        tiny_config(flip="mirror")
    with pytest.raises(RmlibError, match="tta='crops'"):
        CifarRecipe("fast", (8, 8, 16), 1, 1, tta="crops")
    with pytest.raises(RmlibError, match="whitening stem is for the 'fast'"):
        train_backbone(tiny_config(arch="resnet18", whiten=True), tiny_images(),
                       runs=tmp_path, progress=False)


def test_a_run_killed_between_its_last_two_writes_resumes(tmp_path):
    """history.json is written before model.pt, which alone marks a finished run: a kill
    between the two leaves a run that resumes from its checkpoint instead of failing."""
    cfg, data = tiny_config(epochs=1), tiny_images()
    first = train_backbone(cfg, data, runs=tmp_path, progress=False)
    (first.run_dir / "model.pt").unlink()  # as if killed before the last write
    again = train_backbone(cfg, data, runs=tmp_path, progress=False)
    assert not again.reused and (again.run_dir / "model.pt").exists()
