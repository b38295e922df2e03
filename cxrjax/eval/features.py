"""Frozen encoders for evaluation, and their features over a prepared split (streamed to disk, cached).

One `Encoder` value (how to compute features + its parameters + where it came from) for every kind of
model the evaluation jobs compare in one table:

    restore_encoder(checkpoint)      a cxrjax pre-training run (WORKDIR = latest step, or WORKDIR/STEP /
                                     WORKDIR/checkpoints/STEP), rebuilt from the run's own config.json /
                                     run.json: the query encoder of a MoCo run (q_params / q_stats), or the
                                     image tower of a masked vision-language run (the ViT's params); only
                                     those arrays are read (Orbax partial restore)
    build_encoder(model, "imagenet", weights=...)   torchvision weights converted by tools.import_torchvision
    build_encoder(model, "random", seed=...)        the initialisation the MoCo runs start from
    random_like(encoder, seed)       the same architecture as `encoder` (ResNet or ViT), randomly initialised
    pixels_encoder(size)             no model: the eval-transformed, normalised pixels themselves, area-resized
                                     to size x size and flattened (the raw-pixel baseline, `init=pixels`)

Feature kinds (`Encoder.kind`): 'resnet' (pooled backbone features, or the MoCo head's embedding with
output='head'), 'vit' (the mean of the final patch states of an image-only, unmasked pass,
`MVLM.embed_image`; output='head' = its ITC projection), 'pixels'.

Pixels are normalised by their own range: 8-bit records by 255, 16-bit records (`prepare --bit_depth=16`)
by 65535, so the two give the same features (`normalize_pixels`).

`extract_features` runs the encoder in eval mode over one split, batch sharded over the mesh's
data-parallel axes (one `jax.jit`, nothing but the features leaves the device). With `out=PATH` the
features are written to the .npy file PATH as they arrive (positioned by table row), so memory does
not grow with the number of images; `cached_features` keys that file by (encoder, data, split,
transform, output) so re-running a probe with other fractions or seeds never re-extracts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

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

OUTPUTS = ("backbone", "head")  # pooled backbone features (linear eval), or the embedding of the pre-training head
INITS = ("checkpoint", "imagenet", "random", "pixels")
KINDS = ("resnet", "vit", "pixels")
PIXELS_SIZE = 32  # default side of the raw-pixel baseline's features (32 x 32 = 1024 numbers per image)
# Model keys the MoCo trainer's run.json records; the rest of a model config comes from the defaults.
RUN_JSON_MODEL_KEYS = ("arch", "width", "embed_dim", "hidden_dim")


class CheckpointReadError(ValueError):
    """A checkpoint that exists but cannot be read (damaged files, another model): one line for the user."""


@dataclasses.dataclass(frozen=True)
class PixelsSpec:
    """The raw-pixel 'model': features = the normalised eval image area-resized to size x size (0: as is)."""

    size: int = PIXELS_SIZE


@dataclasses.dataclass
class Encoder:
    """A frozen feature extractor and where it came from (`source`, for caches and tables).

    kind 'resnet': graphdef/params/stats of a split MoCo encoder (backbone + head); 'vit': of a
    masked vision-language model (stats empty); 'pixels': graphdef is a `PixelsSpec`, no parameters.
    """

    graphdef: Any
    params: Any
    stats: Any
    source: dict
    kind: str = "resnet"

    @property
    def feature_dim(self) -> int:
        if self.kind == "resnet":
            return int(self.params["head"]["linear1"]["kernel"].shape[0])  # the head reads the pooled features
        return int(self.source["feature_dim"])  # vit: its hidden size; pixels: size^2


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


def run_job(workdir: str | os.PathLike) -> str:
    """'moco' or 'mvlm': which trainer wrote WORKDIR (config.json's `job`, else run.json's; default moco)."""
    workdir = Path(workdir)
    for name in ("config.json", "run.json"):
        f = workdir / name
        if f.is_file():
            try:
                job = json.loads(f.read_text()).get("job")
            except json.JSONDecodeError as e:
                raise CheckpointReadError(f"{f} is not valid JSON ({e}); the run's files are damaged") from None
            if job:
                return str(job)
    return "moco"


def run_model_config(workdir: str | os.PathLike):
    """The model section a MoCo run was trained with: WORKDIR/config.json if the trainer wrote one, else the
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


def _replicated(mesh):
    return NamedSharding(mesh, P()) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _partial_restore(workdir: Path, step: int, target: dict, what: str) -> dict:
    """Read only the arrays of `target` (a dict of abstract pytrees) from the `state` item of one step.

    Any failure becomes one `CheckpointReadError` line naming the step: damaged files (a storage fault:
    truncated or missing arrays, as `train.checkpoint.damage_reason` recognises them) with what is wrong and
    the intact-looking steps beside it, or a model of other shapes.
    """
    import orbax.checkpoint as ocp

    from cxrjax.train import checkpoint as ckpt_lib

    restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    steps = sorted(int(s.name) for s in (workdir / "checkpoints").iterdir() if s.name.isdigit())
    others = [s for s in steps if s != step]
    step_dir = workdir / "checkpoints" / str(step)
    try:  # quiet_failed_reads: abandoned reads of a damaged step make no noise
        with ckpt_lib.quiet_failed_reads(step_dir), ocp.CheckpointManager(workdir / "checkpoints") as manager:
            state = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
            jax.block_until_ready(state)
    except Exception as e:  # noqa: BLE001 - TensorStore/Orbax raise many types; the user needs one line
        hint = (f"; try an earlier step, e.g. {workdir}/{others[-1]} (steps: {others})" if others
                else "; the run has no other checkpoint")
        damage = ckpt_lib.damage_reason(e, step_dir)
        if damage is not None:
            raise CheckpointReadError(f"{step_dir} cannot be read: the checkpoint is damaged ({damage}){hint}") from None
        raise CheckpointReadError(f"{step_dir} cannot be read as {what} ({_first_line(e)}): the checkpoint is damaged "
                                  f"or holds another model{hint}") from None
    return state


def restore_encoder(checkpoint: str | os.PathLike, mesh=None, model_cfg=None) -> Encoder:
    """The frozen image encoder of a cxrjax run, replicated on `mesh`: a MoCo run's query encoder
    (q_params, q_stats) or a masked vision-language run's ViT (its params); nothing else is read.

    `model_cfg` (MoCo only) defaults to the run's own (see `run_model_config`).
    """
    workdir, step = resolve_checkpoint(checkpoint)
    if run_job(workdir) == "mvlm":
        return _restore_vit(workdir, step, mesh)
    model_cfg = model_cfg or run_model_config(workdir)
    abstract = nnx.eval_shape(_encoder_factory(model_cfg, 0))
    graphdef, a_params, a_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    sharding = _replicated(mesh)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          {"q_params": a_params, "q_stats": a_stats})
    what = (f"a {model_cfg.arch} of width {model_cfg.width} (embed {model_cfg.embed_dim}, hidden "
            f"{model_cfg.hidden_dim}; from the run's config.json/run.json, override with --config.model.*)")
    state = _partial_restore(workdir, step, target, what)
    return Encoder(graphdef, state["q_params"], state["q_stats"],
                   _source(model_cfg, init="checkpoint", checkpoint=str(workdir), step=step))


# ----------------------------------------------------------------------------------------------
# Vision-language (ViT) runs


def _mvlm_model_config(workdir: Path):
    """(MVLMConfig, run config) of a masked vision-language run, from its config.json and run.json."""
    from cxrjax.train import checkpoint as ckpt_lib
    from cxrjax.train import mvlm as mvlm_train

    config = ckpt_lib.load_config(workdir)
    vocab = None
    run_json = workdir / "run.json"
    if run_json.is_file():
        vocab = json.loads(run_json.read_text()).get("vocab_size")
    if vocab is None:  # older runs: the tokenizer the run trained
        from cxrjax.text import tokenizer as tok_lib

        vocab = tok_lib.load(workdir).get_vocab_size()
    return mvlm_train.model_config(config, int(vocab)), config


def _vit_source(mcfg, **kw) -> dict:
    v = mcfg.vit
    width = getattr(v, "width", 0)  # a narrower ViT of the same depth (tests)
    return {"arch": f"vit-{v.size}/{v.patch}" + (f"-w{width}" if width else ""), "stem": v.stem, "image_size": int(v.image_size),
            "vocab_size": int(mcfg.vocab_size), "proj_dim": int(mcfg.proj_dim), "feature_dim": int(v.hidden), **kw}


def _vit_encoder(mcfg, params, mesh, source: dict) -> Encoder:
    from cxrjax.models import mvlm

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: mvlm.MVLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return Encoder(graphdef, params, nnx.State({}), source, kind="vit")


def _restore_vit(workdir: Path, step: int, mesh) -> Encoder:
    from cxrjax.models import mvlm

    mcfg, _ = _mvlm_model_config(workdir)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: mvlm.MVLM(mcfg, rngs=nnx.Rngs(0)))
    _, a_params = nnx.split(abstract, nnx.Param)
    sharding = _replicated(mesh)
    target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), a_params)}
    v = mcfg.vit
    state = _partial_restore(workdir, step, target, f"a ViT-{v.size}/{v.patch} at {v.image_size} px (from the run's "
                                                    "config.json)")
    return _vit_encoder(mcfg, state["params"], mesh, _vit_source(mcfg, init="checkpoint", checkpoint=str(workdir),
                                                                 step=step))


# ----------------------------------------------------------------------------------------------
# Encoders without a checkpoint


def build_encoder(model_cfg, init: str, *, weights: str = "", seed: int = 0, mesh=None) -> Encoder:
    """An ImageNet-initialised ('imagenet', weights from tools.import_torchvision) or random ResNet encoder,
    built exactly as `contrastive.build_encoders` builds a run's query encoder at step 0."""
    from cxrjax.train import contrastive

    if init not in ("imagenet", "random"):
        raise ValueError(f"init={init!r}; expected 'imagenet' or 'random' (or restore_encoder for a checkpoint, "
                         "pixels_encoder for raw pixels)")
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
    params, stats = jax.device_put((params, stats), _replicated(mesh))
    src = _source(model_cfg, init=init, seed=seed)
    if init == "imagenet":
        w = Path(weights).resolve()
        src.update(weights=str(w), weights_bytes=w.stat().st_size, weights_mtime=int(w.stat().st_mtime))
    return Encoder(graphdef, params, stats, src)


def random_like(encoder: Encoder, seed: int = 0, mesh=None) -> Encoder:
    """The architecture of `encoder` (ResNet of its width, or its ViT), randomly initialised with `seed`:
    the 'random' baseline row beside a checkpoint (a run with this seed starts from these weights)."""
    src = encoder.source
    if encoder.kind == "pixels":
        raise ValueError("the raw-pixel baseline has no architecture to initialise randomly")
    if encoder.kind == "vit":
        from cxrjax.models import mvlm

        mcfg, _ = _mvlm_model_config(Path(src["checkpoint"]))
        model = mvlm.build(mcfg, seed)
        params = jax.device_put(nnx.state(model, nnx.Param), _replicated(mesh))
        return _vit_encoder(mcfg, params, mesh, _vit_source(mcfg, init="random", seed=seed))
    from cxrjax.train import contrastive

    model_cfg = contrastive.default_config().model
    model_cfg.update({k: src[k] for k in RUN_JSON_MODEL_KEYS})
    if src.get("init") == "checkpoint":
        model_cfg = run_model_config(src["checkpoint"])
    return build_encoder(model_cfg, "random", seed=seed, mesh=mesh)


def pixels_encoder(size: int = PIXELS_SIZE, image_size: int | None = None) -> Encoder:
    """The raw-pixel baseline: features = the eval-transformed, normalised image, area-resized to
    `size` x `size` (0 = kept at the eval size `image_size`) and flattened."""
    if size < 0:
        raise ValueError(f"pixels size {size} must be >= 0 (0 = the eval image size)")
    side = size or image_size
    if not side:
        raise ValueError("pixels_encoder(size=0) needs the eval image size")
    return Encoder(PixelsSpec(int(size)), {}, {}, {"init": "pixels", "arch": "pixels", "pixels_size": int(size),
                                                   "feature_dim": int(side) ** 2}, kind="pixels")


# ----------------------------------------------------------------------------------------------
# Features over one split


def max_pixel_value(dtype) -> float:
    """The largest value of a record's pixel type: 255 for 8-bit records, 65535 for 16-bit ones."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    raise ValueError(f"images must be uint8 or uint16 records, got {dtype}")


def normalize_pixels(images):
    """uint8 or uint16 images -> float32 normalised as the trainers do (x / max - mean) / std, where max is
    the records' own maximum: 8- and 16-bit records of the same images give the same numbers."""
    return augment_lib.normalize(images, max_value=max_pixel_value(images.dtype))


def encoder_features(kind: str, model, x, *, train: bool = False, output: str = "backbone"):
    """Features of normalised images `x` (B, S, S, 1) float32 from a merged model of `kind`."""
    if kind == "resnet":
        return model.features(x, train=train) if output == "backbone" else model(x, train=train)
    if kind == "vit":
        e = model.embed_image(x)
        if output == "head":
            if not hasattr(model, "image_proj"):
                raise ValueError("output='head': this vision-language run trained no ITC projection (loss.itc=0)")
            return model.image_proj(e)
        return e
    raise ValueError(f"encoder kind {kind!r} has no model")


def area_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of an area resize along one axis: output cell i averages the input pixels it covers,
    each weighted by the length of the overlap (OpenCV's INTER_AREA when shrinking)."""
    edges = np.arange(dst + 1, dtype=np.float64) * src / dst
    pix = np.arange(src, dtype=np.float64)
    overlap = np.minimum(edges[1:, None], pix[None] + 1) - np.maximum(edges[:-1, None], pix[None])
    return (np.clip(overlap, 0.0, None) * dst / src).astype(np.float32)


def pixel_features(spec: PixelsSpec, x):
    """(B, S, S, 1) normalised images -> (B, size*size): area-resized to size x size, flattened (row-major)."""
    b, s = x.shape[0], x.shape[1]
    if spec.size and spec.size != s:
        a = jnp.asarray(area_matrix(s, spec.size))
        x = jnp.einsum("ps,bst,qt->bpq", a, x[..., 0], a, precision=jax.lax.Precision.HIGHEST)
    return x.reshape(b, -1)


def make_forward(encoder_or_graphdef, output: str = "backbone", kind: str | None = None):
    """(params, stats, uint8/uint16 images) -> float32 features; eval mode (running BN statistics)."""
    if isinstance(encoder_or_graphdef, Encoder):
        graphdef, kind = encoder_or_graphdef.graphdef, encoder_or_graphdef.kind
    else:
        graphdef, kind = encoder_or_graphdef, kind or ("pixels" if isinstance(encoder_or_graphdef, PixelsSpec)
                                                       else "resnet")
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}; expected one of {OUTPUTS}")
    if kind == "pixels" and output != "backbone":
        raise ValueError("the raw-pixel baseline has no head: use output='backbone'")

    def forward(params, stats, images):
        x = normalize_pixels(images)
        if kind == "pixels":
            return pixel_features(graphdef, x)
        model = nnx.merge(graphdef, params, stats, copy=True) if kind == "resnet" else nnx.merge(graphdef, params,
                                                                                                 copy=True)
        return encoder_features(kind, model, x, output=output).astype(jnp.float32)

    return forward


def batch_sharding(mesh) -> NamedSharding:
    """The batch split over every data-parallel axis of the mesh (the trainer's ('data', 'fsdp'))."""
    return NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))


@functools.lru_cache(maxsize=8)
def jitted_forward(graphdef, output: str, mesh, kind: str = "resnet"):
    """The sharded forward (params replicated, batch over `data`), one per (model, output, mesh): every
    split of an evaluation reuses the compiled step."""
    replicated, batched = NamedSharding(mesh, P()), batch_sharding(mesh)
    return jax.jit(make_forward(graphdef, output, kind), in_shardings=(replicated, replicated, batched),
                   out_shardings=batched)


class NpyRowWriter:
    """Writes an (n, d) float32 .npy file block by block at given row positions, with plain file writes
    (no memory map: nothing of the file stays resident in the process). `finish` checks every row was
    written exactly once and moves the file into place (atomic: a killed run never leaves half a file)."""

    def __init__(self, path: str | os.PathLike, n: int, d: int):
        self.path, self.n, self.d = Path(path), int(n), int(d)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (self.n, self.d)})
            self.offset = f.tell()
            f.truncate(self.offset + self.n * self.d * 4)
        self.fd = os.open(self.tmp, os.O_WRONLY)
        self.written = np.zeros(self.n, bool)

    def write(self, positions: np.ndarray, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype="<f4")
        order = np.argsort(positions, kind="stable")
        pos, block = positions[order], block[order]
        twice = self.written[pos] | (np.diff(pos, prepend=-1) == 0)
        if twice.any():
            raise RuntimeError(f"{self.path}: row position {int(pos[twice][0])} written twice")
        self.written[pos] = True
        starts = np.flatnonzero(np.diff(pos, prepend=-2) != 1)  # contiguous runs -> one write each
        for a, b in zip(starts, list(starts[1:]) + [len(pos)]):
            os.pwrite(self.fd, block[a:b].tobytes(), self.offset + int(pos[a]) * self.d * 4)

    def finish(self) -> Path:
        os.close(self.fd)
        self.fd = None
        if not self.written.all():
            raise RuntimeError(f"{self.path}: {int((~self.written).sum())} of {self.n} rows were never written")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def _records_dtype(data) -> np.dtype:
    """The pixel type of a split's records (uint8 unless the records say 16-bit)."""
    try:
        return np.dtype(pipeline.open_reader(data).format.dtype)
    except (AttributeError, FileNotFoundError, ValueError, TypeError):
        return np.dtype(np.uint8)


def extract_features(encoder: Encoder, data_dir: str, split: str, augment: augment_lib.AugmentConfig, *,
                     mesh, batch_size: int = 64, output: str = "backbone", num_workers: int = 0,
                     name: str | None = None, progress: bool = True,
                     out: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every image of `split` -> (features (n, d) float32, table rows (n,) int64), sorted by row.

    Batches are sharded over the mesh's data axes; a short last batch is padded (row -1) so every step has
    the compiled shape and every process runs the same number of steps. The images keep their records'
    pixel type (uint8 or uint16) up to the device, where they are normalised by that type's maximum.
    `out`: the features go to that .npy file as they come (process 0 writes; memory stays flat whatever
    the number of images) and are returned as a read-only memory map of it.
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
    forward = jitted_forward(encoder.graphdef, output, mesh, encoder.kind)
    size = augment.size
    dtype = _records_dtype(data)
    rows_sorted = np.sort(data.split_rows)  # the output order
    writer, feats, written, started = None, None, None, False
    leader = jax.process_index() == 0
    it = iter(pipeline.make_dataset(cfg, data))
    try:
        for _ in tqdm(range(steps), desc=f"features {split}", unit="batch", disable=not progress, leave=False):
            batch = next(it, None)
            if batch is not None:
                dtype = batch["image"].dtype
            images = np.zeros((local_b, size, size, 1), dtype)
            row = np.full((local_b,), -1, np.int64)
            if batch is not None:
                k = len(batch["row"])
                images[:k], row[:k] = batch["image"], batch["row"]
            x = forward(encoder.params, encoder.stats, jax.make_array_from_process_local_data(batched, images))
            x = np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)
            r = multihost_utils.process_allgather(row, tiled=False).reshape(-1)
            keep = r >= 0
            pos = np.searchsorted(rows_sorted, r[keep])
            if not started:  # the feature size is known after the first batch
                started = True
                if out is not None and leader:
                    writer = NpyRowWriter(out, data.n, x.shape[1])
                elif out is None:
                    feats = np.zeros((data.n, x.shape[1]), np.float32)
                    written = np.zeros(data.n, bool)
            if writer is not None:
                writer.write(pos, x[keep])
            elif feats is not None:
                feats[pos] = x[keep]
                written[pos] = True
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if out is not None:
        if writer is not None:
            try:
                writer.finish()  # raises if a row is missing (corrupt records are fatal here: max_corrupt=0)
            except RuntimeError as e:
                writer.abort()
                raise RuntimeError(f"split {split!r}: {e}") from None
        _barrier("cxrjax: features written")
        return np.load(out, mmap_mode="r"), rows_sorted
    if feats is None:
        raise RuntimeError(f"split {split!r}: no batch was extracted")
    if not written.all():  # corrupt records are fatal here (max_corrupt=0): a missing row would bias AUC
        raise RuntimeError(f"split {split!r}: extracted {int(written.sum())} of {data.n} images")
    return feats, rows_sorted


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from cxrjax import distributed

        distributed.barrier(name)


def cache_key(encoder: Encoder, data_dir: str, split: str, augment: augment_lib.AugmentConfig, output: str) -> str:
    """A hash of everything the features depend on (the prepare run is identified by its manifest)."""
    manifest = Path(data_dir) / "manifest.json"
    data_id = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else str(
        (Path(data_dir) / "table.parquet").stat().st_mtime_ns)
    key = {"encoder": encoder.source, "data": str(Path(data_dir).resolve()), "data_id": data_id, "split": split,
           "transform": {"size": augment.size, "eval_crop": augment.eval_crop}, "output": output,
           "normalisation": "by-dtype-max"}  # features before the 16-bit fix were normalised by 255 whatever the type
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(encoder: Encoder, data_dir: str, split: str, augment: augment_lib.AugmentConfig, *,
                    cache_dir: str | os.PathLike | None, note=print, **kw) -> tuple[np.ndarray, np.ndarray]:
    """`extract_features`, streamed into `cache_dir/<split>-<key>.npy` (+ `.json`: rows' count and the
    encoder) and read from there (memory-mapped) when it was computed before. None: no cache."""
    output = kw.get("output", "backbone")
    if cache_dir is None:
        return extract_features(encoder, data_dir, split, augment, **kw)
    path = Path(cache_dir) / f"{split}-{cache_key(encoder, data_dir, split, augment, output)}.npy"
    rows = np.sort(pipeline.load_prepared(data_dir, split, None, name=kw.get("name")).split_rows)
    if path.is_file():
        x = np.load(path, mmap_mode="r")
        if x.shape[0] == len(rows):
            note(f"Features of {split!r} from cache {path}")
            return x, rows
        note(f"Cache {path} holds {x.shape[0]} rows, the split {len(rows)}: extracting again")
    x, rows = extract_features(encoder, data_dir, split, augment, out=path, **kw)
    if jax.process_index() == 0:
        info = path.with_suffix(".json")
        info.write_text(json.dumps({"encoder": encoder.source, "split": split, "rows": len(rows), "dim": x.shape[1],
                                    "size": augment.size, "output": output}, indent=1, default=str))
    return x, rows
