# Who answers for the module and the package (nixpkgs' maintainer shape: name, and github,
# githubId or email). Add a GitHub handle and id when someone takes it on; nixpkgs'
# lib.maintainers has no entry for us.
{
  tensorforge = {
    name = "TensorForge maintainers";
  };
}
