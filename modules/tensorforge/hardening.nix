# systemd sandboxing shared by the reconciler and the gateway.
{
  common =
    cfg:
    (
      if cfg.user != null then
        {
          User = cfg.user;
          Group = cfg.group;
        }
      else
        { DynamicUser = true; }
    )
    // {
      CapabilityBoundingSet = [ "" ];
      AmbientCapabilities = [ "" ];
      NoNewPrivileges = true;
      LockPersonality = true;
      PrivateTmp = true;
      PrivateMounts = true;
      ProtectSystem = "strict";
      ProtectHome = true;
      ProtectClock = true;
      ProtectControlGroups = true;
      ProtectHostname = true;
      ProtectKernelLogs = true;
      ProtectKernelModules = true;
      ProtectKernelTunables = true;
      ProtectProc = "invisible";
      ProcSubset = "all"; # /proc/meminfo and /proc/cpuinfo size CPU backends
      RemoveIPC = true;
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      RestrictAddressFamilies = [
        "AF_INET"
        "AF_INET6"
        "AF_UNIX"
      ];
      SystemCallArchitectures = "native";
      SystemCallFilter = [
        "@system-service @resources" # @resources: NUMA binding and CPU affinity (NCCL, llama.cpp)
        "~@privileged"
      ];
      SystemCallErrorNumber = "EPERM";
      UMask = "0077";
    };

  devices =
    gpu:
    if gpu then
      {
        # A private /dev would hide the NVIDIA device nodes the backends need.
        PrivateDevices = false;
        DevicePolicy = "closed";
        DeviceAllow = [
          "/dev/nvidiactl rw"
          "/dev/nvidia-uvm rw"
          "/dev/nvidia-uvm-tools rw"
          "/dev/nvidia-modeset rw"
          "char-nvidia-frontend rw" # /dev/nvidia0 ... /dev/nvidia7
          "char-nvidia-caps rw" # MIG and fabric capabilities
          "char-nvidia-caps-imex-channels rw"
        ];
        # CUDA, Triton and PyTorch JIT-compile kernels into writable-executable memory.
        MemoryDenyWriteExecute = false;
        # NCCL finds its network interfaces through getifaddrs(), a netlink socket (as the
        # rendered vllm/tgi units in templates/ allow).
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
          "AF_NETLINK"
        ];
      }
    else
      {
        PrivateDevices = true;
        MemoryDenyWriteExecute = true;
      };

  # NVML and CUDA come from the driver, which NixOS links under /run/opengl-driver.
  driverEnvironment = gpu: if gpu then { LD_LIBRARY_PATH = "/run/opengl-driver/lib"; } else { };
}
