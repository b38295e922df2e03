"""The MoCo step really splits its work over 8 devices: read from the compiled program, not inferred
from equal losses (a step that runs the whole batch on every device gives the same loss).

What is asserted, per device, for a ResNet-18 (width 8) MoCo step with global batch 16 on 8 devices:
* every convolution of both encoders -- query forward, key forward, input and weight gradients -- runs
  on 16 / 8 = 2 examples (79 of them: 20 query + 20 key forward, 19 input-gradient, 20 weight-gradient);
* the only collective that moves images is shuffle BN's one exchange, an all-gather of the uint8 key
  views (B x S x S bytes, the reference MoCo's `concat_all_gather`), and whole-batch BN (MedAug's
  1 group) has none;
* the queue never moves: no collective carries K rows, and the queue logits are computed per device
  against its K / 8 rows.
"""

from __future__ import annotations

import contextlib
import math

import jax
import pytest

from configs import moco_patient
from cxrjax.models import conv as conv_lib
from cxrjax.train import contrastive as ct
from cxrjax.train import hlo_stats
from cxrjax.train import mesh as mesh_lib

N, B, K, S, D = 8, 16, 96, 32, 128  # K: no layer of the model has 96 or 12 channels


def _config(groups: int, where: str, hard: int = 0):
    c = moco_patient.get_config()
    c.model.update(arch="resnet18", width=8, init="random")
    c.batch_size, c.moco.queue_size, c.moco.shuffle_bn_groups = B, K, groups
    c.augment.update(size=S, where=where)
    if hard:
        c.data.hard_negatives, c.data.num_hard_negatives = "patient-other-study", hard
    return c


def _report(config, image_size, cpu_matmuls: bool = False):
    """The step's per-device program. `cpu_matmuls=False`: every convolution left an XLA convolution, the
    program a GPU / TPU compiles (on the CPU, models/conv.py computes some as matmuls; see the last test)."""
    mesh = ct.make_mesh(config)
    setup = ct.build_training(config, mesh, total_steps=100, materialize=False)
    state = mesh_lib.with_shardings(setup.abstract, setup.state_sharding)
    with contextlib.nullcontext() if cpu_matmuls else conv_lib.xla_convolutions():
        lowered = setup.train_step.lower(state, ct.abstract_batch(config, mesh, image_size))
    return hlo_stats.step_report(lowered)


@pytest.fixture(scope="module")
def shuffled():
    """Shuffle BN with one group per device, host-augmented views, 1 hard negative per query."""
    return _report(_config(groups=N, where="host", hard=1), S)


@pytest.fixture(scope="module")
def whole_batch():
    """MedAug's setting (BN over the whole batch), on-device augmentation from 40 px records."""
    return _report(_config(groups=1, where="device"), 40)


@pytest.mark.parametrize("which", ["shuffled", "whole_batch"])
def test_every_convolution_runs_on_its_share_of_the_batch(which, request):
    report = request.getfixturevalue(which)
    convs = report.convolutions
    weight_grads = [c for c in convs if c.is_weight_gradient]
    assert len(weight_grads) == 20, "ResNet-18 has 20 convolutions, each with one weight gradient"
    assert len(convs) == 79
    # the key encoder also encodes the hard negatives: 2 images per example in `shuffled`
    per_device = {c.examples for c in convs}
    expected = {B // N, 2 * B // N} if which == "shuffled" else {B // N}
    assert per_device <= expected, f"convolutions on {sorted(per_device)} examples; the batch share is {B // N}"
    assert min(per_device) == B // N


def test_only_the_shuffle_exchange_moves_images(shuffled, whole_batch):
    def image_collectives(report):
        return [c for c in report.collectives if any(len(s.dims) == 4 and s.dims[1] >= S for s in c.shapes)]

    moved = image_collectives(shuffled)
    assert [(c.kind, str(c.shapes[0])) for c in moved] == [("all-gather", f"u8[{2 * B},{S},{S},1]")]
    assert moved[0].bytes == 2 * B * S * S  # the key views and the hard negatives, 8-bit
    assert image_collectives(whole_batch) == []


def test_the_queue_never_moves(shuffled, whole_batch):
    for report in (shuffled, whole_batch):
        for c in report.collectives:
            assert not any(K in s.dims or K * D == s.dims[0] for s in c.shapes if s.dims), (c.kind, c.shapes)
        queue_dots = [c for c in report.contractions if c.kind == "dot" and K // N in c.rhs.dims + c.lhs.dims]
        assert queue_dots, "the queue logits should be a per-device (B, K/8) product"
        # nothing but the data-parallel gradient all-reduce moves more than a few (B, D) float rows
        big = [c for c in report.collectives if c.bytes > 4 * B * D * 4 and "reduce_sum" not in c.op_name]
        assert all(c.kind == "all-gather" and c.shapes[0].dtype == "u8" for c in big), big


@pytest.mark.parametrize("groups", [3, 12])
def test_bn_groups_that_do_not_line_up_with_the_devices_are_refused(groups, eight_devices):
    config = _config(groups=groups, where="host")
    config.batch_size = 48
    with pytest.raises(ValueError, match="shuffle_bn_groups=.*batch shards"):
        ct.check_bn_groups(config, ct.make_mesh(config))


def test_the_masked_vision_language_step_splits_its_work():
    """The MVLM step (joint, image-only and text-only passes of a mixed batch) on 8 devices: each device
    does ~1/8 of the one-device FLOPs, every matmul runs on its share of its pass's rows, no rows move
    between devices, and the gradient crosses the devices once (all-reduced bytes = the parameters)."""
    from configs import mvlm_mixed
    from cxrjax.train import mvlm as mvlm_train

    c = mvlm_mixed.get_config("demo")
    c.batch_size = 32  # 16 paired + 8 image-only + 8 text-only: per device 2 + 1 + 1
    cost = mvlm_train.abstract_step(c, 1, devices=jax.devices()[:1])[0].compile().cost_analysis()
    one_flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])  # (not partitioned)
    eight = hlo_stats.step_report(mvlm_train.abstract_step(c, 8)[0])
    assert eight.flops < 1.05 * one_flops / 8, (one_flops, eight.flops)
    # the passes run vmapped over the 8 batch shards: a matmul's leading dimension is that axis, 1 per
    # device (8 if the shards were not split); unvmapped ones hold at most the 24 rows of the largest
    # pass (image rows + the paired rows' clean images for ITC) / 8
    assert max(d.examples for d in eight.contractions) <= 24 // 8
    # each device holds [paired, image, text] of its own rows: no rows are re-spread, no images move
    assert not [x for x in eight.collectives if x.kind in ("collective-permute", "all-to-all") and x.bytes > 1024]
    s = c.augment.size
    assert not [x for x in eight.collectives if any(len(sh.dims) == 4 and sh.dims[1] >= s for sh in x.shapes)]
    # one reduction of the gradient: the passes' weight gradients are summed on each device first
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    setup = mvlm_train.build_training(c, mesh, c.text.vocab_size, 1000, {"paired": 16, "image": 8, "text": 8},
                                      materialize=False)
    param_bytes = sum(4 * math.prod(x.shape) for x in jax.tree.leaves(setup.abstract.params))
    reduced = sum(x.bytes for x in eight.collectives if x.kind == "all-reduce")
    assert param_bytes <= reduced < 1.01 * param_bytes + 4096, (reduced, param_bytes)


def test_the_cpu_matmul_convolutions_also_run_on_their_share():
    """On the CPU, layer 3 (2x2 maps at 32 px), layer 4 (1x1) and the 1x1 downsamples are matmuls over
    im2col patches (models/conv.py): their rows are each device's 2 examples x the output positions."""
    report = _report(_config(groups=1, where="device"), 40, cpu_matmuls=True)
    kernels = {(k * k * cin, cout) for cin, cout in ((8, 8), (8, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64))
               for k in (1, 3)}
    forward = [c for c in report.contractions
               if c.kind == "dot" and len(c.lhs.dims) == 2 and tuple(c.rhs.dims) in kernels
               and c.lhs.dims[1] == c.rhs.dims[0]]
    rows = {c.lhs.dims[0] for c in forward}
    # 2 examples x (layer 2's 4x4 downsample, layer 3's 2x2, layer 4's 1x1 output positions); the whole
    # batch would be 16 x the same
    assert rows == {B // N * 16, B // N * 4, B // N * 1}, rows
    # what stays a convolution (stem, layers 1-2, layer 3's stride-2 entry: 9 per encoder forward, 8 input-
    # and 9 weight-gradients) also runs on the share
    assert len(report.convolutions) == 35
    assert {c.examples for c in report.convolutions} == {B // N}
