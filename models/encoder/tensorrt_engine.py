"""The ``tensorrt`` backend: an engine built from the mixed-precision ONNX export, cached on disk.

Build: :func:`export_encoder` writes the ViT in fp16 or bf16 with LayerNorm and the patch embedding
as fp32 islands (see :mod:`models.encoder.onnx_export` for why); TensorRT's ONNX parser reads it
into a strongly typed network, where each layer runs in the type the graph gives it. Strong typing
is the only mode of TensorRT 11 (its precision flags are gone) and an opt-in flag on 10.x, which is
set here. The input size is fixed, so the engine needs no optimization profile.

Engines are cached under the weights' digest, the input size, the precision, the GPU's name,
TensorRT's version and the export recipe; a stale or corrupt engine is rebuilt after one warning.
``tensorrt`` is imported only when an engine is built or run, so this module (and its cache keys)
loads on machines without it.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.encoder.base import EncoderUnavailable, pixels_shape, vision_backbone
from models.encoder.cache import ArtifactCache, CacheKey, CorruptArtifact, weights_digest
from models.encoder.onnx_export import export_encoder, export_recipe
from models.loading import Sam3Models

log = logging.getLogger(__name__)

ENGINE_FILE = "encoder.plan"
ENGINE_PRECISIONS = ("fp16", "bf16")
DEFAULT_ENGINE_PRECISION = "fp16"
INSTALL_HINT = "pip install 'sam3-stream[trt]' on a machine with an NVIDIA GPU"


def tensorrt_module() -> Any:
    """The ``tensorrt`` module, or :class:`EncoderUnavailable` saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise EncoderUnavailable(f"TensorRT is not installed ({INSTALL_HINT})") from error
    return tensorrt


def tensorrt_problem() -> str | None:
    """Why no engine can be built or run on this machine (TensorRT or a CUDA GPU missing), or ``None``.

    Cheap: lets a command refuse before it loads a model for nothing.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and torch sees none"
    return None


def engine_cache_key(weights: str, image_size: int, precision: str, gpu_name: str, tensorrt_version: str) -> CacheKey:
    """What an engine depends on. An engine runs only on the GPU model and TensorRT version it was built by."""
    return CacheKey.of(
        "tensorrt",
        weights=weights,
        image_size=image_size,
        precision=precision,
        gpu=gpu_name,
        tensorrt=tensorrt_version,
        recipe=export_recipe(),
    )


def check_engine_precision(precision: str) -> None:
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"precision: a TensorRT engine is {' or '.join(ENGINE_PRECISIONS)}, got {precision!r}")


class TensorRTImageEncoder:
    """Runs a serialized encoder engine (``encoder.plan``) on the models' GPU, ordered with torch's stream."""

    def __init__(self, models: Sam3Models, plan_path: str | Path, precision: str) -> None:
        trt = tensorrt_module()
        self.models = models
        self.device = models.device
        self.name = f"tensorrt-{precision}"
        self.plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise CorruptArtifact("TensorRT cannot deserialize it (truncated, or built by another version)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise CorruptArtifact(f"expected one input and one output, found {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        built_for = tuple(self.engine.get_tensor_shape(self.input_name))
        if built_for != pixels_shape(models):
            raise CorruptArtifact(f"it was built for input {built_for}, the model takes {pixels_shape(models)}")
        self.tokens_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        # TensorRT synchronizes the device around work enqueued on the default stream: use a stream of our own.
        self.stream = torch.cuda.Stream(self.device)
        self.tokens_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(torch.float32).contiguous()  # the export's input is fp32 (the patch embedding's island)
        tokens = torch.empty(self.tokens_shape, dtype=self.tokens_dtype, device=self.device)
        self.context.set_tensor_address(self.input_name, pixels.data_ptr())
        self.context.set_tensor_address(self.output_name, tokens.data_ptr())
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # after the preprocessing that made the pixels
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the encoder engine (see its log)")
        caller.wait_stream(self.stream)  # the necks read the tokens only once the engine is done
        return tokens.to(self.models.dtype)


def build_engine_file(onnx_path: Path, plan_path: Path) -> None:
    """Build a strongly typed engine from ``onnx_path`` (external data beside it is found) into ``plan_path``."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on in 11.x
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EncoderUnavailable(f"TensorRT cannot parse the encoder's ONNX export: {errors}")
    config = builder.create_builder_config()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EncoderUnavailable("TensorRT could not build the encoder engine (its log above says why)")
    plan_path.write_bytes(memoryview(plan))


def load_tensorrt_encoder(models: Sam3Models, precision: str, cache: ArtifactCache) -> TensorRTImageEncoder:
    """The TensorRT encoder for ``models``, from the engine cache (built there on first use)."""
    check_engine_precision(precision)
    key, build = _engine_recipe(models, precision)
    return cache.get_or_build(key, build, lambda folder: TensorRTImageEncoder(models, folder / ENGINE_FILE, precision))


def build_engine(
    models: Sam3Models, precision: str = DEFAULT_ENGINE_PRECISION, cache_dir: str | Path | None = None
) -> Path:
    """Build (or find in the cache) the encoder engine for ``models`` and return its ``encoder.plan`` path.

    Raises :class:`EncoderUnavailable` where TensorRT or a GPU is missing, or the build fails.
    """
    return load_tensorrt_encoder(models, precision, ArtifactCache(cache_dir)).plan_path


def _engine_recipe(models: Sam3Models, precision: str) -> tuple[CacheKey, Any]:
    trt = tensorrt_module()
    if models.device.type != "cuda":
        raise EncoderUnavailable(f"TensorRT needs a CUDA GPU; the model is on {models.device}")
    key = engine_cache_key(
        weights_digest(vision_backbone(models)),
        models.image_size,
        precision,
        torch.cuda.get_device_name(models.device),
        trt.__version__,
    )

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="sam3-encoder-onnx-") as scratch:
            onnx_path = export_encoder(models, scratch, precision=precision)
            log.info("building the %s TensorRT engine for %s (minutes for the full model)", precision, models.source)
            build_engine_file(onnx_path, folder / ENGINE_FILE)

    return key, build


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    if dtype not in dtypes:
        raise CorruptArtifact(f"its output type {dtype} is not float32, float16 or bfloat16")
    return dtypes[dtype]
