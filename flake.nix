{
  description = "MSP compliance appliance: agent, central server, NixOS modules, installer ISO";

  # Not locked yet (no flake.lock): each build takes the branch as it is.
  # docs/nixos.md, "Pinning nixpkgs", says what to run once with network.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "aarch64-darwin"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The three Python packages of the uv workspace, built from their
      # pyproject.toml. Runtime dependencies are read from there too, so the
      # lock file's names and these builds cannot drift apart: a name nixpkgs
      # lacks fails evaluation, and a version nixpkgs does not satisfy fails
      # the build (pythonRuntimeDepsCheckHook).
      mspPythonPackages =
        pkgs:
        let
          python3Packages = pkgs.python3Packages;
          local = {
            msp-protocol = build ./protocol "msp_protocol" python3Packages.buildPythonPackage;
            msp-agent = build ./agent "msp_agent" python3Packages.buildPythonApplication;
            msp-central = build ./server "msp_central" python3Packages.buildPythonApplication;
          };

          # A PEP 508 requirement ("sqlalchemy[asyncio]>=2.0.30") as packages:
          # the workspace member or nixpkgs' python3Packages attribute of that
          # name, plus the extras' dependencies.
          requirement =
            spec:
            let
              parts = builtins.match "([A-Za-z0-9_.-]+)(\\[([A-Za-z0-9_.,-]+)])?.*" spec;
              # PEP 503 normalisation, which nixpkgs' attribute names follow.
              name = builtins.replaceStrings [ "_" "." ] [ "-" "-" ] (lib.toLower (builtins.elemAt parts 0));
              extras = lib.optionals (builtins.elemAt parts 2 != null) (
                lib.splitString "," (builtins.elemAt parts 2)
              );
              package = local.${name} or python3Packages.${name};
            in
            [ package ] ++ lib.concatMap (extra: package.optional-dependencies.${extra} or [ ]) extras;

          build =
            dir: module: builder:
            let
              project = (lib.importTOML (dir + "/pyproject.toml")).project;
              scripts = lib.attrNames (project.scripts or { });
            in
            builder {
              pname = project.name;
              inherit (project) version;
              pyproject = true;
              src = lib.fileset.toSource {
                root = dir;
                fileset = lib.fileset.unions [
                  (dir + "/pyproject.toml")
                  (dir + "/README.md")
                  (dir + "/src")
                ];
              };
              build-system = [ python3Packages.hatchling ];
              dependencies = lib.concatMap requirement (project.dependencies or [ ]);
              # The test suites live at the workspace root and need services
              # (PostgreSQL, real processes): they run under `uv run pytest`
              # and in the VM tests. Here: the package imports.
              pythonImportsCheck = [ module ];
              meta = {
                inherit (project) description;
                license = lib.licenses.asl20;
              }
              // lib.optionalAttrs (scripts != [ ]) { mainProgram = lib.head scripts; };
            };
        in
        local;

      nixosModuleFor =
        name: file:
        { lib, pkgs, ... }:
        {
          imports = [ file ];
          services.${name}.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.${name};
        };

      x86Pkgs = nixpkgs.legacyPackages.x86_64-linux;
      vmTest = file: x86Pkgs.testers.runNixOSTest (import file { inherit self; });
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          python = mspPythonPackages pkgs;
        in
        python
        // {
          default = python.msp-agent;
        }
        // lib.optionalAttrs (pkgs.stdenv.hostPlatform.system == "x86_64-linux") {
          iso = self.nixosConfigurations.installer.config.system.build.isoImage;
        }
      );

      nixosModules = {
        agent = nixosModuleFor "msp-agent" ./nixos/agent.nix;
        central = nixosModuleFor "msp-central" ./nixos/central.nix;
        appliance = {
          imports = [
            self.nixosModules.agent
            ./nixos/appliance.nix
          ];
        };
        installer = ./iso/installer.nix;
        default = {
          imports = [
            self.nixosModules.agent
            self.nixosModules.central
          ];
        };
      };

      nixosConfigurations.appliance = lib.nixosSystem {
        modules = [
          self.nixosModules.appliance
          ./nixos/appliance-disk.nix
          ./nixos/fleet.nix
          {
            nixpkgs.hostPlatform = "x86_64-linux";
            networking.hostName = "msp-appliance";
            system.stateVersion = "26.05";
          }
        ];
      };

      nixosConfigurations.installer = lib.nixosSystem {
        modules = [
          self.nixosModules.installer
          (
            let
              appliance = self.nixosConfigurations.appliance.config;
            in
            {
              nixpkgs.hostPlatform = "x86_64-linux";
              msp.installer.system = appliance.system.build.toplevel;
              msp.installer.enrollmentTokenFile = appliance.services.msp-agent.enrollmentTokenFile;
            }
          )
        ];
      };

      checks =
        forAllSystems (
          pkgs:
          builtins.removeAttrs self.packages.${pkgs.stdenv.hostPlatform.system} [
            "default"
            "iso"
          ]
        )
        // {
          x86_64-linux =
            builtins.removeAttrs self.packages.x86_64-linux [
              "default"
              "iso"
            ]
            // {
              appliance-system = self.nixosConfigurations.appliance.config.system.build.toplevel;
              offline-mode = vmTest ./tests/nixos/offline-mode.nix;
              key-delegation = vmTest ./tests/nixos/key-delegation.nix;
              audit-resync = vmTest ./tests/nixos/audit-resync.nix;
            };
        };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.uv
            pkgs.python3
            pkgs.postgresql
            pkgs.sqlite
            pkgs.nixfmt-tree
          ];
          # uv uses this Python rather than downloading one.
          env = {
            UV_PYTHON = "${pkgs.python3}/bin/python3";
            UV_PYTHON_DOWNLOADS = "never";
          };
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
