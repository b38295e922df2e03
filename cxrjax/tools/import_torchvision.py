"""Convert a torchvision ResNet state_dict into a flat cxrjax weight file (no torch needed to load it).

    python -m cxrjax.tools.import_torchvision resnet18-f37072fd.pth resnet18.safetensors
    python -m cxrjax.tools.import_torchvision SRC OUT --arch resnet50 --in_channels 1

SRC is a torchvision ``.pth`` (needs torch: ``pip install cxrjax[torch]``) or a ``.safetensors`` of
the same state_dict (read with numpy only). OUT is ``.safetensors`` or ``.npz`` holding the NNX state
as ``{"layer1.0.conv1.kernel": array, ...}`` (see `cxrjax.models.resnet.flat_state`); the trainer
fills a model with `load_pretrained(model, OUT)`.

Conversion: conv ``weight`` OIHW -> ``kernel`` HWIO; ``fc.weight`` (out, in) -> ``fc.kernel``
(in, out); BN ``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``;
``num_batches_tracked`` is dropped. ``--in_channels 1`` sums conv1 over its RGB input channels, so a
grey-level image x gives what the ImageNet network gives for the RGB image (x, x, x). Every source
key must be used and every parameter of the target architecture filled, otherwise the tool fails
and lists the offending keys.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping

import numpy as np

_BN_RENAME = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class WeightImportError(ValueError):
    """A state_dict does not match the target architecture (keys or shapes)."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a torch state_dict from ``.pth``/``.pt`` (torch needed) or ``.safetensors`` (numpy)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path!r} needs PyTorch: `pip install cxrjax[torch]`, or convert the checkpoint "
            "to .safetensors on a machine that has torch") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # checkpoints that wrap the state_dict
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


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
            out[f"{name}.{_BN_RENAME[leaf]}"] = value  # batch norm
        elif leaf == "bias":  # batch norm or linear: same name
            out[f"{name}.bias"] = value
        else:
            raise WeightImportError(f"do not know how to convert {key!r} of shape {value.shape}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def check_against(expected: Mapping[str, tuple], converted: Mapping[str, np.ndarray],
                  what: str) -> None:
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


def _expected_shapes(arch: str, in_channels: int, num_classes: int) -> dict[str, tuple]:
    from flax import nnx

    from cxrjax.models.resnet import ResNet, flat_state

    abstract = nnx.eval_shape(lambda: ResNet(arch, num_classes=num_classes, in_channels=in_channels,
                                             rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in flat_state(abstract).items()}


def import_torchvision(src: str, arch: str = "resnet18", *, in_channels: int = 3) -> dict[str, np.ndarray]:
    """Read + convert + check a torchvision ResNet state_dict. Returns the flat cxrjax state."""
    converted = convert_state_dict(read_state_dict(src), in_channels=in_channels)
    num_classes = converted["fc.kernel"].shape[1] if "fc.kernel" in converted else 0
    check_against(_expected_shapes(arch, in_channels, num_classes), converted,
                  f"{arch} (in_channels={in_channels}, num_classes={num_classes})")
    return converted


def save_flat(path: str, flat: Mapping[str, np.ndarray]) -> None:
    """Write a flat state as ``.safetensors`` or ``.npz`` (chosen by the extension)."""
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path)
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


def load_pretrained(model, path: str, *, skip_fc: bool | None = None) -> None:
    """Fill an NNX ResNet (Params and BatchStats) in place from a file written by this tool.

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
    variables = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    check_against({k: v.shape for k, v in variables.items()}, flat,
                  f"the model ({type(model).__name__}) from {path}")
    for k, var in variables.items():
        var.set_value(jnp.asarray(flat[k], dtype=var.dtype))
    nnx.update(model, state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cxrjax.tools.import_torchvision",
        description="Convert a torchvision ResNet state_dict (.pth or .safetensors) into a cxrjax "
                    "weight file (.safetensors or .npz) that loads without torch.")
    p.add_argument("src", help="torchvision state_dict: .pth/.pt (needs torch) or .safetensors")
    p.add_argument("out", help="output file: .safetensors or .npz")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    p.add_argument("--in_channels", type=int, default=3, choices=[1, 3],
                   help="1 sums conv1 over RGB (grey-level chest X-rays with ImageNet weights)")
    args = p.parse_args(argv)
    try:
        flat = import_torchvision(args.src, args.arch, in_channels=args.in_channels)
    except (WeightImportError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_flat(args.out, flat)
    n = sum(v.size for k, v in flat.items() if not k.endswith((".mean", ".var")))
    print(f"wrote {args.out}: {len(flat)} arrays, {n:,} parameters ({args.arch}, "
          f"in_channels={args.in_channels})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
