# NixOS module `services.reachd`: what reachd needs from root. The user unit and the D-Bus
# activation file for every user, the NetworkManager dispatcher hook, and for Nix: the binary
# cache users may name (trusted-substituters, keys) and the post-build hook with its spool and
# group. The unit, the hook, the spool and the group come from systemd/ and dispatcher/ (through
# the package and nix/units.nix); nothing here repeats their text.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.reachd;
  units = import ./units.nix;

  # dispatcher/90-reachd sets PATH to FHS directories, which NixOS lacks: give it the programs
  # it runs (busctl, runuser, timeout, getent, cut).
  dispatcherHook = pkgs.writeScript "90-reachd" (
    units.dispatcherHook (
      lib.makeBinPath [
        config.systemd.package
        pkgs.util-linux
        pkgs.coreutils
        pkgs.getent
      ]
    )
  );
in
{
  options.services.reachd = {
    enable = lib.mkEnableOption "reachd for every user: its user unit (enabled) and D-Bus activation file";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage <reachd>/nix/package.nix { }";
      description = "The reachd package.";
    };

    dispatcherHook.enable = lib.mkOption {
      type = lib.types.bool;
      default = config.networking.networkmanager.enable;
      defaultText = lib.literalExpression "config.networking.networkmanager.enable";
      description = "Install dispatcher/90-reachd: every running agent looks again at once on each NetworkManager event.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Open UDP port 5353 in the firewall: hosts answer mDNS questions by multicast, which the firewall's connection tracking cannot match to the question, so without it no host is ever found (as services.avahi.openFirewall).";
    };

    cache = {
      enable = lib.mkEnableOption "the Nix daemon's trust in reachd's binary cache, so that users' commands may use it when reachd's fragment names it";
      substituters = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ "http://127.0.0.1:37515" ];
        description = "The caches reachd names (`listen` or `substituter` of each host's [host.nix]), added to trusted-substituters.";
      };
      publicKeys = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "rpi-1:8wDbmVzGqUtVpVfqH6GXcNBQ5g0XqByO2ksNYvQ9V7E=" ];
        description = "The keys the Pi's paths are signed with, added to trusted-public-keys: each is the whole content of the Pi's public key file (rpi-1.pub), which already starts with its name `rpi-1:`.";
      };
    };

    upload = {
      enable = lib.mkEnableOption "the post-build hook reachd-nix-upload: every build is recorded in /var/spool/reachd for the users' agents to upload";
      users = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "alice" ];
        description = "Users whose agents upload: members of the spool's group.";
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        environment.systemPackages = [ cfg.package ];
        systemd.packages = [ cfg.package ];
        services.dbus.packages = [ cfg.package ];
        # Enabled for every user, as systemd/reachd.service's [Install] says. reachd runs
        # `nix copy` for uploads: the Nix of the system, first on its PATH.
        systemd.user.services.reachd = {
          wantedBy = units.wantedBy (builtins.readFile ../systemd/reachd.service);
          path = [ config.nix.package ];
        };
      }
      (lib.mkIf cfg.openFirewall {
        networking.firewall.allowedUDPPorts = [ 5353 ];
      })
      (lib.mkIf cfg.dispatcherHook.enable {
        networking.networkmanager.dispatcherScripts = [ { source = dispatcherHook; } ];
      })
      (lib.mkIf cfg.cache.enable {
        # extra-: added to NixOS's own values (cache.nixos.org's key), not replacing them.
        nix.settings.extra-trusted-substituters = cfg.cache.substituters;
        nix.settings.extra-trusted-public-keys = cfg.cache.publicKeys;
      })
      (lib.mkIf cfg.upload.enable {
        # A store path: root-owned, as a hook root runs must be.
        nix.settings.post-build-hook = "${cfg.package}/bin/reachd-nix-upload";
        systemd.tmpfiles.packages = [ cfg.package ];
        users.groups = lib.genAttrs units.sysusersGroups (_: {
          members = cfg.upload.users;
        });
      })
    ]
  );
}
