"""The runtime of a forward pass: PyTorch eager, or the same network exported to ONNX Runtime.

Why a second runtime: on this project's 2-core CPU, ONNX Runtime runs EfficientNet-Lite0 at 224 px
2.3x faster than PyTorch eager (batch 1: 104.6 vs 45.9 images/s on one thread, 186 vs 61 on two;
``make bench`` measures every runtime), with outputs within 1e-5 of PyTorch's. Its graph
optimiser fuses convolution + batch norm + activation, which eager PyTorch runs as separate
kernels. The lung segmenter, a small U-Net, halves its time the same way (4.8 -> 2.5 ms).

The network is exported from the bundle's own weights when the bundle is loaded (about 0.3 s for
Lite0, no second weights file to keep in step); the PyTorch module stays loaded for Grad-CAM,
which needs gradients. A bundle says which runtime serves it (``BundleManifest.runtime``), and
``tests/test_runtime.py`` holds the decisions of both runtimes identical on the test split.

    forward = OnnxForward.export(ForwardWithFeatures(model), torch.zeros(1, 1, 224, 224), ["logits", "features"])
    logits, features = forward(batch)              # numpy in, numpy out
"""

from __future__ import annotations

import io
import logging
from typing import Literal

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Runtime = Literal["torch", "onnxruntime"]
RUNTIMES: tuple[Runtime, ...] = ("torch", "onnxruntime")
OPSET = 17


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class ForwardWithFeatures(nn.Module):
    """A classifier's logits and the pooled features its head reads, from one pass (what the
    gradability gate scores, so serving runs the network once per image)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.classifier = model.get_classifier()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1)
        return self.classifier(pooled), pooled  # the head's dropout is the identity in eval()


class OnnxForward:
    """An exported network in an ONNX Runtime session: ``forward(array) -> list of output arrays``."""

    def __init__(self, graph: bytes, output_names: list[str], threads: int | None = None, spin: bool = False):
        import onnxruntime as ort

        self.graph = graph
        self.output_names = output_names
        self.threads = int(threads or torch.get_num_threads())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads  # the worker's torch thread budget: never oversubscribe
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # idle threads sleep instead of spinning: a worker's two sessions (segmenter, classifier), the
        # other workers, the front and TorchServe's JVM share the cores (spinning threads fought them)
        # (``spin=True``, ORT's default, is what a lone process with the machine to itself runs fastest)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def export(cls, module: nn.Module, example: torch.Tensor, output_names: list[str],
               threads: int | None = None, spin: bool = False) -> "OnnxForward":
        """Trace ``module`` (eval mode) to ONNX with a dynamic batch dimension and open a session."""
        module = module.eval()
        buffer = io.BytesIO()
        axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
        with torch.no_grad():
            torch.onnx.export(module, (example,), buffer, input_names=["input"], output_names=output_names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        return cls(buffer.getvalue(), output_names, threads, spin)

    def __call__(self, array: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        if isinstance(array, torch.Tensor):
            array = array.numpy()
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(array, dtype=np.float32)})


def classifier_forward(model: nn.Module, image_size: int, threads: int | None = None,
                       spin: bool = False) -> OnnxForward:
    """The bundle's network as ONNX: outputs ``logits`` (N, C) and ``features`` (N, D)."""
    example = torch.zeros(1, 1, image_size, image_size)
    return OnnxForward.export(ForwardWithFeatures(model), example, ["logits", "features"], threads, spin)
