#!/bin/bash
# Reruns the measurements of nix-answers-measured.md.
# Needs: /srv/bookworm (nix-bin 2.8.0, python3) and /srv/sid (nix-bin 2.34.8) made with
# debootstrap as in the recipe in docs/nix-answers/measured.md (debootstrap from the Debian mirror). Mounts /proc and /dev into both (and leaves them
# mounted unless UMOUNT=1). Everything stays on 127.0.0.1.
#
#   nix-answers-run.sh [REPS] [CASE...]      cases: c1 c2 c3 c4a c4b c4c c5 c5s c5n c5d c6 c6l c7 c7d c9 c5p c5sd
#
# Results: $OUT/<case>-<ver>-<rep>.{err,sum,req} and one summary line each in $OUT/summary.tsv
set -u
REPS=${1:-2}; shift || true
CASES=${*:-c1 c2 c3 c4a c4b c4c c5 c5s c5n c5d c6 c6l c7 c7d c9 c5p c5sd}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/nix-answers-raw}
BW=/srv/bookworm; SID=/srv/sid
W=/tmp/nixr                      # inside the chroots; $BW$W on the host
P1=18080; P2=18081; P3=18082
mkdir -p "$OUT"

for R in $BW $SID; do
  mountpoint -q $R/proc || mount --bind /proc $R/proc
  mountpoint -q $R/dev || mount --rbind /dev $R/dev
  mkdir -p $R$W/etc $R$W/home
done
mkdir -p $BW$W/cache
cp "$HERE/server.py" $BW$W/server.py

SPIDS=()
start_servers() {
  for spec in "$P1 30" "$P2 40"; do
    set -- $spec
    echo '{}' > $BW$W/mode-$1.json
    chroot $BW /usr/bin/python3 $W/server.py $1 $2 $W/cache $W/mode-$1.json $W/log-$1.jsonl &
    SPIDS+=($!)
  done
  echo '{"narinfo":"404","nar":"404","range":"404"}' > $BW$W/mode-$P2.json
  sleep 1
}
stop_servers() { for p in "${SPIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap stop_servers EXIT

mode() {  # a fresh "run" key each time, so that narinfo_seq counts from 0 again
  echo "$1" | sed "s/^{/{\"run\":\"$(date +%s%N)\",/" > $BW$W/mode-$P1.json; }

expr_of() {  # the derivation for nonce $1
  echo "derivation { name = \"x-$1\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"/usr/bin/seq 1 300000 > \$out\" ]; }"
}

NIXENV_BASE='experimental-features = nix-command
sandbox = false
build-users-group =
require-sigs = false'

produce() {  # build nonce $1 in bookworm's own store, put it into the served cache, delete it
  local e; e=$(expr_of "$1")
  chroot $BW env -i PATH=/usr/bin:/bin HOME=$W/home/producer NIX_CONF_DIR=$W/etc \
    NIX_CONFIG="$NIXENV_BASE
substituters =" sh -c "o=\$(nix-build -E '$e' --no-out-link 2>/dev/null) &&
      nix copy --to 'file://$W/cache?compression=none' \$o 2>/dev/null &&
      nix-store --delete \$o >/dev/null 2>&1 && echo \$o"
}

# client ROOT TAG NONCE SUBSTITUTERS EXTRA-CONFIG -> runs nix-build, writes $OUT/TAG.*
client() {
  local root=$1 tag=$2 nonce=$3 subs=$4 extra=$5 e t0 t1 rc
  e=$(expr_of "$nonce")
  local home=$W/home/$tag-$nonce
  t0=$(date +%s.%N)
  timeout 900 chroot $root env -i PATH=/usr/bin:/bin HOME=$home NIX_CONF_DIR=$W/etc $CLIENT_ENV \
    NIX_CONFIG="$NIXENV_BASE
substituters = $subs
$extra" nix-build -E "$e" --no-out-link >"$OUT/$tag.out" 2>"$OUT/$tag.err"
  rc=$?
  t1=$(date +%s.%N)
  sleep 0.3
  # the requests the servers saw during the run
  chroot $BW /usr/bin/python3 - "$t0" "$t1" $W/log-$P1.jsonl $W/log-$P2.jsonl $W/log-$P3.jsonl >"$OUT/$tag.req" <<'EOF'
import json, sys
t0, t1 = float(sys.argv[1]), float(sys.argv[2])
recs = []
for fn in sys.argv[3:]:
    try:
        for l in open(fn):
            r = json.loads(l)
            if t0 <= r["t"] <= t1 + 0.2 and r.get("method"):
                recs.append(r)
    except OSError:
        pass
recs.sort(key=lambda r: r["t"])
for r in recs:
    h = r["headers"]
    extra = " ".join("%s=%s" % (k, r[k]) for k in ("sent", "total", "start") if k in r)
    print("%+8.3f  dur=%.3f  :%d %-4s %-60s -> %-14s %s%s" % (
        r["t"] - t0, r["t_end"] - r["t"], r["port"], r["method"], r["path"][:60],
        str(r.get("status", "")) + " " + r["action"], extra,
        ("  Range:" + h["Range"]) if "Range" in h else ""))
EOF
  local outpath; outpath=$(cat "$OUT/$tag.out" 2>/dev/null)
  local verify=""
  if [ -n "$outpath" ]; then
    verify=$(chroot $root env -i PATH=/usr/bin:/bin HOME=$home NIX_CONF_DIR=$W/etc \
      NIX_CONFIG="$NIXENV_BASE" nix-store --verify-path "$outpath" 2>&1 && echo verify-ok)
    verify="$verify lines=$(wc -l < $root$outpath)"
  fi
  local how="none"
  grep -q "^building '" "$OUT/$tag.err" && how="built-locally"
  [ -n "$outpath" ] && [ $how = none ] && how="substituted"
  local dt; dt=$(awk "BEGIN{printf \"%.2f\", $t1 - $t0}")
  local nreq; nreq=$(grep -c narinfo "$OUT/$tag.req")
  local nnar; nnar=$(grep -c ' /nar/' "$OUT/$tag.req")
  {
    echo "tag=$tag rc=$rc time=$dt result=$how narinfo_reqs=$nreq nar_reqs=$nnar out=$outpath $verify"
    echo "--- requests (t relative to start):"; cat "$OUT/$tag.req"
    echo "--- stderr:"; cat "$OUT/$tag.err"
  } > "$OUT/$tag.sum"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tag" "$rc" "$dt" "$how" "$nreq" "$nnar" "$outpath" "$verify" >> "$OUT/summary.tsv"
  echo "== $tag rc=$rc t=${dt}s $how narinfo=$nreq nar=$nnar $verify"
  grep -E 'error|warning|disabling|retrying|building|copying|terminate|substitut|Aborted' "$OUT/$tag.err" | head -12 | sed 's/^/   | /'
}

CLIENT_ENV=""
S1=http://127.0.0.1:$P1
S2="http://127.0.0.1:$P1 http://127.0.0.1:$P2"

run_case() {  # run_case CASE ROOT VER REP
  local c=$1 root=$2 v=$3 rep=$4 n tag
  n=$(date +%s%N | tail -c 10)$RANDOM
  tag=$c-$v-$rep
  case $c in
    c1)  mode '{"narinfo":"404"}';                     client $root $tag $n "$S1" "" ;;
    c2)  produce $n >/dev/null; mode '{"narinfo":"serve","nar":"404"}'; client $root $tag $n "$S1" "" ;;
    c3)  produce $n >/dev/null; mode '{"narinfo":"serve","nar":"cut"}'; client $root $tag $n "$S1" "" ;;
    c4a) produce $n >/dev/null; mode '{"narinfo":"serve","nar":"cut-ar","range":"404"}'; client $root $tag $n "$S1" "" ;;
    c4b) produce $n >/dev/null; mode '{"narinfo":"serve","nar":"cut-ar","range":"206"}'; client $root $tag $n "$S1" "" ;;
    c4c) produce $n >/dev/null; mode '{"narinfo":"serve","nar":"cut-ar","range":"cut206"}'; client $root $tag $n "$S1" "" ;;
    c5)  mode '{"narinfo":"503"}';                     client $root $tag $n "$S1" "" ;;
    c5s) mode '{"narinfo":"503"}';                     client $root $tag $n "$S2" "" ;;
    c5n) mode '{"narinfo":"404"}';                     client $root $tag $n "$S2" "" ;;
    c5d) mode '{"narinfo":"delay:3:503"}';             client $root $tag $n "$S1" "" ;;
    c5p) mode '{"narinfo_seq":["delay:3:503","503"]}'; client $root $tag $n "$S1" "" ;;
    c5sd) mode '{"narinfo":"delay:3:503"}';            client $root $tag $n "$S2" "" ;;
    c6)  mode '{"narinfo":"delay:0.5:404"}';           client $root $tag-0.5 $n "$S1" ""
         n=${n}b; mode '{"narinfo":"delay:2:404"}';    client $root $tag-2 $n "$S1" "" ;;
    c6l) mode '{"narinfo":"delay:20:404"}';            client $root $tag $n "$S1" "" ;;
    c7)  mode '{"narinfo":"503"}';                     client $root $tag $n "$S1" "fallback = true" ;;
    c7d) # as c7, but through a nix-daemon (in the chroot, its own /nix) with fallback = true
         mode '{"narinfo":"503"}'
         chroot $root env -i PATH=/usr/bin:/bin HOME=$W/home/daemon-$tag-$n NIX_CONF_DIR=$W/etc \
           NIX_CONFIG="$NIXENV_BASE
substituters = $S1
fallback = true" nix-daemon > $OUT/$tag.daemon 2>&1 &
         local dp=$!; sleep 1
         CLIENT_ENV="NIX_REMOTE=daemon" client $root $tag $n "$S1" "fallback = true"
         echo "daemon still alive after the run: $(kill -0 $dp 2>/dev/null && echo yes || echo no)" >> $OUT/$tag.sum
         kill $dp 2>/dev/null; wait $dp 2>/dev/null ;;
    c9)  # connect that never completes: a listener with a full accept queue on $P3
         chroot $BW /usr/bin/python3 - $P3 > $OUT/$tag.listener 2>&1 <<'EOF' &
import socket, sys, time
p = int(sys.argv[1])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", p)); l.listen(0)
fill = []
for i in range(3):
    s = socket.socket(); s.setblocking(False)
    try: s.connect(("127.0.0.1", p))
    except BlockingIOError: pass
    fill.append(s)
print("listening, queue filled", flush=True)
time.sleep(1200)
EOF
         local lp=$!; sleep 1
         client $root $tag $n "http://127.0.0.1:$P3" "download-attempts = 1"
         kill $lp 2>/dev/null; wait $lp 2>/dev/null ;;
  esac
}

start_servers
for c in $CASES; do
  for rep in $(seq 1 $REPS); do
    { [ $c = c6l ] || [ $c = c9 ] || [ $c = c5sd ]; } && [ $rep -gt 1 ] && continue
    run_case $c $BW 2.8 $rep
    run_case $c $SID 2.34 $rep
  done
done
stop_servers
if [ "${UMOUNT:-0}" = 1 ]; then
  for R in $BW $SID; do umount -R $R/dev; umount $R/proc; done
fi
