#!/bin/bash
# Both orders of tools/ab_lib for a list of cases: each case runs OLD as library A and NEW as B,
# then NEW as A and OLD as B, and prints new/old from each order (the two should agree; where
# they do not, the difference is the slot's, not the build's: rerun with more repetitions).
#
#   tools/ab_both.sh AB_LIB OLD_SO NEW_SO REPS CASE...
#   CASE = op:shape:layout:dtype:threads:scrub[:old_settings[:new_settings]]
#
# OLD_SO and NEW_SO must be different files (two copies of one build to compare settings).
# Settings are ab_lib's SET_A / SET_B ("-" by default): an ISA level or NAME=VALUE pairs.
# AB_BITS, AB_THP, AB_OFFSET, AB_OUT_OFFSET pass through from the environment; with AB_BITS=1 the first
# order's bit comparison is printed too.
#   tools/ab_both.sh /tmp/ab_lib /tmp/old.so /tmp/new.so 21 inf:256x2048x7x7:cf:bf16:1:1
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
ab=$1 old=$2 new=$3 reps=$4
shift 4
for c in "$@"; do
  IFS=: read -r op shape layout dtype threads scrub set_old set_new <<< "$c"
  set_old=${set_old:--} set_new=${set_new:--}
  first=$("$ab" "$old" "$set_old" "$new" "$set_new" "$op" "$shape" "$layout" "$dtype" "$threads" "$reps" "$scrub" | tail -1)
  second=$("$ab" "$new" "$set_new" "$old" "$set_old" "$op" "$shape" "$layout" "$dtype" "$threads" "$reps" "$scrub" | tail -1)
  r1=$(grep -o 'B/A [0-9.]*' <<< "$first" | cut -d' ' -f2)
  r2=$(grep -o 'B/A [0-9.]*' <<< "$second" | cut -d' ' -f2)
  bits=$(grep -o 'bits.*' <<< "$first" || true)
  printf '%s  new/old %s (new as B), %s (new as A) %s\n' "$c" "$r1" "$(awk -v r="$r2" 'BEGIN { printf "%.3f", 1 / r }')" "$bits"
done
