"""A training step's memory and FLOPs traced on fake tensors, and GPUs' datasheet ceilings (SPEC §5: what a run
needs, known before any weight is loaded). Support code: the caller builds its modules and batch inside
tensor_mode(fake) and passes its step; train.traced_memory does it for train.py's step.

    python train.py --preset demo --dry-run     # the plan of a run with its traced peak memory per GPU
    python bench.py memory                      # a training step's traced peak memory and FLOPs
"""
import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage, counted as ops create tensors and as Python frees them, with the
    peak: what torch.cuda.max_memory_allocated reports, less the caching allocator's rounding.
    Fake tensors have shapes but no values, so the step's value reads are answered without data: a
    scalar read gives 1 (the input validation's boolean checks pass; AdamW's step count only sets its
    bias correction), and selecting rows of a (B, T) tensor with a boolean mask gives `selected` rows
    (the labelled positions a loss picks with `out[mask]`). grads_at_peak: bytes of the `watch`
    parameters' gradients live at the peak."""

    def __init__(self, tensors, selected, watch=()):
        super().__init__()
        self.now = self.peak = self.grads_at_peak = 0
        self.seen, self.selected, self.watch = set(), selected, list(watch)
        self.track(tensors)

    def track(self, tensors):
        for t in tensors:
            st = t.untyped_storage()
            if st._cdata not in self.seen:
                self.seen.add(st._cdata)
                self.now += st.nbytes()
                weakref.finalize(st, self.free, st._cdata, st.nbytes())
        if self.now > self.peak:
            self.peak = self.now
            self.grads_at_peak = sum(p.grad.untyped_storage().nbytes() for p in self.watch if p.grad is not None)

    def free(self, key, nbytes):
        self.seen.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if isinstance(x, FakeTensor) and func is torch.ops.aten._local_scalar_dense.default:
            return True if x.dtype == torch.bool else 1
        if isinstance(x, FakeTensor) and func is torch.ops.aten.index.Tensor and args[1][0].dtype == torch.bool:
            out = x.new_empty((self.selected, *x.shape[args[1][0].dim():]))
        else:
            out = func(*args, **(kwargs or {}))
        self.track(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def tensor_mode(fake):
    """Where the traced step's tensors live: FakeTensorMode (shapes only, no memory, no values) or the CPU."""
    return FakeTensorMode() if fake else torch.device("cpu")


def trace_steps(tensors, forward_backward, update, steps=2, selected=1, watch=()):
    """Live tensor bytes over `steps` training steps, each forward_backward() then update(); call it inside the
    tensor_mode the tensors were made in. tensors: everything live before the first step (weights, batch). What
    forward_backward returns (the loss) stays live until the next step's replaces it, as a training loop's `loss`
    variable does, and is counted in "after_step". Returns bytes {"weights" (before), "after_step", "peak",
    "grads_at_peak"} and "flops", the floating-point operations (matrix products) of the first step's
    forward_backward. The second step is the steady state: optimizer state lives from the first."""
    counter = LiveBytes(tensors, selected, watch)
    weights, flops = counter.now, FlopCounterMode(display=False)
    with counter:
        for step in range(steps):
            with flops if step == 0 else contextlib.nullcontext():
                loss = forward_backward()         # live until the next step's replaces it
            update()
    after_step = counter.now                              # the last loss included
    del loss
    return {"weights": weights, "after_step": after_step, "peak": counter.peak, "flops": flops.get_total_flops(),
            "grads_at_peak": counter.grads_at_peak}


# memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s) from the vendors' datasheets, by a part of the
# name torch reports ("NVIDIA H100 80GB HBM3" is the SXM part); first match wins
DATASHEET = {"H200": (4.8e12, 989e12), "H100 PCIe": (2.0e12, 756e12), "H100 NVL": (3.9e12, 835e12),
             "H100": (3.35e12, 989e12)}


def datasheet(name):
    """(bandwidth, bf16 peak) of the GPU called `name`, or (None, None) if unknown."""
    return next((v for k, v in DATASHEET.items() if k in name), (None, None))
