# services.msp-central on SQLite as the systemd tests install it into a booted
# container. Per-run values come as JSON in $MSP_SYSTEMD_SCENARIO
# (tests/systemd/units.py sets it).
{ repo }:
let
  args = builtins.fromJSON (builtins.getEnv "MSP_SYSTEMD_SCENARIO");
in
{
  modules = [ (repo + "/nixos/central.nix") ];
  config = {
    services.msp-central = {
      enable = true;
      rootKeyFile = args.root_key_file;
      settings = args.settings;
    };
  };
}
