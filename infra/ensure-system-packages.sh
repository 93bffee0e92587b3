#!/usr/bin/env bash
# WeasyPrint's system libraries (Pango, HarfBuzz and its subsetter), the DejaVu fonts the template
# uses, Chromium for the gateway's browser test (Playwright drives Debian's build; it downloads
# none), and Node.js for the AsyncAPI parser that checks schemas/asyncapi.yaml. Installed from Debian's packages when missing and running as root.
set -euo pipefail

missing=()
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
have_lib 'libpango-1.0.so' || missing+=(libpango-1.0-0 libpangoft2-1.0-0)
have_lib 'libharfbuzz-subset.so' || missing+=(libharfbuzz-subset0)
fc-list 2>/dev/null | grep -qi 'DejaVuSans' || missing+=(fonts-dejavu-core fontconfig)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)  # the AsyncAPI parser that checks the contract

[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "WeasyPrint needs: ${missing[*]} (install them with your package manager)" >&2
  exit 0
fi
echo "installing ${missing[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
