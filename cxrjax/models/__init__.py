"""Models: torchvision-layout ResNets (NNX) and the MoCo v2 / MedAug pieces built on them."""

from cxrjax.models.moco import (MoCoEncoder, ProjectionHead, QueueState, apply_encoder,
                                build_moco_encoder, copy_encoder, ema_update, encode_keys_shuffled,
                                enqueue, init_queue, l2_normalize, moco_loss, permute_for_shuffle_bn)
from cxrjax.models.resnet import BatchNorm, ResNet, flat_state, num_params, resnet18, resnet50

__all__ = [
    "BatchNorm", "MoCoEncoder", "ProjectionHead", "QueueState", "ResNet", "apply_encoder",
    "build_moco_encoder", "copy_encoder", "ema_update", "encode_keys_shuffled", "enqueue",
    "flat_state", "init_queue", "l2_normalize", "moco_loss", "num_params",
    "permute_for_shuffle_bn", "resnet18", "resnet50",
]
