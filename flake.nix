# reachd as a flake: the package, a Home Manager module and a NixOS module (nix/). There is no
# flake.lock yet: it could not be made without network; `nix flake lock` writes one.
{
  description = "reachd: keeps systemd user targets started exactly while LAN hosts are reachable";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # builtins only, so that tests/nix_files.rs can list the outputs without nixpkgs.
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system;
          }) systems
        );
    in
    {
      packages = forAllSystems (system: {
        default = nixpkgs.legacyPackages.${system}.callPackage ./nix/package.nix { };
      });
      overlays.default = final: _prev: { reachd = final.callPackage ./nix/package.nix { }; };
      # Both modules build the package with the system's own nixpkgs (option `package`).
      # `homeModules` is the name Home Manager's own flake module gives modules for it; many
      # flakes still read `homeManagerModules`, so it names the same module.
      homeModules.default = ./nix/hm-module.nix;
      homeManagerModules.default = self.homeModules.default;
      nixosModules.default = ./nix/nixos-module.nix;

      # `nix flake check`: the package builds (its unit tests run in the build), and a NixOS
      # system with the module enabled, every part of it on, evaluates and builds.
      checks = forAllSystems (system: {
        package = self.packages.${system}.default;
        nixos-module =
          (nixpkgs.lib.nixosSystem {
            inherit system;
            modules = [
              self.nixosModules.default
              {
                boot.isContainer = true;
                networking.networkmanager.enable = true;
                services.reachd = {
                  enable = true;
                  cache.enable = true;
                  upload.enable = true;
                  upload.users = [ "alice" ];
                };
                users.users.alice.isNormalUser = true;
                system.stateVersion = "25.05";
              }
            ];
          }).config.system.build.toplevel;
      });

      # `nix develop`: the package's build inputs and the tools the repository's checks use.
      devShells = forAllSystems (
        system:
        let
          pkgs = nixpkgs.legacyPackages.${system};
        in
        {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.default ];
            packages = with pkgs; [
              clippy
              rustfmt
              rust-analyzer
              jq
            ];
          };
        }
      );
    };
}
