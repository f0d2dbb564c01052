# services.msp-agent as the systemd tests install it into a booted container.
# The values that change per run (the central server's address and key, the
# token file, extra settings) come as JSON in $MSP_SYSTEMD_SCENARIO
# (tests/systemd/units.py sets it), so this file stays the same.
{ repo }:
let
  args = builtins.fromJSON (builtins.getEnv "MSP_SYSTEMD_SCENARIO");
in
{
  modules = [ (repo + "/nixos/agent.nix") ];
  config = {
    services.msp-agent = {
      enable = true;
      centralUrl = args.central_url;
      centralPublicKey = args.central_public_key;
      enrollmentTokenFile = args.enrollment_token_file;
      settings = args.settings;
    };
  };
}
