# Fake packages for tests/nix/eval-module.nix: derivation-shaped attrsets (`type =
# "derivation"`, a store-looking outPath) that record how they were made, so evaluation needs
# no nixpkgs and builds nothing. Only what modules/*.nix and modules/package.nix reach for.
{ lib, pkgsConfig }:
let
  fake =
    name: extra:
    let
      self = {
        type = "derivation";
        inherit name;
        outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
        meta = { };
        # `pkg.override { cudaSupport = true; }`: the same package, built another way.
        override = args: fake "${name}${lib.optionalString (args.cudaSupport or false) "-cuda"}" extra;
        overrideAttrs = _: self;
      } // extra;
    in
    self;

  # The runtime dependencies nixpkgs packages today (pyproject.toml names, normalised), at
  # the versions nixpkgs has: tree-sitter-language-pack is 1.x there.
  pythonLibs = lib.genAttrs [
    "pydantic"
    "pyyaml"
    "jinja2"
    "starlette"
    "uvicorn"
    "httpx"
    "nvidia-ml-py"
    "prometheus-client"
    "gguf"
    "huggingface-hub"
    "psycopg"
    "httpx-aiohttp"
    "httptools"
    "uvloop"
    "websockets"
    "tree-sitter-language-pack"
    "openai"
    "pip"
    "setuptools"
    "pytestCheckHook"
    "pytest-timeout"
  ] (n: fake "python3.13-${n}" { });

  python3Packages = pythonLibs // {
    python = {
      sitePackages = "lib/python3.13/site-packages";
    };
    makePythonPath = deps: lib.concatMapStringsSep ":" (d: "${d}/lib/python3.13/site-packages") deps;
    callPackage = fn: args: import fn ({ inherit lib python3Packages; } // args);
    buildPythonApplication =
      args:
      fake "tensorforge-${args.version}" {
        meta = args.meta;
        # What the sandbox build would do, for the tests to read.
        fakeBuild = {
          inherit (args) pname version;
          dependencies = map (d: d.name) args.dependencies;
          pythonRelaxDeps = args.pythonRelaxDeps or [ ];
          pythonRemoveDeps = args.pythonRemoveDeps or [ ];
          enabledTestPaths = args.enabledTestPaths or [ ];
          disabledTestMarks = args.disabledTestMarks or [ ];
          disabledTestPaths = args.disabledTestPaths or [ ];
        };
      };
    vllm = fake "python3.13-vllm" { };
  };
in
{
  config = pkgsConfig;
  inherit python3Packages;
  stdenv = {
    buildPlatform.canExecute = _: true;
    hostPlatform.system = "x86_64-linux";
  };
  coreutils = fake "coreutils" { };
  vllm = fake "vllm" { };
  llama-cpp = fake "llama-cpp" { };
  ollama = fake "ollama" { };
  # nixpkgs has no text-generation-inference: the attribute is missing, as there.
  writeText = name: text: fake name { fakeText = text; };
  runCommand =
    name: env: script:
    fake name { fakeScript = script; fakeInputs = map (d: d.name) (env.nativeBuildInputs or [ ]); };
  linuxPackages.nvidiaPackages = lib.genAttrs [ "dc_565" "dc_570" "dc_580" "production" ] (n: fake "nvidia-x11-${n}" { });
}
