"""A ``lowering.deferred.Deferred`` as an ONNX initializer: read when the model is saved, written in row blocks.

``onnx_ir`` writes external data tensor by tensor through ``tofile``; here that reads the tensor's stored form
and writes its value block by block, so saving a model holds one stored tensor and one block, whatever the
model's size. Embedded in the protobuf (a small model), it is read whole once, like any initializer.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from lowbit.lowering.deferred import Deferred


class DeferredTensor(ir.LazyTensor):
    """``deferred``'s value as an initializer named ``name`` of ONNX type ``dtype``."""

    def __init__(self, deferred: Deferred, dtype: ir.DataType, name: str):
        super().__init__(lambda: ir.tensor(_numpy_or_torch(deferred.materialize()), name=name), dtype,
                         ir.Shape(list(deferred.shape)), name=name)
        self.deferred = deferred

    def tofile(self, file) -> None:
        for block in self.deferred.row_blocks():
            file.write(block.reshape(-1).view(torch.uint8).numpy())


def _numpy_or_torch(t: torch.Tensor):
    return t if t.dtype == torch.bfloat16 else t.numpy()          # numpy has no bfloat16
