"""Loading Qwen2.5-VL through PaddleFormers: demo, local folder or hub id; device and dtype."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from serving.model import demo
from serving.model import gpu
from serving.model import paddle_fixes
from serving.model import weights

log = logging.getLogger(__name__)

from serving.config import DTYPES, HUBS  # noqa: F401  (one list each, checked before the port is bound)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do instead."""


@dataclass
class LoadedModel:
    model: object  # Qwen2_5_VLForConditionalGeneration
    processor: object  # Qwen2_5_VLProcessor
    name: str  # the name responses carry
    source: str  # the folder it was read from, or the hub id
    is_demo: bool
    device: str
    dtype: str
    load_seconds: float

    @property
    def parameter_count(self) -> int:
        return sum(int(p.numel()) for p in self.model.parameters())


def choose_device(requested: str = "auto") -> str:
    import paddle

    requested = (requested or "auto").lower()
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "auto":
        return "gpu:0" if has_gpu else "cpu"
    if requested.startswith("gpu"):
        if not has_gpu:
            raise ModelLoadError(
                f"--device {requested} asked for a GPU, but this PaddlePaddle build sees none "
                "(is the GPU build installed? run build_env.sh). Use --device cpu or auto.")
        return requested if ":" in requested else "gpu:0"
    if requested == "cpu":
        return "cpu"
    raise ModelLoadError(f"unknown --device {requested!r}: use auto, cpu, gpu or gpu:N")


def choose_dtype(device: str, requested: str = "auto") -> str:
    """The dtype to load in: --dtype when this device can compute in it, else a clear refusal; auto:
    float32 on a CPU (whatever torch_dtype the checkpoint's config.json names), bf16/fp16 on a GPU."""
    requested = (requested or "auto").lower()
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelLoadError(f"unknown --dtype {requested!r}: use auto, {', '.join(DTYPES)}")
        missing = missing_kernel(device, requested)
        if missing:
            raise ModelLoadError(
                f"--dtype {requested} cannot run on {device}: this PaddlePaddle build has no {requested} "
                f"{missing} kernel there ({'use --dtype float32 or auto' if device == 'cpu' else 'use --dtype auto'})")
        return requested
    if device == "cpu":
        return "float32"  # Paddle's CPU build has no bfloat16 or float16 matmul (missing_kernel)
    import paddle

    index = int(device.split(":")[1]) if ":" in device else 0
    major, _minor = paddle.device.cuda.get_device_capability(index)
    return "bfloat16" if major >= 8 else "float16"  # bfloat16 needs Ampere (sm_80) or newer


def missing_kernel(device: str, dtype: str):
    """None when a tiny matmul in `dtype` runs on `device`, else the name of the missing kernel. Asked of
    Paddle itself: Paddle 3.3.1's CPU build has no bfloat16 or float16 matmul, so a model loaded in either
    would load, then fail every request."""
    import paddle

    place = paddle.CPUPlace() if device == "cpu" else paddle.CUDAPlace(int(device.split(":")[1]) if ":" in device else 0)
    try:
        with paddle.no_grad():
            a = paddle.to_tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, place=place)
            paddle.matmul(a, a).numpy()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        if "not registered" in str(exc) or "not support" in str(exc).lower():
            return "matmul"
        raise
    return None


def resolve_source(model: str, cache_dir: str | None = None) -> tuple[str, bool]:
    """(folder or hub id, is_demo). Demo names build the demo checkpoint once."""
    if demo.is_demo_name(model):
        return str(demo.demo_path(model, cache_dir)), True
    return model, False


# PaddleFormers and Paddle's checkpoint loader log dozens of INFO lines per load.
LIBRARY_LOGGERS = ("PaddleFormers", "paddle.distributed.fleet.utils.log_util")


def quiet_library_logs() -> None:
    """Keep their warnings, drop their INFO chatter, unless our own logging asks for DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def load_model(settings) -> LoadedModel:
    import paddle
    from paddleformers.transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    started = time.perf_counter()
    quiet_library_logs()
    source, is_demo = resolve_source(settings.model)
    is_local = os.path.isdir(source)
    problem = model_problem(source)
    if problem:
        raise ModelLoadError(problem)
    if settings.hub not in HUBS:
        raise ModelLoadError(f"unknown --hub {settings.hub!r}: use one of {', '.join(HUBS)}")
    device = choose_device(settings.device)
    dtype = choose_dtype(device, settings.dtype)
    gpu.check_before_load(source, device, dtype, settings.dtype, settings, log)  # says no before an OOM would
    paddle.set_device(device)
    hub_args = {} if is_local else {"download_hub": settings.hub}
    where = f"folder {source}" if is_local else f"hub {settings.hub} ({source})"
    log.info("loading %s from %s on %s as %s", settings.model, where, device, dtype)
    try:
        if streams(device, source):
            model = _stream_from_folder(source, dtype)
        else:
            with _load_view(source) if is_local else contextlib.nullcontext(source) as folder:
                model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, **hub_args)
        processor = AutoProcessor.from_pretrained(source, **hub_args)
        _use_generation_config(model, source, hub_args)
    except Exception as exc:  # the hub clients raise many kinds; the user needs one message
        raise ModelLoadError(_load_failure_message(settings, source, is_local, exc)) from exc
    model.eval()
    paddle_fixes.apply(model, device)  # also the kernel choices of this device (fused RMSNorm off on a CPU)
    loaded = LoadedModel(
        model=model, processor=processor, name=settings.model_name, source=source,
        is_demo=is_demo, device=device, dtype=dtype, load_seconds=time.perf_counter() - started)
    if is_demo:
        log.warning("serving the DEMO model: random weights, its answers are meaningless text (%s)", source)
    log.info("model ready in %.1f s: %s parameters, %s, %s",
             loaded.load_seconds, f"{loaded.parameter_count:,}", device, dtype)
    return loaded


def streams(device: str, source: str) -> bool:
    """On a CPU a local safetensors folder is streamed into the model (serving.model.weights): peak
    memory near the loaded size, and nothing written into the folder. A GPU keeps the library's loader
    (its host copy is freed once on the device; it was not run here, there being no GPU)."""
    return device == "cpu" and weights.can_stream(source)


def _stream_from_folder(source: str, dtype: str):
    from paddleformers.transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_pretrained(source)
    return weights.build_and_load(Qwen2_5_VLForConditionalGeneration, source, config, dtype)


FLEX_METADATA = "flex-ckpt.auto_generated.metadata"  # what PaddleFormers' loader writes beside the weights


@contextlib.contextmanager
def _load_view(folder: str):
    """A private temporary folder of symbolic links to `folder`'s files, to load the weights from.

    PaddleFormers (flex_checkpoint, the default format) deletes and writes `flex-ckpt.auto_generated.metadata`,
    under a `.lock` file, into the folder it loads from, on every load: a read-only model folder could not be
    served ("Read-only file system"), and two servers loading one folder at once raced (one deleted the file
    the other had just written: IndexError, or a stall). Through the view it writes into a folder of this load
    alone; the model folder is only read. A metadata file already in the folder is left out: the loader makes it
    anew every time anyway."""
    view = tempfile.mkdtemp(prefix="qwenvl-load-")
    try:
        for entry in os.scandir(folder):
            if not entry.name.startswith(FLEX_METADATA):
                os.symlink(os.path.abspath(entry.path), os.path.join(view, entry.name))
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def _use_generation_config(model, source: str, hub_args: dict) -> None:
    """The checkpoint's generation_config.json holds the sampling defaults its authors chose."""
    from paddleformers.generation import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(source, **hub_args)
    except Exception as exc:  # a checkpoint without one keeps the library's defaults
        log.info("no generation_config.json for %s (%s); using library defaults", source, type(exc).__name__)


def model_problem(model: str):
    """Why --model names nothing that can be loaded (None when it is the demo, a folder or a hub id): cheap,
    so api.py says it before binding the port."""
    if demo.is_demo_name(model) or os.path.isdir(model) or is_hub_id(model):
        return None
    return (f"model folder {model!r} does not exist. Pass the folder that holds config.json and the "
            "*.safetensors files, a hub id such as Qwen/Qwen2.5-VL-3B-Instruct, or --model demo.")


def is_hub_id(model: str) -> bool:
    """'org/name' (a hub id) rather than a folder, a path or the demo model."""
    model = str(model)
    if demo.is_demo_name(model) or os.path.isdir(model) or model.startswith((".", "/", "~")) or "\\" in model:
        return False
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not any(c.isspace() for c in model)


def _load_failure_message(settings, source: str, is_local: bool, exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {exc}".strip()
    if len(reason) > 500:
        reason = reason[:500] + "..."
    if is_local:
        return (f"could not load the model from folder {source}: {reason}\n"
                "The folder must hold a Qwen2.5-VL checkpoint (config.json, *.safetensors, tokenizer "
                "and preprocessor files).")
    ways_out = ("download the checkpoint elsewhere and pass its folder (--model /path/to/Qwen2.5-VL-3B-Instruct, "
                f"or MODEL=...), try another --hub ({', '.join(h for h in HUBS if h != settings.hub)}), or run the "
                "offline demo model with --model demo.")
    unreachable = _hub_unreachable(settings.hub)
    if unreachable:  # the hub clients say "no files found in repo" offline, which reads like a wrong model id
        url, why = unreachable
        return (f"could not load model {source!r}: the {settings.hub} hub at {url} is unreachable from this "
                f"machine ({why}); it looks offline, or the hub is blocked here.\nTo serve it anyway, {ways_out}")
    return (f"could not load model {source!r} from the {settings.hub} hub: {reason}\n"
            f"Check the model id; if this machine is offline, {ways_out}")


def _hub_unreachable(hub: str):
    """(url, reason) when the hub's server does not answer from here, else None."""
    from serving.model.download import hub_endpoint, probe

    try:
        url = hub_endpoint(hub)
    except ValueError:
        return None
    reason = probe(url)
    return (url, reason) if reason else None
