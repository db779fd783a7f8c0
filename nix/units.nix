# The texts of reachd's units and hooks, read from systemd/ and dispatcher/ (the one source: no
# copy of them is kept here) and patched where Nix needs store paths instead of FHS ones.
# Plain builtins, no nixpkgs: tests/nix_files.rs evaluates this file with nix-instantiate alone
# and checks every patch against the files themselves.
let
  contains = needle: text: builtins.replaceStrings [ needle ] [ "" ] text != text;

  # Replaces each attribute name of `replacements` by its value in `text`. A name that is no
  # longer in the text fails the evaluation (naming `file`), so an edit of systemd/ or
  # dispatcher/ that a patch no longer matches is caught, never shipped unpatched.
  patch =
    file: replacements: text:
    builtins.foldl' (
      patched: from:
      if contains from patched then
        builtins.replaceStrings [ from ] [ replacements.${from} ] patched
      else
        throw "nix/units.nix: `${from}` is no longer in ${file}: update the patch"
    ) text (builtins.attrNames replacements);

  lines = text: builtins.filter builtins.isString (builtins.split "\n" text);

  # The captures of `regex` over the lines of `text` that match it whole.
  matchLines =
    regex: text:
    builtins.concatLists (
      builtins.filter (m: m != null) (map (builtins.match regex) (lines text))
    );

  readUnit = name: builtins.readFile (../systemd + "/${name}");
in
{
  inherit patch;

  # systemd/reachd.service with ExecStart and ExecReload on `reachd`'s store path instead of
  # ~/.cargo/bin (both run reachd; nothing is left for systemd to look up in its PATH).
  reachdService =
    reachd:
    patch "systemd/reachd.service" {
      "ExecStart=%h/.cargo/bin/reachd " = "ExecStart=${reachd}/bin/reachd ";
      "ExecReload=%h/.cargo/bin/reachd " = "ExecReload=${reachd}/bin/reachd ";
    } (readUnit "reachd.service");

  # The example target, tunnel and mount (for the host named rpi), with the programs they run
  # taken from `programs` (absolute paths) instead of /usr/bin and /bin.
  exampleUnits =
    programs:
    {
      "rpi-accessible.target" = readUnit "rpi-accessible.target";
      "rpi-nix-tunnel.service" = patch "systemd/rpi-nix-tunnel.service" {
        "ExecStart=/usr/bin/ssh " = "ExecStart=${programs.ssh} ";
        "ExecStopPost=/bin/rm " = "ExecStopPost=${programs.rm} ";
      } (readUnit "rpi-nix-tunnel.service");
      "rpi-mount.service" = patch "systemd/rpi-mount.service" {
        "ExecStartPre=/bin/mkdir " = "ExecStartPre=${programs.mkdir} ";
        "ExecStart=/usr/bin/sshfs " = "ExecStart=${programs.sshfs} ";
        "ExecStop=-/usr/bin/fusermount3 " = "ExecStop=-${programs.fusermount} ";
        "ExecStopPost=-/usr/bin/fusermount3 " = "ExecStopPost=-${programs.fusermount} ";
      } (readUnit "rpi-mount.service");
    };

  # The targets a unit's [Install] section wants it in (WantedBy=), to enable it as
  # `systemctl enable` would: a link in <target>.wants/.
  wantedBy =
    text:
    builtins.concatMap (line: builtins.filter (t: builtins.isString t && t != "") (builtins.split " " line)) (
      matchLines "WantedBy=(.*)" text
    );

  # dispatcher/90-reachd with its PATH (FHS directories, absent on NixOS) set to `path`.
  dispatcherHook =
    path:
    patch "dispatcher/90-reachd" {
      "\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n" = "\nPATH=${path}\n";
    } (builtins.readFile ../dispatcher/90-reachd);

  # The groups systemd/sysusers.d/reachd.conf declares (`g NAME ...` lines).
  sysusersGroups = matchLines "g ([^ ]+).*" (readUnit "sysusers.d/reachd.conf");
}
