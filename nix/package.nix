# reachd as a Nix package: both binaries, the user unit (ExecStart on this package), the D-Bus
# activation file, the upload spool's tmpfiles.d/sysusers.d snippets, and the man pages and shell
# completions that reachd generates from its own CLI definition.
{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
}:
let
  units = import ./units.nix;
  manifest = builtins.fromTOML (builtins.readFile ../Cargo.toml);
in
rustPlatform.buildRustPackage {
  pname = "reachd";
  inherit (manifest.package) version;

  # The repository without build output and the Nix files (editing those rebuilds nothing).
  src = lib.cleanSourceWith {
    src = lib.cleanSource ../.;
    filter =
      path: _type:
      !builtins.elem (lib.removePrefix "${toString ../.}/" path) [
        "target"
        "flake.nix"
        "flake.lock"
        "nix"
      ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ installShellFiles ];

  # Only the unit tests: the others need root, network namespaces, buses and real
  # NetworkManager, avahi and Nix daemons, which the build sandbox does not have.
  cargoTestFlags = [ "--lib" ];

  # systemd/reachd.service patched by nix/units.nix (the one source of the unit text);
  # `placeholder "out"` becomes this package's path when it is built.
  reachdService = units.reachdService (placeholder "out");
  passAsFile = [ "reachdService" ];

  postInstall =
    ''
      install -Dm644 "$reachdServicePath" $out/lib/systemd/user/reachd.service
      install -Dm644 systemd/org.reachd.Reachd1.service \
        $out/share/dbus-1/services/org.reachd.Reachd1.service
      install -Dm644 systemd/tmpfiles.d/reachd.conf $out/lib/tmpfiles.d/reachd.conf
      install -Dm644 systemd/sysusers.d/reachd.conf $out/lib/sysusers.d/reachd.conf
    ''
    # Man pages and completions come from running reachd, so only where it runs.
    + lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
      mkdir man
      $out/bin/reachd man man
      installManPage man/*.[158]
      installShellCompletion --cmd reachd \
        --bash <($out/bin/reachd completions bash) \
        --zsh <($out/bin/reachd completions zsh) \
        --fish <($out/bin/reachd completions fish)
    '';

  meta = {
    inherit (manifest.package) description;
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "reachd";
    platforms = lib.platforms.linux;
  };
}
