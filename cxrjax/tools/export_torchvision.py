"""Write the encoder of a cxrjax MoCo run as a torchvision ResNet state_dict (weights out to PyTorch).

    python -m cxrjax.tools.export_torchvision --checkpoint=runs/medaug --out=encoder.safetensors
    python -m cxrjax.tools.export_torchvision --checkpoint=runs/medaug/4000 --out=encoder.pth --head
    python -m cxrjax.tools.export_torchvision --checkpoint=runs/medaug --out=key.safetensors --encoder=key

--checkpoint is WORKDIR (its newest step), WORKDIR/STEP or WORKDIR/checkpoints/STEP; only the chosen
encoder's arrays are read from the Orbax checkpoint (`cxrjax.eval.features`). --out ``.safetensors``
needs no torch; ``.pth``/``.pt`` needs torch (``pip install cxrjax[torch]``). Beside it, OUT.json says
how to build the torch model and how images must be normalised.

In PyTorch (``--in_channels=3``, the default: the stock model; give it the grey image on all 3 channels)::

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()      # --head: nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))

``--in_channels=1`` keeps the trained 1-channel conv1: ``model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)``.
The conversion is `cxrjax.models.torchvision_weights` (the way in is `cxrjax.tools.import_torchvision`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TORCHVISION_WIDTH = 64  # torchvision's ResNets: 64 channels after the stem


def restore_moco_encoder(checkpoint: str, encoder: str = "query"):
    """(features.Encoder, model config, step) of a MoCo run's query or key encoder; nothing else is read."""
    import jax
    from flax import nnx

    from cxrjax.eval import features

    workdir, step = features.resolve_checkpoint(checkpoint)
    if features.run_job(workdir) != "moco":
        raise ValueError(f"{workdir} is a {features.run_job(workdir)!r} run; only MoCo ResNet encoders have a "
                         "torchvision layout")
    model_cfg = features.run_model_config(workdir)
    if model_cfg.width != TORCHVISION_WIDTH:
        raise ValueError(f"{workdir}: a {model_cfg.arch} of width {model_cfg.width}; torchvision's ResNets have width "
                         f"{TORCHVISION_WIDTH}, so no torchvision model can hold it (pre-train with "
                         f"--config.model.width={TORCHVISION_WIDTH})")
    if encoder == "query":
        return features.restore_encoder(checkpoint, model_cfg=model_cfg), model_cfg, step
    if encoder != "key":
        raise ValueError(f"encoder={encoder!r}; expected 'query' or 'key'")
    # The key encoder: the same partial restore as features.restore_encoder, of k_params / k_stats.
    abstract = nnx.eval_shape(features._encoder_factory(model_cfg, 0))
    graphdef, a_params, a_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          {"k_params": a_params, "k_stats": a_stats})
    state = features._partial_restore(workdir, step, target, f"the key encoder of a {model_cfg.arch}")
    return (features.Encoder(graphdef, state["k_params"], state["k_stats"],
                             features._source(model_cfg, init="checkpoint", checkpoint=str(workdir), step=step)),
            model_cfg, step)


def torch_recipe(arch: str, feature_dim: int, *, head: bool, in_channels: int, hidden_dim: int,
                 embed_dim: int) -> dict:
    """How to build the torch module this state_dict loads into (strict `load_state_dict`)."""
    return {
        "model": f"torchvision.models.{arch}()",
        "conv1": None if in_channels == 3 else f"torch.nn.Conv2d(1, {TORCHVISION_WIDTH}, 7, 2, 3, bias=False)",
        "fc": (f"torch.nn.Sequential(torch.nn.Linear({feature_dim}, {hidden_dim}), torch.nn.ReLU(), "
               f"torch.nn.Linear({hidden_dim}, {embed_dim}))") if head else "torch.nn.Identity()",
        "output": (f"the MoCo embedding before L2 normalisation ({embed_dim}; "
                   "torch.nn.functional.normalize(model(x)) is cxrjax's)") if head
        else f"the pooled backbone features ({feature_dim}), what cxrjax's linear evaluation uses",
    }


def export(checkpoint: str, out: str, *, encoder: str = "query", head: bool = False, in_channels: int = 3) -> dict:
    """Restore -> torchvision state_dict -> `out` (+ `out`.json). Returns what was written (the JSON)."""
    from flax import nnx

    from cxrjax import __version__
    from cxrjax.data import augment as augment_lib
    from cxrjax.models import torchvision_weights as tvw

    if in_channels not in (1, 3):
        raise ValueError(f"in_channels={in_channels}; expected 1 or 3")
    if not out.endswith((".safetensors", ".pth", ".pt")):  # before the restore, which takes a while
        raise ValueError(f"--out must end in .safetensors, .pth or .pt, got {out!r}")
    enc, model_cfg, step = restore_moco_encoder(checkpoint, encoder)
    model = nnx.merge(enc.graphdef, enc.params, enc.stats)
    sd = tvw.encoder_state_dict(model, head=head, in_channels=in_channels, num_batches_tracked=step)
    feature_dim = int(model.backbone.feature_dim)
    embed_dim = int(model.head.linear2.kernel.shape[1])
    hidden_dim = int(model.head.linear1.kernel.shape[1])
    info = {
        "cxrjax": __version__, "checkpoint": enc.source["checkpoint"], "step": int(step), "encoder": encoder,
        "arch": model_cfg.arch, "in_channels": in_channels, "head": head, "feature_dim": feature_dim,
        "torch": torch_recipe(model_cfg.arch, feature_dim, head=head, in_channels=in_channels,
                              hidden_dim=hidden_dim, embed_dim=embed_dim),
        # what cxrjax feeds its encoders (augment.normalize): pixels / max of their type, then (x - mean) / std
        "input": {"channels": "grey" if in_channels == 1 else "grey, repeated on the 3 channels",
                  "scale": "x / 255 for 8-bit images, x / 65535 for 16-bit",
                  "mean": augment_lib.CXR_MEAN, "std": augment_lib.CXR_STD,
                  "train_image_size": _train_image_size(Path(enc.source["checkpoint"]))},
        "tensors": len(sd),
        "parameters": int(sum(v.size for k, v in sd.items() if k.endswith((".weight", ".bias")))),
    }
    tvw.save_state_dict(out, sd, metadata={"cxrjax": json.dumps(info)})
    Path(f"{out}.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _train_image_size(workdir: Path):
    try:
        return json.loads((workdir / "config.json").read_text())["augment"]["size"]
    except (OSError, KeyError, ValueError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cxrjax.tools.export_torchvision",
        description="Write the query (or key) encoder of a cxrjax MoCo checkpoint as a torchvision ResNet "
                    "state_dict (.safetensors, or .pth with torch) that torchvision.models.resnet18/50 load.")
    p.add_argument("--checkpoint", required=True,
                   help="WORKDIR (newest step), WORKDIR/STEP or WORKDIR/checkpoints/STEP")
    p.add_argument("--out", required=True, help="output file: .safetensors, or .pth/.pt (needs torch)")
    p.add_argument("--encoder", default="query", choices=["query", "key"],
                   help="the query encoder (trained by the gradient) or the momentum (key) encoder")
    p.add_argument("--head", action="store_true",
                   help="include the MoCo projection head as fc.0 / fc.2 (MoCo v2's layout)")
    p.add_argument("--in_channels", type=int, default=3, choices=[1, 3],
                   help="3: stock torchvision conv1 (the grey kernel / 3 on each of R, G, B; feed grey images on "
                        "3 channels); 1: the trained 1-channel conv1 (replace the model's conv1)")
    args = p.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, encoder=args.encoder, head=args.head, in_channels=args.in_channels)
    except (OSError, ValueError, ImportError) as e:  # CheckpointReadError and WeightImportError are ValueErrors
        print(f"error: {str(e).strip()}", file=sys.stderr)
        return 1
    t = info["torch"]
    print(f"wrote {args.out} (+ .json): {info['encoder']} encoder of {info['checkpoint']} step {info['step']}, "
          f"{info['arch']}, {info['parameters']:,} parameters, {info['tensors']} tensors")
    print(f"load: model = {t['model']}; " + (f"model.conv1 = {t['conv1']}; " if t["conv1"] else "")
          + f"model.fc = {t['fc']}; model.load_state_dict(...)")
    print(f"input: {info['input']['channels']}, {info['input']['scale']}, then (x - {info['input']['mean']}) / "
          f"{info['input']['std']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
