# Fake packages for tests/nix/eval-module.nix: derivation-shaped attrsets (`type =
# "derivation"`, a store-looking outPath) that record how they were made, so evaluation needs
# no nixpkgs and builds nothing. Only what modules/*.nix and modules/package.nix reach for.
{
  lib,
  pkgsConfig ? { },
  pythonMissing ? [ ],
  # Real (never built) derivations for `nix flake check --no-build`, which instantiates them;
  # plain attrsets for the Nix 2.8 evaluation, which needs no store.
  realDerivations ? false,
  system ? "x86_64-linux",
}:
let
  fake =
    name: extra:
    let
      drv =
        if realDerivations then
          derivation {
            inherit name system;
            builder = "/bin/sh";
            args = [ "-c" "echo 'a stand-in for nixpkgs: nothing here builds' >&2; exit 1" ];
            inputs = extra.fakeInputDrvs or [ ];
          }
        else
          {
            type = "derivation";
            inherit name;
            outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
          };
      self = drv // {
        meta = { };
        # `pkg.override { cudaSupport = true; }`: the same package, built another way.
        override = args: fake "${name}${lib.optionalString (args.cudaSupport or false) "-cuda"}" extra;
        overrideAttrs = _: self;
      } // extra;
    in
    self;

  # The runtime dependencies nixpkgs packages today (pyproject.toml names, normalised), at
  # the versions nixpkgs has: tree-sitter-language-pack is 1.x there.
  pythonLibs = builtins.removeAttrs (lib.genAttrs [
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
    "nats-py"
    "tqdm"
    "tree-sitter-language-pack"
    "openai"
    "pip"
    "setuptools"
    "pytestCheckHook"
    "pytest-timeout"
    "pytest"
  ] (n: fake "python3.13-${n}" { })) pythonMissing;

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
  pkgs = {
    config = pkgsConfig;
    inherit python3Packages;
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform.system = system;
    };
    coreutils = fake "coreutils" { };
    vllm = fake "vllm" { };
    llama-cpp = fake "llama-cpp" { };
    ollama = fake "ollama" { };
    # nixpkgs has no text-generation-inference: the attribute is missing, as there.
    writeText = name: text: fake name { fakeText = text; };
    # RFC 42's JSON format, with the type as nixpkgs' pkgs/pkgs-lib/formats.nix builds it from
    # lib.types (null, bool, int, float, string, path, and attribute sets and lists of those).
    formats.json =
      { }:
      {
        type =
          let
            valueType =
              lib.types.nullOr (
                lib.types.oneOf [
                  lib.types.bool
                  lib.types.int
                  lib.types.float
                  lib.types.str
                  lib.types.path
                  (lib.types.attrsOf valueType)
                  (lib.types.listOf valueType)
                ]
              )
              // {
                description = "JSON value";
              };
          in
          valueType;
        generate = name: value: pkgs.writeText name (builtins.toJSON value);
      };
    runCommand =
      name: env: script:
      fake name (
        {
          fakeScript = script;
          fakeInputs = map (d: d.name) (env.nativeBuildInputs or [ ]);
          fakeInputDrvs = [ script ] ++ (env.nativeBuildInputs or [ ]);
        }
        // (env.passthru or { })
      );
    # For the flake's dev shell, VM tests and checks (nix flake check --no-build).
    callPackage =
      fn: args:
      let
        f = if builtins.isFunction fn then fn else import fn;
      in
      f (builtins.intersectAttrs (builtins.functionArgs f) (pkgs // { inherit lib; }) // args);
    fetchurl = args: fake (baseNameOf args.url) { };
    mkShell = args: fake "nix-shell" { fakeInputDrvs = args.packages or [ ]; };
    testers.runNixOSTest = test: fake "vm-test-run-${test.name}" { };
    unzip = fake "unzip" { };
    curl = fake "curl" { };
    jq = fake "jq" { };
    nix = fake "nix" { };
    ruff = fake "ruff" { };
    nixfmt = fake "nixfmt" { };
    colmena = fake "colmena" { };
    linuxPackages.nvidiaPackages = lib.genAttrs [ "dc_565" "dc_570" "dc_580" "production" ] (n: fake "nvidia-x11-${n}" { });
  };
in
pkgs
