# services.msp-agent: the appliance agent (msp_agent) as a hardened systemd
# service, and the root-owned L1 runbook actions it may start through polkit
# (docs/adr/0009-nixos-modules.md). How to use it: docs/nixos.md.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.msp-agent;

  settingsFormat = pkgs.formats.json { };
  configFile = settingsFormat.generate "msp-agent.json" cfg.settings;

  # Fixed by the unit (StateDirectory) and by the polkit rule (subject.user).
  user = "msp";
  stateDir = "/var/lib/msp";

  systemctl = lib.getExe' config.systemd.package "systemctl";
  journalctl = lib.getExe' config.systemd.package "journalctl";

  # nixos-upgrade.service exists only with system.autoUpgrade on; without
  # it the action is still allow-listed (msp_agent.l1.ALLOWED_ACTIONS) but
  # fails with a line that says why.
  upgradeEnabled = config.system.autoUpgrade.enable;

  # Garbage collection keeps the last ten system generations, as the weekly
  # nix-gc run does (nixos/appliance.nix) and the nix_generations check
  # expects; it goes through the nix daemon (NIX_REMOTE=daemon in the
  # action's drop-in), which alone writes the store.
  collectGarbage = pkgs.writeShellScript "msp-l1-collect-nix-garbage" ''
    ${lib.getExe' config.nix.package "nix-env"} --profile /nix/var/nix/profiles/system \
      --delete-generations +${toString keptGenerations}
    exec ${lib.getExe' config.nix.package "nix-collect-garbage"}
  '';
  keptGenerations = 10;

  # The unit that loads NixOS's firewall rules: nftables.service with the
  # nftables backend, firewall.service (iptables) otherwise.
  firewallUnit = if config.networking.nftables.enable then "nftables.service" else "firewall.service";

  restartFailedUnits = pkgs.writeShellApplication {
    name = "msp-l1-restart-failed-units";
    runtimeInputs = [
      config.systemd.package
      pkgs.gawk
    ];
    text = ''
      # Failed services, except L1 actions: restarting a failed action would
      # run it again without the agent deciding to.
      mapfile -t units < <(
        systemctl list-units --state=failed --type=service --plain --no-legend \
          | awk '$1 !~ /^msp-l1@/ { print $1 }'
      )
      if [ "''${#units[@]}" -eq 0 ]; then
        echo "no failed services"
        exit 0
      fi
      status=0
      for unit in "''${units[@]}"; do
        echo "restarting $unit"
        systemctl reset-failed "$unit"
        systemctl restart "$unit" || status=1
      done
      exit "$status"
    '';
  };

  # Each allow-listed L1 action and the one fixed command it runs as root.
  # The names are msp_agent.l1.ALLOWED_ACTIONS; keep the two lists equal.
  l1Actions = {
    restart-timesyncd = "${systemctl} restart systemd-timesyncd.service";
    # Frees space at once when the disk check fails; journald.conf's limits
    # still govern normal rotation.
    vacuum-journal = "${journalctl} --vacuum-size=256M";
    restart-failed-units = lib.getExe restartFailedUnits;
    reload-firewall = "${systemctl} reload-or-restart ${firewallUnit}";
    collect-nix-garbage = "${collectGarbage}";
    # --no-block: the upgrade outlives the agent's wait for this action.
    start-nixos-upgrade =
      if upgradeEnabled then
        "${systemctl} start --no-block nixos-upgrade.service"
      else
        "${l1Refuse} start-nixos-upgrade 'system.autoUpgrade is off on this system (no nixos-upgrade.service)'";
  };
  l1Units = map (action: "msp-l1@${action}.service") (lib.attrNames l1Actions);

  l1Refuse = pkgs.writeShellScript "msp-l1-refuse" ''
    echo "msp-l1: $1 not run: $2" >&2
    exit 1
  '';

  # The instance name selects a fixed command; any other name is refused, so
  # starting msp-l1@<anything> can never run text chosen by the caller.
  l1Script = ''
    case "$1" in
    ${lib.concatStrings (
      lib.mapAttrsToList (action: command: ''
        ${action})
          echo "msp-l1: ${action}"
          exec ${command}
          ;;
      '') l1Actions
    )}
    *)
      echo "msp-l1: refusing unknown action '$1'" >&2
      exit 1
      ;;
    esac
  '';

  # polkit: the agent's user may *start* exactly the allow-listed L1 units.
  # No other verb, no other unit, and checks without a unit detail (starting
  # transient units, editing unit files) never match.
  polkitRule = ''
    // services.msp-agent: allow-listed L1 runbook actions.
    polkit.addRule(function (action, subject) {
      if (action.id == "org.freedesktop.systemd1.manage-units" &&
          subject.user == "${user}" &&
          action.lookup("verb") == "start" &&
          ${builtins.toJSON l1Units}.indexOf(action.lookup("unit")) >= 0) {
        return polkit.Result.YES;
      }
    });
  '';

  # With L1 turned off the agent still decides and records; every action is
  # recorded as failed, with this line as its output.
  l1Disabled = pkgs.writeShellScript "msp-l1-disabled" ''
    echo "L1 action $1 not run: services.msp-agent.l1.enable is false on this appliance" >&2
    exit 1
  '';

  # `msp-agent status`, `audit verify`, ... for the operator, reading this
  # configuration.
  agentCli = pkgs.writeShellScriptBin "msp-agent" ''
    exec ${lib.getExe cfg.package} --config ${configFile} "$@"
  '';

  e164 = "\\+[1-9][0-9]{6,14}";
in
{
  options.services.msp-agent = {
    enable = lib.mkEnableOption "the MSP compliance appliance agent";

    package = lib.mkPackageOption pkgs "msp-agent" { };

    centralUrl = lib.mkOption {
      type = lib.types.strMatching "https?://[^[:space:]]+";
      example = "https://central.example.com";
      description = ''
        The central server's URL; its API lives under `/api/v1` below it.
        Written to the agent's configuration as `central_url`.
      '';
    };

    centralPublicKey = lib.mkOption {
      type = lib.types.strMatching "[0-9a-f]{64}";
      example = "77ff85ad0e906477d6122b93d31400dd7bb04cd3e576b4d6161699bdc2955dda";
      description = ''
        The central server's root public key (Ed25519, 64 lowercase hex digits)
        as `msp-central keys show` prints it. Every certificate, configuration
        bundle and revocation list must chain to it. It is not a secret: it is
        pinned in the image. Written to the configuration as
        `central_public_key`.
      '';
    };

    enrollmentTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.externalPath;
      default = null;
      example = "/var/lib/msp-enrollment/token";
      description = ''
        A file holding a one-time enrollment token (`msp-central token create`).
        At its first start the agent enrolls with it. The file may be owned by
        root and readable only by root: it reaches the service as a systemd
        credential. It may be absent: an enrolled agent never reads it (a
        spent token may stay or go), and an agent not enrolled yet says it
        needs one and retries.
      '';
    };

    twilio.authTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.externalPath;
      default = null;
      example = "/var/lib/msp-secrets/twilio-auth-token";
      description = ''
        A file holding the Twilio auth token for the SMS fallback, passed as a
        systemd credential. The rest of the SMS settings are in
        {option}`services.msp-agent.settings` (`twilio_account_sid`,
        `twilio_from`, `on_call_numbers`).
      '';
    };

    metrics.textfileDirectory = lib.mkOption {
      type = lib.types.nullOr lib.types.externalPath;
      default = null;
      example = "/var/lib/msp-metrics";
      description = ''
        A directory for the agent's Prometheus textfile (`msp-agent.prom`:
        log size, witnessed size, queues, last successful sync, certificate
        expiry, link state, problems, as `msp_agent_*` gauges), rewritten
        atomically with each status refresh. The module creates it, owned
        by the agent's user and readable by all, and lets the sandboxed
        service write there and nowhere else new. Point node_exporter's
        textfile collector at it, for example
        `services.prometheus.exporters.node = { enable = true;
        enabledCollectors = [ "textfile" ]; extraFlags = [
        "--collector.textfile.directory=/var/lib/msp-metrics" ]; };`.
        Null: no textfile.
      '';
    };

    l1.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether the agent may run L1 runbook actions: a root-owned template
        unit `msp-l1@<action>.service` per allow-listed action, which polkit
        lets the agent's user start. When false the agent still records what
        it would have done, as failed actions.
      '';
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        The agent's configuration (JSON), passed as `msp-agent --config`.
        Keys are those of `msp_agent.config.AgentSettings`, for example
        `check_interval_seconds`, `sync_interval_seconds`,
        `heartbeat_interval_seconds`, `bundle_refresh_seconds`,
        `sms_after_seconds`, `audit_quota_bytes`, `evidence_quota_bytes`,
        `disk_min_free_percent`, `sshd_config`. Unknown keys stop the agent
        at start. The file is world-readable in the Nix store: secrets go
        through the `*File` options only.
      '';
      example = lib.literalExpression ''
        {
          check_interval_seconds = 600;
          twilio_account_sid = "AC0123456789abcdef0123456789abcdef";
          twilio_from = "+15005550006";
          on_call_numbers = [ "+15551234567" ];
        }
      '';
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options = {
          log_level = lib.mkOption {
            type = lib.types.enum [
              "debug"
              "info"
              "warning"
              "error"
              "critical"
            ];
            default = "info";
            description = "How much the agent logs to the journal.";
          };
          twilio_account_sid = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            description = "Twilio account SID for the SMS fallback (not a secret).";
          };
          twilio_from = lib.mkOption {
            type = lib.types.nullOr (lib.types.strMatching e164);
            default = null;
            description = "The E.164 number texts are sent from.";
          };
          on_call_numbers = lib.mkOption {
            type = lib.types.listOf (lib.types.strMatching e164);
            default = [ ];
            description = ''
              E.164 numbers texted when a critical incident cannot reach the
              central server for `sms_after_seconds`.
            '';
          };
        };
      };
    };
  };

  meta.maintainers = import ./maintainers.nix;

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion =
          cfg.settings.on_call_numbers != [ ]
          -> (
            cfg.twilio.authTokenFile != null
            && cfg.settings.twilio_account_sid != null
            && cfg.settings.twilio_from != null
          );
        message = ''
          services.msp-agent: settings.on_call_numbers is set but the SMS fallback
          is incomplete. Set settings.twilio_account_sid, settings.twilio_from and
          twilio.authTokenFile; without all of them the agent sends no text.
        '';
      }
      {
        assertion = !(cfg.settings ? enrollment_token_file || cfg.settings ? twilio_auth_token_file);
        message = ''
          services.msp-agent: secrets reach the agent as systemd credentials. Use
          services.msp-agent.enrollmentTokenFile and twilio.authTokenFile instead
          of settings.enrollment_token_file / settings.twilio_auth_token_file.
        '';
      }
    ];

    services.msp-agent.settings = {
      central_url = cfg.centralUrl;
      central_public_key = cfg.centralPublicKey;
      state_dir = stateDir;
      metrics_textfile = lib.mkIf (
        cfg.metrics.textfileDirectory != null
      ) "${cfg.metrics.textfileDirectory}/msp-agent.prom";
      l1_command =
        if cfg.l1.enable then
          [
            systemctl
            "--no-ask-password"
            "start"
            "msp-l1@{action}.service"
          ]
        else
          [
            "${l1Disabled}"
            "{action}"
          ];
    };

    users.users.${user} = {
      isSystemUser = true;
      group = user;
      home = stateDir;
      description = "MSP compliance appliance agent";
    };
    users.groups.${user} = { };

    # StateDirectoryMode applies to every directory StateDirectory lists, and
    # the agent refuses a key directory that its group can read: tmpfiles
    # gives keys/ its own mode (and restores both modes at every boot).
    systemd.tmpfiles.settings."10-msp-agent" = {
      ${stateDir}.d = {
        mode = "0750";
        inherit user;
        group = user;
      };
      "${stateDir}/keys".d = {
        mode = "0700";
        inherit user;
        group = user;
      };
    }
    // lib.optionalAttrs (cfg.metrics.textfileDirectory != null) {
      # Readable by node_exporter's user; written by the agent alone.
      ${cfg.metrics.textfileDirectory}.d = {
        mode = "0755";
        inherit user;
        group = user;
      };
    };

    environment.systemPackages = [ agentCli ];

    systemd.services.msp-agent = {
      description = "MSP compliance appliance agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # Checks ask systemd about units (`systemctl is-active`, `list-units`).
      path = [ config.systemd.package ];
      # Never give up on the agent: restarts back off (RestartSteps) instead.
      startLimitIntervalSec = 0;

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} --config ${configFile} run";
        # The main loop pings every WatchdogSec/2; a hung event loop is
        # killed and restarted.
        WatchdogSec = "60s";
        Restart = "on-failure";
        RestartSec = "5s";
        RestartSteps = 8;
        RestartMaxDelaySec = "5min";
        # READY=1 comes once the local state is open, or, on an appliance
        # not enrolled yet, as soon as the token is read ("enrolling") or
        # found missing (then the agent waits, active, for its operator):
        # never after a wait for the central server. Opening the state (its
        # SQLite stores and cached bundles) takes seconds; the bound is for
        # a state disk that does not answer.
        TimeoutStartSec = "5min";
        TimeoutStopSec = "30s";

        User = user;
        Group = user;
        StateDirectory = "msp";
        StateDirectoryMode = "0750";
        WorkingDirectory = stateDir;
        UMask = "0077";
        # ProtectSystem=strict leaves the textfile directory read-only
        # otherwise; the agent writes its one file there (then renames a
        # temporary file beside it).
        ReadWritePaths = lib.optional (
          cfg.metrics.textfileDirectory != null
        ) cfg.metrics.textfileDirectory;

        # A missing file named by LoadCredential= fails the unit, unless a
        # SetCredential= of the same name stands in for it (systemd.exec(5)):
        # the enrollment token may be absent (it is spent after enrollment,
        # and an enrolled agent never reads it), so it gets a one-newline
        # placeholder, which the agent reads as "no token". The Twilio token
        # must be there when set: without it no text would ever go out.
        LoadCredential =
          lib.optional (cfg.enrollmentTokenFile != null) "enrollment-token:${cfg.enrollmentTokenFile}"
          ++ lib.optional (
            cfg.twilio.authTokenFile != null
          ) "twilio-auth-token:${cfg.twilio.authTokenFile}";
        SetCredential = lib.optional (cfg.enrollmentTokenFile != null) "enrollment-token:\\n";
        # %d is the unit's credentials directory ($CREDENTIALS_DIRECTORY).
        Environment =
          lib.optional (
            cfg.enrollmentTokenFile != null
          ) "MSP_AGENT_ENROLLMENT_TOKEN_FILE=%d/enrollment-token"
          ++ lib.optional (
            cfg.twilio.authTokenFile != null
          ) "MSP_AGENT_TWILIO_AUTH_TOKEN_FILE=%d/twilio-auth-token";

        # Hardening. Each relaxation of the usual set says why.
        CapabilityBoundingSet = [ "" ];
        AmbientCapabilities = [ "" ];
        # L1 actions run as root in their own units; polkit, not this
        # process, grants starting them, so no privilege is ever gained here.
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        PrivateMounts = true;
        PrivateIPC = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        # The time_sync check asks timedated over D-Bus (`timedatectl show`),
        # which reads the kernel's NTP state itself: no clock system call here.
        ProtectClock = true;
        # Other users' processes are hidden; checks ask systemd over D-Bus.
        ProtectProc = "invisible";
        # Not ProcSubset=pid: checks read system-wide /proc files.
        # Not PrivateUsers: checks report file owners, and inside a user
        # namespace every owner but the agent and root reads as "nobody".
        # AF_UNIX: sd_notify, the journal, and the system D-Bus through which
        # systemctl starts L1 units and answers checks.
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RemoveIPC = true;
        LockPersonality = true;
        # CPython and compiled extensions that create no libffi closure, so
        # no memory is ever writable and executable. Code that passes a
        # Python callback to C (ctypes/cffi callbacks) would break under
        # this; the VM tests run every check under it.
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
          "~@resources"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };

    systemd.services."msp-l1@" = lib.mkIf cfg.l1.enable {
      description = "MSP L1 runbook action %i";
      scriptArgs = "%i";
      script = l1Script;
      serviceConfig = {
        Type = "oneshot";
        TimeoutStartSec = "30min";
        # Root on purpose: these are the privileged half of the agent's
        # work. What each action needs, and nothing it does not:
        #  - restart-timesyncd, restart-failed-units, reload-firewall,
        #    start-nixos-upgrade: systemctl asking systemd (PID 1) over
        #    its private socket, which takes root's uid; no capability.
        #  - vacuum-journal: journalctl unlinking archived files that
        #    root owns (the drop-in below makes their directories
        #    writable); no capability.
        #  - collect-nix-garbage: nix-env removing root-owned generation
        #    links (drop-in), then the nix daemon collecting garbage over
        #    its socket; no capability, no write access to the store.
        # Every action talks over AF_UNIX sockets only.
        CapabilityBoundingSet = [ "" ];
        AmbientCapabilities = [ "" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        # Garbage collection goes through the daemon and only touches
        # /nix/var/nix/profiles: no action reads a home directory.
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        PrivateNetwork = true;
        IPAddressDeny = "any";
        PrivateIPC = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectClock = true;
        # The actions' processes are root's, as are systemd's.
        ProtectProc = "invisible";
        # Not ProcSubset=pid: journalctl and systemctl read system-wide
        # /proc files (the boot ID, the kernel command line).
        # Not PrivateUsers: root inside a user namespace cannot reach
        # PID 1's private socket as root, and nix-daemon would no
        # longer see a trusted user.
        RestrictAddressFamilies = [ "AF_UNIX" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };

    # What an action needs beyond the template's sandbox, as a drop-in for
    # its instance: overrideStrategy "asDropin" is nixpkgs' way to configure
    # one instance of a template (systemd-unit-options.nix).
    systemd.services."msp-l1@vacuum-journal" = lib.mkIf cfg.l1.enable {
      overrideStrategy = "asDropin";
      # journalctl unlinks archived journal files; "-": either directory
      # may be absent (persistent or volatile storage).
      serviceConfig.ReadWritePaths = [
        "-/var/log/journal"
        "-/run/log/journal"
      ];
    };
    systemd.services."msp-l1@collect-nix-garbage" = lib.mkIf cfg.l1.enable {
      overrideStrategy = "asDropin";
      # nix-env removes old generation links (and takes the profile's
      # lock) in the profiles' directory; the store is written by the nix
      # daemon alone, reached over its socket.
      environment.NIX_REMOTE = "daemon";
      serviceConfig.ReadWritePaths = [ "/nix/var/nix/profiles" ];
    };

    security.polkit = lib.mkIf cfg.l1.enable {
      enable = true;
      extraConfig = polkitRule;
    };
  };
}
