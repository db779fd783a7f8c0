# Home Manager module `services.reachd`: the agent as the user's service, its configuration, the
# example target/tunnel/mount units if wanted, and the `!include` of reachd's nix.conf fragment.
# Unit texts are never written here: reachd.service is the package's (systemd/reachd.service
# patched by nix/units.nix) and the examples are systemd/'s, patched by nix/units.nix too.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.reachd;
  units = import ./units.nix;
  toml = pkgs.formats.toml { };

  # The configuration file, refused at build time when reachd itself refuses it. Only where the
  # package runs: building for a phone on another machine (cross), reachd checks the file when
  # it starts instead, and refuses it in its log.
  configFile =
    let
      generated = toml.generate "config.toml" cfg.settings;
      canRun = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
    in
    pkgs.runCommand "reachd-config.toml" { } (
      lib.optionalString canRun ''
        ${lib.getExe cfg.package} run --check-config --config ${generated}
      ''
      + ''
        cp ${generated} $out
      ''
    );

  # A unit in ~/.config/systemd/user/, enabled as `systemctl --user enable` would do it: a link
  # in the .wants/ of each target its [Install] WantedBy= names (`text` is the unit's text).
  userUnit =
    name: source: text:
    {
      "systemd/user/${name}".source = source;
    }
    // lib.listToAttrs (
      map (target: lib.nameValuePair "systemd/user/${target}.wants/${name}" { inherit source; }) (
        units.wantedBy text
      )
    );

  examples = units.exampleUnits {
    ssh = "${pkgs.openssh}/bin/ssh";
    sshfs = "${pkgs.sshfs}/bin/sshfs";
    mkdir = "${pkgs.coreutils}/bin/mkdir";
    rm = "${pkgs.coreutils}/bin/rm";
    inherit (cfg.exampleUnits) fusermount;
  };
in
{
  options.services.reachd = {
    enable = lib.mkEnableOption "reachd, which keeps <host>-accessible.target started exactly while the host is reachable";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage <reachd>/nix/package.nix { }";
      description = "The reachd package.";
    };

    settings = lib.mkOption {
      inherit (toml) type;
      default = { };
      example = lib.literalExpression ''
        {
          host = [
            {
              name = "rpi";
              hostname = "rpi.local";
              connections = [ "5e8e1a7c-0c43-4b6e-9d2c-1f6a2d6f0b11" ];
              nix.upload = true;
            }
          ];
        }
      '';
      description = ''
        reachd's configuration (`man 5 reachd.toml`), written to
        ~/.config/reachd/config.toml and checked with `reachd run --check-config` when built.
        Empty: no file, so reachd follows its embedded default (host rpi, rpi.local).
      '';
    };

    exampleUnits = {
      enable = lib.mkEnableOption "the example units for the host named rpi: rpi-accessible.target, rpi-nix-tunnel.service (ssh) and rpi-mount.service (sshfs at ~/rpi), enabled in the target";
      fusermount = lib.mkOption {
        type = lib.types.str;
        default = "/run/wrappers/bin/fusermount3";
        example = "/usr/bin/fusermount3";
        description = "The setuid fusermount3 that unmounts ~/rpi: NixOS's wrapper, or the distribution's.";
      };
    };

    nixInclude = {
      enable = lib.mkEnableOption "`!include` of reachd's nix.conf fragment in ~/.config/nix/nix.conf (through `nix.extraOptions`, which needs `nix.package`)";
      uid = lib.mkOption {
        type = lib.types.ints.unsigned;
        example = 1000;
        description = "Your user id (`id -u`): the fragment is /run/user/<uid>/reachd/nix.conf, and nix.conf expands no variables.";
      };
    };

    nixPackage = lib.mkOption {
      type = lib.types.package;
      default = pkgs.nix;
      defaultText = lib.literalExpression "pkgs.nix";
      description = "The Nix whose `nix copy` uploads builds (`upload = true`): first on the agent's PATH.";
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        home.packages = [ cfg.package ];
        xdg.configFile = userUnit "reachd.service" "${cfg.package}/lib/systemd/user/reachd.service" (
          builtins.readFile ../systemd/reachd.service
        ) // {
          # The agent runs `nix copy` for uploads: the chosen Nix first, then the places Nix is
          # installed for the user (%h, %u) or the system, then the usual directories.
          "systemd/user/reachd.service.d/path.conf".text = ''
            [Service]
            Environment=PATH=${lib.makeBinPath [ cfg.nixPackage ]}:%h/.nix-profile/bin:/etc/profiles/per-user/%u/bin:/nix/var/nix/profiles/default/bin:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin
          '';
        };
        xdg.dataFile."dbus-1/services/org.reachd.Reachd1.service".source =
          "${cfg.package}/share/dbus-1/services/org.reachd.Reachd1.service";
      }
      (lib.mkIf (cfg.settings != { }) { xdg.configFile."reachd/config.toml".source = configFile; })
      (lib.mkIf cfg.exampleUnits.enable {
        xdg.configFile = lib.mkMerge (
          lib.mapAttrsToList (name: text: userUnit name (pkgs.writeText name text) text) examples
        );
      })
      (lib.mkIf cfg.nixInclude.enable {
        nix.extraOptions = ''
          !include /run/user/${toString cfg.nixInclude.uid}/reachd/nix.conf
        '';
      })
    ]
  );
}
