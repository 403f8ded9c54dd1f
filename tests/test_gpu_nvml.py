"""The real NVML code path (`NvmlInventory`) with no GPU here.

There is no NVIDIA driver on this machine, so `pynvml.nvmlInit` raises
NVMLError_LibraryNotFound: that path is tested as it is. For the GPU path, the real `pynvml`
module is used with its NVML entry points replaced by a simulated B200 board. `monkeypatch`
refuses to replace a name the installed nvidia-ml-py does not have, and the simulated calls
return pynvml's own ctypes structures and raise its own error classes, so a misspelt call, a
wrong unit (NVML reports milliwatts) or an unhandled NVMLError fails here."""

from __future__ import annotations

import logging

import pynvml
import pytest

from reconciler.gpu.inventory import GpuInfo, NvmlInventory

GIB = 1024**3


def test_no_driver_is_an_empty_inventory_with_a_reason(caplog):
    with caplog.at_level(logging.INFO):
        inventory = NvmlInventory()
        assert inventory.gpus() == []
        assert inventory.gpus() == []
    assert "NVML unavailable (NVMLError_LibraryNotFound)" in inventory.reason
    assert caplog.text.count("NVML unavailable") == 1  # said once, not every pass
    assert inventory.failed is False  # no driver is an answer, not an error


class Board:
    """A simulated NVML: `gpus` are (uuid, name, total, used, util, cc, temp, milliwatts).
    `lost`: GPUs whose handle raises GPU_IS_LOST; `no_memory_info`: GPUs whose memory query
    raises NOT_SUPPORTED; `count_error`: nvmlDeviceGetCount itself fails."""

    def __init__(self, gpus):
        self.gpus = gpus
        self.lost: set[int] = set()
        self.no_memory_info: set[int] = set()
        self.count_error = False
        self.inits = 0

    def install(self, monkeypatch):
        def handle(i):
            if i in self.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return i

        def memory(h):
            if h in self.no_memory_info:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            info = pynvml.c_nvmlMemory_t()
            info.total, info.used = self.gpus[h][2], self.gpus[h][3]
            info.free = info.total - info.used
            return info

        def utilization(h):
            rates = pynvml.c_nvmlUtilization_t()
            rates.gpu, rates.memory = self.gpus[h][4], 0
            return rates

        def temperature(h, sensor):
            assert sensor == pynvml.NVML_TEMPERATURE_GPU
            return self.gpus[h][6]

        def power(h):
            if self.gpus[h][7] is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return self.gpus[h][7]

        def init():
            self.inits += 1

        def count():
            if self.count_error:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
            return len(self.gpus)

        for name, fake in {
            "nvmlInit": init,
            "nvmlDeviceGetCount": count,
            "nvmlDeviceGetHandleByIndex": handle,
            "nvmlDeviceGetMemoryInfo": memory,
            "nvmlDeviceGetUUID": lambda h: self.gpus[h][0],
            "nvmlDeviceGetName": lambda h: self.gpus[h][1].encode(),  # older drivers: bytes
            "nvmlDeviceGetUtilizationRates": utilization,
            "nvmlDeviceGetCudaComputeCapability": lambda h: self.gpus[h][5],
            "nvmlDeviceGetTemperature": temperature,
            "nvmlDeviceGetPowerUsage": power,
        }.items():
            monkeypatch.setattr(pynvml, name, fake)  # raising=True: the name must exist


@pytest.fixture
def board(monkeypatch):
    b = Board([
        ("GPU-aaaa", "NVIDIA B200", 192 * GIB, 120 * GIB, 55, (10, 0), 61, 640_500),
        ("GPU-bbbb", "NVIDIA B200", 192 * GIB, 2 * GIB, 0, (10, 0), 35, None),  # no power sensor
    ])  # fmt: skip
    b.install(monkeypatch)
    return b


def test_a_board_is_read_into_gpu_infos(board):
    inventory = NvmlInventory()
    assert inventory.gpus() == [
        GpuInfo(
            0, "GPU-aaaa", "NVIDIA B200", 192 * GIB, 120 * GIB, 72 * GIB, 55, (10, 0), 61, 640.5
        ),
        GpuInfo(1, "GPU-bbbb", "NVIDIA B200", 192 * GIB, 2 * GIB, 190 * GIB, 0, (10, 0), 35, None),
    ]
    assert inventory.reason == ""
    inventory.gpus()
    assert board.inits == 1  # NVML is initialised once per process, not every pass


def test_a_lost_gpu_is_left_out_with_its_reason_and_the_others_stay(board, caplog):
    """One GPU raising an NVML error used to empty the whole inventory: placement then said
    "this host has none" and the plan stopped every GPU backend, on every healthy card too."""
    inventory = NvmlInventory()
    board.lost.add(1)
    with caplog.at_level(logging.WARNING):
        assert [g.uuid for g in inventory.gpus()] == ["GPU-aaaa"]
        assert [g.uuid for g in inventory.gpus()] == ["GPU-aaaa"]
    assert inventory.failed is True  # an incomplete answer, not "no GPU"
    assert "GPU 1 left out: NVML query failed: GPU is lost" == inventory.reason
    assert caplog.text.count("GPU is lost") == 1  # said when it happens, not every pass
    board.lost.clear()  # after a driver reset the next pass sees the board again
    assert [g.uuid for g in inventory.gpus()] == ["GPU-aaaa", "GPU-bbbb"]
    assert inventory.reason == ""  # status.json and the exporter stop reporting the failure
    assert inventory.failed is False


def test_a_query_a_gpu_does_not_support_leaves_out_that_gpu_only(board):
    """NOT_SUPPORTED on one GPU's memory query is that GPU's problem, not the host's."""
    inventory = NvmlInventory()
    board.no_memory_info.add(0)
    assert [g.uuid for g in inventory.gpus()] == ["GPU-bbbb"]
    assert (
        inventory.failed
        and "GPU 0 left out" in inventory.reason
        and "Not Supported" in inventory.reason
    )


def test_nvml_failing_as_a_whole_is_a_failed_inventory_not_an_empty_host(board, monkeypatch):
    """No answer at all from a working driver is a failure (`failed`), which the controller
    must not read as "this host has no GPU"; a failed init is one too, unlike a missing driver."""
    inventory = NvmlInventory()
    board.count_error = True
    assert inventory.gpus() == []
    assert inventory.failed and "NVML query failed: Unknown Error" in inventory.reason
    board.count_error = False
    assert len(inventory.gpus()) == 2 and not inventory.failed

    def broken_init():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(pynvml, "nvmlInit", broken_init)
    fresh = NvmlInventory()
    assert fresh.gpus() == [] and fresh.failed and "NVML init failed" in fresh.reason
