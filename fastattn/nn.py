"""Drop-in modules running the fused ops; each subclasses the torch module it replaces (same constructor and
``state_dict`` keys), so weights load unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.batch_norm import batch_norm_add_relu


class BatchNormAddReLU(torch.nn.BatchNorm2d):
    """``relu(bn(x) + identity)`` in one fused op: a ``BatchNorm2d`` **followed by the residual add and a ReLU**.

    Not a plain BatchNorm: ``forward(x)`` alone returns ``relu(bn(x))`` (the ResNet stem and the inner convs of a
    block), ``forward(x, identity)`` returns ``relu(bn(x) + identity)`` (the block's tail). Constructor, parameters,
    buffers and ``state_dict`` are ``nn.BatchNorm2d``'s, and so are its semantics: in training the batch
    statistics are used and the running ones updated (``momentum``, or the cumulative average when ``momentum`` is
    None) while ``num_batches_tracked`` is incremented here; ``track_running_stats=False`` always uses batch
    statistics; eval mode uses the running statistics in a single fused pass.
    """

    def forward(self, x: Tensor, identity: Tensor | None = None) -> Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        # Batch statistics in training, and in eval when there are no running statistics (as _BatchNorm.forward).
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return batch_norm_add_relu(
            x, identity,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, bn_training, self.momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked if self.momentum is None else None,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused=batch_norm+add+relu"
