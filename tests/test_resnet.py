"""ResNet-18/50 in NNX: shapes, parameter counts, batch norm, and numerical parity with real torchvision
(`torchvision.models.resnet18/50`: eval mode, train-mode batch norm and its running statistics) through the
importer (`cxrjax.models.torchvision_weights`, command line `cxrjax.tools.import_torchvision`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cxrjax.models.resnet import ResNet, flat_state, num_params, resnet18, resnet50
from cxrjax.models import torchvision_weights as tvw
from cxrjax.tools import import_torchvision as itv
from model_utils import fast_init, randomize_torch_batchnorm, torchvision_models


@functools.partial(jax.jit, static_argnames=("graphdef", "train", "bn_groups"))
def _apply(graphdef, state, x, train, bn_groups):
    m = nnx.merge(graphdef, state, copy=True)
    y = m(x, train=train, bn_groups=bn_groups)
    return y, nnx.state(m)


def _forward(model, x, *, train=False, bn_groups=1):
    """Jitted functional forward (compiled once per architecture/shape); updates the batch stats."""
    graphdef, state = nnx.split(model)
    y, new_state = _apply(graphdef, state, x, train, bn_groups)
    nnx.update(model, new_state)
    return y


def test_parameter_counts_match_torchvision():
    r18 = nnx.eval_shape(lambda: resnet18(num_classes=1000, rngs=nnx.Rngs(0)))
    r50 = nnx.eval_shape(lambda: resnet50(num_classes=1000, rngs=nnx.Rngs(0)))
    assert num_params(r18) == 11_689_512
    assert num_params(r50) == 25_557_032
    names = set(flat_state(r50))
    assert {"conv1.kernel", "bn1.scale", "bn1.mean", "layer1.0.downsample.0.kernel",
            "layer4.2.bn3.var", "fc.kernel", "fc.bias"} <= names
    assert "layer1.0.downsample.0.kernel" not in flat_state(r18)  # basic block, same width
    assert "layer2.0.downsample.1.scale" in flat_state(r18)


def test_output_shapes_dtypes_and_channels():
    x1 = jnp.ones((2, 32, 32, 1))
    m = fast_init(lambda: resnet18(in_channels=1, dtype=jnp.bfloat16, width=8, rngs=nnx.Rngs(0)))
    y = _forward(m, x1, train=True)
    assert y.shape == (2, 64) and y.dtype == jnp.float32  # 8 * 8 (512 at torchvision width)
    assert m.conv1.kernel[...].dtype == jnp.float32  # fp32 params under bf16 compute
    m = fast_init(lambda: resnet18(num_classes=7, width=8, rngs=nnx.Rngs(0)))
    assert _forward(m, jnp.ones((3, 32, 32, 3))).shape == (3, 7)
    with pytest.raises(ValueError, match="channels"):
        m(jnp.ones((1, 32, 32, 1)), train=False)
    assert nnx.eval_shape(lambda: resnet18(rngs=nnx.Rngs(0))).feature_dim == 512
    m50 = nnx.eval_shape(lambda: resnet50(rngs=nnx.Rngs(0)))
    assert m50.feature_dim == 2048
    y50 = jax.eval_shape(lambda x: resnet50(rngs=nnx.Rngs(0))(x, train=True), jnp.ones((2, 64, 64, 3)))
    assert y50.shape == (2, 2048) and y50.dtype == jnp.float32


def test_real_init_and_zero_init_residual():
    # an 'rbg' key: threefry kernels take seconds each to compile on a busy CPU (one per shape)
    m = resnet18(zero_init_residual=True, width=8, in_channels=1, num_classes=3,
                 rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    assert float(jnp.abs(m.layer1[0].bn2.scale[...]).max()) == 0.0
    assert float(m.bn1.scale[...].min()) == 1.0
    k = np.asarray(m.layer2[0].conv2.kernel[...])  # kaiming normal, fan_out: std sqrt(2 / (9 * 16))
    assert abs(k.std() / np.sqrt(2 / (9 * 16)) - 1) < 0.1
    assert abs(np.asarray(m.fc.bias[...])).max() <= 1 / np.sqrt(64)


def test_train_mode_updates_batch_stats_and_eval_does_not():
    m = fast_init(lambda: resnet18(width=8, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 2 + 1
    before = {k: np.asarray(v) for k, v in flat_state(m).items()}
    _forward(m, x, train=False)
    after_eval = flat_state(m)
    assert all(np.array_equal(before[k], after_eval[k]) for k in before)
    _forward(m, x, train=True)
    after = flat_state(m)
    # running mean of bn1 = 0.9 * 0 + 0.1 * batch mean of conv1 output
    conv = m.conv1(x)
    np.testing.assert_allclose(after["bn1.mean"], 0.1 * np.asarray(conv.mean((0, 1, 2))), atol=1e-5)
    n = conv.shape[0] * conv.shape[1] * conv.shape[2]
    np.testing.assert_allclose(after["bn1.var"], 0.9 + 0.1 * np.asarray(conv.var((0, 1, 2))) * n / (n - 1),
                               rtol=1e-5)
    changed = [k for k in before if k.endswith((".mean", ".var")) and not np.allclose(before[k], after[k])]
    assert len(changed) == sum(k.endswith((".mean", ".var")) for k in before)
    assert all(np.array_equal(before[k], after[k]) for k in before if k.endswith((".kernel", ".scale")))


def test_grouped_batch_norm_equals_separate_batches():
    # 64 px and 4 images a group: layer4 BN still sees 16 values (tiny groups are ill-conditioned)
    x = jax.random.normal(jax.random.key(2), (8, 64, 64, 3))
    m = fast_init(lambda: resnet18(width=8, rngs=nnx.Rngs(0)))
    whole = _forward(nnx.clone(m), x, train=True, bn_groups=2)
    halves = [_forward(nnx.clone(m), x[:4], train=True), _forward(nnx.clone(m), x[4:], train=True)]
    np.testing.assert_allclose(whole, np.concatenate(halves), atol=1e-5)
    full = _forward(nnx.clone(m), x, train=True, bn_groups=1)
    assert not np.allclose(whole, full, atol=1e-3)
    with pytest.raises(ValueError, match="num_groups"):
        m(x, train=True, bn_groups=3)
    # running statistics: the mean over groups of the group statistics (here: of the two halves)
    m2 = nnx.clone(m)
    _forward(m2, x, train=True, bn_groups=2)
    h1, h2 = nnx.clone(m), nnx.clone(m)
    _forward(h1, x[:4], train=True)
    _forward(h2, x[4:], train=True)
    np.testing.assert_allclose(flat_state(m2)["layer3.1.bn2.var"],
                               (flat_state(h1)["layer3.1.bn2.var"] + flat_state(h2)["layer3.1.bn2.var"]) / 2,
                               rtol=1e-4)


# ---------------------------------------------------------------------------- importer, no torch
def _random_flat(arch, num_classes=10, seed=0):
    abstract = nnx.eval_shape(lambda: ResNet(arch, num_classes=num_classes, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in flat_state(abstract).items()}


def test_load_pretrained_round_trip_and_errors(tmp_path):
    flat = _random_flat("resnet18")
    flat = {k: (np.abs(v) + 0.5 if k.endswith(".var") else v) for k, v in flat.items()}
    for ext in ("npz", "safetensors"):
        path = str(tmp_path / f"w.{ext}")
        tvw.save_flat(path, flat)
        m = fast_init(lambda: resnet18(num_classes=10, rngs=nnx.Rngs(1)))
        tvw.load_pretrained(m, path)
        got = flat_state(m)
        assert set(got) == set(flat)
        assert all(np.array_equal(got[k], flat[k]) for k in flat)
    # a classifier file initialises a feature backbone: fc.* is dropped when the model has no fc
    m0 = fast_init(lambda: resnet18(rngs=nnx.Rngs(1)))
    tvw.load_pretrained(m0, path)
    np.testing.assert_array_equal(m0.layer4[1].conv2.kernel[...], flat["layer4.1.conv2.kernel"])
    # a 1-channel model and a 3-channel file: clear shape error
    with pytest.raises(tvw.WeightImportError, match=r"shape mismatch.*conv1.kernel"):
        tvw.load_pretrained(fast_init(lambda: resnet18(in_channels=1, rngs=nnx.Rngs(1))), path)
    bad = dict(flat)
    del bad["layer1.0.bn1.var"]
    bad["layer9.0.conv1.kernel"] = np.zeros(3, np.float32)
    tvw.save_flat(str(tmp_path / "bad.npz"), bad)
    with pytest.raises(tvw.WeightImportError, match=r"(?s)missing \(1\): layer1.0.bn1.var.*"
                                                    r"unexpected \(1\): layer9.0.conv1.kernel"):
        tvw.load_pretrained(fast_init(lambda: resnet18(num_classes=10, rngs=nnx.Rngs(1))),
                            str(tmp_path / "bad.npz"))


def _to_torch_names(flat):
    """Inverse of the importer's renaming (used to build a .safetensors state_dict without torch)."""
    sd = {}
    for k, v in flat.items():
        name, leaf = k.rsplit(".", 1)
        if leaf == "kernel":
            sd[f"{name}.weight"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        else:
            sd[f"{name}.{ {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}[leaf]}"] = v
            if leaf == "mean":
                sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)
    # safetensors.numpy writes a non-contiguous (transposed) array's raw buffer: make it contiguous
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def test_importer_cli_safetensors_without_torch(tmp_path, capsys):
    from safetensors.numpy import save_file

    flat = _random_flat("resnet18", num_classes=1000)
    sd = _to_torch_names(flat)
    src = str(tmp_path / "tv.safetensors")
    save_file(sd, src)
    out = str(tmp_path / "out.npz")
    assert itv.main([src, out, "--arch", "resnet18"]) == 0
    assert "11,689,512 parameters" in capsys.readouterr().out
    got = tvw.load_flat(out)
    assert all(np.array_equal(got[k], flat[k]) for k in flat) and set(got) == set(flat)
    # --in_channels 1 sums conv1 over RGB
    assert itv.main([src, str(tmp_path / "g.safetensors"), "--in_channels", "1"]) == 0
    g = tvw.load_flat(str(tmp_path / "g.safetensors"))
    np.testing.assert_allclose(g["conv1.kernel"], flat["conv1.kernel"].sum(2, keepdims=True), rtol=1e-6)
    # wrong architecture: clear error, non-zero exit, the keys are listed
    assert itv.main([src, str(tmp_path / "x.npz"), "--arch", "resnet50"]) == 1
    err = capsys.readouterr().err
    assert "missing (165)" in err and "layer1.0.conv3.kernel" in err and "shape mismatch" in err


def test_pth_without_torch_gives_install_hint(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install cxrjax\[torch\]"):
        tvw.read_state_dict(str(tmp_path / "w.pth"))
    assert itv.main([str(tmp_path / "w.pth"), str(tmp_path / "o.npz")]) == 1




def test_tools_module_keeps_the_library_names():
    """The trainer and evaluation jobs still reach the library through cxrjax.tools.import_torchvision."""
    for name in ("load_pretrained", "import_torchvision", "save_flat", "load_flat", "read_state_dict",
                 "convert_state_dict", "check_against", "WeightImportError"):
        assert getattr(itv, name) is getattr(tvw, name)


# ---------------------------------------------------------------------------- real torchvision parity
def _torchvision_net(arch, num_classes, seed=0):
    """torchvision's own model and initialisation, with random BN affine parameters and statistics."""
    import torch

    models = torchvision_models()
    torch.manual_seed(seed)
    net = getattr(models, arch)(num_classes=num_classes)
    randomize_torch_batchnorm(net, seed)
    if arch == "resnet50":  # its pooled features are ~20x larger: keep logits O(1-10)
        with torch.no_grad():
            net.fc.weight.mul_(0.1)
    return torch, net


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _bn_names(flat):
    return sorted(k[:-len(".mean")] for k in flat if k.endswith(".mean"))


@pytest.mark.parametrize("arch, fmt", [("resnet18", "safetensors"), ("resnet50", "pth")])
def test_parity_with_torchvision_eval_and_train_mode(arch, fmt, tmp_path):
    """torchvision.models.<arch> -> importer CLI -> cxrjax: same logits in eval mode; in train mode the same
    logits (batch statistics) and the same running statistics in every BN layer afterwards."""
    torch, net = _torchvision_net(arch, num_classes=10)
    src = str(tmp_path / f"tv.{fmt}")
    if fmt == "pth":
        torch.save(net.state_dict(), src)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, src)
    out = str(tmp_path / "cx.safetensors")
    assert itv.main([src, out, "--arch", arch]) == 0
    model = fast_init(lambda: ResNet(arch, num_classes=10, rngs=nnx.Rngs(0)))
    tvw.load_pretrained(model, out)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 64, 64)).astype(np.float32)

    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = np.asarray(_forward(model, _nhwc(x)))
    diff = float(np.abs(got - ref).max())
    print(f"{arch} eval: max |logit diff| = {diff:.2e}, logit scale {np.abs(ref).max():.2f}")
    assert diff < 1e-4

    net.train()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = np.asarray(_forward(model, _nhwc(x), train=True))
    diff = float(np.abs(got - ref).max())
    print(f"{arch} train: max |logit diff| = {diff:.2e}, logit scale {np.abs(ref).max():.2f}")
    assert diff < 1e-4
    sd, ours = net.state_dict(), flat_state(model)
    names = _bn_names(ours)
    assert len(names) == {"resnet18": 20, "resnet50": 53}[arch]  # every BN layer of torchvision's model
    for name in names:  # momentum 0.1, unbiased batch variance, as torch
        np.testing.assert_allclose(ours[f"{name}.mean"], sd[f"{name}.running_mean"].numpy(), atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(ours[f"{name}.var"], sd[f"{name}.running_var"].numpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=name)

    net.eval()  # the updated statistics in use: eval logits agree again
    x2 = rng.normal(size=(4, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x2)).numpy()
    assert float(np.abs(np.asarray(_forward(model, _nhwc(x2))) - ref).max()) < 1e-4


def test_grey_import_matches_torchvision_on_repeated_channels(tmp_path):
    """--in_channels 1: cxrjax on a grey image x == torchvision's RGB model on (x, x, x)."""
    torch, net = _torchvision_net("resnet18", num_classes=5, seed=3)
    net.eval()
    src = str(tmp_path / "tv.pth")
    torch.save(net.state_dict(), src)
    assert itv.main([src, str(tmp_path / "grey.npz"), "--in_channels", "1"]) == 0
    grey = fast_init(lambda: resnet18(num_classes=5, in_channels=1, rngs=nnx.Rngs(0)))
    tvw.load_pretrained(grey, str(tmp_path / "grey.npz"))
    x = np.random.default_rng(2).normal(size=(2, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(np.repeat(x, 3, axis=1))).numpy()
    diff = float(np.abs(np.asarray(_forward(grey, _nhwc(x))) - ref).max())
    print(f"grey import: max |logit diff| = {diff:.2e}, logit scale {np.abs(ref).max():.2f}")
    assert diff < 1e-4
