# What every appliance of one MSP shares, used by the flake's
# nixosConfigurations.appliance and so by the installer ISO. Edit these
# values (in a fork, or in your own flake importing nixosModules.appliance)
# before building an ISO, then delete the warning at the end.
{
  services.msp-agent = {
    # Where your central server answers, and its root public key as
    # `msp-central-manage keys show` prints it.
    centralUrl = "https://central.example.com";
    centralPublicKey = "0000000000000000000000000000000000000000000000000000000000000000";
  };

  msp.appliance = {
    # Your flake, so appliances upgrade themselves from it, for example
    # "github:example-msp/msp-appliance#appliance".
    upgradeFlake = null;
    # SSH keys allowed to log in as root; none means no login at all.
    adminSshKeys = [ ];
  };

  warnings = [
    ''
      nixos/fleet.nix still holds example values: an appliance built from it
      trusts no central server. Set services.msp-agent.centralUrl and
      centralPublicKey (and msp.appliance.upgradeFlake), then remove this warning.
    ''
  ];
}
