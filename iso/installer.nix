# The installer ISO: a minimal NixOS live system that carries one built
# appliance system and writes it to a disk, offline. The disk layout is the
# one nixos/appliance-disk.nix mounts. `msp-install` asks which disk to
# erase and, optionally, for the appliance's enrollment token; with
# msp.installer.autoInstallDisk set it installs at boot without asking.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:
let
  cfg = config.msp.installer;

  install = pkgs.writeShellApplication {
    name = "msp-install";
    runtimeInputs = [
      pkgs.coreutils
      pkgs.gawk
      pkgs.gnugrep
      pkgs.parted
      pkgs.util-linux
      pkgs.dosfstools
      pkgs.e2fsprogs
      config.systemd.package
    ];
    # nixos-install comes from the live system's PATH.
    text = ''
      usage() {
        echo "usage: msp-install [--yes] [--poweroff] [--token-file FILE] DISK" >&2
        echo "Erases DISK and installs the MSP appliance on it. Disks:" >&2
        lsblk --nodeps --output NAME,SIZE,MODEL,TRAN,TYPE >&2
        exit 2
      }
      die() {
        echo "msp-install: $*" >&2
        exit 1
      }

      yes=0
      poweroff=0
      token_file=""
      while [ "$#" -gt 0 ]; do
        case "$1" in
          --yes) yes=1 ;;
          --poweroff) poweroff=1 ;;
          --token-file)
            [ "$#" -ge 2 ] || usage
            token_file="$2"
            shift
            ;;
          -h|--help) usage ;;
          -*) usage ;;
          *) break ;;
        esac
        shift
      done
      [ "$#" -eq 1 ] || usage
      disk="$1"
      [ "$(id -u)" -eq 0 ] || die "run it as root (sudo msp-install …)"
      [ -b "$disk" ] || die "$disk is not a block device"
      [ "$(lsblk --nodeps --noheadings --output TYPE "$disk")" = disk ] || die "$disk is not a whole disk"
      if lsblk --noheadings --output MOUNTPOINTS "$disk" | grep -q '[^[:space:]]'; then
        die "something on $disk is mounted (is it the installation medium?)"
      fi

      if [ "$yes" -eq 0 ]; then
        lsblk --output NAME,SIZE,MODEL,TRAN,TYPE "$disk"
        read -r -p "Everything on $disk will be erased. Type $disk to go on: " answer
        [ "$answer" = "$disk" ] || die "not confirmed; nothing was changed"
      fi

      # Where the installed agent reads its token; empty if this ISO was
      # built without msp.installer.enrollmentTokenFile.
      token_path=${
        lib.escapeShellArg (if cfg.enrollmentTokenFile == null then "" else cfg.enrollmentTokenFile)
      }
      token=""
      if [ -n "$token_file" ]; then
        [ -n "$token_path" ] || die "this installer does not know where the appliance reads its token"
        token="$(tr -d '[:space:]' < "$token_file")"
      elif [ -n "$token_path" ] && [ "$yes" -eq 0 ]; then
        read -r -p "Enrollment token from msp-central (empty: enroll later): " token
      fi

      echo "partitioning $disk"
      wipefs --all --force "$disk"
      parted --script --align optimal "$disk" -- \
        mklabel gpt \
        mkpart ESP fat32 1MiB 513MiB \
        set 1 esp on \
        mkpart root ext4 513MiB 100%
      udevadm settle
      mapfile -t parts < <(lsblk --list --noheadings --paths --output NAME,TYPE "$disk" | awk '$2 == "part" { print $1 }')
      [ "''${#parts[@]}" -eq 2 ] || die "expected 2 partitions on $disk, found ''${#parts[@]}"

      echo "formatting"
      mkfs.vfat -F 32 -n MSP-BOOT "''${parts[0]}"
      mkfs.ext4 -F -q -L msp-root "''${parts[1]}"
      udevadm settle

      mkdir -p /mnt
      mount "''${parts[1]}" /mnt
      mkdir -p /mnt/boot
      mount -o umask=077 "''${parts[0]}" /mnt/boot

      echo "installing"
      nixos-install --root /mnt --system ${cfg.system} --no-root-passwd --no-channel-copy

      if [ -n "$token" ]; then
        install -d -m 0700 "/mnt$(dirname "$token_path")"
        (umask 077 && printf '%s\n' "$token" > "/mnt$token_path")
        echo "enrollment token written; the appliance enrolls at its first start"
      elif [ -n "$token_path" ]; then
        echo "no enrollment token: the agent enrolls once one is at $token_path"
      fi

      umount --recursive /mnt
      sync
      if [ "$poweroff" -eq 1 ]; then
        systemctl poweroff
      else
        echo "done: remove the installation medium and reboot"
      fi
    '';
  };
in
{
  imports = [ "${modulesPath}/installer/cd-dvd/installation-cd-minimal.nix" ];

  options.msp.installer = {
    system = lib.mkOption {
      type = lib.types.package;
      description = ''
        The appliance system to install: a NixOS configuration's
        `config.system.build.toplevel`. It is carried on the ISO, so the
        installation needs no network.
      '';
    };

    enrollmentTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/msp-enrollment/token";
      description = ''
        Where the installed system's agent reads its enrollment token (its
        `services.msp-agent.enrollmentTokenFile`). When set, `msp-install`
        asks for a token and writes it there, root's alone.
      '';
    };

    autoInstallDisk = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/dev/nvme0n1";
      description = ''
        Erase this disk and install at boot without asking, then power off:
        for preparing appliances in series. An ISO built with it wipes the
        disk of any machine it boots; label it accordingly.
      '';
    };
  };

  config = {
    # iso-image.nix sets the base name without mkDefault.
    image.baseName = lib.mkForce "msp-appliance-installer-${config.system.nixos.label}";
    isoImage.storeContents = [ cfg.system ];
    environment.systemPackages = [ install ];
    networking.hostName = "msp-installer";

    services.getty.helpLine = ''

      MSP appliance installer. To erase a disk and install the appliance:
        sudo msp-install /dev/<disk>      (run `sudo msp-install` to list disks)
    '';

    systemd.services.msp-auto-install = lib.mkIf (cfg.autoInstallDisk != null) {
      description = "Install the MSP appliance to ${cfg.autoInstallDisk}";
      wantedBy = [ "multi-user.target" ];
      after = [ "multi-user.target" ];
      path = [ "/run/current-system/sw" ];
      serviceConfig = {
        Type = "oneshot";
        ExecStart = "${lib.getExe install} --yes --poweroff ${lib.escapeShellArg cfg.autoInstallDisk}";
        StandardOutput = "journal+console";
        StandardError = "journal+console";
      };
    };
  };
}
