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


class Board:
    """A simulated NVML: `gpus` are (uuid, name, total, used, util, cc, temp, milliwatts)."""

    def __init__(self, gpus):
        self.gpus = gpus
        self.lost: set[int] = set()
        self.inits = 0

    def install(self, monkeypatch):
        def handle(i):
            if i in self.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return i

        def memory(h):
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

        for name, fake in {
            "nvmlInit": init,
            "nvmlDeviceGetCount": lambda: len(self.gpus),
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
        GpuInfo(0, "GPU-aaaa", "NVIDIA B200", 192 * GIB, 120 * GIB, 72 * GIB, 55, (10, 0), 61, 640.5),
        GpuInfo(1, "GPU-bbbb", "NVIDIA B200", 192 * GIB, 2 * GIB, 190 * GIB, 0, (10, 0), 35, None),
    ]
    assert inventory.reason == ""
    inventory.gpus()
    assert board.inits == 1  # NVML is initialised once per process, not every pass


def test_a_lost_gpu_empties_the_inventory_with_a_reason_and_recovers(board, caplog):
    inventory = NvmlInventory()
    board.lost.add(1)
    with caplog.at_level(logging.WARNING):
        assert inventory.gpus() == []
    assert "NVML query failed" in inventory.reason and "GPU is lost" in inventory.reason
    assert "GPU is lost" in caplog.text
    board.lost.clear()  # after a driver reset the next pass sees the board again
    assert [g.uuid for g in inventory.gpus()] == ["GPU-aaaa", "GPU-bbbb"]
    assert inventory.reason == ""  # status.json and the exporter stop reporting the failure
