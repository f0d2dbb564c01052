# meta.maintainers of the project's NixOS modules. nixpkgs' option
# (modules/generic/meta-maintainers.nix) is meant for lib.maintainers
# entries; these modules live outside nixpkgs and have none, so this is an
# entry of the same shape (maintainer-list.nix: name, and the contact fields
# left out rather than made up). The option's merge keeps it as given.
[
  {
    name = "MSP appliance maintainers";
  }
]
