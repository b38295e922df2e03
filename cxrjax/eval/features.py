"""Frozen encoders for evaluation, and their features over a prepared split (cached on disk).

Three initialisations, one `Encoder` value (graph + params + BatchNorm running stats):

    restore_encoder(checkpoint)      the query encoder of a cxrjax MoCo run (WORKDIR = latest step, or
                                     WORKDIR/STEP / WORKDIR/checkpoints/STEP); only the `state` item's
                                     q_params / q_stats are read (Orbax partial restore)
    build_encoder(model, "imagenet", weights=...)   torchvision weights converted by tools.import_torchvision
    build_encoder(model, "random", seed=...)        the initialisation the MoCo runs start from

`extract_features` runs the encoder in eval mode (running BN stats) over one split, in record order,
batch sharded over the mesh's data-parallel axes (one `jax.jit`, nothing but the features leaves the device);
`cached_features` keys the result by (encoder, data, split, transform, output) so re-running a probe with
other fractions or seeds never re-extracts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax.data import augment as augment_lib
from cxrjax.data import pipeline
from cxrjax.models import moco
from cxrjax.train import mesh as mesh_lib

OUTPUTS = ("backbone", "head")  # pooled backbone features (linear eval), or the L2-normalised MoCo embedding
INITS = ("checkpoint", "imagenet", "random")
# Model keys the trainer's run.json records; the rest of a model config comes from the defaults.
RUN_JSON_MODEL_KEYS = ("arch", "width", "embed_dim", "hidden_dim")


@dataclasses.dataclass
class Encoder:
    """A split MoCo encoder (backbone + head) and where it came from (`source`, for caches and tables)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    stats: nnx.State
    source: dict

    @property
    def feature_dim(self) -> int:
        return int(self.params["head"]["linear1"]["kernel"].shape[0])  # the head reads the pooled features


# ----------------------------------------------------------------------------------------------
# Where a checkpoint is, and the model it holds


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, int]:
    """WORKDIR (latest step), WORKDIR/STEP or WORKDIR/checkpoints/STEP -> (workdir, step)."""
    p = Path(path).expanduser().resolve()
    if (p / "checkpoints").is_dir():
        workdir, step = p, None
    elif p.name.isdigit() and p.parent.name == "checkpoints":
        workdir, step = p.parent.parent, int(p.name)
    elif p.name.isdigit() and (p.parent / "checkpoints").is_dir():
        workdir, step = p.parent, int(p.name)
    else:
        raise FileNotFoundError(
            f"{path}: not a cxrjax run (expected WORKDIR with checkpoints/, WORKDIR/STEP or "
            "WORKDIR/checkpoints/STEP, as written by `python -m cxrjax.main --workdir=WORKDIR`)")
    steps = sorted(int(s.name) for s in (workdir / "checkpoints").iterdir() if s.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{workdir}/checkpoints has no step {step}; it has steps {steps}")
    return workdir, step


def run_model_config(workdir: str | os.PathLike):
    """The model section a run was trained with: WORKDIR/config.json if the trainer wrote one, else the
    trainer's defaults updated with what WORKDIR/run.json records (arch, width, embed_dim, hidden_dim)."""
    from cxrjax.train import contrastive

    workdir = Path(workdir)
    model = contrastive.default_config().model
    config_json, run_json = workdir / "config.json", workdir / "run.json"
    if config_json.is_file():
        saved = json.loads(config_json.read_text()).get("model", {})
        source = config_json
    elif run_json.is_file():
        saved = {k: v for k, v in json.loads(run_json.read_text()).items() if k in RUN_JSON_MODEL_KEYS}
        source = run_json
    else:
        raise FileNotFoundError(f"{workdir} has neither config.json nor run.json: cannot tell which model its "
                                "checkpoints hold")
    unknown = sorted(set(saved) - set(model.keys()))
    if unknown:
        raise ValueError(f"{source}: unknown model keys {unknown}; written by a newer cxrjax?")
    model.update(saved)
    if source == run_json and (missing := [k for k in RUN_JSON_MODEL_KEYS if k not in saved]):
        raise ValueError(f"{run_json} lacks model keys {missing}; cannot rebuild the encoder")
    return model


def _encoder_factory(model_cfg, seed: int):
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.dtype]
    return lambda: moco.build_moco_encoder(
        model_cfg.arch, in_channels=1, embed_dim=model_cfg.embed_dim, hidden_dim=model_cfg.hidden_dim,
        dtype=dtype, param_dtype=jnp.float32, width=model_cfg.width,
        rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))  # same key as contrastive.build_encoders


def _source(model_cfg, **kw) -> dict:
    return {"arch": model_cfg.arch, "width": int(model_cfg.width), "embed_dim": int(model_cfg.embed_dim),
            "hidden_dim": int(model_cfg.hidden_dim), **kw}


def restore_encoder(checkpoint: str | os.PathLike, mesh=None, model_cfg=None) -> Encoder:
    """The query encoder (q_params, q_stats) of a MoCo checkpoint, replicated on `mesh`.

    Only those two entries of the `state` item are read; the optimizer, key encoder, queue and
    data-iterator state stay on disk. `model_cfg` defaults to the run's own (see `run_model_config`).
    """
    import orbax.checkpoint as ocp

    workdir, step = resolve_checkpoint(checkpoint)
    model_cfg = model_cfg or run_model_config(workdir)
    abstract = nnx.eval_shape(_encoder_factory(model_cfg, 0))
    graphdef, a_params, a_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    sharding = NamedSharding(mesh, P()) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          {"q_params": a_params, "q_stats": a_stats})
    restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        try:
            state = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cannot read the query encoder of {workdir}/checkpoints/{step} as a {model_cfg.arch} of width "
                f"{model_cfg.width} (embed {model_cfg.embed_dim}, hidden {model_cfg.hidden_dim}): {e}\n"
                "Is this a cxrjax MoCo run? Override the model with --config.model.* if its run.json is wrong."
            ) from e
    return Encoder(graphdef, state["q_params"], state["q_stats"],
                   _source(model_cfg, init="checkpoint", checkpoint=str(workdir), step=step))


def build_encoder(model_cfg, init: str, *, weights: str = "", seed: int = 0, mesh=None) -> Encoder:
    """An ImageNet-initialised ('imagenet', weights from tools.import_torchvision) or random encoder,
    built exactly as `contrastive.build_encoders` builds a run's query encoder at step 0."""
    from cxrjax.train import contrastive

    if init not in ("imagenet", "random"):
        raise ValueError(f"init={init!r}; expected 'imagenet' or 'random' (or restore_encoder for a checkpoint)")
    if init == "imagenet" and not (weights and Path(weights).is_file()):
        raise FileNotFoundError(
            f"ImageNet init needs a weights file (got {weights!r}); ImageNet weights are never downloaded: convert "
            "torchvision's once with `python -m cxrjax.tools.import_torchvision resnet18.pth weights/r18.safetensors "
            "--in_channels 1` and pass its path")
    cfg = contrastive.default_config()
    cfg.seed = seed
    cfg.model.update(dict(model_cfg))
    cfg.model.update(init=init, weights=weights)
    query = contrastive.build_encoders(cfg, note=lambda s: None)[0]
    graphdef, params, stats = nnx.split(query, nnx.Param, nnx.BatchStat)
    if mesh is not None:
        params, stats = jax.device_put((params, stats), NamedSharding(mesh, P()))
    src = _source(model_cfg, init=init, seed=seed)
    if init == "imagenet":
        w = Path(weights).resolve()
        src.update(weights=str(w), weights_bytes=w.stat().st_size, weights_mtime=int(w.stat().st_mtime))
    return Encoder(graphdef, params, stats, src)


# ----------------------------------------------------------------------------------------------
# Features over one split


def make_forward(graphdef: nnx.GraphDef, output: str = "backbone"):
    """(params, stats, uint8 images) -> float32 features; eval mode (running BN statistics)."""
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}; expected one of {OUTPUTS}")

    def forward(params, stats, images):
        model = nnx.merge(graphdef, params, stats, copy=True)
        x = augment_lib.normalize(images)
        return model.features(x, train=False) if output == "backbone" else model(x, train=False)

    return forward


def batch_sharding(mesh) -> NamedSharding:
    """The batch split over every data-parallel axis of the mesh (the trainer's ('data', 'fsdp'))."""
    return NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))


@functools.lru_cache(maxsize=8)
def jitted_forward(graphdef: nnx.GraphDef, output: str, mesh):
    """The sharded forward (params replicated, batch over `data`), one per (model, output, mesh): every
    split of an evaluation reuses the compiled step."""
    replicated, batched = NamedSharding(mesh, P()), batch_sharding(mesh)
    return jax.jit(make_forward(graphdef, output), in_shardings=(replicated, replicated, batched),
                   out_shardings=batched)


def extract_features(encoder: Encoder, data_dir: str, split: str, augment: augment_lib.AugmentConfig, *,
                     mesh, batch_size: int = 64, output: str = "backbone", num_workers: int = 0,
                     name: str | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image of `split` -> (features (n, d) float32, table rows (n,) int64), in record order.

    Batches are sharded over the mesh's `data` axis; a short last batch is padded (row -1) so every
    step has the compiled shape and every process runs the same number of steps.
    """
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    n_dev = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names]))
    batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the data axis
    cfg = pipeline.PipelineConfig(data_dir=data_dir, name=name, split=split, mode="eval", batch_size=batch_size,
                                  num_epochs=1, shuffle=False, drop_remainder=False, augment=augment,
                                  num_workers=num_workers, max_corrupt=0)
    data = pipeline.load_prepared(data_dir, split, None, name=name)
    local_b = cfg.local_batch_size()
    _, count = cfg.layout()
    steps = -(-(-(-data.n // count)) // local_b)  # ceil(ceil(n / processes) / local batch)
    batched = batch_sharding(mesh)
    forward = jitted_forward(encoder.graphdef, output, mesh)
    size = augment.size
    feats, rows = [], []
    it = iter(pipeline.make_dataset(cfg, data))
    for _ in tqdm(range(steps), desc=f"features {split}", unit="batch", disable=not progress, leave=False):
        batch = next(it, None)
        images = np.zeros((local_b, size, size, 1), np.uint8)
        row = np.full((local_b,), -1, np.int64)
        if batch is not None:
            k = len(batch["row"])
            images[:k], row[:k] = batch["image"], batch["row"]
        out = forward(encoder.params, encoder.stats, jax.make_array_from_process_local_data(batched, images))
        feats.append(multihost_utils.process_allgather(out, tiled=True))
        rows.append(multihost_utils.process_allgather(row, tiled=False).reshape(-1))
    feats, rows = np.concatenate(feats).astype(np.float32), np.concatenate(rows)
    keep = rows >= 0
    order = np.argsort(rows[keep], kind="stable")
    feats, rows = feats[keep][order], rows[keep][order]
    if len(rows) != data.n:  # corrupt records are fatal here (max_corrupt=0): a missing row would bias AUC
        raise RuntimeError(f"split {split!r}: extracted {len(rows)} of {data.n} images")
    return feats, rows


def cache_key(encoder: Encoder, data_dir: str, split: str, augment: augment_lib.AugmentConfig, output: str) -> str:
    """A hash of everything the features depend on (the prepare run is identified by its manifest)."""
    manifest = Path(data_dir) / "manifest.json"
    data_id = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else str(
        (Path(data_dir) / "table.parquet").stat().st_mtime_ns)
    key = {"encoder": encoder.source, "data": str(Path(data_dir).resolve()), "data_id": data_id, "split": split,
           "transform": {"size": augment.size, "eval_crop": augment.eval_crop}, "output": output}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(encoder: Encoder, data_dir: str, split: str, augment: augment_lib.AugmentConfig, *,
                    cache_dir: str | os.PathLike | None, note=print, **kw) -> tuple[np.ndarray, np.ndarray]:
    """`extract_features`, read from `cache_dir/<key>.npz` when it was computed before (None: no cache)."""
    output = kw.get("output", "backbone")
    path = Path(cache_dir) / f"{split}-{cache_key(encoder, data_dir, split, augment, output)}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            note(f"Features of {split!r} from cache {path}")
            return z["features"], z["rows"]
    feats, rows = extract_features(encoder, data_dir, split, augment, **kw)
    if path is not None and jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=feats, rows=rows, source=json.dumps(encoder.source))
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry
    return feats, rows
