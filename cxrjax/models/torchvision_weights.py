"""torchvision ResNet state_dicts <-> cxrjax NNX ResNets, in both directions (numpy; torch only for .pth).

Import (ImageNet weights into the trainer, `load_pretrained`):

    flat = import_torchvision("resnet18.pth", "resnet18", in_channels=1)   # read, convert, check
    save_flat("r18.safetensors", flat); load_pretrained(model, "r18.safetensors")

Export (a trained encoder out to PyTorch, `encoder_state_dict` + `save_state_dict`): a strict
``torchvision.models.resnet18()`` ``load_state_dict`` accepts the result (after ``model.fc =
nn.Identity()``, or MoCo v2's ``nn.Sequential(Linear, ReLU, Linear)`` head with ``head=True``).

The mapping, one rule per kind of tensor (cxrjax name = the NNX path joined with dots, see
`cxrjax.models.resnet.flat_state`):

    conv      weight (O, I, H, W)                      <->  kernel (H, W, I, O)
    linear    weight (out, in)                         <->  kernel (in, out);  bias <-> bias
    BN        weight / bias / running_mean / running_var  <->  scale / bias / mean / var
              num_batches_tracked: dropped on import; written on export (the training step)
    MoCo head fc.0 / fc.2 (MoCo v2: ``fc = Sequential(Linear, ReLU, Linear)``)  <->  head.linear1 / head.linear2

Grey input: cxrjax's encoders see 1-channel images. Import with ``in_channels=1`` sums torchvision's
conv1 over RGB, so a grey image x gives what the RGB network gives for (x, x, x); export with
``in_channels=3`` spreads the grey conv1 over RGB divided by 3, so the stock 3-channel torchvision model
gives on (x, x, x) what the cxrjax encoder gives on x. Both are exact up to float32 rounding.

A file that does not fit the architecture (missing, unexpected or mis-shaped keys) raises
`WeightImportError` listing the keys.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

_BN_TO_CXR = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN_TO_TORCH = {v: k for k, v in _BN_TO_CXR.items()}
# MoCo v2's encoder_q.fc = Sequential(Linear(dim_mlp, dim_mlp), ReLU(), Linear(dim_mlp, dim))
MOCO_HEAD_NAMES = {"head.linear1": "fc.0", "head.linear2": "fc.2"}


class WeightImportError(ValueError):
    """A state_dict does not match the target architecture (keys or shapes)."""


# ----------------------------------------------------------------------------------------------
# Files


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a torch state_dict from ``.pth``/``.pt`` (torch needed) or ``.safetensors`` (numpy)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    torch = _import_torch(f"reading {path!r}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # checkpoints that wrap the state_dict
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def save_state_dict(path: str, sd: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a torchvision-layout state_dict as ``.safetensors`` (numpy; `metadata` in its header) or
    ``.pth``/``.pt`` (torch: a plain dict of tensors, what ``torch.load`` + ``load_state_dict`` expect).
    Atomic: a killed export never leaves half a file under `path`."""
    arrays = {k: np.array(v, order="C") for k, v in sd.items()}  # (ascontiguousarray makes 0-d arrays 1-d)
    if not path.endswith((".safetensors", ".pth", ".pt")):
        raise ValueError(f"output must end in .safetensors, .pth or .pt, got {path!r}")
    torch = None if path.endswith(".safetensors") else _import_torch(f"writing {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        if torch is None:
            from safetensors.numpy import save_file

            save_file(arrays, tmp, metadata=dict(metadata or {}))
        else:
            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp)  # v: a writable copy
        _default_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_flat(path: str, flat: Mapping[str, np.ndarray]) -> None:
    """Write a flat cxrjax state as ``.safetensors`` or ``.npz`` (chosen by the extension)."""
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path)
        _default_mode(path)
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        raise ValueError(f"output must end in .safetensors or .npz, got {path!r}")


def load_flat(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    raise ValueError(f"weights must be .safetensors or .npz, got {path!r}")


def _default_mode(path: str) -> None:
    """Permissions as for any new file (safetensors writes its files 0600: weights are meant to be shared)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _import_torch(what: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{what} needs PyTorch: `pip install cxrjax[torch]`, or use .safetensors, which needs no torch") from e
    return torch


# ----------------------------------------------------------------------------------------------
# torchvision -> cxrjax


def convert_state_dict(sd: Mapping[str, np.ndarray], *, in_channels: int = 3) -> dict[str, np.ndarray]:
    """torchvision names/layouts -> cxrjax flat names/layouts (no check against an architecture)."""
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        value = np.asarray(value)
        parts = key.split(".")
        if parts[0] == "module":  # DataParallel prefix
            parts = parts[1:]
        *prefix, leaf = parts
        if leaf == "num_batches_tracked":
            continue
        name = ".".join(prefix)
        if value.ndim == 4 and leaf == "weight":  # conv: OIHW -> HWIO
            kernel = value.transpose(2, 3, 1, 0)
            if name == "conv1" and in_channels != kernel.shape[2]:
                if in_channels == 1 and kernel.shape[2] == 3:
                    kernel = kernel.sum(axis=2, keepdims=True)
                else:
                    raise WeightImportError(
                        f"conv1 has {kernel.shape[2]} input channels; cannot make {in_channels}")
            out[f"{name}.kernel"] = kernel
        elif value.ndim == 2 and leaf == "weight":  # linear: (out, in) -> (in, out)
            out[f"{name}.kernel"] = value.T
        elif leaf in ("running_mean", "running_var") or (leaf == "weight" and value.ndim == 1):
            out[f"{name}.{_BN_TO_CXR[leaf]}"] = value  # batch norm
        elif leaf == "bias":  # batch norm or linear: same name
            out[f"{name}.bias"] = value
        else:
            raise WeightImportError(f"do not know how to convert {key!r} of shape {value.shape}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def check_against(expected: Mapping[str, tuple], converted: Mapping[str, np.ndarray], what: str) -> None:
    """Fail with the lists of missing / unexpected / mis-shaped keys, if any."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    bad = sorted(f"{k}: file {tuple(converted[k].shape)} vs model {tuple(expected[k])}"
                 for k in set(expected) & set(converted)
                 if tuple(converted[k].shape) != tuple(expected[k]))
    if missing or unexpected or bad:
        lines = [f"weights do not match {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise WeightImportError("\n".join(lines))


def expected_shapes(arch: str, in_channels: int, num_classes: int) -> dict[str, tuple]:
    """{flat name: shape} of a cxrjax ResNet (built abstractly: no memory, no compilation)."""
    from flax import nnx

    from cxrjax.models.resnet import ResNet, flat_state

    abstract = nnx.eval_shape(lambda: ResNet(arch, num_classes=num_classes, in_channels=in_channels,
                                             rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in flat_state(abstract).items()}


def import_torchvision(src: str, arch: str = "resnet18", *, in_channels: int = 3) -> dict[str, np.ndarray]:
    """Read + convert + check a torchvision ResNet state_dict. Returns the flat cxrjax state."""
    converted = convert_state_dict(read_state_dict(src), in_channels=in_channels)
    num_classes = converted["fc.kernel"].shape[1] if "fc.kernel" in converted else 0
    check_against(expected_shapes(arch, in_channels, num_classes), converted,
                  f"{arch} (in_channels={in_channels}, num_classes={num_classes})")
    return converted


def load_pretrained(model, path: str, *, skip_fc: bool | None = None) -> None:
    """Fill an NNX ResNet (Params and BatchStats) in place from a flat cxrjax weight file.

    ``skip_fc`` (default: when the model has no ``fc``) drops the file's ``fc.*`` entries, so an
    ImageNet classifier file initialises a feature backbone (``num_classes=0``). Anything else that
    does not match exactly (missing, unexpected, shape) raises `WeightImportError`. Values are cast
    to each variable's dtype.
    """
    import jax.numpy as jnp
    from flax import nnx

    flat = load_flat(path)
    if skip_fc is None:
        skip_fc = getattr(model, "fc", None) is None
    if skip_fc:
        flat = {k: v for k, v in flat.items() if not k.startswith("fc.")}
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    variables = {".".join(str(p) for p in var_path): var for var_path, var in nnx.to_flat_state(state)}
    check_against({k: v.shape for k, v in variables.items()}, flat,
                  f"the model ({type(model).__name__}) from {path}")
    for k, var in variables.items():
        var.set_value(jnp.asarray(flat[k], dtype=var.dtype))
    nnx.update(model, state)


# ----------------------------------------------------------------------------------------------
# cxrjax -> torchvision


def to_torchvision(flat: Mapping[str, np.ndarray], *, in_channels: int | None = None,
                   num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """cxrjax flat names/layouts -> a torchvision state_dict (float32 numpy; ``num_batches_tracked`` int64).

    ``in_channels=3`` turns a 1-channel conv1 into torchvision's RGB one (the grey kernel / 3 on each
    channel); None keeps conv1 as it is.
    """
    sd: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        value = np.asarray(value, dtype=np.float32)
        name, leaf = key.rsplit(".", 1)
        if leaf == "kernel" and value.ndim == 4:  # conv: HWIO -> OIHW
            weight = value.transpose(3, 2, 0, 1)
            if name == "conv1" and in_channels is not None and in_channels != weight.shape[1]:
                if not (in_channels == 3 and weight.shape[1] == 1):
                    raise WeightImportError(f"conv1 has {weight.shape[1]} input channels; cannot make {in_channels}")
                weight = np.repeat(weight / 3.0, 3, axis=1)
            sd[f"{name}.weight"] = weight
        elif leaf == "kernel" and value.ndim == 2:  # linear: (in, out) -> (out, in)
            sd[f"{name}.weight"] = value.T
        elif leaf in _BN_TO_TORCH:
            sd[f"{name}.{_BN_TO_TORCH[leaf]}"] = value  # scale/mean/var: batch norm; bias: BN or linear
            if leaf == "mean":
                sd[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
        else:
            raise WeightImportError(f"do not know how to export {key!r} of shape {value.shape}")
    return {k: np.array(v, order="C") for k, v in sd.items()}  # num_batches_tracked stays 0-d


def encoder_state_dict(encoder, *, head: bool = False, in_channels: int = 3,
                       num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """A MoCo encoder (`cxrjax.models.moco.MoCoEncoder`: backbone + head) as a torchvision state_dict.

    The backbone becomes torchvision's ResNet without ``fc`` (load it after ``model.fc = nn.Identity()``);
    ``head=True`` adds the projection head as MoCo v2's ``fc.0`` / ``fc.2``.
    """
    from flax import nnx

    from cxrjax.models.resnet import flat_state

    if getattr(encoder.backbone, "fc", None) is not None:
        raise WeightImportError("the encoder's backbone has a classifier (fc); a MoCo backbone has none")
    flat = {k: np.asarray(v) for k, v in flat_state(encoder.backbone).items()}
    if head:
        state = nnx.state(encoder.head, nnx.Param)
        for var_path, var in nnx.to_flat_state(state):
            module, leaf = ".".join(str(p) for p in var_path[:-1]), str(var_path[-1])
            flat[f"{MOCO_HEAD_NAMES['head.' + module]}.{leaf}"] = np.asarray(var.get_value())
    return to_torchvision(flat, in_channels=in_channels, num_batches_tracked=num_batches_tracked)
