"""Download a Qwen2.5-VL checkpoint from a hub into a folder, then verify what arrived.

    python -m serving.model.download Qwen/Qwen2.5-VL-3B-Instruct --hub aistudio --to /home/aistudio/Qwen2.5-VL-3B-Instruct
    python -m serving.model.download Qwen/Qwen2.5-VL-3B-Instruct --hub huggingface     # or --hub modelscope
    python -m serving.model.download --verify models/Qwen2.5-VL-3B-Instruct            # only check a folder

The hub's own client does the transfer (aistudio-sdk, huggingface_hub or modelscope, all
installed with PaddleFormers): each shows a progress bar per file and continues a partly
downloaded file where it stopped, so after an interruption the same command resumes. Before
it starts, the hub is probed with a short timeout, so an offline machine fails in seconds
with one clear message instead of retrying for minutes. A folder that already verifies is
not downloaded again (and needs no network).

Verification reads only the files' headers: config.json, the tokenizer and preprocessor
files, and every shard named in model.safetensors.index.json present, complete (its length
matches its safetensors header) and holding the tensors the index assigns to it, with the
tensors' bytes adding up to the index's total_size.

Exit codes: 0 complete and verified, 1 download or verification failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.model.demo import default_cache_dir
from serving.model.loader import HUBS, ModelLoadError, is_hub_id

SDK_PACKAGES = {"aistudio": "aistudio-sdk", "huggingface": "huggingface_hub", "modelscope": "modelscope"}
REACH_TIMEOUT = 6.0  # seconds for the whole reachability probe (DNS + TCP + TLS + first byte)

# What a Qwen2.5-VL checkpoint folder must hold besides its weights.
REQUIRED_FILES = ("config.json", "preprocessor_config.json")
TOKENIZER_CHOICES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class DownloadError(ModelLoadError):
    """A download that cannot start or did not finish; the message says what to do."""


# --------------------------------------------------------------------------- verification


@dataclass
class Verification:
    folder: str
    problems: list = field(default_factory=list)
    shards: int = 0
    tensors: int = 0
    parameters: int = 0
    weight_bytes: int = 0  # bytes of all shard files on disk

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return (f"{self.folder}: complete - {self.shards} shard(s), {self.tensors} tensors, "
                    f"{self.parameters:,} parameters, {self.weight_bytes / 2**30:.2f} GiB of weights")
        lines = [f"{self.folder}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, expected file length) of a .safetensors file; ValueError when it is not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise ValueError(f"header length {n} does not fit in the file's {size} bytes (truncated?)")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has no data_offsets") from None
    return header, 8 + n + end


def _tensor_elements(info: dict) -> int:
    count = 1
    for dim in info.get("shape", []):
        count *= int(dim)
    return count


def verify_checkpoint(folder) -> Verification:
    """Check a downloaded checkpoint folder without loading it (headers only: fast on GBs)."""
    folder = Path(folder)
    result = Verification(str(folder))
    bad = result.problems.append
    if not folder.is_dir():
        bad("the folder does not exist")
        return result
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            bad(f"{name} is missing")
    if (folder / "config.json").is_file():
        try:
            json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            bad(f"config.json is not valid JSON: {exc}")
    if not any(all((folder / n).is_file() for n in choice) for choice in TOKENIZER_CHOICES):
        bad("tokenizer files are missing (tokenizer.json, or vocab.json + merges.txt)")

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            bad(f"model.safetensors.index.json is unreadable: {type(exc).__name__}: {exc}")
            return result
        expected_total = (index.get("metadata") or {}).get("total_size")
    elif (folder / "model.safetensors").is_file():
        weight_map, expected_total = None, None
    else:
        bad("no weights: neither model.safetensors.index.json nor model.safetensors")
        return result

    shard_names = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    tensor_bytes = 0
    for shard in shard_names:
        path = folder / shard
        if not path.is_file():
            bad(f"shard {shard} is missing")
            continue
        try:
            header, expected_len = read_safetensors_header(path)
        except (OSError, ValueError) as exc:
            bad(f"shard {shard} is damaged: {exc}")
            continue
        actual = path.stat().st_size
        if actual != expected_len:
            bad(f"shard {shard} is incomplete: {actual:,} bytes, its header needs {expected_len:,} "
                "(interrupted download? run the download again to resume)")
            continue
        result.shards += 1
        result.weight_bytes += actual
        names = [k for k in header if k != "__metadata__"]
        if weight_map is not None:
            missing = [k for k, v in weight_map.items() if v == shard and k not in header]
            if missing:
                bad(f"shard {shard} lacks {len(missing)} tensor(s) the index assigns to it, e.g. {missing[0]}")
        for name in names:
            info = header[name]
            elements = _tensor_elements(info)
            result.tensors += 1
            result.parameters += elements
            start, end = (int(x) for x in info["data_offsets"])
            tensor_bytes += end - start
    if expected_total is not None and not result.problems and int(expected_total) != tensor_bytes:
        bad(f"the shards hold {tensor_bytes:,} bytes of tensors, the index's total_size says "
            f"{int(expected_total):,}")
    return result


# --------------------------------------------------------------------------- the hubs


def hub_endpoint(hub: str) -> str:
    """The base URL the hub's client talks to (each honours its own environment variable)."""
    if hub == "aistudio":
        default = "https://git.aistudio.baidu.com"
        try:
            from aistudio_sdk.config import STUDIO_GIT_HOST_DEFAULT as default  # noqa: N811
        except Exception:  # noqa: BLE001 - not installed: the default is still the right address
            pass
        return os.environ.get("STUDIO_GIT_HOST") or default
    if hub == "huggingface":
        return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if hub == "modelscope":
        domain = os.environ.get("MODELSCOPE_DOMAIN") or "modelscope.cn"
        return domain if "://" in domain else "https://" + domain
    raise ValueError(f"unknown hub {hub!r}: use one of {', '.join(HUBS)}")


def probe(url: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """None when an HTTP server answers at url within timeout (any status), else the reason.

    Runs in a thread with a hard deadline: name resolution ignores socket timeouts, and on
    some offline machines it hangs for far longer than the timeout.
    """
    import requests

    outcome: list = []

    def attempt():
        try:
            requests.head(url, timeout=(timeout, timeout), allow_redirects=False)
            outcome.append(None)
        except requests.exceptions.RequestException as exc:
            outcome.append(_short_reason(exc))
        except Exception as exc:  # noqa: BLE001
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Name or service not known", "Temporary failure in name resolution", "Failed to resolve",
                   "Connection refused", "Network is unreachable", "timed out", "No route to host"):
        if marker in text:
            return f"{type(exc).__name__}: {marker}"
    return f"{type(exc).__name__}: {text[:200]}"


def _sdk_download(hub: str, model: str, to: Path, revision: str | None, endpoint: str | None) -> None:
    """One call into the hub's client; it draws the progress bars and resumes partial files."""
    if hub == "aistudio":
        from aistudio_sdk.snapshot_download import snapshot_download

        snapshot_download(repo_id=model, local_dir=str(to), revision=revision)
    elif hub == "huggingface":
        from huggingface_hub import snapshot_download

        kwargs = {"endpoint": endpoint} if endpoint else {}
        snapshot_download(model, local_dir=str(to), revision=revision, **kwargs)
    elif hub == "modelscope":
        from modelscope import snapshot_download

        snapshot_download(model, local_dir=str(to), revision=revision)
    else:
        raise ValueError(f"unknown hub {hub!r}")


def _sdk_installed(hub: str) -> bool:
    import importlib.util

    module = {"aistudio": "aistudio_sdk", "huggingface": "huggingface_hub", "modelscope": "modelscope"}[hub]
    return importlib.util.find_spec(module) is not None


def download(model: str, hub: str = "aistudio", to=None, *, revision: str | None = None, force: bool = False,
             endpoint: str | None = None, timeout: float = REACH_TIMEOUT, fetch=None, out=None) -> Verification:
    """Download `model` from `hub` into `to` and verify it; DownloadError when that fails.

    `fetch(hub, model, to, revision, endpoint)` replaces the hub client (tests, other hubs).
    """
    out = out or sys.stderr
    if hub not in HUBS:
        raise DownloadError(f"unknown hub {hub!r}: use one of {', '.join(HUBS)}")
    to = Path(to) if to else default_target(model)
    if not force:
        existing = verify_checkpoint(to)
        if existing.ok:
            print(f"already downloaded and complete: {existing.summary()}", file=out)
            return existing
    if fetch is None:
        if not _sdk_installed(hub):
            raise DownloadError(f"the {hub} hub's client is not installed: pip install {SDK_PACKAGES[hub]} "
                                "(build_env.sh installs it with paddleformers)")
        url = endpoint or hub_endpoint(hub)
        print(f"checking that the {hub} hub answers at {url} ...", file=out)
        reason = probe(url, timeout)
        if reason:
            raise DownloadError(
                f"cannot reach the {hub} hub at {url} ({reason}): this machine looks offline, or the hub is "
                "blocked here.\nDownload the checkpoint on a machine with internet access and copy the folder "
                f"here (then: python api.py --model {to}), try another --hub ({', '.join(h for h in HUBS if h != hub)}), "
                "or serve the offline demo model: python api.py --model demo")
        fetch = _sdk_download
    to.mkdir(parents=True, exist_ok=True)
    print(f"downloading {model} from the {hub} hub into {to} (an interrupted download resumes when the "
          "same command runs again)", file=out)
    started = time.monotonic()
    try:
        fetch(hub, model, to, revision, endpoint)
    except KeyboardInterrupt:
        raise DownloadError(f"interrupted; run the same command again to resume the download into {to}") from None
    except Exception as exc:  # noqa: BLE001 - every hub client raises its own kinds
        reason = f"{type(exc).__name__}: {exc}".strip()
        reason = reason if len(reason) < 600 else reason[:600] + "..."
        raise DownloadError(
            f"downloading {model} from the {hub} hub failed: {reason}\n"
            "Check the model id and your network, then run the same command again: the files already "
            "downloaded are kept and partly downloaded ones resume.") from exc
    result = verify_checkpoint(to)
    print(f"finished in {time.monotonic() - started:.0f} s", file=out)
    if not result.ok:
        raise DownloadError("the download finished but the checkpoint is not complete:\n" + result.summary() +
                            "\nRun the same command again to fetch what is missing (add --force to re-check every file).")
    return result


def default_target(model: str) -> Path:
    """Where a hub id goes without --to: <cache>/models/<name> (QWENVL_CACHE moves the cache)."""
    return default_cache_dir() / "models" / model.rstrip("/").split("/")[-1]


def download_model(model: str, hub: str = "aistudio", to=None, **kwargs) -> Path:
    """Download (or find already complete) and verify; the folder to load. Raises DownloadError."""
    return Path(download(model, hub, to, **kwargs).folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.model.download",
        description="Download a Qwen2.5-VL checkpoint (progress bars, resumable) and verify it.")
    parser.add_argument("model", nargs="?", help="hub id, for example Qwen/Qwen2.5-VL-3B-Instruct")
    parser.add_argument("--hub", choices=HUBS, default=os.environ.get("HUB", "aistudio"),
                        help="where to download from (default: env HUB or aistudio)")
    parser.add_argument("--to", type=Path,
                        help="target folder (default: ~/.cache/qwenvl-serving/models/<name>; QWENVL_CACHE moves it)")
    parser.add_argument("--revision", help="branch, tag or commit (default: the hub's main revision)")
    parser.add_argument("--force", action="store_true",
                        help="ask the hub even when the folder already verifies")
    parser.add_argument("--timeout", type=float, default=REACH_TIMEOUT,
                        help="seconds to wait for the hub's first answer (default: %(default)s)")
    parser.add_argument("--verify", type=Path, metavar="DIR", help="only verify a checkpoint folder")
    args = parser.parse_args(argv)
    if args.verify:
        result = verify_checkpoint(args.verify)
        print(result.summary())
        return 0 if result.ok else 1
    if not args.model:
        parser.error("give a model id (or --verify DIR)")
    if not is_hub_id(args.model):
        parser.error(f"{args.model!r} is not a hub id of the form org/name (to check a folder use --verify)")
    try:
        result = download(args.model, args.hub, args.to, revision=args.revision, force=args.force,
                          timeout=args.timeout)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    print(f"serve it: python api.py --model {result.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
