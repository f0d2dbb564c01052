# The installed appliance's disk and boot: exactly what iso/installer.nix
# creates (a GPT disk with an EFI system partition labelled MSP-BOOT and an
# ext4 root labelled msp-root), booted with systemd-boot on UEFI machines.
# There is no per-machine hardware-configuration.nix: the initrd carries the
# drivers for any common disk controller instead.
{ lib, ... }:
{
  fileSystems."/" = {
    device = "/dev/disk/by-label/msp-root";
    fsType = "ext4";
  };
  fileSystems."/boot" = {
    device = "/dev/disk/by-label/MSP-BOOT";
    fsType = "vfat";
    options = [
      "fmask=0077"
      "dmask=0077"
    ];
  };

  boot.loader.systemd-boot.enable = true;
  # The installer may run on another machine than the one the disk ends up
  # in: install to the removable-media path and leave firmware variables be.
  boot.loader.efi.canTouchEfiVariables = false;
  boot.loader.systemd-boot.configurationLimit = lib.mkDefault 10;

  hardware.enableAllHardware = lib.mkDefault true;
  hardware.enableRedistributableFirmware = lib.mkDefault true;
  zramSwap.enable = lib.mkDefault true;
}
