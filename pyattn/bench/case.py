"""What one measurement is: a family, a shape, a dtype, causal or not, a pass, a device."""
from __future__ import annotations

import dataclasses

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int

    @property
    def id(self) -> str:
        """Readable id as in the tests: ``B1-H8/2-S1024-D64`` (``Sq1-Sk4096`` when they differ)."""
        heads = f"H{self.heads_q}" + (f"/{self.heads_kv}" if self.heads_kv != self.heads_q else "")
        seq = f"S{self.seq_q}" if self.seq_q == self.seq_k else f"Sq{self.seq_q}-Sk{self.seq_k}"
        dim = f"D{self.head_dim}" + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim else "")
        return f"B{self.batch}-{heads}-{seq}-{dim}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_seq(self, seq_q: int, seq_k: int) -> "Shape":
        return dataclasses.replace(self, seq_q=seq_q, seq_k=seq_k)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    shape: Shape
    dtype: torch.dtype
    causal: bool
    pass_: str  # "fwd", "bwd" or "fwd+bwd"
    device: torch.device

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def needs_grad(self) -> bool:
        return self.pass_ != "fwd"

    def config_key(self):
        """Everything but the shape: a provider's correctness is checked once per config."""
        return (self.family, self.dtype_name, self.causal, self.pass_)
