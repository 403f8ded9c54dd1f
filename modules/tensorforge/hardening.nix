# systemd sandboxing for the units NixOS declares (reconciler, gateway, GPU exporter), read
# from templates/hardening.json: the file the reconciler's unit templates render the backend
# units from, so NixOS and the rendered units share one definition.
let
  shared = builtins.fromJSON (builtins.readFile ../../templates/hardening.json);
in
{
  # Services (gateway, GPU exporter): a static user or a DynamicUser, `service` and the
  # `gpu` or `cpu` part.
  service =
    cfg: gpu:
    (
      if cfg.user != null then
        {
          User = cfg.user;
          Group = cfg.group;
        }
      else
        { DynamicUser = true; }
    )
    // shared.service
    // (if gpu then shared.gpu else shared.cpu);

  # The reconciler: root, to write runtime units to /run/systemd/system and drive systemd.
  reconciler = shared.reconciler;

  # NVML and CUDA come from the driver, which NixOS links under /run/opengl-driver.
  driverEnvironment = gpu: if gpu then { LD_LIBRARY_PATH = "/run/opengl-driver/lib"; } else { };
}
