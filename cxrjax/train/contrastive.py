"""MedAug contrastive pre-training: MoCo v2 whose positive key is a metadata-chosen image.

`train_and_evaluate(config, workdir)` reads top to bottom: mesh -> data -> model -> optimizer ->
train state -> sharded step -> resume -> loop (metrics, checkpoints, NaN guard). The step is one
`jax.jit` with explicit shardings (`train/mesh.py`: batch over the ('data', 'fsdp') mesh axes, the
ResNet's parameters replicated, the MoCo queue split over `data` along K), the state donated, and
nothing leaves the device except the metrics on logging steps. Multi-process runs: every process runs
this; each reads its own slice of the records, process 0 alone writes logs and files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cxrjax import distributed
from cxrjax.data import augment as augment_lib
from cxrjax.data import device_augment
from cxrjax.data import pairs
from cxrjax.data import pipeline
from cxrjax.models import moco
from cxrjax.train import checkpoint as ckpt_lib
from cxrjax.train import curves
from cxrjax.train import flops as flops_lib
from cxrjax.train import mesh as mesh_lib
from cxrjax.train import metrics as metrics_lib
from cxrjax.train import online_probe
from cxrjax.train import preemption
from cxrjax.train.workdir import workdir_path

@struct.dataclass
class TrainState:
    step: jax.Array
    q_params: nnx.State
    q_stats: nnx.State
    k_params: nnx.State
    k_stats: nnx.State
    opt_state: optax.OptState
    queue: moco.QueueState
    rng: jax.Array
    first_bad_step: jax.Array  # -1 while every loss so far was finite


# ----------------------------------------------------------------------------------------------
# The config: every key a MoCo run has (experiment files in configs/ change what they need)


def default_config():
    """All keys of a MoCo run, set to MedAug's official run (papers.md "The official run, exactly":
    their README command + the defaults of moco/main_moco.py and aihc_utils/image_transform.py);
    configs/*.py start from this. cxrjax's own choices are named variants (`apply_variants`)."""
    import ml_collections as mlc

    c = mlc.ConfigDict()
    c.job = "moco"
    c.seed = 0
    c.batch_size = 16  # MedAug: --batch-size 16, one GPU
    c.epochs = 20  # MedAug: --epochs 20
    c.total_steps = 0  # > 0 overrides epochs
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.checkpoint_atomicity = "auto"  # 'rename' / 'commit_file' (gs://, gcsfuse); train/checkpoint.py
    c.require_accelerator = False  # True: stop at start-up when JAX would train on the CPU

    # Prepared data (python -m cxrjax.prepare); empty dir = the phantom data set, prepared and cached.
    c.data = mlc.ConfigDict(dict(
        dir="", name=mlc.FieldReference(None, field_type=str), split="train",
        strategy="study-same_lat-any",  # MedAug's best: same patient, same study, all lateralities
        include_self=True,  # MedAug eq. 2: the query is in its own candidate set (self-pairs happen)
        hard_negatives=mlc.FieldReference(None, field_type=str), num_hard_negatives=0,
        num_workers=-1, read_threads=2, device_prefetch=2, max_corrupt=100,
    ))
    # Or any TFDS dataset in array_record format (docs/tfds.md): its metadata becomes a cached prepared
    # folder, its images are read from its own files. feature_map: canonical name -> source feature ('' =
    # not mapped); split: 'train' or 'train=train,valid=validation' (canonical=source).
    from cxrjax.data import tfds_source

    c.data.tfds = mlc.ConfigDict(dict(name="", data_dir="", split="train", feature_map=dict(
        image="image", image_id="", patient_id="", study_id="", study_order="", view="", laterality="",
        report="", labels="", **dict.fromkeys(tfds_source.LABEL_KEYS, ""))))  # labels: vector, or one by one
    # version: the phantom's renderer (docs/phantom.md); "2" = the films before real films' nuisance
    c.phantom = mlc.ConfigDict(dict(patients=2000, size=256, seed=0, version=phantom_version()))
    # MedAug (--aug-setting chexpert --rotate 10 --maintain-ratio, crop 320): Resize(320) of the shorter
    # side, aspect kept -> horizontal flip -> rotation +-10 deg -> random 320 x 320 crop; evaluation:
    # Resize(320) -> CenterCrop(320). Normalisation: their CheXpert mean / std.
    c.augment = mlc.ConfigDict(dict(
        size=320, geometry="shorter_side_crop", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=10.0,
        hflip_prob=0.5, brightness=0.0, contrast=0.0, jitter_prob=0.8, blur_prob=0.0, blur_sigma=(0.1, 2.0),
        eval_crop=1.0,
        # device: the workers only read records; crop/rotate/flip(/jitter/blur) run jitted in the train
        # step (cxrjax.data.device_augment). host: the workers augment (numpy/OpenCV). auto: host when
        # JAX runs on the CPU (faster there: README "Input pipeline"), device on an accelerator.
        where="auto",
    ))
    c.model = mlc.ConfigDict(dict(
        arch="resnet18", width=64, embed_dim=128, hidden_dim=512,  # -a resnet18 --mlp: head 512 -> 512 -> 128
        init="imagenet", weights="",  # --from-imagenet, both encoders (weights via tools.import_torchvision)
        dtype="float32",  # or bfloat16 compute (params stay float32)
    ))
    c.moco = mlc.ConfigDict(dict(
        queue_size=24576, momentum=0.999, temperature=0.2,  # --moco-k default, --moco-m default, --moco-t 0.2
        # BN statistics per group of the global batch. MedAug ran one GPU: every statistic over the whole
        # batch of 16 per encoder (1 group; shuffling inside one batch changes nothing).
        shuffle_bn=True, shuffle_bn_groups=1,
        mask_false_negatives="none",  # 'patient' / 'study': drop queue keys of the query's patient/study
        hard_mode="none",  # 'same_laterality_only' / 'reweight' / 'append' / 'synthetic' (MedAug sec. 4.3)
        hard_weight=0.9,  # reweight: share of the denominator's weight on same-laterality keys
        append_fraction=0.1,  # append / synthetic: int(0.1 * K) keys per laterality (their README)
    ))
    c.optim = mlc.ConfigDict(dict(
        name="adam", lr=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9,  # --lr 0.0001, Adam, wd 1e-4
        # MedAug: lr x 0.1 at epochs 12, 18 and 24 (--schedule 12 18 24; no --cos); 'cosine' / 'constant' too
        schedule="step", milestones=(12, 18, 24), decay=0.1, warmup_steps=0, scale_by_batch=False,
    ))
    # A label probe on held-out images every N steps (train/online_probe.py): kNN / logistic AUC beside the loss.
    c.probe = online_probe.default_probe_config()
    c.probe.every = 2000  # MedAug's run: ~140 probes of 512 images over 279k steps, ~1 % of its time
    # ('data', 'fsdp', 'model') device mesh; -1 = the remaining devices (train/mesh.py, docs/scaling.md).
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, model=1))
    return c


# cxrjax's own choices beside the paper's run; each named variant says what differs and why
# (configs/README.md lists them).
VARIANTS = {
    "demo": "phantom data, a small ResNet-18 and a short run: minutes on 2 CPU cores",
    "exclude-self": "positives are always another image when one exists (MedAug's eq. 2 also draws the query itself)",
    "padded": "the whole image, padded to a square, no crop jitter (nothing of the anatomy cut off)",
    "cosine": "cosine decay instead of MedAug's x0.1 steps at epochs 12 and 18",
    "bn-groups": "shuffle BN over 8 groups (the reference MoCo's 8-GPU setting) instead of whole-batch BN",
    "sgd": "MoCo v2's ImageNet recipe: SGD 0.03 x batch/256, momentum 0.9, cosine",
    "crop": "MedAug's random-crop-scale row: RandomResizedCrop area [0.95, 1], ratio [3/4, 4/3]",
    "bf16": "bfloat16 compute (parameters stay float32)",
}


def apply_variants(c, arg: str | None):
    """Shared `:variant` options of the MoCo configs (comma-separated, e.g. `:demo,cosine`); `VARIANTS`."""
    for v in filter(None, (arg or "").split(",")):
        if v == "demo":  # minutes on 2 CPU cores, on the phantom data
            c.data.dir = ""
            c.phantom.patients, c.phantom.size = 300, 64  # ~840 training images; 79 effusion-positive test images
            c.augment.size = 56
            c.model.update(arch="resnet18", width=16, init="random")
            c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 150, 25, 50
            # a queue that is a small part of the ~340 training images (a queue holding most of them is
            # mostly stale keys of the query's own image), and a key encoder that follows in ~100 steps
            c.moco.queue_size, c.moco.momentum = 64, 0.99
            c.data.num_workers = 0
            c.optim.update(lr=1e-3, schedule="constant")  # from random init: a visible decrease in 150 steps
            c.probe.update(every=75, split="train", max_images=256)  # valid holds ~70 labelled images here
        elif v == "exclude-self":
            c.data.include_self = False
        elif v == "padded":
            c.augment.update(geometry="resized_crop", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
        elif v == "cosine":
            c.optim.schedule = "cosine"
        elif v == "bn-groups":
            c.moco.shuffle_bn_groups = 8
        elif v == "sgd":  # MoCo v2's ImageNet recipe, as an option beside the paper's Adam
            c.optim.update(name="sgd", lr=0.03, scale_by_batch=True, schedule="cosine", momentum=0.9)
        elif v == "crop":  # MedAug's random-crop-scale variant (their best row)
            c.augment.update(geometry="resized_crop", crop_scale=(0.95, 1.0), crop_ratio=(3 / 4, 4 / 3))
        elif v == "bf16":
            c.model.dtype = "bfloat16"
        else:
            raise ValueError(f"unknown config variant {v!r}; known: {', '.join(VARIANTS)}")
    return c


# ----------------------------------------------------------------------------------------------
# Pieces, each built from one config section


def make_mesh(config) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'model') mesh of `config.mesh` over all devices of all processes."""
    return mesh_lib.make_mesh(config.mesh)


def prepared_data_dir(config, note) -> str:
    """config.data.dir, a TFDS dataset's prepared view (config.data.tfds), or the phantom data set
    prepared once into a cache folder."""
    tfds_cfg = config.data.get("tfds")  # MoCo configs have it; other jobs reuse this function without it
    if tfds_cfg is not None and tfds_cfg.name:
        if config.data.dir:
            raise ValueError("set config.data.dir (a prepared folder) or config.data.tfds.name (a TFDS dataset), "
                             "not both")
        from cxrjax.data import tfds_source

        return tfds_source.prepared_view(tfds_source.TfdsSource.from_config(tfds_cfg),
                                         strategies=[config.data.strategy], note=note)
    if config.data.dir:
        d = Path(config.data.dir).expanduser()
        if not (d / "table.parquet").is_file():
            raise FileNotFoundError(
                f"config.data.dir={d} holds no prepared data (no table.parquet). Prepare it first: "
                f"python -m cxrjax.prepare --source=... --src=... --out={d}"
            )
        return str(d)
    ph = config.phantom
    cache = Path(os.environ.get("CXRJAX_CACHE", Path.home() / ".cache" / "cxrjax"))
    d = cache / phantom_cache_name(ph)
    prepare_phantom_once(d, ph, note)
    distributed.barrier("cxrjax: phantom prepared")
    return str(d)


def phantom_version() -> str:
    """The phantom renderer a config gets by default: the current one."""
    from cxrjax.data import phantom

    return phantom.VERSION


def phantom_cache_name(ph) -> str:
    """The cache folder of a phantom: its generator version too, so a changed generator never serves
    images of an older one."""
    from cxrjax.data import phantom

    return f"phantom-v{ph.get('version') or phantom.VERSION}-p{ph.patients}-s{ph.size}-seed{ph.seed}"


def prepare_phantom_once(d: Path, ph, note) -> None:
    """Prepare the phantom into `d` unless it is there. Every process calls this: hosts that do not
    share a home directory each write their own copy (the phantom is a pure function of its settings),
    and on a shared filesystem a file lock lets one process write while the others wait for it."""
    import fcntl

    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / "manifest.json").is_file():
            return
        note(f"No data.dir: preparing the phantom data set ({ph.patients} patients, {ph.size}px) in {d} ...")
        from cxrjax import prepare

        prepare.prepare_dataset("phantom", d, patients=ph.patients, size=ph.size, seed=ph.seed,
                                phantom_version=ph.get("version") or None,
                                progress=jax.process_index() == 0)


def resolve_workers(requested: int, previous_run: dict | None) -> int:
    """The number of decode processes. Batch composition depends on it (each worker batches its own
    slice of the records), so it is part of the resume fingerprint: an automatic count (-1) is the one
    the run started with when it is resumed (on any node), else `pipeline.auto_workers()`."""
    if requested != -1:
        return requested
    if previous_run and isinstance(previous_run.get("num_workers"), int):
        return previous_run["num_workers"]
    return pipeline.auto_workers()


def pipeline_config(config, data_dir: str, num_workers: int | None = None) -> pipeline.PipelineConfig:
    """The input pipeline of a run; augment.where "auto" resolved here, once, for this backend."""
    d = config.data
    pairs.check_hard_negatives_compatible(d.strategy, d.hard_negatives)
    aug = augment_lib.AugmentConfig.from_dict(config.augment)
    return pipeline.PipelineConfig(
        data_dir=data_dir, name=d.name, split=d.split, mode="contrastive", strategy=d.strategy,
        include_self=d.include_self, hard_negatives=d.hard_negatives, num_hard_negatives=d.num_hard_negatives,
        batch_size=config.batch_size, seed=config.seed,
        num_workers=d.num_workers if num_workers is None else num_workers,
        read_threads=d.read_threads, device_prefetch=d.device_prefetch, max_corrupt=d.max_corrupt,
        augment=dataclasses.replace(aug, where=augment_lib.resolve_where(aug.where)),
    )


def learning_rate(config, total_steps: int, steps_per_epoch: int | None = None):
    """The lr schedule: 'step' (MedAug: x `decay` at each epoch in `milestones`), 'cosine' or 'constant',
    after `warmup_steps` of linear warm-up; lr x batch/256 with `scale_by_batch` (MoCo's rule)."""
    o = config.optim
    lr = o.lr * (config.batch_size / 256 if o.scale_by_batch else 1.0)
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
    if o.schedule == "constant":
        base = optax.constant_schedule(lr)
    elif o.schedule == "step":
        spe = steps_per_epoch or max(1, total_steps // max(config.epochs, 1))
        bounds = {}
        for epoch in o.milestones:
            step = int(round(epoch * spe))
            if 0 < step < total_steps:  # milestones past the run's end (MedAug's 24 of 20 epochs) never act
                bounds[step] = bounds.get(step, 1.0) * o.decay
        base = optax.piecewise_constant_schedule(lr, bounds)
    else:
        raise ValueError(f"config.optim.schedule={o.schedule!r}; expected 'step', 'cosine' or 'constant'")
    if not warmup:
        return base
    return lambda step: base(step) * jnp.minimum(1.0, step / warmup)


def optimizer(config, schedule) -> optax.GradientTransformation:
    """L2 weight decay added to the gradient, as torch's Adam/SGD(weight_decay=...) do."""
    o = config.optim
    if o.name == "adam":  # MedAug: Adam, lr 1e-4, wd 1e-4
        inner = optax.adam(schedule, b1=o.b1, b2=o.b2)
    elif o.name == "sgd":  # MoCo v2: SGD momentum 0.9, lr 0.03 x batch/256, wd 1e-4, cosine
        inner = optax.sgd(schedule, momentum=o.momentum)
    else:
        raise ValueError(f"config.optim.name={o.name!r}; expected 'adam' or 'sgd'")
    return optax.chain(optax.add_decayed_weights(o.weight_decay), inner)


def build_encoders(config, note):
    m = config.model
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype]
    query = moco.build_moco_encoder(m.arch, in_channels=1, embed_dim=m.embed_dim, hidden_dim=m.hidden_dim,
                                    dtype=dtype, param_dtype=jnp.float32, width=m.width,
                                    # rbg keys: eager init compiles one PRNG kernel per parameter shape;
                                    # rbg's are ~2x cheaper to compile than threefry's (5 s vs 11 s at start-up).
                                    rngs=nnx.Rngs(jax.random.key(config.seed, impl="rbg")))
    if m.init == "imagenet":
        if not m.weights:
            raise ValueError(
                "config.model.init='imagenet' needs config.model.weights=PATH: convert torchvision's weights "
                "once with `python -m cxrjax.tools.import_torchvision resnet18.pth OUT --in_channels 1` "
                "(no download happens at run time), or set config.model.init='random'."
            )
        from cxrjax.models import torchvision_weights

        torchvision_weights.load_pretrained(query.backbone, m.weights)
        note(f"Backbone initialised from {m.weights}")
    elif m.init != "random":
        raise ValueError(f"config.model.init={m.init!r}; expected 'imagenet' or 'random'")
    return query, moco.copy_encoder(query)  # MedAug: both encoders start from the same weights


# ----------------------------------------------------------------------------------------------
# The step


def _key_inputs(batch: dict):
    """The key encoder's inputs as one batch: per example its key view followed by its hard
    negatives (B * (1 + k) images, with their augmentation seeds and content boxes on the device path).
    Interleaving keeps each example's images on the device that holds the example (no exchange to
    assemble them)."""
    parts = {"images": ("key", "hard_negatives"), "seeds": ("key_seed", "hard_negative_seeds"),
             "boxes": ("key_box", "hard_negative_boxes")}
    out = {}
    for name, (key, hard) in parts.items():
        if key not in batch:
            out[name] = None
            continue
        a = batch[key][:, None]
        if "hard_negatives" in batch:
            a = jnp.concatenate([a, batch[hard]], axis=1)
        out[name] = a.reshape((-1,) + a.shape[2:])
    return out["images"], out["seeds"], out["boxes"]


def make_train_step(config, q_graph, k_graph, tx, schedule, mesh=None):
    """The MoCo step (pure; `build_training` jits it). With a `mesh`, the key encoder's shuffled
    inputs and the queue logits are pinned to their shardings (see `moco.encode_keys_shuffled`,
    `moco.moco_loss`), so every device encodes its own B/N keys and scores its own K/N queue rows."""
    mc = config.moco
    bn_groups = mc.shuffle_bn_groups if mc.shuffle_bn else 1
    aug = augment_lib.AugmentConfig.from_dict(config.augment)
    constrain, logits_sharding = (lambda x: x), None
    if mesh is not None:
        batch_sharded = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
        constrain = lambda x: jax.lax.with_sharding_constraint(x, batch_sharded)
        logits_sharding = NamedSharding(mesh, P(None, mesh_lib.batch_axes(mesh)))

    def train_step(state: TrainState, batch: dict):
        rng, shuffle_rng, hard_rng = jax.random.split(state.rng, 3)
        b = batch["query"].shape[0]
        # where="device" batches are augmented here; host-augmented ones are only normalised
        x_q = device_augment.to_views(batch["query"], batch.get("query_seed"), aug, boxes=batch.get("query_box"))

        # Momentum encoder: EMA first, then the keys (reference MoCo), shuffle BN across groups.
        k_params = moco.ema_update(state.k_params, state.q_params, mc.momentum)
        keys_all, k_stats = moco.encode_keys_shuffled(
            k_graph, k_params, state.k_stats, _key_inputs(batch), shuffle_rng, num_groups=bn_groups,
            to_views=lambda xs: device_augment.to_views(xs[0], xs[1], aug, boxes=xs[2]), constrain=constrain)
        keys_all = keys_all.reshape(b, -1, keys_all.shape[-1])
        k_emb = keys_all[:, 0]
        hard, hard_valid = None, None
        if "hard_negatives" in batch:
            hard, hard_valid = keys_all[:, 1:], batch["hard_negative_rows"] >= 0

        def loss_fn(q_params):
            q, q_stats = moco.apply_encoder(q_graph, q_params, state.q_stats, x_q, train=True,
                                            bn_groups=bn_groups)
            loss, m = moco.moco_loss(
                q, k_emb, state.queue, temperature=mc.temperature, q_patient=batch["patient"],
                q_study=batch["study"], q_laterality=batch["laterality"],
                mask_false_negatives=mc.mask_false_negatives, hard_negatives=hard,
                hard_negatives_valid=hard_valid, hard_mode=mc.hard_mode, hard_weight=mc.hard_weight,
                append_fraction=mc.append_fraction, rng=hard_rng, queue_logits_sharding=logits_sharding,
            )
            return loss, (q_stats, m)

        (loss, (q_stats, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.q_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.q_params)
        q_params = optax.apply_updates(state.q_params, updates)
        queue = moco.enqueue(state.queue, k_emb, batch["patient"], batch["key_study"], batch["key_laterality"])

        finite = jnp.isfinite(loss)
        first_bad = jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step)
        new = TrainState(step=state.step + 1, q_params=q_params, q_stats=q_stats, k_params=k_params,
                         k_stats=k_stats, opt_state=opt_state, queue=queue, rng=rng, first_bad_step=first_bad)
        metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads), **m}
        return new, metrics

    return train_step


def state_shardings(abstract: TrainState, mesh) -> TrainState:
    """Where each array of the MoCo state lives: parameters and optimizer state by their logical axis
    names (the ResNet has none: replicated, it is small), the queue split along K over `data`."""
    shardings = mesh_lib.state_sharding(abstract, mesh)
    return shardings.replace(queue=mesh_lib.sharded_along_first(abstract.queue, mesh, mesh_lib.batch_axes(mesh)))


@dataclasses.dataclass
class Training:
    """The initial train state, its shapes and shardings, and the jitted (not yet compiled) step."""

    state: TrainState | None  # None when built with materialize=False (compile-only tools)
    abstract: TrainState
    state_sharding: TrainState
    train_step: object
    q_graph: object = None  # the query encoder's NNX graph (q_params / q_stats are its state)


def check_bn_groups(config, mesh) -> None:
    """BN groups must line up with the batch shards, or every BN layer gathers its activations.

    Each group of the global batch is normalised with its own statistics. With G groups over N batch
    shards (devices along data x fsdp), G a multiple of N puts G/N whole groups on every device (no
    communication) and N a multiple of G makes each group's statistics an all-reduce of C numbers
    over N/G devices (G = 1 is synchronised BN over the whole batch, MedAug's single-GPU setting).
    Anything else makes XLA gather every BN layer's activations (measured: benchmarks/hlo_report.py).
    """
    g = config.moco.shuffle_bn_groups if config.moco.shuffle_bn else 1
    n = mesh_lib.num_batch_shards(mesh)
    if g < 1 or config.batch_size % g:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of moco.shuffle_bn_groups {g}")
    if g % n and n % g:
        b = config.batch_size
        fits = [d for d in range(1, b + 1) if b % d == 0 and (d % n == 0 or n % d == 0)]
        raise ValueError(f"moco.shuffle_bn_groups={g} does not line up with the {n} batch shards of the mesh "
                         f"(data x fsdp): every BN layer would gather its activations across devices. Use a "
                         f"divisor or a multiple of {n} that divides batch_size {b}: one of {fits}")


def build_training(config, mesh, total_steps: int, note=lambda s: None, *, materialize: bool = True,
                   steps_per_epoch: int | None = None) -> Training:
    """Encoders -> optimizer -> sharded initial state -> `jax.jit` step with explicit shardings and
    the state donated (shared by the trainer and benchmarks, so all run the same step).

    Shardings (train/mesh.py): parameters by their logical axis names (the ResNet has none: replicated),
    the queue split over the batch axes along K, the batch over ('data', 'fsdp').
    `materialize=False` builds no state (`state` is None): enough to lower and compile the step from
    `mesh_lib.with_shardings(abstract, state_sharding)` for any device count (benchmarks/hlo_report.py)."""
    check_bn_groups(config, mesh)
    replicated = NamedSharding(mesh, P())
    query, key = build_encoders(config, note)
    q_graph, q_params, q_stats = nnx.split(query, nnx.Param, nnx.BatchStat)
    k_graph, k_params, k_stats = nnx.split(key, nnx.Param, nnx.BatchStat)
    schedule = learning_rate(config, total_steps, steps_per_epoch)
    tx = optimizer(config, schedule)

    def init_state():
        return TrainState(
            step=jnp.zeros((), jnp.int32), q_params=q_params, q_stats=q_stats, k_params=k_params, k_stats=k_stats,
            opt_state=tx.init(q_params),
            queue=moco.init_queue(jax.random.PRNGKey(config.seed + 1), config.moco.queue_size, config.model.embed_dim),
            rng=jax.random.PRNGKey(config.seed + 2), first_bad_step=jnp.full((), -1, jnp.int32),
        )

    abstract = jax.eval_shape(init_state)
    state_sharding = state_shardings(abstract, mesh)
    state = jax.jit(init_state, out_shardings=state_sharding)() if materialize else None
    step_fn = make_train_step(config, q_graph, k_graph, tx, schedule, mesh)
    train_step = jax.jit(step_fn, in_shardings=(state_sharding, pipeline.batch_sharding(mesh, mesh_lib.BATCH_AXES)),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    return Training(state, abstract, state_sharding, train_step, q_graph)


def abstract_batch(config, mesh, image_size: int) -> dict:
    """ShapeDtypeStructs of one global pipeline batch of this config (compile-only tools and tests):
    uint8 images of `image_size` (the view size on the host path, the record size on the device path),
    the metadata codes, and the augmentation seeds / hard negatives when configured."""
    import numpy as np

    where = augment_lib.resolve_where(config.augment.where)
    b, k = config.batch_size, config.data.num_hard_negatives if config.data.hard_negatives else 0
    sharding = pipeline.batch_sharding(mesh, mesh_lib.BATCH_AXES)
    sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    img = (image_size, image_size, 1)
    batch = {"query": sd((b, *img), np.uint8), "key": sd((b, *img), np.uint8)}
    for name in ("patient", "study", "laterality", "key_study", "key_laterality"):
        batch[name] = sd((b,), np.int32)
    if where == "device":
        batch.update(query_seed=sd((b, 2), np.uint32), key_seed=sd((b, 2), np.uint32),
                     query_box=sd((b, 4), np.float32), key_box=sd((b, 4), np.float32))
    if k:
        batch.update(hard_negatives=sd((b, k, *img), np.uint8), hard_negative_rows=sd((b, k), np.int32))
        if where == "device":
            batch.update(hard_negative_seeds=sd((b, k, 2), np.uint32), hard_negative_boxes=sd((b, k, 4), np.float32))
    return batch


# ----------------------------------------------------------------------------------------------
# The job


def _fingerprint(config, pcfg: pipeline.PipelineConfig) -> dict:
    """What a checkpoint must agree with to be resumed."""
    return {"job": "moco", "arch": config.model.arch, "width": config.model.width, "embed_dim": config.model.embed_dim,
            "hidden_dim": config.model.hidden_dim, "queue_size": config.moco.queue_size, "optim": config.optim.name,
            "batch_size": config.batch_size, "data_dir": str(workdir_path(pcfg.data_dir)), "seed": config.seed,
            "strategy": config.data.strategy, "include_self": config.data.include_self,
            "process_count": jax.process_count(), "num_workers": pcfg.num_workers,
            # host and device draw different random numbers: a resume must keep the path
            "augment_where": pcfg.augment.where}


def train_and_evaluate(config, workdir: str) -> dict:
    """Run (or resume) a MoCo pre-training; returns the last logged metrics (window averages)."""
    workdir = workdir_path(workdir)
    note = metrics_lib.note

    note("Creating mesh ...")
    mesh = make_mesh(config)
    note(mesh_lib.describe(mesh))

    note("Creating input pipeline ...")
    data_dir = prepared_data_dir(config, note)
    previous = _previous_run(workdir)
    workers = resolve_workers(config.data.num_workers, previous)
    pcfg = pipeline_config(config, data_dir, num_workers=workers)
    note(f"augmentation on the {pcfg.augment.where} (augment.where={config.augment.where!r}, JAX backend "
         f"{jax.default_backend()}); {workers} decode worker process(es) "
         f"({pipeline.available_cpus()} CPUs available to this process)")
    data = pipeline.load_prepared(data_dir, pcfg.split, pcfg.strategy, pcfg.hard_negatives, name=pcfg.name,
                                  include_self=pcfg.include_self)
    steps_per_epoch = data.n // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the {data.n} images of split {pcfg.split!r}")
    total_steps = config.total_steps if config.total_steps > 0 else config.epochs * steps_per_epoch
    if config.moco.queue_size % config.batch_size:
        raise ValueError(f"moco.queue_size {config.moco.queue_size} must be a multiple of batch_size {config.batch_size}")
    mesh_lib.batch_size_per_shard(config.batch_size, mesh)
    check_bn_groups(config, mesh)

    note("Creating model and compiling the train step ...")
    setup = build_training(config, mesh, total_steps, note, steps_per_epoch=steps_per_epoch)
    state, abstract, state_sharding, train_step = setup.state, setup.abstract, setup.state_sharding, setup.train_step

    ckpt_lib.check_run_compatible(workdir, _fingerprint(config, pcfg))
    ckpt_lib.save_config(workdir, config)  # after the check: a refused config must not replace the run's
    checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=config.checkpoint_every, keep=config.keep_checkpoints,
                                         atomicity_setting=config.checkpoint_atomicity)
    iterator = pipeline.make_iterator(pcfg, mesh, data=data, axis=mesh_lib.BATCH_AXES)
    logger = None
    try:
        # Into this run's shardings, whatever mesh wrote the checkpoint (Orbax reshards); damaged newer
        # checkpoints are named, moved aside and skipped.
        start, restored = checkpointer.restore_latest(mesh_lib.with_shardings(abstract, state_sharding), iterator,
                                                      note=note)
        if restored is not None:
            state = restored
        if start >= total_steps:
            note(f"{workdir} already holds the final step {start} of {total_steps}; nothing to do.")
            return {}

        first = next(iterator)
        compiled = train_step.lower(state, first).compile()
        step_flops = flops_lib.step_flops(compiled)
        logger = metrics_lib.MetricLogger(workdir, total_steps=total_steps, start_step=start)
        logger.note(f"{total_steps} steps ({steps_per_epoch}/epoch), global batch {config.batch_size} on "
                    f"{jax.device_count()} device(s); {step_flops / 1e9:.1f} GFLOP per device per step; InfoNCE "
                    f"chance level ln(K+1) = {chance_loss(config):.2f}")
        probe = online_probe.OnlineProbe.build(config, data_dir, mesh, setup.q_graph, note=logger.note)
        with preemption.StopRequest() as stop:
            last = _loop(config, compiled, state, first, iterator, checkpointer, logger, start=start,
                         total_steps=total_steps, steps_per_epoch=steps_per_epoch, flops=step_flops, workdir=workdir,
                         stop=stop, chance=chance_loss(config), probe=probe)
        if jax.process_index() == 0:
            curves.write_training_curves(workdir)
        return last
    finally:
        checkpointer.close()
        iterator.close()
        if logger is not None:
            logger.close()


def _previous_run(workdir) -> dict | None:
    """WORKDIR/run.json of an earlier start of this run, if any."""
    import json

    path = workdir_path(workdir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def chance_loss(config) -> float:
    """InfoNCE of a model that cannot tell the positive from the K queue keys: ln(K + 1)."""
    return math.log(config.moco.queue_size + 1)


@jax.jit
def _accumulate(sums, metrics):
    return jax.tree.map(jnp.add, sums, metrics)


def _loop(config, compiled, state, batch, iterator, checkpointer, logger, *, start, total_steps,
          steps_per_epoch, flops, workdir, stop=None, chance: float | None = None, probe=None) -> dict:
    """Steps `start`..`total_steps` (shared by the MoCo and MVLM jobs): metrics averaged over each
    logging window (summed on the device, read on log steps only), NaN check and checkpoint on save
    steps, and with a `preemption.StopRequest` a synchronous save and a clean stop when the process is
    asked to stop (SIGTERM: preemption, a time limit). `chance`: the loss at chance, logged beside it.
    `probe` (train/online_probe.py): its metrics are logged on the steps it is due; its time is kept out
    of the step timing and logged as `probe_time_frac` (its share of the wall time)."""
    last = {}
    probe_s = 0.0
    if probe is not None and start == 0:  # where the encoder starts from: the curve's first point
        logger.write(0, probe(state))
    kind = jax.devices()[0].device_kind
    sums = None
    t_window, wait_window, steps_window = time.perf_counter(), 0.0, 0
    for step in range(start, total_steps):
        if step > start:
            t0 = time.perf_counter()
            batch = next(iterator)
            wait_window += time.perf_counter() - t0
        state, metrics = compiled(state, batch)
        sums = metrics if sums is None else _accumulate(sums, metrics)
        steps_window += 1
        done = step + 1
        # (asked at every step, in order: multi-process runs agree on the stop step through it)
        stopping = stop is not None and stop.reached(done) and done < total_steps
        log_now = done % config.log_every == 0 or done == total_steps or stopping
        save_now = checkpointer.manager.should_save(done) or done == total_steps or stopping
        if log_now or save_now:
            bad = int(jax.device_get(state.first_bad_step))
            if bad >= 0:
                _stop_nonfinite(bad, checkpointer, workdir)
        probed = {}
        if probe is not None and probe.due(done):
            t0 = time.perf_counter()
            probed = probe(state)
            probe_s += time.perf_counter() - t0
            if not log_now:
                logger.write(done, probed)
        if log_now:
            m = {k: float(v) / steps_window for k, v in jax.device_get(sums).items()}
            m.update(probed)
            m["lr"] = float(metrics["lr"])  # the current rate, not the window's mean
            dt = time.perf_counter() - t_window - probe_s
            if probe is not None:
                m["probe_time_frac"] = probe_s / (dt + probe_s)
            if chance is not None:
                m["chance_loss"] = chance
            m.update(img_per_s=steps_window * config.batch_size / dt,
                     step_time_s=dt / steps_window, input_wait_frac=wait_window / dt,
                     tflops_per_s_per_device=flops * steps_window / dt / 1e12, epoch=done / steps_per_epoch)
            mfu = flops_lib.utilisation(flops, dt / steps_window, kind)
            if mfu is not None:
                m["mfu"] = mfu
            logger.write(done, m)
            last = m
            sums = None
            t_window, wait_window, steps_window, probe_s = time.perf_counter(), 0.0, 0, 0.0
        if save_now:
            logger.flush()
            checkpointer.save(done, state, iterator, force=done == total_steps or stopping)
        logger.progress(done)
        if stopping:
            checkpointer.wait()  # the checkpoint must be complete before the process goes
            raise preemption.Preempted(stop.message(done, checkpointer.directory))
    return last


_flops = flops_lib.step_flops  # the MVLM trainer's name for it (until it imports train/flops.py itself)


def _stop_nonfinite(bad_step: int, checkpointer, workdir) -> None:
    checkpointer.wait()  # saves in flight hold good states; let them finish, write nothing new
    good = checkpointer.latest_step()
    raise FloatingPointError(
        f"the loss became NaN/Inf at step {bad_step + 1}; the run stopped without saving it. "
        + (f"The last good checkpoint is step {good} in {workdir}/checkpoints. " if good else "No checkpoint was written. ")
        + "Lower config.optim.lr, use float32 (config.model.dtype), or check the input data."
    )
