"""GPUs: the inventory (NVML) and placement of backends onto them."""
