# services.msp-central: the central server (msp_central) as a hardened
# systemd service, on SQLite by default or a local PostgreSQL. How to deploy
# it: docs/nixos.md.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.msp-central;

  settingsFormat = pkgs.formats.json { };
  # The server parses a settings file not named *.toml as JSON.
  configFile = settingsFormat.generate "msp-central.json" cfg.settings;

  # Fixed by the unit (StateDirectory) and, with a local database, by
  # PostgreSQL's peer authentication (database role = Unix user).
  user = "msp-central";
  stateDir = "/var/lib/msp-central";
  localDatabaseUrl = "postgresql+asyncpg://${user}@/${user}?host=/run/postgresql";

  credentials = [
    {
      id = "root-key";
      file = cfg.rootKeyFile;
      variable = "MSP_CENTRAL_ROOT_KEY_FILE";
    }
  ]
  ++ lib.optional (cfg.database.urlFile != null) {
    id = "database-url";
    file = cfg.database.urlFile;
    variable = "MSP_CENTRAL_DATABASE_URL_FILE";
  }
  ++ lib.optional (cfg.smtp.passwordFile != null) {
    id = "smtp-password";
    file = cfg.smtp.passwordFile;
    variable = "MSP_CENTRAL_SMTP_PASSWORD_FILE";
  }
  ++ lib.optional (cfg.metricsTokenFile != null) {
    id = "metrics-token";
    file = cfg.metricsTokenFile;
    variable = "MSP_CENTRAL_METRICS_TOKEN_FILE";
  };

  command = lib.escapeShellArgs [
    (lib.getExe cfg.package)
    "--config"
    "${configFile}"
  ];

  # The CLI as the service runs it: same user, configuration and credentials,
  # so a partner, site or token made here lands in the service's database
  # and never leaves a root-owned file in its state directory.
  manage = pkgs.writeShellApplication {
    name = "msp-central-manage";
    runtimeInputs = [
      config.systemd.package
      pkgs.coreutils
    ];
    text = ''
      if [ "$(id -u)" -ne 0 ]; then
        echo "msp-central-manage: run it as root (it runs msp-central as ${user})" >&2
        exit 1
      fi
      exec systemd-run --quiet --pipe --wait --collect --service-type=exec \
        --uid=${user} --gid=${user} \
        ${
          lib.concatMapStringsSep " " (
            c: lib.escapeShellArg "--property=LoadCredential=${c.id}:${c.file}"
          ) credentials
        } \
        -- ${manageRunner} "$@"
    '';
  };
  # Inside the transient unit: credential paths only exist at run time.
  manageRunner = pkgs.writeShellScript "msp-central-manage-run" ''
    ${lib.concatMapStrings (c: ''
      export ${c.variable}="$CREDENTIALS_DIRECTORY/${c.id}"
    '') credentials}
    exec ${command} "$@"
  '';

  isLoopback = host: lib.elem host [
    "127.0.0.1"
    "::1"
    "localhost"
  ];
in
{
  options.services.msp-central = {
    enable = lib.mkEnableOption "the MSP compliance central server";

    package = lib.mkPackageOption pkgs "msp-central" { };

    rootKeyFile = lib.mkOption {
      type = lib.types.externalPath;
      example = "/var/lib/msp-central-secrets/root.key";
      description = ''
        The central root key (a hex Ed25519 seed, as `msp-central keys init`
        writes it). It reaches the service as a systemd credential, so the
        file can be root's alone (0400) and never lives in the service's
        state directory. Its public key is pinned in every appliance; losing
        the file means re-pinning every appliance, so back it up offline.
      '';
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        The server's configuration (JSON), passed as `msp-central --config`.
        Keys are those of `msp_central.config.Settings`, for example
        `certificate_lifetime_days`, `bundle_lifetime_hours`,
        `enrollment_token_hours`, `max_body_bytes`, `max_sync_body_bytes`.
        Unknown keys stop the server at start. The file is world-readable in
        the Nix store: a database URL with a password goes in
        {option}`services.msp-central.database.urlFile`.
      '';
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options = {
          host = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1";
            description = "Address to listen on.";
          };
          port = lib.mkOption {
            type = lib.types.port;
            default = 8080;
            description = ''
              Port to listen on, 1024 or above: the server speaks plain HTTP,
              so ports 80 and 443 belong to a reverse proxy that terminates
              TLS in front of it.
            '';
          };
          public_url = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "https://central.example.com";
            description = ''
              The URL appliances use, when the server sits behind a reverse
              proxy: appliance request signatures cover the full target URI.
            '';
          };
          database_url = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "postgresql+asyncpg://msp@db.example.com/msp";
            description = ''
              SQLAlchemy URL (`sqlite+aiosqlite` or `postgresql+asyncpg`);
              `null` is SQLite in the state directory. Set by
              {option}`services.msp-central.database.createLocally`.
            '';
          };
        };
      };
    };

    database = {
      createLocally = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = ''
          Whether to create a local PostgreSQL database and role `${user}` and
          connect to it over its Unix socket with peer authentication (no
          password). Without it the server uses SQLite in its state directory,
          or {option}`services.msp-central.settings.database_url`.
        '';
      };
      urlFile = lib.mkOption {
        type = lib.types.nullOr lib.types.externalPath;
        default = null;
        example = "/var/lib/msp-central-secrets/database-url";
        description = ''
          A file holding the database URL, for a URL with a password. Passed
          as a systemd credential; wins over `settings.database_url`.
        '';
      };
    };

    smtp.passwordFile = lib.mkOption {
      type = lib.types.nullOr lib.types.externalPath;
      default = null;
      example = "/var/lib/msp-central-secrets/smtp-password";
      description = ''
        A file holding the SMTP password for e-mail notifications (the relay
        itself is `settings.smtp_host`, `smtp_port`, `smtp_from`,
        `smtp_username`). Passed as a systemd credential.
      '';
    };

    metricsTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.externalPath;
      default = null;
      example = "/var/lib/msp-central-secrets/metrics-token";
      description = ''
        A file holding the bearer token (at least 16 characters) a Prometheus
        server presents to read `/metrics`. Passed as a systemd credential;
        setting it makes `settings.metrics_access` default to `"bearer"`.
        Without it, `settings.metrics_access` may be `"off"` (the default:
        404) or `"loopback"` (a scraper on this host, through no proxy).
      '';
    };

    workers = lib.mkOption {
      type = lib.types.ints.between 1 64;
      default = 1;
      description = ''
        Server processes sharing the port (`serve --workers`). All state is in
        the database, so they behave like replicas behind a load balancer.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Whether to open {option}`services.msp-central.settings.port` in the firewall.";
    };
  };

  meta.maintainers = import ./maintainers.nix;

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.openFirewall -> !isLoopback cfg.settings.host;
        message = ''
          services.msp-central.openFirewall is set but settings.host is
          ${cfg.settings.host}: the server only listens on loopback. Set
          settings.host (for example "0.0.0.0"), or put a reverse proxy in front
          and leave the firewall closed.
        '';
      }
      {
        # Binding below 1024 would need CAP_NET_BIND_SERVICE, and a
        # capability held inside a user namespace cannot bind the host's
        # privileged ports, so the unit would also lose PrivateUsers. The
        # server has no TLS of its own: a port below 1024 only ever makes
        # sense behind a proxy, which then owns that port.
        assertion = cfg.settings.port >= 1024;
        message = ''
          services.msp-central.settings.port is ${toString cfg.settings.port}: use a port
          of 1024 or above. The server speaks plain HTTP; put a reverse proxy that
          terminates TLS on ports 80/443 in front of it (see docs/nixos.md).
        '';
      }
      {
        assertion = (cfg.settings.metrics_access or "off" == "bearer") -> cfg.metricsTokenFile != null;
        message = ''
          services.msp-central: settings.metrics_access is "bearer" but no
          metricsTokenFile is set; the server would not start.
        '';
      }
      {
        assertion = cfg.database.createLocally -> cfg.database.urlFile == null;
        message = "services.msp-central: database.createLocally and database.urlFile exclude each other.";
      }
      {
        assertion =
          !(
            cfg.settings ? root_key_file
            || cfg.settings ? database_url_file
            || cfg.settings ? smtp_password_file
            || cfg.settings ? metrics_token_file
          );
        message = ''
          services.msp-central: secrets reach the server as systemd credentials.
          Use rootKeyFile, database.urlFile, smtp.passwordFile and
          metricsTokenFile instead of settings.root_key_file,
          settings.database_url_file, settings.smtp_password_file and
          settings.metrics_token_file.
        '';
      }
    ];

    services.msp-central.settings = lib.mkMerge [
      { state_dir = stateDir; }
      (lib.mkIf cfg.database.createLocally { database_url = localDatabaseUrl; })
      (lib.mkIf (cfg.metricsTokenFile != null) { metrics_access = lib.mkDefault "bearer"; })
    ];

    users.users.${user} = {
      isSystemUser = true;
      group = user;
      home = stateDir;
      description = "MSP compliance central server";
    };
    users.groups.${user} = { };

    services.postgresql = lib.mkIf cfg.database.createLocally {
      enable = true;
      ensureDatabases = [ user ];
      ensureUsers = [
        {
          name = user;
          ensureDBOwnership = true;
        }
      ];
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.settings.port ];

    environment.systemPackages = [ manage ];

    systemd.services.msp-central = {
      description = "MSP compliance central server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # postgresql.target: the server is up and ensureUsers/ensureDatabases ran.
      requires = lib.optional cfg.database.createLocally "postgresql.target";
      after = [ "network-online.target" ] ++ lib.optional cfg.database.createLocally "postgresql.target";

      serviceConfig = {
        Type = "exec";
        ExecStart = "${command} serve --migrate --workers ${toString cfg.workers}";
        Restart = "on-failure";
        RestartSec = "5s";
        # The parent stops its worker processes itself on SIGTERM.
        KillMode = "mixed";
        TimeoutStopSec = "30s";

        User = user;
        Group = user;
        StateDirectory = "msp-central";
        StateDirectoryMode = "0700";
        WorkingDirectory = stateDir;
        UMask = "0077";

        LoadCredential = map (c: "${c.id}:${c.file}") credentials;
        # %d is the unit's credentials directory ($CREDENTIALS_DIRECTORY).
        Environment = map (c: "${c.variable}=%d/${c.id}") credentials;

        # Hardening. Each relaxation of the usual set says why.
        # No capability at all: the port is 1024 or above (assertion).
        CapabilityBoundingSet = [ "" ];
        AmbientCapabilities = [ "" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        PrivateMounts = true;
        PrivateIPC = true;
        # PostgreSQL's peer authentication reads the caller's real uid from
        # the socket (SO_PEERCRED), which a user namespace does not change.
        PrivateUsers = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        # AF_UNIX: the journal and PostgreSQL's socket.
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
  };
}
