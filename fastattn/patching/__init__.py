"""``fastattn.patch(model)``: swap fastattn's fused ops into a model you already have, in place.

``patch`` walks ``model.named_modules()`` and recognises modules by their *exact* type (a subclass may have a
different ``forward``, so it is reported and left alone), or, for transformers, by what they compute. A recognised
module whose configuration the fused path reproduces exactly gets its ``__class__`` set, on that one instance, to a
subclass whose ``forward`` calls the fused ops on the module's own submodules, parameters and buffers. Nothing is
copied, re-created or cast: the ``state_dict`` (keys, values, dtypes), the optimizer's parameter references and
registered hooks are untouched, and other instances of the same class, the class itself and every library global
stay as they were (a transformers model's attention adds the name ``"fastattn"`` to transformers' registries through
their public ``register``; nothing that does not ask for that name changes). Configurations it does not support are
left alone and reported with the reason. ``unpatch`` restores every swapped instance's class (and a transformers
model's attention implementation); ``patch`` twice does nothing more.

Recognised (each under its option):

- ``attention``: ``nn.MultiheadAttention`` (the forward rebuilt around ``fastattn.scaled_dot_product_attention``),
  timm's ``Attention``, fastattn's ``models.MultiHeadAttention``.
- ``layer_norm``: ``nn.LayerNorm`` / ``nn.RMSNorm`` / timm's ``LayerNorm`` (-> ``fastattn.nn.LayerNorm`` /
  ``RMSNorm``), torchvision's and timm's channels-first ``LayerNorm2d`` (ConvNeXt; ``fastattn.layer_norm2d``) and
  the blocks whose residual add is fused into the following norm: ``nn.TransformerEncoderLayer`` /
  ``DecoderLayer`` (post-norm and pre-norm), torchvision's ViT ``EncoderBlock``, timm's ``Block``.
  ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are also swapped whenever their attention is, so that
  torch's eval fast path (``torch._transformer_encoder_layer_fwd``, nested tensors), which never calls
  ``self_attn.forward``, cannot bypass the fused kernels.
- ``patch_embed``: torchvision's and timm's ``VisionTransformer`` (projection, class token and position
  embedding in one kernel) and fastattn's own.
- ``batch_norm``: torchvision's and timm's ``BasicBlock`` / ``Bottleneck`` and the ResNet stems (BN + ReLU and
  BN + add + ReLU; those BatchNorms become ``fastattn.nn.BatchNormAddReLU``), fastattn's own ResNet; the BN +
  activation pairs of ``nn.Sequential`` and torchvision's ``Conv2dNormActivation``, timm's ``BatchNormAct2d``, and
  the block tails where BN + the residual add (+ activation) fuse: torchvision's ``MBConv``, MobileNetV2/V3
  ``InvertedResidual``, RegNet ``ResBottleneckBlock``, timm's ``InvertedResidual`` / ``DepthwiseSeparableConv``
  (those BatchNorms become ``fastattn.nn.BatchNormAct2d``, ``fastattn.batch_norm_act``). Squeeze-excitation
  modules are left alone, reported.
- Hugging Face transformers (:mod:`~fastattn.patching.transformers`), recognised by what the modules compute: a
  ``PreTrainedModel``'s attention implementation (``attention``), its RMSNorms and the residual add + norm of its
  layers (``layer_norm``), ViT's embeddings (``patch_embed``).

The package:

- :mod:`~fastattn.patching.walker`: ``patch`` / ``unpatch``: plans every swap against the original classes, then
  applies them, then explains what it left alone.
- :mod:`~fastattn.patching.report`: ``PatchReport`` / ``PatchEntry`` and ``patch_report(model)``.
- :mod:`~fastattn.patching.rules`: the one registry: a ``Rule`` per recognised class (library, class path, option,
  fused class or mixin, the signature of the method it replaces, the check); ``register`` adds rules.
  :mod:`~fastattn.patching.checks`: the helpers checks are written with.
- :mod:`~fastattn.patching.wrappers`: the classes FSDP2's ``fully_shard`` generates (``FSDP<Class>``), seen through
  for the rule lookup and kept around the fused class (``FSDP<FusedTimmBlock>``), and restored by ``unpatch``.
- one module per library, each registering its rules and holding its fused forwards: ``torch_nn``,
  ``torchvision``, ``timm``, ``transformers`` (with ``transformers_attention``, the attention function it
  registers), ``fastattn_models``. The fused subclasses of library classes are built on first use and
  kept in their library's module (``fastattn.patching.timm.FusedTimmBlock``), where pickling finds them.

``fastattn.patch`` (the module of the same name as the function) is an alias kept for old import paths and for
models pickled before this package existed.
"""

from fastattn.patching import (  # noqa: F401  (each registers its rules)
    fastattn_models,
    timm,
    torch_nn,
    torchvision,
    transformers,
)
from fastattn.patching.report import PatchEntry, PatchReport, patch_report
from fastattn.patching.rules import Rule, Setting, Skip, Swap, register
from fastattn.patching.walker import patch, unpatch

__all__ = ["PatchEntry", "PatchReport", "Rule", "Setting", "Skip", "Swap", "patch", "patch_report", "register",
           "unpatch"]
