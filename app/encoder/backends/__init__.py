"""Encoder backends: the seam between the encoder's batching/normalisation and the tensor runtime.

`torch` runs open_clip eagerly in fp32; `onnx` / `onnx-int8` run cached ONNX exports in ONNX Runtime
(onnx_backend.py; made by export.py, read by cache.py), imported lazily by the factory so torch-only use never
loads ORT and serving from exports never loads torch.

There is no bf16 backend: on the reference CPU (AVX-512 bf16 + AMX) torch's bf16 autocast was slower than
fp32 eager for ViT-B-32 in every interleaved trial (about 0.7x at batch 32) and cost the stand-in 0.5-1.3
accuracy points at 16 shots; a model cast to bf16 reached ~2x eager at batch 32 but stayed 2-4x slower than
`onnx-int8` (docs/benchmarks.md).
"""

from .base import ImageTower, TextTower

# torch_backend is imported where torch is wanted (factory.make_towers): serving exports never imports torch.
__all__ = ["ImageTower", "TextTower"]
