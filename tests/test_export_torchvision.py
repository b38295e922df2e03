"""Weights out to PyTorch: `python -m cxrjax.tools.export_torchvision` on a MoCo checkpoint, loaded into REAL
torchvision (`torchvision.models.resnet18` + strict `load_state_dict`), gives cxrjax's own features and
embeddings (grey 1-channel and 3-channel models); the key encoder and WORKDIR/STEP; one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cxrjax.data import augment as augment_lib
from cxrjax.eval import features
from cxrjax.models import moco
from cxrjax.models import torchvision_weights as tvw
from cxrjax.tools import export_torchvision as etv
from model_utils import fast_init, torchvision_models

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # image side of the comparison


def _randomized(tree, rng):
    """Every array of an NNX state replaced by random values of its kind: He-scaled kernels, BN scale in
    [0.5, 1.5], biases/means ~ 0.1 N(0, 1), variances in [0.5, 2] (a mapping that swaps any two changes outputs)."""
    def draw(path, a):
        leaf, shape = [str(k.key) for k in path if hasattr(k, "key")][-1], a.shape  # ..., 'kernel', .value
        if leaf == "kernel":
            v = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf == "scale":
            v = rng.uniform(0.5, 1.5, shape)
        elif leaf == "var":
            v = rng.uniform(0.5, 2.0, shape)
        else:  # bias, mean
            v = rng.normal(size=shape) * 0.1
        return jax.device_put(np.asarray(v, a.dtype), a.sharding)

    return jax.tree_util.tree_map_with_path(draw, tree)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A MoCo workdir as the trainer writes it (config.json + Orbax `state` items of its TrainState) at
    steps 3 and 5, ResNet-18 at torchvision's width, query and key encoders random and different."""
    import orbax.checkpoint as ocp

    from cxrjax.train import checkpoint as ckpt_lib
    from cxrjax.train import contrastive

    workdir = tmp_path_factory.mktemp("moco")
    config = contrastive.default_config()
    config.model.update(init="random", width=64, arch="resnet18")
    config.moco.queue_size = 32
    from cxrjax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
    build_encoders = contrastive.build_encoders

    def numpy_filled_encoders(config, note):  # the trainer's modules without its eager init (one PRNG compile
        query = fast_init(lambda: build_encoders(config, note)[0])  # per shape); every value is drawn below
        return query, moco.copy_encoder(query)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(contrastive, "build_encoders", numpy_filled_encoders)
        state = contrastive.build_training(config, mesh, total_steps=10).state
    ckpt_lib.save_config(workdir, config)
    rng = np.random.default_rng(0)
    saved = {}
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        for step in (3, 5):
            state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                                  **{k: _randomized(getattr(state, k), rng)
                                     for k in ("q_params", "q_stats", "k_params", "k_stats")})
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
            manager.wait_until_finished()
            saved[step] = {k: jax.device_get(getattr(state, k)) for k in ("q_params", "q_stats", "k_params", "k_stats")}
    return workdir, saved


@pytest.fixture(scope="module")
def cxrjax_outputs(run):
    """cxrjax's own features and MoCo embeddings of fixed 8-bit grey images, through the evaluation path
    (`features.restore_encoder` + `features.make_forward`: normalisation, eval-mode BN)."""
    workdir, _ = run
    images = np.random.default_rng(1).integers(0, 256, size=(3, SIZE, SIZE, 1), dtype=np.uint8)
    enc = features.restore_encoder(workdir)
    both = jax.jit(lambda p, s, x: (features.make_forward(enc, "backbone")(p, s, x),
                                    features.make_forward(enc, "head")(p, s, x)))
    feats, emb = both(enc.params, enc.stats, images)
    return images, np.asarray(feats), np.asarray(emb)


def _torch_input(images, channels):
    """What the export's JSON says to feed: x / 255, (x - mean) / std, grey on `channels` channels (NCHW)."""
    import torch

    x = (images.astype(np.float32) / 255.0 - augment_lib.CXR_MEAN) / augment_lib.CXR_STD
    x = np.repeat(x.transpose(0, 3, 1, 2), channels, axis=1)
    return torch.from_numpy(np.ascontiguousarray(x))


def _torchvision_resnet18(info):
    """Build the torch module from the recipe the export wrote (only torch/torchvision names in it)."""
    import torch

    models = torchvision_models()
    recipe = info["torch"]
    namespace = {"torch": torch, "torchvision": sys.modules["torchvision"]}
    assert recipe["model"] == "torchvision.models.resnet18()"
    net = models.resnet18()
    if recipe["conv1"]:
        net.conv1 = eval(recipe["conv1"], namespace)
    net.fc = eval(recipe["fc"], namespace)
    return torch, net


def _max_rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_three_channel_export_with_head_matches_cxrjax(tmp_path, run, cxrjax_outputs, capsys):
    workdir, _ = run
    images, feats, emb = cxrjax_outputs
    out = str(tmp_path / "encoder.safetensors")
    assert etv.main([f"--checkpoint={workdir}", f"--out={out}", "--head"]) == 0
    printed = capsys.readouterr().out
    assert "step 5" in printed and "torchvision.models.resnet18()" in printed
    umask = os.umask(0)
    os.umask(umask)
    assert Path(out).stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' own 0600
    info = json.loads(Path(out + ".json").read_text())
    assert info["step"] == 5 and info["encoder"] == "query" and info["in_channels"] == 3 and info["head"]
    assert info["input"]["mean"] == augment_lib.CXR_MEAN and info["input"]["std"] == augment_lib.CXR_STD

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(out, "np") as f:
        assert json.loads(f.metadata()["cxrjax"]) == info
    sd = load_file(out)
    torch, net = _torchvision_resnet18(info)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)  # strict: every key of the torch model, nothing else
    net.eval()
    assert int(net.layer3[1].bn2.num_batches_tracked) == 5
    x = _torch_input(images, 3)
    with torch.no_grad():
        got_emb = torch.nn.functional.normalize(net(x)).numpy()
        net.fc = torch.nn.Identity()
        got_feats = net(x).numpy()
    print(f"3-channel export: max rel diff features {_max_rel(got_feats, feats):.1e}, "
          f"embedding {_max_rel(got_emb, emb):.1e}")
    assert _max_rel(got_feats, feats) < 1e-5 and _max_rel(got_emb, emb) < 1e-5

    # The tolerance separates right from wrong: mappings that are wrong in plausible ways are far outside it.
    def diff_with(mutate):
        wrong = {k: v.clone() for k, v in sd.items()}
        mutate(wrong)
        torch_, bad = _torchvision_resnet18(info)
        bad.load_state_dict(wrong)
        bad.eval()
        bad.fc = torch.nn.Identity()
        with torch.no_grad():
            return _max_rel(bad(x).numpy(), feats)

    def swap_hw(d):  # kernels transposed H<->W (a wrong OIHW permutation; invisible on 1x1 convs)
        for k, v in d.items():
            if v.ndim == 4:
                d[k] = v.transpose(2, 3).contiguous()

    def swap_mean_var(d):
        for k in [k for k in d if k.endswith("running_mean")]:
            v = k.replace("running_mean", "running_var")
            d[k], d[v] = d[v], d[k]

    def swap_scale_bias(d):
        for k in [k for k in d if k.endswith("running_mean")]:
            w, b = k.replace("running_mean", "weight"), k.replace("running_mean", "bias")
            d[w], d[b] = d[b], d[w]

    for wrong in (swap_hw, swap_mean_var, swap_scale_bias):
        assert not diff_with(wrong) < 1e-3, wrong.__name__  # NaN (a negative variance) counts as different


def test_grey_export_to_pth_matches_cxrjax(tmp_path, run, cxrjax_outputs):
    workdir, _ = run
    images, feats, _ = cxrjax_outputs
    out = str(tmp_path / "encoder.pth")
    assert etv.main([f"--checkpoint={workdir}", f"--out={out}", "--in_channels=1"]) == 0
    info = json.loads(Path(out + ".json").read_text())
    assert info["torch"]["conv1"] and info["torch"]["fc"] == "torch.nn.Identity()"
    torch, net = _torchvision_resnet18(info)
    net.load_state_dict(torch.load(out, weights_only=True))
    net.eval()
    assert tuple(net.conv1.weight.shape) == (64, 1, 7, 7)
    with torch.no_grad():
        got = net(_torch_input(images, 1)).numpy()
    print(f"grey export: max rel diff features {_max_rel(got, feats):.1e}")
    assert _max_rel(got, feats) < 1e-5


def test_key_encoder_of_an_earlier_step_round_trips_exactly(tmp_path, run):
    """WORKDIR/3 --encoder=key: the file holds the key encoder of step 3 (not the query encoder, not step 5);
    imported back (torchvision -> cxrjax) every array is the checkpoint's."""
    from cxrjax.models.resnet import flat_state

    workdir, saved = run
    out = str(tmp_path / "key.safetensors")
    assert etv.main([f"--checkpoint={workdir}/3", f"--out={out}", "--encoder=key", "--head"]) == 0
    sd = tvw.read_state_dict(out)
    assert int(sd["bn1.num_batches_tracked"]) == 3
    back = tvw.convert_state_dict(sd, in_channels=1)  # the importer: conv1's three thirds summed back
    model = nnx.merge(features.restore_encoder(workdir).graphdef, saved[3]["k_params"], saved[3]["k_stats"])
    want = {**flat_state(model.backbone),
            **{f"fc.{i}.{leaf}": getattr(getattr(model.head, name), leaf)[...]
               for i, name in ((0, "linear1"), (2, "linear2")) for leaf in ("kernel", "bias")}}
    assert set(back) == set(want)
    for k in want:
        np.testing.assert_allclose(back[k], want[k], rtol=1e-6 if k == "conv1.kernel" else 0, err_msg=k)
    query = nnx.merge(features.restore_encoder(workdir).graphdef, saved[3]["q_params"], saved[3]["q_stats"])
    assert not np.allclose(back["layer1.0.conv1.kernel"], query.backbone.layer1[0].conv1.kernel[...])


def test_errors_are_one_line(tmp_path, run, capsys):
    workdir, _ = run

    def error(*args):
        assert etv.main(list(args)) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    assert "not a cxrjax run" in error(f"--checkpoint={tmp_path}/nothing", f"--out={tmp_path}/a.safetensors")
    assert "has no step 4" in error(f"--checkpoint={workdir}/4", f"--out={tmp_path}/a.safetensors")
    assert ".safetensors, .pth or .pt" in error(f"--checkpoint={workdir}", f"--out={tmp_path}/a.npz")
    assert not (tmp_path / "a.npz").exists()
    narrow = tmp_path / "narrow"
    (narrow / "checkpoints" / "1").mkdir(parents=True)
    cfg = json.loads((workdir / "config.json").read_text())
    cfg["model"]["width"] = 16
    (narrow / "config.json").write_text(json.dumps(cfg))
    assert "width 16" in error(f"--checkpoint={narrow}", f"--out={tmp_path}/a.safetensors")
    cfg["job"] = "mvlm"
    (narrow / "config.json").write_text(json.dumps(cfg))
    assert "'mvlm' run" in error(f"--checkpoint={narrow}", f"--out={tmp_path}/a.safetensors")


def test_command_line_help():
    r = subprocess.run([sys.executable, "-m", "cxrjax.tools.export_torchvision", "--help"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "--encoder {query,key}" in r.stdout
