#!/usr/bin/env bash
# Print the Debian archive URI this machine's apt already uses (the first deb822 entry whose suites include the
# running release). The project never writes a registry hostname down: every script that needs a mirror (the
# trixie source for compose v2, debootstrap for the base image) asks this helper at run time instead.
set -euo pipefail
sources=${DLT_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
suite=${1:-bookworm}
if [ ! -r "$sources" ]; then
  echo "apt_source: $sources not readable; cannot derive the Debian archive URI" >&2
  exit 3
fi
# deb822 stanzas are separated by blank lines; within a stanza pick URIs when Suites lists "$suite" exactly.
awk -v want="$suite" '
  BEGIN { RS=""; FS="\n" }
  {
    uri=""; ok=0
    for (i = 1; i <= NF; i++) {
      if ($i ~ /^URIs:/)   { split($i, a, /[ \t]+/); uri=a[2] }
      if ($i ~ /^Suites:/) { n=split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == want) ok=1 }
    }
    if (ok && uri != "") { print uri; found=1; exit }
  }
  END { if (!found) exit 1 }
' "$sources" || { echo "apt_source: no entry for suite '$suite' in $sources" >&2; exit 3; }
