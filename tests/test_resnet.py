"""ResNet-18/50 in NNX: shapes, parameter counts, batch norm, and numerical parity with a torch
reference laid out exactly like torchvision (torchvision itself is not needed), through the importer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cxrjax.models.resnet import ResNet, flat_state, num_params, resnet18, resnet50
from cxrjax.tools import import_torchvision as itv
from model_utils import fast_init


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
        itv.save_flat(path, flat)
        m = fast_init(lambda: resnet18(num_classes=10, rngs=nnx.Rngs(1)))
        itv.load_pretrained(m, path)
        got = flat_state(m)
        assert set(got) == set(flat)
        assert all(np.array_equal(got[k], flat[k]) for k in flat)
    # a classifier file initialises a feature backbone: fc.* is dropped when the model has no fc
    m0 = fast_init(lambda: resnet18(rngs=nnx.Rngs(1)))
    itv.load_pretrained(m0, path)
    np.testing.assert_array_equal(m0.layer4[1].conv2.kernel[...], flat["layer4.1.conv2.kernel"])
    # a 1-channel model and a 3-channel file: clear shape error
    with pytest.raises(itv.WeightImportError, match=r"shape mismatch.*conv1.kernel"):
        itv.load_pretrained(fast_init(lambda: resnet18(in_channels=1, rngs=nnx.Rngs(1))), path)
    bad = dict(flat)
    del bad["layer1.0.bn1.var"]
    bad["layer9.0.conv1.kernel"] = np.zeros(3, np.float32)
    itv.save_flat(str(tmp_path / "bad.npz"), bad)
    with pytest.raises(itv.WeightImportError, match=r"(?s)missing \(1\): layer1.0.bn1.var.*"
                                                    r"unexpected \(1\): layer9.0.conv1.kernel"):
        itv.load_pretrained(fast_init(lambda: resnet18(num_classes=10, rngs=nnx.Rngs(1))),
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
    got = itv.load_flat(out)
    assert all(np.array_equal(got[k], flat[k]) for k in flat) and set(got) == set(flat)
    # --in_channels 1 sums conv1 over RGB
    assert itv.main([src, str(tmp_path / "g.safetensors"), "--in_channels", "1"]) == 0
    g = itv.load_flat(str(tmp_path / "g.safetensors"))
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
        itv.read_state_dict(str(tmp_path / "w.pth"))
    assert itv.main([str(tmp_path / "w.pth"), str(tmp_path / "o.npz")]) == 1


def test_one_channel_import_equals_rgb_on_grey_input(tmp_path):
    from safetensors.numpy import save_file

    flat = _random_flat("resnet18", num_classes=5, seed=3)
    flat = {k: (np.abs(v) + 0.5 if k.endswith(".var") else v * (0.05 if k.endswith("kernel") else 1))
            for k, v in flat.items()}
    save_file(_to_torch_names(flat), str(tmp_path / "tv.safetensors"))
    itv.save_flat(str(tmp_path / "rgb.npz"), itv.import_torchvision(str(tmp_path / "tv.safetensors")))
    itv.save_flat(str(tmp_path / "grey.npz"),
                  itv.import_torchvision(str(tmp_path / "tv.safetensors"), in_channels=1))
    rgb = fast_init(lambda: resnet18(num_classes=5, rngs=nnx.Rngs(0)))
    grey = fast_init(lambda: resnet18(num_classes=5, in_channels=1, rngs=nnx.Rngs(0)))
    itv.load_pretrained(rgb, str(tmp_path / "rgb.npz"))
    itv.load_pretrained(grey, str(tmp_path / "grey.npz"))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
    np.testing.assert_allclose(_forward(grey, x), _forward(rgb, jnp.repeat(x, 3, axis=-1)),
                               atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- torch parity
def _torch_resnet(arch, num_classes):
    """Minimal torchvision-identical ResNet (same module names, v1.5 strides, init)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + idt)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + idt)

    class TorchResNet(nn.Module):
        def __init__(self, block, layers, num_classes):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], 2)
            self.layer3 = self._make_layer(block, 256, layers[2], 2)
            self.layer4 = self._make_layer(block, 512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    block, layers = {"resnet18": (BasicBlock, [2, 2, 2, 2]),
                     "resnet50": (Bottleneck, [3, 4, 6, 3])}[arch]
    torch.manual_seed(0)
    net = TorchResNet(block, layers, num_classes)
    with torch.no_grad():  # random affine parameters AND random running statistics
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(100)
        if arch == "resnet50":  # its pooled features are ~20x larger: keep logits O(1-10)
            net.fc.weight.mul_(0.1)
    return torch, net


@pytest.mark.parametrize("arch, fmt", [("resnet18", "pth"), ("resnet18", "safetensors"),
                                       ("resnet50", "pth")])
def test_parity_with_torch_reference(arch, fmt, tmp_path):
    torch, net = _torch_resnet(arch, num_classes=10)
    net.eval()
    src = str(tmp_path / f"tv.{fmt}")
    if fmt == "pth":
        torch.save(net.state_dict(), src)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, src)
    out = str(tmp_path / "cx.safetensors")
    assert itv.main([src, out, "--arch", arch]) == 0

    model = fast_init(lambda: ResNet(arch, num_classes=10, rngs=nnx.Rngs(0)))
    itv.load_pretrained(model, out)
    x = np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = np.asarray(_forward(model, jnp.asarray(x.transpose(0, 2, 3, 1))))
    diff = float(np.abs(got - ref).max())
    print(f"{arch} {fmt}: max |logit diff| = {diff:.2e}, logit scale {np.abs(ref).max():.2f}")
    assert diff < 1e-4


def test_train_mode_parity_with_torch_resnet18(tmp_path):
    """One train-mode forward: same outputs (batch statistics) and same running-stat update."""
    torch, net = _torch_resnet("resnet18", num_classes=10)
    src = str(tmp_path / "tv.pth")
    torch.save(net.state_dict(), src)
    itv.save_flat(str(tmp_path / "cx.npz"), itv.import_torchvision(src))
    model = fast_init(lambda: resnet18(num_classes=10, rngs=nnx.Rngs(0)))
    itv.load_pretrained(model, str(tmp_path / "cx.npz"))
    x = np.random.default_rng(1).normal(size=(4, 3, 64, 64)).astype(np.float32)
    net.train()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = np.asarray(_forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True))
    assert float(np.abs(got - ref).max()) < 1e-4
    sd = net.state_dict()
    ours = flat_state(model)
    for name in ("bn1", "layer2.0.downsample.1", "layer4.1.bn2"):
        np.testing.assert_allclose(ours[f"{name}.mean"], sd[f"{name}.running_mean"].numpy(), atol=1e-5)
        np.testing.assert_allclose(ours[f"{name}.var"], sd[f"{name}.running_var"].numpy(), rtol=1e-4)
