"""Masked vision-language pre-training (Wang et al. 2021) on mixed paired / unpaired image-report data.

`train_and_evaluate(config, workdir)` reads top to bottom: mesh -> data + tokenizer -> model ->
shardings -> optimizer -> train state -> sharded step -> resume -> loop. The step is one `jax.jit`
with explicit shardings (batch over the mesh's data axes; parameters by their logical axis names,
replicated on a data-only mesh), the state donated; nothing leaves the device except the metrics
on logging steps. Conventions (workdir layout, resume, NaN guard, metrics) are those of the MoCo
trainer, `cxrjax.train.contrastive`, whose pieces are reused.

The workdir holds, besides checkpoints/metrics: `tokenizer.json` (trained on the training split's
report text at the first start, loaded on resume) and `config.json` (read by the eval jobs).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax.data import vl_pipeline
from cxrjax.models import mvlm, vit
from cxrjax.text import tokenizer as tok_lib
from cxrjax.train import checkpoint as ckpt_lib
from cxrjax.train import contrastive
from cxrjax.train import mesh as mesh_lib
from cxrjax.train import metrics as metrics_lib
from cxrjax.train import preemption
from cxrjax.train import workdir as workdir_lib


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    first_bad_step: jax.Array  # -1 while every loss so far was finite


# ----------------------------------------------------------------------------------------------
# The config


def default_config():
    """All keys of a masked vision-language run (ViT-B/16, 224 px); configs/mvlm_*.py start from this."""
    import ml_collections as mlc

    c = mlc.ConfigDict()
    c.job = "mvlm"
    c.seed = 0
    c.batch_size = 64
    c.total_steps = 100_000
    c.log_every = 50
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    c.checkpoint_atomicity = "auto"  # 'rename' / 'commit_file' (gs://, gcsfuse); train/checkpoint.py
    c.require_accelerator = False  # True: stop at start-up unless JAX runs on a GPU/TPU (also --require_accelerator)
    c.data = mlc.ConfigDict(dict(
        dir="", name=mlc.FieldReference(None, field_type=str), split="train",
        shares={"paired": 1.0},  # fraction of each batch per kind: paired / image / text
        paired_fraction=1.0,  # patients of the train split whose images come with their reports
        text_source="records",  # 'records' (unpaired patients' reports) or 'reports' (reports.parquet)
        num_workers=-1, read_threads=2, device_prefetch=2, max_corrupt=100,
    ))
    # version: the phantom's renderer (docs/phantom.md); "2" = the films before real films' nuisance
    c.phantom = mlc.ConfigDict(dict(patients=2000, size=256, seed=0, version=contrastive.phantom_version()))
    # Mild geometry only: the report describes sides ("right pleural effusion"), so no flips.
    c.augment = mlc.ConfigDict(dict(
        size=224, crop_scale=(0.8, 1.0), crop_ratio=(3 / 4, 4 / 3), rotation=5.0, hflip_prob=0.0,
        brightness=0.0, contrast=0.0, jitter_prob=0.0, blur_prob=0.0, blur_sigma=(0.1, 2.0), eval_crop=1.0,
    ))
    # width / depth: 0 = the size's own; > 0 a narrower / shallower model with the size's heads (tests, debugging).
    # remat: 'none' | 'full' | 'dots' (rematerialise each block; vit.REMAT_POLICIES).
    # attention: 'auto' (cuDNN's fused kernel on GPU with bf16, else XLA) | 'xla' | 'cudnn'.
    c.model = mlc.ConfigDict(dict(size="base", patch=16, stem="none", dtype="float32", proj_dim=256, norm_pix=True,
                                  width=0, depth=0, remat="none", attention="auto"))
    c.text = mlc.ConfigDict(dict(vocab_size=8000, max_len=128, min_frequency=2))
    # Block sides (in patches) of the multi-scale masks: each must divide the patch grid into >= 2x2 blocks.
    # 224 px / patch 16 = a 14x14 grid, divided by 1, 2 and 7 (16, 32 and 112 px blocks; 7 = quadrants);
    # 1/2/4 need a grid divisible by 4 (e.g. 256 px: --config.augment.size=256 --config.mask.scales=1,2,4).
    c.mask = mlc.ConfigDict(dict(image_ratio=0.5, scales=(1, 2, 7), text_prob=0.15, text_mask_frac=0.8,
                                 text_random_frac=0.1))
    c.loss = mlc.ConfigDict(dict(mlm=1.0, mvm=1.0, itc=0.5))  # itc: image-report contrastive on paired rows
    c.optim = mlc.ConfigDict(dict(lr=1.5e-4, weight_decay=0.05, b1=0.9, b2=0.95, warmup_steps=2000, clip_norm=1.0))
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, model=1))  # train/mesh.py; --config.mesh.fsdp=N for FSDP
    c.eval = mlc.ConfigDict(dict(split="test", label="Pleural Effusion", batch_size=64))
    return c


VARIANTS = ("demo", "cpu", "bf16", "conv", "small", "large", "remat")


def apply_variants(c, arg: str | None):
    """`:variant` options (comma-separated): demo (phantom, minutes on CPU), cpu (the demo's model, trained
    long enough to learn on a CPU budget: docs/mvlm_results.md), bf16, conv (patch-local CNN stem),
    small / large (ViT-S/16, ViT-L/16), remat (rematerialise every block)."""
    variants = list(filter(None, (arg or "").split(",")))
    if "cpu" in variants and "demo" not in variants:
        variants.insert(variants.index("cpu"), "demo")
    for v in variants:
        if v == "cpu":  # after demo: what differs from it, and why
            c.phantom.patients = 1500  # ~5,000 images: 900 steps x 32 see each paired image ~11 times
            c.text.max_len = 128  # the phantom's reports: median 55, 90th percentile 103 word pieces (64 cut 45 %)
            c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 32, 900, 50, 300
            c.optim.warmup_steps = 60
            c.loss.itc = 1.0  # retrieval and the probe depend on the image-report alignment
        elif v == "demo":
            c.data.dir = ""
            c.phantom.patients, c.phantom.size = 400, 64
            c.augment.size = 64
            c.model.update(size="tiny", patch=8, proj_dim=64)
            c.mask.scales = (1, 2, 4)  # 64 px / patch 8 = an 8x8 grid
            c.text.update(vocab_size=1000, max_len=64)  # the phantom's reports: ~60 word pieces
            c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 200, 25, 100
            c.optim.update(lr=1e-3, warmup_steps=30, weight_decay=0.05)
            c.data.num_workers = 0
            c.eval.batch_size = 32
        elif v == "bf16":
            c.model.dtype = "bfloat16"
        elif v == "conv":
            c.model.stem = "conv"
        elif v in ("small", "large"):
            c.model.size = v
        elif v == "remat":
            c.model.remat = "full"
        else:
            raise ValueError(f"unknown config variant {v!r}; known: {', '.join(VARIANTS)}")
    return c


# ----------------------------------------------------------------------------------------------
# Pieces


def model_config(config, vocab_size: int) -> mvlm.MVLMConfig:
    m = config.model  # .get: configs of runs from before width/remat/attention existed
    return mvlm.MVLMConfig(
        vit=vit.ViTConfig(size=m.size, image_size=config.augment.size, patch=m.patch, channels=1, stem=m.stem,
                          dtype=m.dtype, width=m.get("width", 0), depth_override=m.get("depth", 0),
                          remat=m.get("remat", "none"),
                          attention=m.get("attention", "auto")),
        vocab_size=vocab_size, max_len=config.text.max_len, proj_dim=m.proj_dim if config.loss.itc > 0 else 0,
        norm_pix=m.norm_pix)


def load_or_train_tokenizer(config, vl_cfg, workdir, note):
    path = workdir_lib.workdir_path(workdir) / tok_lib.FILENAME
    if path.is_file():
        return tok_lib.load(path)
    note(f"Training the report tokenizer (WordPiece, vocab <= {config.text.vocab_size}) on the training reports ...")
    tok = tok_lib.train_tokenizer(vl_pipeline.tokenizer_corpus(vl_cfg), config.text.vocab_size,
                                  config.text.min_frequency)
    if jax.process_index() == 0:
        tok_lib.save(tok, workdir)
    return tok


# Leaves that are matrices of linear maps: dense/conv kernels, the attention projections (q/k/v as
# (embed, heads, kv), out as (heads, kv, embed)) and the word-piece embedding (also the tied MLM decoder).
DECAYED_LEAVES = ("kernel", "q", "k", "v", "out", "embedding")


def decay_mask(params):
    """True for the leaves weight decay applies to: matrices of linear maps (`DECAYED_LEAVES`). Not
    decayed (ViT/MAE/BERT practice): biases (incl. the (3, heads, kv) qkv bias), LayerNorm scales and
    offsets, the CLS and [MASK] tokens, type and position embeddings, the MLM output bias, the ITC
    temperature."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_name(path) in DECAYED_LEAVES, params)


def param_name(path) -> str:
    """The parameter's own name in a key path ('kernel', 'q', 'scale', ...): its last dictionary key."""
    return next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def optimizer(config, total_steps: int):
    o = config.optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, min(o.warmup_steps, total_steps - 1), total_steps)
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
    return tx, schedule


def make_train_step(config, graphdef, tx, schedule, counts: dict[str, int], mesh=None, param_sharding=None):
    """The pure step. The global batch is one block per batch shard, each [paired, image, text]
    (`vl_pipeline.shard_slices`). Three encoder passes, each holding only the tokens its rows have (an
    absent modality would get no attention anyway: same states, fewer FLOPs):

        joint       paired rows: masked image + MLM-corrupted report        -> MVM + MLM
        image-only  image rows (masked) + the paired rows' clean images      -> MVM; ITC image side
        text-only   text rows (corrupted) + the paired rows' clean reports   -> MLM; ITC text side

    How it splits over devices: the passes run under `jax.vmap` over the batch shards, on one replica
    of the parameters per shard (a broadcast pinned to the batch axes; dimensions split over `model`
    stay split). So each device runs every pass on its own rows (a kind is a local slice, never
    re-spread), each replica's gradient sums its three passes locally, and the gradient crosses the
    devices ONCE, as the transpose of the broadcast (one all-reduce per parameter, where taking the
    passes' parameter gradients from one shared copy reduces each pass separately: 3x the bytes). The
    losses are global: per-shard sums of errors and counts are added before dividing, and the ITC loss
    takes every shard's paired embeddings (a small all-gather).
    With fsdp > 1 the replicas hold whole parameters (gathered once per step, not per layer)."""
    w = config.loss
    patch, norm_pix, num_scales = config.model.patch, config.model.norm_pix, len(config.mask.scales)
    axes = mesh_lib.batch_axes(mesh) if mesh is not None else ()
    shards = mesh_lib.batch_shards(mesh) if mesh is not None else 1
    slices = vl_pipeline.shard_slices(counts, shards)
    n_paired = counts.get("paired", 0)
    itc = w.itc > 0 and n_paired > 1

    def replica_sharding(sh):  # a parameter's sharding with a leading axis over the batch shards
        drop = lambda e: (None if e is None else (tuple(a for a in ((e,) if isinstance(e, str) else e) if a not in axes)
                                                  or None))
        return NamedSharding(mesh, P(axes or None, *(drop(e) for e in sh.spec)))

    def replicate(params):
        if mesh is None:
            return jax.tree.map(lambda x: x[None], params)
        return jax.tree.map(lambda x, sh: jax.lax.with_sharding_constraint(jnp.broadcast_to(x, (shards, *x.shape)),
                                                                           replica_sharding(sh)), params, param_sharding)

    def per_shard(batch):  # (B, ...) -> (shards, B / shards, ...): a layout change, each block stays put
        out = {k: x.reshape(shards, x.shape[0] // shards, *x.shape[1:]) for k, x in batch.items()}
        if mesh is not None:
            out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P(axes or None)))
        return out

    def take(batch, kind):
        a, b = slices[kind]
        return {k: x[a:b] for k, x in batch.items()}

    def cat(*xs):
        return jnp.concatenate(xs) if len(xs) > 1 else xs[0]

    def shard_terms(params, batch):
        """One batch shard: the three passes -> loss sums (MVM, MLM) and the paired rows' ITC embeddings."""
        model = nnx.merge(graphdef, params)
        batch = dict(batch, text_valid=batch["text_valid"] & batch["text_present"][:, None])
        mvm_rows, mvm_states, mlm_labels, mlm_states = [], [], [], []
        if "paired" in slices:
            p = take(batch, "paired")
            img, txt = model(p["image"], p["image_present"], p["patch_mask"], p["text_ids"], p["text_valid"])
            mvm_rows.append(p), mvm_states.append(img), mlm_labels.append(p["text_labels"]), mlm_states.append(txt)
        n_p = slices["paired"][1] - slices["paired"][0] if "paired" in slices else 0
        # image-only pass: the image rows, then (ITC) the paired rows' images unmasked
        image_in = [take(batch, "image")] if "image" in slices else []
        if itc:
            image_in.append(dict(p, patch_mask=jnp.zeros_like(p["patch_mask"])))
        out = {}
        if image_in:
            states, _ = model(cat(*(x["image"] for x in image_in)), cat(*(x["image_present"] for x in image_in)),
                              cat(*(x["patch_mask"] for x in image_in)), None, None)
            if "image" in slices:
                mvm_rows.append(image_in[0]), mvm_states.append(states[: len(image_in[0]["image"])])
            if itc:
                out["itc_image"] = model.image_proj(mvlm.pool_image(states[len(states) - n_p :]))
        # text-only pass: the text rows, then (ITC) the paired rows' reports without the MLM corruption
        text_in = [take(batch, "text")] if "text" in slices else []
        if itc:
            text_in.append(dict(p, text_ids=jnp.where(p["text_labels"] >= 0, p["text_labels"], p["text_ids"])))
        if text_in:
            _, states = model(None, None, None, cat(*(x["text_ids"] for x in text_in)),
                              cat(*(x["text_valid"] for x in text_in)))
            if "text" in slices:
                mlm_labels.append(text_in[0]["text_labels"]), mlm_states.append(states[: len(text_in[0]["text_ids"])])
            if itc:
                out["itc_text"] = model.text_proj(mvlm.pool_text(states[len(states) - n_p :], p["text_valid"]))
                out["itc_valid"] = p["source"] == 0
        if mvm_rows:
            out.update(mvlm.mvm_sums(model.regenerate(cat(*mvm_states)), patch_targets(cat(*(x["image"] for x in mvm_rows))),
                                     cat(*(x["patch_mask"] for x in mvm_rows)), cat(*(x["image_present"] for x in mvm_rows)),
                                     cat(*(x["mask_scale"] for x in mvm_rows)), num_scales))
        if mlm_states:
            out.update(mvlm.mlm_sums(model.mlm_logits(cat(*mlm_states)), cat(*mlm_labels)))
        return out

    def loss_fn(params, batch):
        terms = jax.vmap(shard_terms, spmd_axis_name=axes or None)(replicate(params), per_shard(batch))
        sums = {k: v.sum(0) for k, v in terms.items() if not k.startswith("itc_")}
        total, metrics = 0.0, {}
        if "mvm_n" in sums:
            l_mvm, m = mvlm.mvm_from_sums(sums, num_scales)
            metrics.update(m)
            total = total + w.mvm * l_mvm
        if "mlm_n" in sums:
            l_mlm, m = mvlm.mlm_from_sums(sums)
            metrics.update(m)
            total = total + w.mlm * l_mlm
        if itc:
            flat = lambda x: x.reshape(-1, *x.shape[2:])  # every shard's paired rows, in global order
            l_itc, m = mvlm.itc_loss(flat(terms["itc_image"]), flat(terms["itc_text"]),
                                     nnx.merge(graphdef, params).logit_scale[...], flat(terms["itc_valid"]))
            metrics.update(m)
            total = total + w.itc * l_itc
        metrics["loss"] = total
        return total, metrics

    def patch_targets(image):
        return mvlm.patch_targets(image, patch, norm_pix)

    def train_step(state: TrainState, batch: dict):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss)
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step)
        metrics.update(lr=schedule(state.step), grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, first_bad_step=first_bad), metrics

    return train_step


@dataclasses.dataclass
class Training:
    """The model's graph, the initial train state, its shapes and shardings, and the jitted step."""

    graphdef: object
    state: TrainState
    abstract: TrainState
    state_sharding: TrainState
    batch_sharding: NamedSharding
    train_step: object


def build_training(config, mesh, vocab_size: int, total_steps: int, counts: dict[str, int],
                   materialize: bool = True) -> Training:
    """Model -> shardings (logical names -> mesh) -> optimizer -> sharded initial state -> jitted step.

    counts: examples of each kind per global batch (`VLConfig.counts()`); with the batch sharding they
    give where the paired rows sit in the global batch (`vl_pipeline.kind_rows`). materialize=False:
    shapes and shardings only (`state` is abstract; for lowering the step, e.g. benchmarks/hlo_report.py)."""
    mcfg = model_config(config, vocab_size)
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: mvlm.MVLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    p_sharding = mesh_lib.state_sharding(abstract_params, mesh)  # logical names -> mesh (train/mesh.py RULES)
    tx, schedule = optimizer(config, total_steps)
    replicated = NamedSharding(mesh, P())

    def init_params():
        # rbg keys: one compiled init program instead of a PRNG kernel per parameter shape
        with nnx.use_eager_sharding(False):
            model = mvlm.MVLM(mcfg, rngs=nnx.Rngs(jax.random.key(config.seed, impl="rbg")))
        return nnx.state(model, nnx.Param)

    if materialize:
        params = jax.jit(init_params, out_shardings=p_sharding)()
        opt_state = jax.jit(tx.init)(params)  # moments follow the parameters' shardings (propagated by XLA)
        # ... except leaves XLA put on one device (step counts): replicate those
        o_sharding = jax.tree.map(lambda x: x.sharding if len(x.sharding.device_set) == mesh.size else replicated,
                                  opt_state)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                           first_bad_step=jnp.full((), -1, jnp.int32))
        state = jax.device_put(state, TrainState(step=replicated, params=p_sharding, opt_state=o_sharding,
                                                 first_bad_step=replicated))
        state_sharding = jax.tree.map(lambda x: x.sharding, state)
    else:  # shapes only: the moments' shardings from the names they share with the parameters
        params = jax.jit(init_params, out_shardings=p_sharding).eval_shape()
        opt_state = jax.eval_shape(tx.init, params)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                           first_bad_step=jax.ShapeDtypeStruct((), jnp.int32))
        state_sharding = TrainState(step=replicated, params=p_sharding, opt_state=mesh_lib.state_sharding(opt_state, mesh),
                                    first_bad_step=replicated)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sharding)
    state = state if materialize else abstract
    batch_sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
    step_fn = make_train_step(config, graphdef, tx, schedule, counts, mesh, p_sharding)
    train_step = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    return Training(graphdef, state, abstract, state_sharding, batch_sharding, train_step)


def abstract_batch(config, mesh, counts: dict[str, int]) -> dict:
    """The global batch the step takes (shapes, dtypes as on the device, batch sharding): `vl_pipeline`'s
    example fields with a leading axis of the batch size."""
    b = sum(counts.values())
    sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
    spec = vl_pipeline.example_spec(config.augment.size, config.text.max_len, config.model.patch)
    return {k: jax.ShapeDtypeStruct((b, *shape), jax.dtypes.canonicalize_dtype(dtype), sharding=sharding)
            for k, (shape, dtype) in spec.items()}


def abstract_step(config, num_devices: int, devices=None):
    """(lowered train step, title) of `config` on `num_devices` devices (all of them, or `devices` with a
    data-only mesh), lowered from shapes only (no data, no initialised weights): benchmarks/hlo_report.py."""
    mesh = mesh_lib.make_mesh(config.mesh) if devices is None else mesh_lib.make_mesh({"data": -1}, devices=devices)
    b = config.batch_size
    counts = vl_pipeline.kind_counts(config.data.shares, b)
    setup = build_training(config, mesh, config.text.vocab_size, total_steps=1000, counts=counts, materialize=False)
    m = config.model
    title = (f"MVLM ViT-{m.size} (patch {m.patch}, {m.stem} stem), global batch {b} {counts}, "
             f"{config.augment.size} px + {config.text.max_len} word pieces, vocab {config.text.vocab_size}, "
             f"ITC {'on' if config.loss.itc > 0 else 'off'}, on {num_devices} devices ({mesh_lib.describe(mesh)})")
    return setup.train_step.lower(setup.abstract, abstract_batch(config, mesh, counts)), title


def _fingerprint(config, data_dir: str, vocab_size: int) -> dict:
    m = config.model
    narrowed = {k: m[k] for k in ("width", "depth") if m[k]}
    return {"job": "mvlm", "size": m.size, **narrowed, "patch": m.patch, "stem": m.stem, "image_size": config.augment.size,
            "vocab_size": vocab_size, "max_len": config.text.max_len, "proj_dim": m.proj_dim if config.loss.itc > 0 else 0,
            "batch_size": config.batch_size, "shares": dict(config.data.shares), "seed": config.seed,
            "paired_fraction": config.data.paired_fraction, "text_source": config.data.text_source,
            "data_dir": str(Path(data_dir).resolve()), "process_count": jax.process_count()}


# ----------------------------------------------------------------------------------------------
# The job


def train_and_evaluate(config, workdir: str) -> dict:
    """Run (or resume) a masked vision-language pre-training; returns the last logged metrics."""
    workdir = workdir_lib.workdir_path(workdir)  # local (absolute) or a URL: gs://bucket/run
    note = metrics_lib.note
    if config.total_steps <= 0:
        raise ValueError("config.total_steps must be > 0 for the masked vision-language job")

    note("Creating mesh ...")
    mesh = contrastive.make_mesh(config)

    note("Creating input pipeline and tokenizer ...")
    data_dir = contrastive.prepared_data_dir(config, note)
    vl_cfg = vl_pipeline.config_from_dict(config, data_dir, mesh_lib.batch_shards(mesh))
    counts = vl_cfg.counts()
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(config, vl_cfg, workdir, note)
    vocab_size = tokenizer.get_vocab_size()
    ckpt_lib.check_run_compatible(workdir, _fingerprint(config, data_dir, vocab_size))
    ckpt_lib.save_config(workdir, config)  # after the check: a refused config must not replace the run's

    checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=config.checkpoint_every, keep=config.keep_checkpoints,
                                         atomicity_setting=config.checkpoint_atomicity)
    note("Creating model and compiling the train step ...")
    setup = build_training(config, mesh, vocab_size, config.total_steps, counts)
    iterator = vl_pipeline.make_vl_iterator(vl_cfg, tokenizer, mesh, axis=mesh_lib.batch_axes(mesh))
    logger = None
    try:
        # The newest intact checkpoint; damaged newer ones are named, moved aside and redone.
        start, restored = checkpointer.restore_latest(setup.abstract, iterator, note)
        if start >= config.total_steps:
            note(f"{workdir} already holds the final step {start} of {config.total_steps}; nothing to do.")
            return {}
        state = setup.state if restored is None else restored
        first = next(iterator)
        compiled = setup.train_step.lower(state, first).compile()
        flops = step_flops(compiled)
        logger = metrics_lib.MetricLogger(workdir, total_steps=config.total_steps, start_step=start)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        logger.note(f"{config.total_steps} steps, global batch {config.batch_size} ({counts}) on {jax.device_count()} "
                    f"device(s); ViT-{config.model.size}/{config.model.patch}, {n_params / 1e6:.2f} M parameters, "
                    f"vocab {vocab_size}; {flops / 1e9:.1f} GFLOP/step per device")
        with preemption.StopRequest() as stop:
            return _loop(config, compiled, state, first, iterator, checkpointer, logger, stop, start=start,
                         steps_per_epoch=_steps_per_epoch(vl_cfg), flops=flops, workdir=workdir)
    finally:
        checkpointer.close()
        iterator.close()
        if logger is not None:
            logger.close()


@jax.jit
def _accumulate(sums, metrics):
    return jax.tree.map(jnp.add, sums, metrics)


def _loop(config, compiled, state, batch, iterator, checkpointer, logger, stop, *, start, steps_per_epoch, flops,
          workdir) -> dict:
    """Steps `start`..`config.total_steps`: metrics averaged over each logging window (summed on the device,
    read on log steps only), NaN check and checkpoint on save steps; on a stop request (SIGTERM:
    preemption, a time limit; `train/preemption.py`) the step is finished, saved synchronously and the
    run stops with `preemption.Preempted`. (The MoCo loop's conventions; its metrics are its own.)"""
    total, last, sums = config.total_steps, {}, None
    t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
    for step in range(start, total):
        if step > start:
            t0 = time.perf_counter()
            batch = next(iterator)
            wait_window += time.perf_counter() - t0
        state, metrics = compiled(state, batch)
        sums = metrics if sums is None else _accumulate(sums, metrics)
        steps_window += 1
        done = step + 1
        stopping = stop.reached(done)
        log_now = done % config.log_every == 0 or done == total or stopping
        save_now = checkpointer.manager.should_save(done) or done == total or stopping
        if log_now or save_now:
            bad = int(jax.device_get(state.first_bad_step))
            if bad >= 0:
                contrastive._stop_nonfinite(bad, checkpointer, workdir)
        if log_now:
            m = {k: float(v) / steps_window for k, v in jax.device_get(sums).items()}
            m["lr"] = float(metrics["lr"])  # the current rate, not the window's mean
            dt = time.perf_counter() - t_window
            m.update(img_per_s=steps_window * config.batch_size / dt, step_time_s=dt / steps_window,
                     input_wait_frac=wait_window / dt, tflops_per_s_per_device=flops * steps_window / dt / 1e12,
                     epoch=done / steps_per_epoch)
            logger.write(done, m)
            last, sums = m, None
            t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
        if save_now:
            logger.flush()
            checkpointer.save(done, state, iterator, force=done == total or stopping)
        logger.progress(done)
        if stopping:
            checkpointer.wait()  # the checkpoint must be complete before the process goes
            raise preemption.Preempted(stop.message(done, checkpointer.directory))
    return last


def step_flops(compiled) -> float:
    """FLOPs of one step on one device, from XLA's cost analysis of the compiled (partitioned) program."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort on some backends
        return 0.0


def _steps_per_epoch(vl_cfg) -> int:
    """Steps for one pass over the largest stream (the `epoch` metric)."""
    table = vl_pipeline.read_split_table(vl_cfg.pipeline.data_dir, vl_cfg.pipeline.split)
    recs = vl_pipeline.source_records(table, vl_cfg.paired_fraction, vl_cfg.pipeline.seed)
    return max(1, max(len(recs[k]) // n for k, n in vl_cfg.counts().items() if k != "text" or vl_cfg.text_source == "records"))


# ----------------------------------------------------------------------------------------------
# For the eval jobs


def load_run(workdir: str, step: int | None = None):
    """(config, data_dir, tokenizer, model with the checkpoint's parameters, step) of a finished run."""
    import orbax.checkpoint as ocp

    workdir = workdir_lib.workdir_path(workdir)  # local (absolute) or a URL: gs://bucket/run
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: --checkpoint must be the workdir of a masked "
                                "vision-language run (python -m cxrjax.main --config=configs/mvlm_*.py ...)")
    config = ckpt_lib.load_config(workdir)
    data_dir = json.loads((workdir / "run.json").read_text())["data_dir"]  # the fingerprint has it
    tokenizer = tok_lib.load(workdir)
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = step if step is not None else manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    mcfg = model_config(config, tokenizer.get_vocab_size())
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: mvlm.MVLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    tx, _ = optimizer(config, config.total_steps)
    replicated = NamedSharding(mesh, P())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=jax.eval_shape(tx.init, abstract_params),
                          first_bad_step=jax.ShapeDtypeStruct((), jnp.int32))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    model = nnx.merge(graphdef, restored.params)
    return config, data_dir, tokenizer, model, int(step)
