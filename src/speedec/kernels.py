"""Matrix products for decoding: a few rows against large weight matrices.

At batch size 1 decoding is memory-bound, and SPEED's gain rests on a product
of 2-8 rows costing about what one row costs (one read of the weights). Which
formulation achieves that depends on the BLAS; measured on the 2-core
development machine (PyTorch 2.13 CPU, MKL + oneDNN, 103 MB of float32
weights, see BENCHMARKS.md):

* ``F.linear`` with 2-8 rows: 2-4x slower than one row (no amortisation);
* ``W @ x.T`` with row-major ``x``: 2 rows at 2.3 ms, 4 rows at 3.1 ms, but a
  single row (MKL's GEMV) at 4.7 ms, on one thread — so one row is padded to
  two; a column-major ``x`` made it 5x slower;
* oneDNN with the weights reordered once into its blocked layout
  (``mkldnn._linear_pointwise``): flatter still across 1-8 rows.

Training (gradients on) and many rows always use ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Above this many rows a plain GEMM is efficient and F.linear is used.
FEW_ROWS = 16

_ONEDNN = (torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., in] @ weight[out, in].T``, with the fastest kernel for the row count."""
    rows = x.numel() // x.shape[-1]
    if rows > FEW_ROWS or torch.is_grad_enabled():
        return F.linear(x, weight)
    # Row-major rows in, row-major rows out: a column-major output pushes the
    # attention that follows off its fast kernel.
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    if _ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32:
        out = torch.ops.mkldnn._linear_pointwise(x2, _onednn_weight(weight), None, "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if rows == 1:
        out = (weight @ torch.cat((x2, x2)).T)[:, :1]  # [out, 1]
    else:
        out = weight @ x2.T  # [out, rows]
    return out.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout, reordered once and kept on the tensor.

    The copy is tied to the tensor object and to its storage and version, so
    an in-place update (an optimizer step, ``load_state_dict``) or a move to
    another dtype/device makes a fresh one; it dies with the weight.
    """
    try:
        key = (weight.data_ptr(), weight._version)
    except RuntimeError:  # inference tensors have no version counter; they cannot change in place
        key = (weight.data_ptr(), -1)
    cached = getattr(weight, "_speedec_onednn", None)
    if cached is None or cached[0] != key:
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        cached = (key, packed)
        weight._speedec_onednn = cached
    return cached[1]
