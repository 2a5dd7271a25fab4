"""The benchmark's cases (shape x layout x dtype) and the arrays of one case, built once and
shared by every column that times it: ours, PyTorch, the NumPy implementation, np.copyto."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

import batchnorm as bn

# The shapes: ResNet-like (N, C, H, W) activations and two (N, C) ones.
SHAPES: Tuple[Tuple[int, ...], ...] = (
    (32, 64, 56, 56),
    (64, 256, 28, 28),
    (256, 2048, 7, 7),
    (8, 32, 112, 112),
    (128, 64, 56, 56),
    (4096, 1024),
    (65536, 64),
)
# Half dtypes run on two of them: many positions per channel, and many channels.
HALF_SHAPES: Tuple[Tuple[int, ...], ...] = ((32, 64, 56, 56), (256, 2048, 7, 7))
QUICK_SHAPES: Tuple[Tuple[int, ...], ...] = ((32, 64, 56, 56), (4096, 1024))
QUICK_HALF_SHAPES: Tuple[Tuple[int, ...], ...] = ((32, 64, 56, 56),)

OPS: Tuple[str, ...] = ("forward_inference", "forward_training", "backward")
OP_ALIASES = {"inf": "forward_inference", "inference": "forward_inference", "train": "forward_training",
              "training": "forward_training", "bwd": "backward", "back": "backward"}
SHORT_OP = {"forward_inference": "fwd_inf", "forward_training": "fwd_train", "backward": "backward"}
# Arrays of x's size each op must touch at least: x read + y written; dy, x read + dx written.
ARRAYS_TOUCHED = {"forward_inference": 2, "forward_training": 2, "backward": 3}
DTYPES: Tuple[str, ...] = ("float32", "bfloat16", "float16")
LAYOUTS: Tuple[str, ...] = ("cf", "cl")  # (N, C) shapes have the one layout "nc"
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
EPS = 1e-5


@dataclass(frozen=True)
class Case:
    shape: Tuple[int, ...]  # logical (N, C, H, W) or (N, C)
    layout: str  # "cf" (NCHW), "cl" (NHWC memory: ours gets the NHWC array, axis=-1), "nc"
    dtype: str

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.elements * ITEMSIZE[self.dtype]

    @property
    def memory_shape(self) -> Tuple[int, ...]:
        """The shape of the array ours receives: NHWC for channels-last."""
        if self.layout == "cl":
            n, c, h, w = self.shape
            return (n, h, w, c)
        return self.shape

    @property
    def axis(self) -> int:
        return -1 if self.layout == "cl" else 1

    @property
    def reduce_axes(self) -> Tuple[int, ...]:
        nd = len(self.shape)
        channel = nd - 1 if self.layout == "cl" else 1
        return tuple(d for d in range(nd) if d != channel)

    @property
    def label(self) -> str:
        return "x".join(map(str, self.shape))


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("(", "").replace(")", "").replace(",", "x").split("x") if v)
    except ValueError:
        raise ValueError(f"a shape must look like 32x64x56x56 or 4096x1024, got {text!r}") from None
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise ValueError(f"a shape must be (N, C, H, W) or (N, C) with positive sizes, got {text!r}")
    return shape


def make_cases(shapes: Sequence[Tuple[int, ...]], half_shapes: Sequence[Tuple[int, ...]], dtypes: Sequence[str],
               layouts: Sequence[str]) -> list:
    """float32 on every shape, the half dtypes on `half_shapes`; both layouts of 4-d shapes."""
    cases = []
    for dtype in dtypes:
        for shape in shapes if dtype == "float32" else [s for s in shapes if s in half_shapes]:
            for layout in (["nc"] if len(shape) == 2 else list(layouts)):
                cases.append(Case(tuple(shape), layout, dtype))
    return cases


class CaseData:
    """Every array of one case. Ours gets NumPy arrays (float32, float16) or torch tensors
    (bfloat16, through DLPack); torch gets views of the same memory where it can, with
    memory_format=channels_last for "cl"; the copy roofline copies x's bytes."""

    def __init__(self, case: Case, torch: Optional[Any], seed: int = 0) -> None:
        self.case = case
        rng = np.random.default_rng(seed)
        C = case.channels
        # x is not centred on zero so that the statistics pass has real work to do.
        master = rng.standard_normal(case.memory_shape, dtype=np.float32)
        master *= 2.0
        master += 0.5
        grad = rng.standard_normal(case.memory_shape, dtype=np.float32)
        self.weight = rng.uniform(0.5, 1.5, C).astype(np.float32)
        self.bias = rng.uniform(-0.5, 0.5, C).astype(np.float32)
        self.mean = rng.uniform(0.0, 1.0, C).astype(np.float32)
        self.var = rng.uniform(3.0, 5.0, C).astype(np.float32)
        self.running_mean = np.zeros(C, np.float32)
        self.running_var = np.ones(C, np.float32)
        self.torch = torch
        if case.dtype == "bfloat16":
            if torch is None:
                raise RuntimeError("bfloat16 cases need torch (bfloat16 tensors are passed through DLPack)")
            self.x = torch.from_numpy(master).to(torch.bfloat16)
            self.dy = torch.from_numpy(grad).to(torch.bfloat16)
            self.out = torch.empty_like(self.x)
            self.copy_src = self.x.view(torch.int16).numpy()
        else:
            dt = np.dtype(case.dtype)
            self.x = master if dt == np.float32 else master.astype(dt)
            self.dy = grad if dt == np.float32 else grad.astype(dt)
            self.out = np.empty_like(self.x)
            self.copy_src = self.x
        del master, grad
        self.copy_dst = np.empty_like(self.copy_src)
        np.copyto(self.copy_dst, self.copy_src)  # touch every page once
        if isinstance(self.out, np.ndarray):
            self.out.fill(0)
        else:
            self.out.zero_()
        _, self.saved_mean, self.saved_invstd = bn.forward_training(self.x, self.weight, self.bias, axis=case.axis,
                                                                    out=self.out)
        if torch is not None:
            self._torch_arrays(torch)

    def _torch_arrays(self, torch: Any) -> None:
        def as_torch(a: Any) -> Any:
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
            return t.permute(0, 3, 1, 2) if self.case.layout == "cl" else t  # NHWC memory, NCHW logical

        self.tx = as_torch(self.x)
        self.tdy = as_torch(self.dy)
        if self.case.layout == "cl":
            assert self.tx.is_contiguous(memory_format=torch.channels_last)
        self.tweight = torch.from_numpy(self.weight)
        self.tbias = torch.from_numpy(self.bias)
        self.tmean = torch.from_numpy(self.mean)
        self.tvar = torch.from_numpy(self.var)
        self.trunning_mean = torch.zeros(self.case.channels)
        self.trunning_var = torch.ones(self.case.channels)
        with torch.no_grad():
            _, self.tsave_mean, self.tsave_invstd = torch.ops.aten.native_batch_norm(
                self.tx, self.tweight, self.tbias, None, None, True, 0.1, EPS)
