# The server package of a local backend (a `settings.backends.<name>` value) when its NixOS
# option `package` is unset: the nixpkgs package of its kind, and for a backend on GPUs its
# CUDA build as a per-package override (like services.ollama's `acceleration`), never the
# system-wide nixpkgs.config.cudaSupport. null where nixpkgs has none (TGI, SGLang): the host
# sets the backend's `package`, whose main program (meta.mainProgram) is then the server.
{ lib, pkgs }:
let
  wantsGpu = (import ../lib).wantsGpu;
  byKind = {
    llamacpp = {
      cpu = pkgs.llama-cpp or null;
      gpu = if pkgs ? llama-cpp then pkgs.llama-cpp.override { cudaSupport = true; } else null;
      exe = "llama-server";
    };
    vllm = {
      cpu = pkgs.vllm or null;
      gpu = pkgs.python3Packages.vllm.override { cudaSupport = true; };
      exe = "vllm";
    };
    tgi = {
      cpu = pkgs.text-generation-inference or null;
      gpu = pkgs.text-generation-inference or null;
      exe = "text-generation-launcher";
    };
    ollama = {
      cpu = pkgs.ollama or null;
      gpu = pkgs.ollama.override { acceleration = "cuda"; };
      exe = "ollama";
    };
  };
in
{
  # An unknown kind has no package; the schema names the kind's mistake at build time.
  packageFor =
    b:
    let
      server = byKind.${b.kind} or null;
    in
    if server == null then
      null
    else if wantsGpu b then
      server.gpu
    else
      server.cpu;
  binaryOf =
    kind: package:
    if byKind ? ${kind} then "${package}/bin/${byKind.${kind}.exe}" else lib.getExe package;
}
