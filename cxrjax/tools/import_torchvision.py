"""Convert a torchvision ResNet state_dict into a flat cxrjax weight file (no torch needed to load it).

    python -m cxrjax.tools.import_torchvision resnet18-f37072fd.pth resnet18.safetensors
    python -m cxrjax.tools.import_torchvision SRC OUT --arch resnet50 --in_channels 1

SRC is a torchvision ``.pth`` (needs torch: ``pip install cxrjax[torch]``) or a ``.safetensors`` of
the same state_dict (read with numpy only). OUT is ``.safetensors`` or ``.npz`` holding the NNX state
as ``{"layer1.0.conv1.kernel": array, ...}`` (see `cxrjax.models.resnet.flat_state`); the trainer
fills a model with `cxrjax.models.torchvision_weights.load_pretrained(model, OUT)`, where the
conversion lives (this module is its command line; the way back is `cxrjax.tools.export_torchvision`).

Conversion: conv ``weight`` OIHW -> ``kernel`` HWIO; ``fc.weight`` (out, in) -> ``fc.kernel``
(in, out); BN ``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``;
``num_batches_tracked`` is dropped. ``--in_channels 1`` sums conv1 over its RGB input channels, so a
grey-level image x gives what the ImageNet network gives for the RGB image (x, x, x). Every source
key must be used and every parameter of the target architecture filled, otherwise the tool fails
and lists the offending keys.
"""

from __future__ import annotations

import argparse
import sys

# The library lives in cxrjax.models.torchvision_weights; these names stay importable from here for
# callers written before the move (the trainer, evaluation jobs).
from cxrjax.models.torchvision_weights import (  # noqa: F401
    WeightImportError,
    check_against,
    convert_state_dict,
    import_torchvision,
    load_flat,
    load_pretrained,
    read_state_dict,
    save_flat,
)


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
