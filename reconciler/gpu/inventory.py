"""GPU inventory through NVML. No driver or no GPU is a normal answer: an empty inventory
and one log line, never a traceback. An NVML error is not: the answer is incomplete, and
`failed` says so, so that the controller does not stop backends over a monitoring failure.
Tests inject inventories through `StaticInventory`, which is what `NvmlInventory` produces
from real hardware."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    memory_used: int
    memory_free: int
    utilization: int | None = None  # percent
    compute_capability: tuple[int, int] | None = None
    temperature: int | None = None  # degrees C
    power_watts: float | None = None


class GpuInventory(Protocol):
    def gpus(self) -> list[GpuInfo]: ...

    @property
    def reason(self) -> str: ...

    @property
    def failed(self) -> bool:
        """True when the last `gpus()` hit an error: GPUs may be missing from it (see reason)."""
        ...


class StaticInventory:
    """A fixed list of GPUs: what tests and `--gpus-from FILE` use."""

    def __init__(self, gpus: list[GpuInfo], reason: str = ""):
        self._gpus = list(gpus)
        self._reason = reason or ("" if gpus else "no GPU declared")

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def failed(self) -> bool:
        return False


def load_inventory(path: str) -> StaticInventory:
    """GPUs described in a JSON file (a list of GpuInfo fields, sizes in bytes), so a host's
    placement can be planned and its units rendered on another machine."""
    import json
    from dataclasses import fields

    allowed = {f.name for f in fields(GpuInfo)}
    try:
        entries = json.loads(open(path, encoding="utf-8").read())
        gpus = []
        for number, entry in enumerate(entries):
            unknown = set(entry) - allowed
            if unknown:
                raise ValueError(
                    f"[{number}]: unknown keys {sorted(unknown)}; use {sorted(allowed)}"
                )
            if entry.get("compute_capability") is not None:
                entry = {**entry, "compute_capability": tuple(entry["compute_capability"])}
            gpus.append(GpuInfo(**entry))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a GPU inventory: {exc}") from None
    return StaticInventory(gpus, reason=f"GPUs from {path}")


# nvmlInit errors that mean "no GPU here" (no driver installed or loaded): a normal answer.
_NO_DRIVER = (12, 9)  # NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_DRIVER_NOT_LOADED


class NvmlInventory:
    """The real inventory. `reason` says why it is empty or short when it is; `failed` whether
    that is an NVML error (GPUs there but not read) rather than no GPU at all."""

    def __init__(self) -> None:
        self._reason = ""
        self._failed = False
        self._ready = False
        self._logged = False

    def _init(self) -> bool:
        if self._ready:
            return True
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            self._reason = "nvidia-ml-py is not installed"
        except Exception as exc:  # pynvml.NVMLError_LibraryNotFound and friends
            # A driver that is there but errors (GPU lost, no permission) is not "no GPU".
            self._failed = getattr(exc, "value", None) not in (None, *_NO_DRIVER)
            if self._failed:
                self._reason = f"NVML init failed: {exc}"
            else:
                self._reason = f"NVML unavailable ({type(exc).__name__}): running without GPUs"
        else:
            self._ready = True
            return True
        if not self._logged:
            (log.warning if self._failed else log.info)("%s", self._reason)
            self._logged = True
        return False

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def failed(self) -> bool:
        return self._failed

    def gpus(self) -> list[GpuInfo]:
        if not self._init():
            return []
        import pynvml

        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            return self._answer([], [f"NVML query failed: {exc}"])
        found, problems = [], []
        for index in range(count):
            # One GPU that errors (lost, or a query it does not support) is left out with its
            # reason; the others are still reported.
            try:
                found.append(_read_gpu(pynvml, index))
            except pynvml.NVMLError as exc:
                problems.append(f"GPU {index} left out: NVML query failed: {exc}")
        return self._answer(found, problems)

    def _answer(self, found: list[GpuInfo], problems: list[str]) -> list[GpuInfo]:
        reason = "; ".join(problems)
        if reason != self._reason:  # said when it changes, not every pass
            if reason:
                log.warning("%s", reason)
            elif self._failed:
                log.info("NVML answers again: %d GPU(s)", len(found))
        # A failure that passed (a driver reset) must not be reported forever.
        self._reason, self._failed = reason, bool(problems)
        return found


def _read_gpu(pynvml, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        memory_free=int(memory.free),
        utilization=_optional(lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu, handle),
        compute_capability=_optional(
            lambda h: tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)), handle
        ),
        temperature=_optional(
            lambda h: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU), handle
        ),
        power_watts=_optional(lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0, handle),
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read, handle):
    try:
        return read(handle)
    except Exception:  # a sensor this GPU does not have
        return None
