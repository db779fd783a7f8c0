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
      homeManagerModules.default = ./nix/hm-module.nix;
      nixosModules.default = ./nix/nixos-module.nix;
    };
}
