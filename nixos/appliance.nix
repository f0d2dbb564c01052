# The appliance profile: what every MSP appliance is, whatever its hardware.
# The agent, an egress-only firewall, time sync, bounded logs, automatic
# upgrades from the flake, and no password anywhere. The disk layout the
# installer creates is in ./appliance-disk.nix; the values an MSP sets for its
# whole fleet (central server, upgrade flake, admin keys) in ./fleet.nix.
#
# Import it together with the agent module (the flake's
# nixosModules.appliance does both).
{
  config,
  lib,
  ...
}:
let
  cfg = config.msp.appliance;
  # System generations kept; appliance-disk.nix's boot menu shows as many.
  keptGenerations = 10;
  journaldDropIn = "systemd/journald.conf.d/50-msp-appliance.conf";
in
{
  options.msp.appliance = {
    upgradeFlake = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "[^#]+#[^#]+");
      default = null;
      example = "github:example-msp/msp-appliance#appliance";
      description = ''
        The flake this appliance upgrades itself from, with the configuration
        after `#` (nixos-rebuild would otherwise pick the host name).
        `null` turns automatic upgrades off.
      '';
    };

    adminSshKeys = lib.mkOption {
      type = lib.types.listOf lib.types.singleLineStr;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA… admin@msp" ];
      description = ''
        SSH public keys allowed to log in as root. With none (the default)
        SSH is off and there is no way to log in at all: the appliance is
        managed through its flake and its agent only.
      '';
    };
  };

  config = {
    services.msp-agent.enable = true;
    # Written by the installer when an enrollment token is given.
    services.msp-agent.enrollmentTokenFile = lib.mkDefault "/var/lib/msp-enrollment/token";

    # Egress only: nothing listens to the network except SSH when keys are
    # set. ICMPv6 stays allowed (the firewall needs it for IPv6 itself).
    networking.firewall.enable = true;
    networking.nftables.enable = true;
    networking.firewall.allowPing = lib.mkDefault false;

    services.timesyncd.enable = lib.mkDefault true;
    time.timeZone = lib.mkDefault "UTC";

    # A drop-in rather than services.journald options, whose names differ
    # between NixOS releases; journald reads journald.conf.d on every one.
    environment.etc.${journaldDropIn}.text = ''
      [Journal]
      Storage=persistent
      SystemMaxUse=512M
      SystemKeepFree=1G
      SystemMaxFileSize=32M
      RuntimeMaxUse=64M
      MaxRetentionSec=1year
    '';
    systemd.services.systemd-journald.restartTriggers = [
      config.environment.etc.${journaldDropIn}.source
    ];

    # No passwords: accounts come from this configuration only, root's
    # password is locked, SSH (when on) takes keys only.
    users.mutableUsers = false;
    users.users.root.hashedPassword = "!";
    users.users.root.openssh.authorizedKeys.keys = cfg.adminSshKeys;
    # Without admin keys, being unable to log in is the point; NixOS would
    # otherwise refuse the configuration as a lock-out.
    users.allowNoPasswordLogin = cfg.adminSshKeys == [ ];
    security.sudo.enable = lib.mkDefault false;
    services.openssh = {
      enable = lib.mkDefault (cfg.adminSshKeys != [ ]);
      settings = {
        PermitRootLogin = "prohibit-password";
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
      };
    };

    system.autoUpgrade = lib.mkIf (cfg.upgradeFlake != null) {
      enable = true;
      flake = cfg.upgradeFlake;
      operation = lib.mkDefault "switch";
      # A new kernel or initrd needs a reboot, allowed only inside the night
      # window. nixpkgs' nixos-upgrade builds the new system first and then
      # compares the time *after* the build strictly with the window
      # (lower < now < upper); outside it, it neither reboots nor switches
      # and waits for the next night. So the upgrade starts early in the
      # window (01:30 plus up to 30 minutes) and leaves the build three
      # hours before 05:00. A run caught up after a power-off (persistent)
      # outside the window waits likewise.
      allowReboot = lib.mkDefault true;
      rebootWindow = lib.mkDefault {
        lower = "01:00";
        upper = "05:00";
      };
      dates = lib.mkDefault "01:30";
      randomizedDelaySec = lib.mkDefault "30min";
    };

    nix = {
      settings.experimental-features = [
        "nix-command"
        "flakes"
      ];
      settings.auto-optimise-store = lib.mkDefault true;
      # Flakes only: upgrades name their flake, never a channel.
      channel.enable = lib.mkDefault false;
      # Weekly garbage collection keeps the last ten system generations,
      # whatever their age (an appliance that has not changed for months
      # can still roll back), deletes older ones, then everything no
      # generation uses. Ten is what the boot menu shows
      # (appliance-disk.nix) and what the agent's nix_generations check
      # allows; the collect-nix-garbage L1 action does the same.
      gc = {
        automatic = lib.mkDefault true;
        dates = lib.mkDefault "weekly";
        options = lib.mkDefault "";
      };
    };
    systemd.services.nix-gc.preStart = lib.mkIf config.nix.gc.automatic ''
      ${lib.getExe' config.nix.package "nix-env"} --profile /nix/var/nix/profiles/system \
        --delete-generations +${toString keptGenerations}
    '';

    boot.tmp.cleanOnBoot = lib.mkDefault true;
    security.protectKernelImage = lib.mkDefault true;
    documentation.enable = lib.mkDefault false;
  };
}
